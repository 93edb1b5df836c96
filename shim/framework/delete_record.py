"""What the daemon answered when it deleted a container itself, kept for the `delete` command.

After every normal teardown containerd still runs `<binary> ... delete` in the bundle and
waits for it before it removes the container's snapshot, so that command is on every
container's path. By then the daemon has done all of the command's work (the OCI runtime's
container deleted, the rootfs unmounted, the exit recorded); when it has, it writes the
DeleteResponse it answered into the bundle, and the command prints that and exits without
importing the rest of the shim (shim/framework/main.py, the binary's script).

Without the file (the daemon died, or its Delete failed half-way) the command does the whole
cleanup (shim/framework/delete.py). containerd makes a new bundle directory for every
container and removes it after this command, so the file never outlives its container.
"""

from __future__ import annotations

import os

FILE_NAME = "deleted.pb"
_MAX = 4096  # a DeleteResponse is ~20 bytes: anything larger is not ours


def write(bundle: str, response: bytes) -> None:
    """Record `response` (a serialized DeleteResponse), atomically. Raises OSError."""
    path = os.path.join(bundle, FILE_NAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, response)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _bundle_of(words: list[str]) -> str | None:
    """-bundle from a Go-flag command line (`-bundle X`, `-bundle=X`, `--bundle X`), else the
    directory containerd runs the command in (the bundle); None for a -bundle without a value
    (the full command reports that)."""
    for i, word in enumerate(words):
        name, eq, value = word.lstrip("-").partition("=")
        if word.startswith("-") and name == "bundle":
            if eq:
                return value
            return words[i + 1] if i + 1 < len(words) else None
    return "."


def answer(words: list[str]) -> bool:
    """For a `delete` command line (words: the arguments), print the recorded DeleteResponse
    when there is one; whether it did (the command is then done)."""
    if not words or words[-1] != "delete":
        return False
    bundle = _bundle_of(words[:-1])
    if not bundle:
        return False
    try:
        fd = os.open(os.path.join(bundle, FILE_NAME), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        response = os.read(fd, _MAX + 1)
    except OSError:
        return False
    finally:
        os.close(fd)
    if not response or len(response) > _MAX:
        return False
    view = memoryview(response)
    while view:
        view = view[os.write(1, view):]
    return True
