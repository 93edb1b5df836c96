"""Seeing inside a live daemon: the debug socket every daemon serves and the `pyshim` command.

- trace.py: what happens in the daemon (requests, OCI runtime commands, events, exits), kept
  as the last commands per container and streamed to attached `pyshim trace` clients. The
  daemon's code reports to it unconditionally; with no client attached a report costs one
  attribute test.
- wire.py: the debug protocol, sans-IO (a JSON request line in; JSON lines out).
- server.py: the daemon's debug socket (root or the daemon's user only, 0600, never abstract).
- snapshot.py, stacks.py: what `ls`/`inspect` and `stacks` answer; imported on first use.
- cli.py: the `pyshim` console script (ls, inspect, trace, stacks, log-level).

Every daemon's socket is <DEBUG_DIR>/<name of its Task API socket>.sock, so the command finds
all daemons on the machine by listing one directory, whatever containerd they serve.
"""

from __future__ import annotations

import os

#: Where daemons put their debug sockets (a directory only root can enter).
DEBUG_DIR = "/run/pyshim"


def debug_socket_path(task_socket_path: str) -> str:
    """The debug socket of the daemon serving the Task API at task_socket_path."""
    name = os.path.basename(task_socket_path.removeprefix("unix://")) or "shim"
    return os.path.join(DEBUG_DIR, name + ".sock")
