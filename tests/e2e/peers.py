"""A peer with another uid, for the tests of who may talk to a daemon's sockets."""

from __future__ import annotations

import ctypes
import os
import socket

NOBODY = 65534


def exchange_as_nobody(path: str, payload: bytes, *, keep_fs_root: bool = True) -> str:
    """Connect to the unix socket at path from a child whose uid is nobody's, send payload and
    read until the other side closes: what was read (decoded), "closed" when nothing was, or
    "EACCES" when the connect itself was refused.

    keep_fs_root: the child's filesystem uid stays root, so that file modes let it reach the
    socket and only the daemon's own SO_PEERCRED check stands in its way."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(r)
            os.setresgid(NOBODY, NOBODY, 0)
            os.setresuid(NOBODY, NOBODY, 0)
            if keep_fs_root:
                libc.setfsuid(0)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(5)
            try:
                s.connect(path)
            except PermissionError:
                os.write(w, b"EACCES")
                os._exit(0)
            received = b""
            try:  # the daemon may close before the payload is even sent
                s.sendall(payload)
                while chunk := s.recv(65536):
                    received += chunk
            except (BrokenPipeError, ConnectionResetError):
                pass
            os.write(w, received[:4000] or b"closed")
            code = 0
        except BaseException as exc:
            os.write(w, repr(exc).encode())
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(child, 0)
    outcome = os.read(r, 4096).decode(errors="replace")
    os.close(r)
    assert os.waitstatus_to_exitcode(status) == 0, outcome
    return outcome
