"""The init process's exit, kept in the bundle so that it outlives the daemon's memory.

Why: containerd's own shim keeps an exit only in memory and in one /tasks/exit event. When
containerd is down at that moment, or the shim dies before containerd asked, the status is
lost and containerd later reports 137 ("killed") or nothing at all (containerd issue 6771).
pyshim writes the exit here first (before /tasks/exit is published), and `delete` -- the
command containerd runs when the daemon is gone -- answers with it instead of a made-up 137.

Format: one line `<pid> <exit status> <exited_at in ns since the epoch>`, written atomically
(temp file + rename). Plain text and no imports beyond os: `delete` reads it on every
container's teardown.
"""

from __future__ import annotations

import os

FILE_NAME = "init.exit"


def write(bundle: str, pid: int, exit_status: int, exited_at_ns: int) -> None:
    """Record init's exit in `bundle`. Raises OSError (the caller logs it: the exit is still
    published, only its durability is lost)."""
    path = os.path.join(bundle, FILE_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid} {exit_status} {exited_at_ns}\n")
    os.replace(tmp, path)


def read(bundle: str) -> tuple[int, int, int] | None:
    """(pid, exit status, exited_at ns) recorded in `bundle`, or None if there is none or it
    cannot be read."""
    try:
        with open(os.path.join(bundle, FILE_NAME)) as f:
            fields = f.read().split()
        pid, status, exited_at_ns = (int(x) for x in fields)
    except (OSError, ValueError):
        return None
    if pid < 0 or status < 0 or exited_at_ns <= 0:
        return None
    return pid, status, exited_at_ns
