"""Execs built the way containerd's Go client builds them, through containerd's gRPC Tasks API.

The Go client (`task.Exec` with `cio.WithTerminal`) sends the container's own process spec,
whose `terminal` is false, and asks for the TTY in `ExecProcessRequest.terminal` only. `ctr
task exec -t` sets both, so it cannot show a shim that passes the spec to runc as it came
(runc: "cannot use console socket if runc will not detach or allocate tty").

Each exec here: a FIFO for stdout, Exec (terminal in the request, not in the spec), Wait,
Start, read the FIFO to EOF, the Wait's status, DeleteProcess, as the Go client orders them.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import tempfile

import pytest

from test_lifecycle import PYSHIM, RUNC, pyshim_daemons

pytestmark = pytest.mark.usefixtures("oci_runtime")

PROCESS_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
SEQ_ARGS = ["seq", "-s", " ", "1000000"]
#: What a pty delivers of `seq -s " " 1000000`: one line, its newline made CRLF (onlcr).
SEQ_OUTPUT = (" ".join(str(n) for n in range(1, 1_000_001)) + "\r\n").encode()


class TasksClient:
    """containerd.services.tasks.v1.Tasks over grpclib, in one containerd namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        from grpclib.client import Channel

        from cri_client import MessageCodec

        self.channel = Channel(path=address, codec=MessageCodec())
        self.metadata = {"containerd-namespace": namespace}

    async def call(self, method: str, request, response_type, timeout: float = 60):
        from grpclib.const import Cardinality

        async with self.channel.request(f"/containerd.services.tasks.v1.Tasks/{method}", Cardinality.UNARY_UNARY,
                                        type(request), response_type, timeout=timeout,
                                        metadata=self.metadata) as stream:
            await stream.send_message(request, end=True)
            return await stream.recv_message()

    def close(self) -> None:
        self.channel.close()


def _read_to_eof(fd: int) -> bytes:
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


async def exec_with_tty_in_request_only(client: TasksClient, cid: str, exec_id: str, process: dict,
                                        fifo_dir: str) -> tuple[int, bytes]:
    """One exec as the Go client makes it; returns (exit status, stdout)."""
    from shim.api.containerd.services.tasks import v1 as tasks
    from shim.api.google.protobuf import Any, Empty

    stdout = os.path.join(fifo_dir, f"{exec_id}-stdout")
    os.mkfifo(stdout, 0o600)
    # Opened before the exec exists (without a writer an O_NONBLOCK open succeeds); read once
    # Start has returned, when the shim holds the write end.
    fd = os.open(stdout, os.O_RDONLY | os.O_NONBLOCK)
    try:
        spec = dict(process, args=list(SEQ_ARGS), terminal=False)
        await client.call("Exec", tasks.ExecProcessRequest(
            container_id=cid, exec_id=exec_id, stdout=stdout, terminal=True,
            spec=Any(type_url=PROCESS_SPEC_TYPE, value=json.dumps(spec).encode())), Empty)
        waiting = asyncio.ensure_future(client.call("Wait", tasks.WaitRequest(container_id=cid, exec_id=exec_id),
                                                    tasks.WaitResponse))
        try:
            await client.call("Start", tasks.StartRequest(container_id=cid, exec_id=exec_id), tasks.StartResponse)
            output = await asyncio.to_thread(_read_to_eof, fd)
            status = (await asyncio.wait_for(waiting, 60)).exit_status
        finally:
            waiting.cancel()
        deleted = await client.call("DeleteProcess", tasks.DeleteProcessRequest(container_id=cid, exec_id=exec_id),
                                    tasks.DeleteResponse)
        assert deleted.exit_status == status
        return status, output
    finally:
        os.close(fd)
        os.unlink(stdout)


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("runtime,count", [(PYSHIM, 100), (RUNC, 3)], ids=["pyshim", "runc-v2"])
def test_exec_tty_asked_in_the_request_only(e2e, runtime, count):
    if e2e.oci is not None and e2e.oci.id != "runc1.1":
        # The shim's leak check needs many execs; another runtime's part (the console socket,
        # exec --process) shows in a few.
        count = min(count, 10)
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(runtime), e2e.image, cid, "sleep", "600", check=True)
    process = json.loads((e2e.bundle_dir(cid) / "config.json").read_text())["process"]
    assert not process.get("terminal")
    daemon = None
    if runtime == PYSHIM:
        (daemon,) = [pid for pid in pyshim_daemons(e2e)
                     if os.readlink(f"/proc/{pid}/cwd") == str(e2e.bundle_dir(cid))]

    async def run_execs() -> None:
        client = TasksClient(e2e.address, e2e.namespace)
        try:
            with tempfile.TemporaryDirectory(prefix="pyshim-exec-tty-") as fifo_dir:
                # A first exec before counting: the daemon's lazily imported modules and
                # cached objects are in place after it.
                status, output = await exec_with_tty_in_request_only(client, cid, "warm", process, fifo_dir)
                assert (status, len(output)) == (0, len(SEQ_OUTPUT))
                before = (_fd_count(daemon), sorted(_children(daemon))) if daemon else None
                for i in range(count):
                    status, output = await exec_with_tty_in_request_only(client, cid, f"tty-{i}", process, fifo_dir)
                    assert status == 0, f"exec {i}: exit status {status}"
                    assert output == SEQ_OUTPUT, (
                        f"exec {i}: {len(output)} bytes, not {len(SEQ_OUTPUT)}; starts {output[:80]!r}")
                if daemon:
                    after = (_fd_count(daemon), sorted(_children(daemon)))
                    assert after == before, f"shim fds and children before {before}, after {count} execs {after}"
        finally:
            client.close()

    try:
        asyncio.run(run_execs())
    except AssertionError:
        print(e2e.containerd.log_tail(60))
        raise
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
