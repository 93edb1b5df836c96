"""A PrivateContainerd whose shims import more than the shim package: examples and test
handlers, for tests of code that runs inside the shim.

containerd's shims inherit containerd's environment, so the modules' directories go into
the PYTHONPATH containerd is started with (the session's containerd has whatever PYTHONPATH
pytest had, which does not name them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from conftest import installed_target
from containerd import REPO_ROOT, PrivateContainerd


@contextlib.contextmanager
def containerd_importing(version_id: str, image: Path, *dirs: Path | str,
                         **kwargs) -> Iterator[PrivateContainerd]:
    """A started PrivateContainerd of `version_id` (skipped or failed like the `containerd`
    fixture when it is not installed) whose shims import this checkout's shim package and
    the modules in `dirs`; the test image is its `image_archive`. kwargs go to
    PrivateContainerd. On exit it is closed, and anything left behind fails the test."""
    pythonpath = os.pathsep.join(str(d) for d in (REPO_ROOT, *dirs))
    env = {"PYTHONPATH": pythonpath, **kwargs.pop("containerd_env", {})}
    c = PrivateContainerd(installed_target(version_id), containerd_env=env, **kwargs)
    c.image_archive = image
    try:
        c.start()
        yield c
    finally:
        log_tail = c.log_tail(40)
        leftovers = c.close()
        assert not leftovers, f"left behind: {leftovers}\n{log_tail}"
