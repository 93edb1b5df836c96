"""Terminals: the console socket runc hands a pty master through, and resizing a pty.

With `terminal: true` runc creates the pseudo-terminal itself, makes the slave the container
process's stdio, connects to the unix socket named by `--console-socket` and sends one message:
the master's file name as payload and the master fd as SCM_RIGHTS (runc's utils.SendFile). The
shim copies between that master and containerd's FIFOs (shim.framework.stdio, terminal mode).

    async with ConsoleSocket() as console:          # listening, already accepting
        await runtime.create(..., console_socket=console.path)
        master = await console.receive_master()     # the fd is ours from here on
    # temp dir and socket removed

or, for a shim.framework.stdio.ProcessIO (a no-op unless it is in terminal mode):

    async with attach_console(io) as console_socket:   # a path, or None
        await runtime.create(..., console_socket=console_socket)
    # io has the master now

Accepting starts when the socket is opened, before runc is spawned: runc sends the master
before `runc create`/`runc exec` returns. (The connection would wait in the listen backlog
anyway, but a receiver that is already there keeps the order obvious.)
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import socket
import struct
import tempfile
import termios
from collections.abc import AsyncIterator

from shim.framework.ttrpc.status import Code, TtrpcError

#: runc's message is the master's name (a path); it never needs more than this.
MAX_PAYLOAD = 4096
#: How long to wait for runc's message once `runc create`/`exec` has returned (it was sent
#: before runc exited, so this only bounds a runtime that never sends one).
RECEIVE_TIMEOUT = 10.0


class ConsoleError(TtrpcError):
    """The pty master could not be received; the text says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(Code.UNKNOWN, f"failed to retrieve console master: {reason}")


class ConsoleSocket:
    """A temporary listening socket (`pty.sock` in a fresh temp dir) for one runc call."""

    def __init__(self, *, parent: str | None = None) -> None:
        self._parent = parent if parent is not None else (os.environ.get("XDG_RUNTIME_DIR") or None)
        self._dir = ""
        self.path = ""
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._taken = False

    async def __aenter__(self) -> ConsoleSocket:
        self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def open(self) -> None:
        try:
            self._dir = tempfile.mkdtemp(prefix="pyshim-pty", dir=self._parent)
            self.path = os.path.join(self._dir, "pty.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self._listener = listener
            listener.bind(self.path)
            listener.listen(1)
            listener.setblocking(False)
        except OSError as exc:
            self._remove()
            raise ConsoleError(f"creating console socket in {self._dir or self._parent or tempfile.gettempdir()}: {exc}") from None
        self._accepting = asyncio.get_running_loop().create_task(self._accept_and_receive())

    async def receive_master(self, timeout: float = RECEIVE_TIMEOUT) -> int:
        """The pty master fd runc sent (the caller owns it). ConsoleError if none came."""
        if self._accepting is None:
            raise ConsoleError("console socket is not open")
        try:
            async with asyncio.timeout(timeout):
                fd = await asyncio.shield(self._accepting)
        except TimeoutError:
            raise ConsoleError(f"no pty master received on {self.path} within {timeout:g}s") from None
        self._taken = True
        return fd

    async def close(self) -> None:
        """Stop accepting, close any fd received but not taken, remove the temp dir. Idempotent."""
        accepting, self._accepting = self._accepting, None
        if accepting is not None:
            if accepting.done():
                # A master nobody took (the runtime failed after sending it) is closed here.
                if not accepting.cancelled() and accepting.exception() is None and not self._taken:
                    os.close(accepting.result())
            else:
                accepting.cancel()
                with contextlib.suppress(BaseException):
                    await accepting
        self._remove()

    def _remove(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = ""

    async def _accept_and_receive(self) -> int:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        try:
            conn, _ = await loop.sock_accept(self._listener)
        except OSError as exc:
            raise ConsoleError(f"accepting on {self.path}: {exc}") from None
        with conn:
            # Only one connection is ever expected: stop listening (the path goes with the dir).
            self._remove()
            return await receive_fd(conn)


@contextlib.asynccontextmanager
async def attach_console(io) -> AsyncIterator[str | None]:
    """Around a runc call: yields the console socket's path when `io` is a terminal (else
    None), and when the block succeeds hands the received master to `io.attach_console`."""
    if not io.terminal:
        yield None
        return
    async with ConsoleSocket() as console:
        yield console.path
        io.attach_console(await console.receive_master())


async def receive_fd(conn: socket.socket) -> int:
    """Read one message from `conn` (non-blocking) and return the one fd it carries."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            payload, fds, flags, _ = socket.recv_fds(conn, MAX_PAYLOAD, 1, socket.MSG_CMSG_CLOEXEC)
            break
        except (BlockingIOError, InterruptedError):
            ready = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
            try:
                await ready
            finally:
                loop.remove_reader(conn.fileno())
        except OSError as exc:
            raise ConsoleError(f"receiving the pty master: {exc}") from None
    if flags & socket.MSG_CTRUNC or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        if not payload and not fds:
            raise ConsoleError("the runtime closed the console socket without sending a pty master")
        raise ConsoleError(f"expected one fd with the console message, got {len(fds)} (truncated: {bool(flags & socket.MSG_CTRUNC)})")
    return fds[0]


def resize(fd: int, *, width: int, height: int) -> None:
    """Set the window size of the terminal `fd` (a pty master or slave): TIOCSWINSZ."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))


def window_size(fd: int) -> tuple[int, int]:
    """(width, height) of the terminal `fd`: TIOCGWINSZ."""
    rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return cols, rows
