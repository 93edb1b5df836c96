"""Log lines name the container they are about, not the group daemon's first container."""

from __future__ import annotations

import asyncio
import logging

from shim.framework.daemon import FifoLogHandler
from shim.framework.logcontext import TASK_ID
from shim.framework.service import _for_its_task


def test_lines_name_the_task_being_served(tmp_path):
    path = tmp_path / "log"
    path.write_text("")
    handler = FifoLogHandler(str(path), "first", "ns")
    logger = logging.getLogger("test-logcontext")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    class Request:
        def __init__(self, id: str) -> None:
            self.id = id

    async def serve(request, ctx):
        logger.info("serving")
        return request.id

    async def main() -> None:
        logger.info("daemon")  # no request: the id containerd started the daemon with
        wrapped = _for_its_task(serve)
        assert await asyncio.gather(asyncio.create_task(wrapped(Request("second"), None)),
                                    asyncio.create_task(wrapped(Request("third"), None))) == ["second", "third"]

    try:
        asyncio.run(main())
    finally:
        logger.removeHandler(handler)
    assert TASK_ID.get() == ""
    ids = [line.rsplit(" id=", 1)[1] for line in path.read_text().splitlines()]
    assert ids == ["first", "second", "third"]
    assert 'runtime=io.containerd.pyshim.v2' in path.read_text()


def test_lines_have_nanosecond_times_like_the_go_shims(tmp_path):
    """containerd's log orders a shim's lines against its own by these times."""
    import re

    path = tmp_path / "log"
    path.write_text("")
    handler = FifoLogHandler(str(path), "c1", "ns")
    handler.emit(logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None))
    assert re.match(r'time="\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z" level=info msg="hello" ', path.read_text())
