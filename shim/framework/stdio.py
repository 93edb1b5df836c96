"""A process's stdio: pipes for runc on one side, containerd's FIFOs (or a file) on the other.

containerd hands the shim three strings per process (stdin, stdout, stderr) and a terminal
flag. `plan_stdio` reads them (pure, no I/O); `open_process_io` opens everything and returns a
`ProcessIO` that owns every fd and the copy loops. How the shim drives it:

    io = await open_process_io(stdin, stdout, stderr, uid=io_uid, gid=io_gid)
    try:
        spawn `runc create` / `runc exec` with io.child_fds() as its fds 0, 1, 2
        io.start_copying()
        io.close_child_ends()   # else EOF never arrives: we would hold a writer ourselves
    except BaseException:
        io.close(); raise
    ...
    CloseIO RPC               -> io.close_stdin()
    process exited            -> await io.wait_output_flushed(timeout), then publish TaskExit
    Delete                    -> io.close()

Rules kept here (containerd's runc shim, `cmd/containerd-shim-runc-v2/process/io.go`):

* Output FIFO: opened for writing first, which succeeds only once the client has its reading
  end open (ctr and CRI open theirs before Create). The Go shim blocks in open(2); we poll
  O_WRONLY|O_NONBLOCK (ENXIO = no reader yet) so the event loop never blocks, bounded by
  `open_timeout`. Then the shim opens the FIFO for reading too and keeps that fd unused: while
  we hold a reader our writes never fail with EPIPE, so a client may detach and re-attach
  (containerd restarting re-opens CRI's FIFOs and the log continues). The price, same as the
  Go shim: with no client reading, the FIFO and the pipe fill up and the container blocks on
  write until someone reads.
* Stdin FIFO: opened O_RDONLY|O_NONBLOCK (never waits), then the shim opens it O_WRONLY
  itself and holds that writer until CloseIO. Without it a non-blocking FIFO reader sees EOF
  as soon as no writer is open: before the client opened its end, or between two attaches.
  On EOF (CloseIO and client writer closed) the pipe is closed: the container reads EOF.
* A write that fails (EPIPE, ENOSPC, EIO, ...) stops forwarding that stream, quietly apart from
  one warning; the pipe is still drained to nowhere so the container never blocks on it.
  SIGPIPE must be ignored in the process (Python does at startup; the daemon does too).
* Output is flushed when each stdout/stderr pipe reached EOF and all its bytes were written
  into the FIFO/file; `wait_output_flushed` is bounded because a background process inside
  the container may hold the pipe open forever. Copying continues until `close()`.

Copying is not done by coroutines but by readiness callbacks (`_Pump`): each chunk is one
splice(2) between two pipes (kernel to kernel, no copy through Python), and the callback stays
registered while data flows, so a busy stream costs no future and no epoll_ctl per chunk.
`binary:///path?k=v` starts a logger process instead of pumps (see `_Logger`).

Terminal mode (`terminal=True`): runc gets /dev/null as its stdio and sends the pty master
over the console socket (shim.framework.console); the shim hands it over with `attach_console(master)`.
The stdout FIFO (or file) and the stdin FIFO are opened up front exactly as above, stderr is
unused (the pty merges it). Pumps: master -> stdout, stdin FIFO -> master. The master reads
EIO once the last slave fd is closed (the process and whatever inherited the tty exited). That
EIO can come early: the kernel moves the pty's data to the reader through a work queue, at most
one line discipline buffer (4 KiB) at a time, and a read between two of those moves finds the
buffer empty and the slave closed (seen on 6.x kernels: up to ~10 KB of a fast writer's last
output lost). So EIO is the output's EOF only once reads kept failing for PTY_EOF_GRACE
seconds with nothing more arriving (retried with backoff, any data starts over); then the
master is closed (stdin pump stopped too), so a terminal
process's `wait_output_flushed` means the same as with pipes. EOF on stdin (after CloseIO)
hangs the console up, as in the Go shim. `resize` sets its window size.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import signal
import stat
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("shim.framework.stdio")

#: How long Create/Exec wait for the client to open its end of an output FIFO (the Go shim's
#: copy context has the same 30 s).
OPEN_TIMEOUT = 30.0

#: splice(2) between pipes; flipped off by hack/bench-stdio to measure the read/write path.
USE_SPLICE = hasattr(os, "splice")

#: Pipe buffer size for the shim's own pipes (None = kernel default, 64 KiB). See
#: hack/bench-stdio for what a bigger one buys.
PIPE_SIZE: int | None = None

_CHUNK = 1 << 20  # upper bound per splice/read; a pipe hands out at most what it holds
_BURST = 16  # chunks per readiness callback before yielding to the rest of the loop
#: How long reads of a pty master must keep failing with EIO before that is its EOF (see the
#: module docstring), and the first retry's delay (doubled each time).
PTY_EOF_GRACE = 0.05
_PTY_RETRY_FIRST = 0.001
_OPEN_POLL_MAX = 0.05  # longest pause between two attempts to open an output FIFO

#: How long Create/Exec wait for a binary:// logger to signal that it is ready.
LOGGER_READY_TIMEOUT = 10.0
#: How long a logger may take to exit after SIGTERM before it is SIGKILLed (the Go shim's 12 s).
LOGGER_STOP_TIMEOUT = 12.0
#: After a logger said it is ready: how long we look whether it is exiting instead.
LOGGER_EXIT_GRACE = 0.025


class StdioError(Exception):
    """The stdio of a process cannot be set up; the message names the stream and the path."""

    def __init__(self, message: str, *, stream: str = "", path: str = "") -> None:
        super().__init__(message)
        self.stream = stream
        self.path = path


@dataclass(frozen=True, slots=True)
class StdioPlan:
    """What the three strings mean. Paths are '' for /dev/null."""

    stdin: str
    stdout: str
    stderr: str
    #: file:// target to create (directory 0755, file 0644) before opening it.
    create_file: str = ""
    #: Output comes from a pty master (attach_console), not from pipes; stderr is unused.
    terminal: bool = False
    #: binary:// logger command line; stdout and stderr then go to it, stdin is /dev/null.
    logger: tuple[str, ...] = ()


def plan_stdio(stdin: str, stdout: str, stderr: str, *, terminal: bool = False) -> StdioPlan:
    """Interpret containerd's stdio strings (no I/O).

    The scheme comes from stdout (as in the Go shim), or from stderr when stdout is empty.
    Plain paths are FIFOs or files created by the client; `file:///p` sends stdout and stderr
    (those that are not empty) to the file p.
    """
    if terminal:
        # The pty is the container's stdout and stderr at once; containerd sends stderr ''.
        plan = plan_stdio(stdin, stdout, "")
        if plan.logger:
            # The logger reads the pty's output on its fd 3; stdin still comes from the FIFO.
            return StdioPlan(stdin, "", "", terminal=True, logger=plan.logger)
        return StdioPlan(plan.stdin, plan.stdout, "", plan.create_file, terminal=True)
    uri = stdout or stderr
    scheme = ""
    if uri:
        try:
            scheme = urlsplit(uri).scheme
        except ValueError as exc:
            raise StdioError(f"cannot parse stdio uri {uri!r}: {exc}", path=uri) from None
    if scheme == "":
        return StdioPlan(stdin, stdout, stderr)
    if scheme == "file":
        path = unquote(urlsplit(uri).path)
        if not path.startswith("/"):
            raise StdioError(f"file stdio needs an absolute path: {uri!r}", path=uri)
        return StdioPlan(stdin, path if stdout else "", path if stderr else "", create_file=path)
    if scheme == "binary":
        return StdioPlan("", "", "", logger=_logger_argv(uri))
    raise StdioError(f"unknown STDIO scheme {scheme}: {uri!r}", stream="stdout", path=uri)


async def open_process_io(
    stdin: str,
    stdout: str,
    stderr: str,
    *,
    terminal: bool = False,
    uid: int = 0,
    gid: int = 0,
    open_timeout: float = OPEN_TIMEOUT,
    container_id: str = "",
    namespace: str = "",
    reaper=None,
) -> ProcessIO:
    """Create the pipes and open the client's FIFOs/files for one process.

    `uid`/`gid` own the container's ends of the pipes (runc's io_uid/io_gid), so a container
    user can reopen /proc/self/fd/1. Waits (without blocking the loop) at most `open_timeout`
    seconds for the client to open its output FIFOs. Raises `StdioError` naming the path that
    failed. With `terminal`, copying starts
    once the pty master is handed over (`attach_console`). Nothing is left open on failure or
    cancellation.

    binary:// needs `reaper` (a started shim.framework.reaper.Reaper: the logger's exit must go to a
    watcher, never look like a container process's) and gets `container_id` and `namespace`
    in its environment; it returns once the logger said it is ready.
    """
    plan = plan_stdio(stdin, stdout, stderr, terminal=terminal)
    pio = ProcessIO(asyncio.get_running_loop())
    try:
        if plan.logger:
            if reaper is None:
                raise StdioError(f"binary logger {plan.logger[0]}: no reaper to run it", stream="stdout")
            pio._logger = _Logger(plan.logger, reaper)
            if plan.terminal:
                await pio._open_terminal_logger(plan, container_id, namespace)
            else:
                await pio._open_logger(uid, gid, container_id, namespace)
        else:
            await pio._open(plan, uid, gid, open_timeout)
    except BaseException as exc:
        pio.close()
        if not isinstance(exc, asyncio.CancelledError):
            await pio.wait_closed()  # a logger that failed us is gone before Create fails
        raise
    return pio


class ProcessIO:
    """Every fd of one process's stdio and the loops copying between them.

    Built by `open_process_io`. Not thread-safe: use it from the loop that built it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._child: list[int] = [-1, -1, -1]  # container's ends of the pipes, or /dev/null
        self._devnull = -1
        self._stdin_writer = -1  # held until CloseIO, see module docstring
        self._pumps: list[_Pump] = []
        self._output: list[_Pump] = []
        self._logger: _Logger | None = None
        self._started = False
        self._closed = False
        # terminal mode: opened in _open, handed to pumps by attach_console
        self._terminal = False
        self._master = -1  # kept for resize until the output reached EOF
        self._console_out: _Target | None = None
        self._console_in = -1
        self._console_in_path = ""

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("copying" if self._started else "open")
        return f"<ProcessIO {state} pumps={self._pumps!r}>"

    # -- for the runtime ------------------------------------------------------------------
    def child_fds(self) -> tuple[int, int, int]:
        """Fds to dup2 onto runc's 0, 1, 2 (/dev/null for empty strings). Blocking fds."""
        if self._closed or -1 in self._child:
            raise RuntimeError("ProcessIO: child fds already closed")
        return self._child[0], self._child[1], self._child[2]

    def start_copying(self) -> None:
        """Start the copy loops; call once runc has been spawned. Idempotent."""
        if self._closed:
            raise RuntimeError("ProcessIO: closed")
        if self._started:
            return
        self._started = True
        for pump in self._pumps:
            pump.start()

    def close_child_ends(self) -> None:
        """Close the shim's copies of the container's fds (right after spawning runc). Idempotent."""
        for i, fd in enumerate(self._child):
            if fd != -1 and fd != self._devnull:
                _close(fd)
            self._child[i] = -1
        if self._devnull != -1:
            _close(self._devnull)
            self._devnull = -1

    @property
    def terminal(self) -> bool:
        return self._terminal

    def attach_console(self, master: int) -> None:
        """Terminal mode: take ownership of the pty master runc sent and copy through it
        (master -> stdout, stdin FIFO -> master); copying starts with `start_copying`."""
        if self._closed or not self._terminal or self._master != -1:
            _close(master)
            raise RuntimeError("ProcessIO: not expecting a console")
        self._master = master
        os.set_blocking(master, False)
        # Each pump owns a dup: asyncio keys readiness callbacks by fd, and both use the master.
        pump = _Pump(self._loop, "stdout", os.dup(master))
        pump.source = "pty"
        out, self._console_out = self._console_out, None
        if out is not None:
            pump.connect(os.dup(out.fd), out.pollable, splice=False)  # a tty cannot be spliced from
            pump.target = out.description
            if out.hold != -1:
                pump.hold = os.dup(out.hold)
            out.close()
        else:
            pump.drain_only()  # nobody reads, but the container must never block on a write
            pump.target = "/dev/null"
        pump.on_finish = self._console_output_done
        self._pumps.append(pump)
        self._output.append(pump)
        if self._console_in != -1:
            pump = _Pump(self._loop, "stdin", self._console_in)
            pump.source, pump.target = f"fifo {self._console_in_path}", "pty"
            self._console_in = -1
            pump.connect(os.dup(master), pollable=True, splice=False)
            pump.on_finish = self._console_input_done
            self._pumps.append(pump)
        if self._started:
            for pump in self._pumps:
                pump.start()

    def resize(self, *, width: int, height: int) -> bool:
        """ResizePty: set the pty's window size. False when there is no (longer a) console."""
        if self._master == -1:
            return False
        from shim.framework.console import resize

        resize(self._master, width=width, height=height)
        return True

    def _console_input_done(self, eof: bool) -> None:
        # stdin reached EOF (CloseIO, then the client closed its end: CRI does this when a
        # `kubectl exec -it` session ends). Like the Go shim, hang up the console: every
        # master fd closed, so the process on the slave gets SIGHUP instead of living on
        # with nobody to talk to. Output not yet read from the pty is dropped, as there.
        if not eof or self._master == -1:
            return
        log.debug("stdin reached EOF: closing the console")
        for pump in self._output:
            pump.stop()
        _close(self._master)
        self._master = -1

    def _console_output_done(self, flushed: bool) -> None:
        # Output EOF: every slave fd is closed, nothing can read what stdin would still
        # forward. Close the master now rather than at Delete (synchronously, so that
        # whoever sees the output flushed also sees the console gone).
        if not flushed:
            return
        for pump in self._pumps:
            if pump.name == "stdin":
                pump.stop()
        if self._master != -1:
            _close(self._master)
            self._master = -1

    # -- for the Task API -----------------------------------------------------------------
    def close_stdin(self) -> None:
        """CloseIO: drop the shim's own stdin writer. Once the client's writer is closed
        too, the container reads EOF. Idempotent."""
        if self._stdin_writer != -1:
            _close(self._stdin_writer)
            self._stdin_writer = -1

    async def wait_output_flushed(self, timeout: float) -> bool:
        """Wait until stdout and stderr reached EOF and every byte was written out.

        True when they did (also for a stream whose target failed and was drained), False
        after `timeout` seconds (a background process still holds the pipe, or nobody reads
        the FIFO) or when the IO was closed first. Copying goes on either way until `close()`.
        """
        waits = [p.done for p in self._output]
        if not waits:
            return True
        if not all(w.done() for w in waits):
            await asyncio.wait(waits, timeout=max(timeout, 0.0))
        return all(w.done() and w.result() for w in waits)

    def close(self) -> None:
        """Stop every copy loop and close every fd this object owns; SIGTERM a logger (its
        stop finishes in the background, see `wait_closed`). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.stop()
        self.close_child_ends()
        self.close_stdin()
        if self._master != -1:
            _close(self._master)
            self._master = -1
        if self._console_out is not None:
            self._console_out.close()
            self._console_out = None
        if self._console_in != -1:
            _close(self._console_in)
            self._console_in = -1
        if self._logger is not None:
            self._logger.stop()

    async def wait_closed(self) -> None:
        """After `close`: wait until a logger has exited and was reaped (at most
        LOGGER_STOP_TIMEOUT, then it is SIGKILLed). Returns at once without a logger."""
        if self._logger is not None:
            await self._logger.stopped()

    # -- for the debug socket (pyshim inspect) ---------------------------------------------
    def describe(self) -> list[dict]:
        """One dict per copy loop, JSON types only: `stream`, `source`, `target`, `mode`
        (splice, readwrite, drain), `bytes` written to the target, `dropped_bytes`,
        `queued_bytes` (waiting in the source, None when it cannot tell), `state` ("not
        started", "copying", "waiting for data", "blocked on writer": the target takes
        nothing, its reader is not reading; "waiting for the pty's last output", "done",
        "stopped"), `blocked_since` (time.time() when it began waiting for its target, None
        when not blocked) and `blocked_for_s`. A terminal process's pumps before the console
        arrived are "waiting for the console"; a binary:// logger is one more entry with its
        `pid` and `argv`. No side effects; one ioctl per pump."""
        now = time.time()
        described = [pump.describe(now) for pump in self._pumps]
        if self._console_out is not None:
            described.append(_unattached_console("stdout", "pty", self._console_out.description))
        if self._console_in != -1:
            described.append(_unattached_console("stdin", f"fifo {self._console_in_path}", "pty"))
        if self._logger is not None:
            described.append(self._logger.describe())
        return described

    def __enter__(self) -> ProcessIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup ----------------------------------------------------------------------------
    async def _open(self, plan: StdioPlan, uid: int, gid: int, open_timeout: float) -> None:
        deadline = self._loop.time() + open_timeout
        if plan.create_file:
            _create_log_file(plan.create_file)
        if plan.terminal:
            await self._open_terminal(plan, deadline)
            return
        targets: dict[str, _Target] = {}
        try:
            for index, stream, path in ((1, "stdout", plan.stdout), (2, "stderr", plan.stderr)):
                if not path:
                    self._child[index] = self._null()
                    continue
                pump = _Pump(self._loop, stream, self._pipe(index, uid, gid, stream))
                pump.source = "container pipe"
                self._pumps.append(pump)
                self._output.append(pump)
                target = targets.get(path)
                if target is None:
                    target = targets[path] = await _open_output(stream, path, deadline, self._loop)
                pump.target = target.description
                # Each pump gets its own dups: asyncio keys readiness callbacks by fd, and
                # stdout and stderr may share one FIFO.
                pump.connect(os.dup(target.fd), target.pollable)
                if target.hold != -1:
                    pump.hold = os.dup(target.hold)
        finally:
            for target in targets.values():
                target.close()
        if plan.stdin:
            pump = _Pump(self._loop, "stdin", -1)
            pump.source, pump.target = f"fifo {plan.stdin}", "container pipe"
            self._pumps.append(pump)
            pump.connect(self._pipe(0, uid, gid, "stdin"), pollable=True)
            pump.src = _open_stdin_fifo(plan.stdin)
            try:
                self._stdin_writer = os.open(plan.stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise _open_error("stdin", plan.stdin, exc) from exc
        else:
            self._child[0] = self._null()

    async def _open_logger(self, uid: int, gid: int, container_id: str, namespace: str) -> None:
        """binary://: the container writes into two pipes whose read ends are the logger's
        fds 3 and 4; it starts only once the logger signalled readiness on fd 5."""
        assert self._logger is not None
        self._child[0] = self._null()
        out = self._pipe(1, uid, gid, "stdout")
        try:
            err = self._pipe(2, uid, gid, "stderr")
        except BaseException:
            _close(out)
            raise
        for fd in (out, err):
            os.set_blocking(fd, True)  # the logger may well do blocking reads
        await self._logger.start(out, err, container_id, namespace, self._child[1])

    async def _open_terminal_logger(self, plan: StdioPlan, container_id: str, namespace: str) -> None:
        """binary:// with a terminal (as the Go shim does it): the pty's output goes into a
        pipe read by the logger as fd 3; its fd 4 only ever sees EOF (the pty merges stderr)."""
        assert self._logger is not None
        await self._open_terminal(plan, deadline=0.0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        _close(err_w)
        os.set_blocking(out_w, False)
        self._console_out = _Target(out_w, -1, pollable=True, description=self._logger.name)
        await self._logger.start(out_r, err_r, container_id, namespace, out_w)

    async def _open_terminal(self, plan: StdioPlan, deadline: float) -> None:
        self._terminal = True
        self._child = [self._null()] * 3  # runc's own stdio; the container gets the pty slave
        if plan.stdout:
            self._console_out = await _open_output("stdout", plan.stdout, deadline, self._loop)
        if plan.stdin:
            self._console_in = _open_stdin_fifo(plan.stdin)
            self._console_in_path = plan.stdin
            try:
                self._stdin_writer = os.open(plan.stdin, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                raise _open_error("stdin", plan.stdin, exc) from exc

    def _null(self) -> int:
        if self._devnull == -1:
            self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        return self._devnull

    def _pipe(self, index: int, uid: int, gid: int, stream: str) -> int:
        """A pipe whose child end goes to fd `index` of the container; returns our end."""
        r, w = os.pipe()  # both O_CLOEXEC
        child, ours = (r, w) if index == 0 else (w, r)
        self._child[index] = child
        try:
            if PIPE_SIZE:
                fcntl.fcntl(ours, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            st = os.fstat(child)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.fchown(child, uid, gid)
            os.set_blocking(ours, False)  # our end only: the container keeps blocking I/O
        except OSError as exc:
            _close(ours)
            raise StdioError(f"{stream}: preparing pipe for uid {uid} gid {gid}: {exc}", stream=stream) from exc
        return ours


def _unattached_console(stream: str, source: str, target: str) -> dict:
    """A terminal process's stream whose pump does not exist yet: runc has not sent the
    pty master (a container stuck here never got as far as its console)."""
    return {"stream": stream, "source": source, "target": target, "mode": None, "bytes": 0, "dropped_bytes": 0,
            "queued_bytes": None, "state": "waiting for the console", "blocked_since": None, "blocked_for_s": None}


def _logger_argv(uri: str) -> tuple[str, ...]:
    """binary:///path?k=v&k2=v2 -> (path, k, v, k2, v2): each key then its first value, as
    the Go shim builds it (its order is Go map order, i.e. none; we keep the URI's)."""
    parts = urlsplit(uri)
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise StdioError(f"binary logger needs an absolute path: {uri!r}", stream="stdout", path=uri)
    argv = [path]
    for key, values in parse_qs(parts.query, keep_blank_values=True).items():
        argv += [key, values[0]]
    return tuple(argv)


class _Logger:
    """A binary:// logger process: started through the shim's Reaper (its exit goes to our
    watcher only), ready when it closes fd 5 or writes to it, stopped with SIGTERM and, after
    LOGGER_STOP_TIMEOUT, SIGKILL."""

    def __init__(self, argv: tuple[str, ...], reaper) -> None:
        self.argv = argv
        self.reaper = reaper
        self.pid = 0
        self.exited: asyncio.Future | None = None
        self._stopping: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return f"binary logger {self.argv[0]}"

    def describe(self) -> dict:
        """The logger as an entry of ProcessIO.describe: it reads the container's pipes
        itself, so there are no byte counts, only whether it runs."""
        exited = self.exited
        if exited is not None and exited.done() and not exited.cancelled() and exited.exception() is None:
            state = f"exited with status {exited.result().status}"
        elif self._stopping is not None:
            state = "stopping"
        elif self.pid:
            state = "running"
        else:
            state = "not started"
        return {"stream": "logger", "source": "its fd 3 (stdout) and fd 4 (stderr)", "target": self.name,
                "mode": None, "bytes": None, "dropped_bytes": None, "queued_bytes": None, "state": state,
                "blocked_since": None, "blocked_for_s": None, "pid": self.pid or None, "argv": list(self.argv)}

    async def start(self, out: int, err: int, container_id: str, namespace: str, probe: int) -> None:
        """Spawn it with fds 3, 4 and 5 (`out` and `err` are closed here), wait until it is
        ready. `probe` is the container's stdout write end: once the logger is gone it reports
        POLLERR (no reader left)."""
        loop = asyncio.get_running_loop()
        ready_r = ready_w = -1
        try:
            ready_r, ready_w = os.pipe()
            env = {"CONTAINER_ID": container_id, "CONTAINER_NAMESPACE": namespace}
            try:
                self.pid = self.reaper.spawn(list(self.argv), extra_fds={3: out, 4: err, 5: ready_w}, env=env)
            except OSError as exc:
                raise StdioError(f"{self.name}: cannot start it: {exc.strerror or exc}", stream="stdout",
                                 path=self.argv[0]) from exc
            self.exited = self.reaper.watch(self.pid)
            # The read ends stay only in the logger: if it dies the container gets EPIPE
            # instead of blocking on a full pipe, and a logger that exited shows (below).
            for fd in (out, err, ready_w):
                _close(fd)
            out = err = ready_w = -1
            ready = loop.create_future()

            def on_ready() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(ready_r, on_ready)
            try:
                await asyncio.wait((ready, self.exited), timeout=LOGGER_READY_TIMEOUT,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                loop.remove_reader(ready_r)
            if not ready.done() and not self.exited.done():
                raise StdioError(f"{self.name} did not signal ready (close or write fd 5) within "
                                 f"{LOGGER_READY_TIMEOUT:g}s", stream="stdout", path=self.argv[0])
            # A logger that exits also closes fd 5, which looks like readiness: give its exit
            # a moment to show (the kernel releases an exiting process's files in no useful
            # order), longer when its stdout reader is already gone.
            if not self.exited.done():
                await asyncio.wait((self.exited,), timeout=LOGGER_EXIT_GRACE)
            if not self.exited.done() and _no_reader(probe):
                await asyncio.wait((self.exited,), timeout=1.0)
                if not self.exited.done():
                    log.warning("%s closed fd 3 (container stdout): the container's writes to "
                                "stdout will fail", self.name)
            if self.exited.done():
                raise StdioError(f"{self.name} exited with status {self.exited.result().status} before "
                                 "it was ready", stream="stdout", path=self.argv[0])
        except BaseException:
            self.stop()
            raise
        finally:
            for fd in (out, err, ready_r, ready_w):
                if fd != -1:
                    _close(fd)

    def stop(self) -> None:
        """SIGTERM now, SIGKILL after LOGGER_STOP_TIMEOUT; runs in the background. Idempotent."""
        if self._stopping is not None or self.exited is None:
            return
        self._stopping = asyncio.get_running_loop().create_task(self._stop())
        self._stopping.add_done_callback(self._stop_done)

    async def stopped(self) -> None:
        if self._stopping is not None:
            await asyncio.shield(self._stopping)

    async def _stop(self) -> None:
        assert self.exited is not None
        if self.exited.done():
            return
        _signal(self.pid, signal.SIGTERM)
        done, _ = await asyncio.wait((self.exited,), timeout=LOGGER_STOP_TIMEOUT)
        if not done:
            log.warning("%s (pid %d) still running %gs after SIGTERM; killing it", self.name, self.pid,
                        LOGGER_STOP_TIMEOUT)
            _signal(self.pid, signal.SIGKILL)
            await self.exited

    def _stop_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: stopping it failed", self.name, exc_info=task.exception())


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)  # not reaped before our watcher saw the exit, so the pid is still ours
    except ProcessLookupError:
        pass


def _no_reader(write_end: int) -> bool:
    poller = select.poll()
    poller.register(write_end, select.POLLOUT)
    return any(ev & select.POLLERR for _, ev in poller.poll(0))


@dataclass(slots=True)
class _Target:
    fd: int
    hold: int  # our own reader of an output FIFO, -1 for files
    pollable: bool
    description: str = ""  # "fifo PATH", "file PATH", ... for `pyshim inspect`

    def close(self) -> None:
        _close(self.fd)
        if self.hold != -1:
            _close(self.hold)


async def _open_output(stream: str, path: str, deadline: float, loop: asyncio.AbstractEventLoop) -> _Target:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _open_error(stream, path, exc) from exc
    if not stat.S_ISFIFO(st.st_mode):
        # Regular file (or a device): appended to, writes never wait on a reader.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise _open_error(stream, path, exc) from exc
        os.set_blocking(fd, True)
        kind = "file" if stat.S_ISREG(st.st_mode) else "device"
        return _Target(fd, -1, pollable=False, description=f"{kind} {path}")
    pause = 0.001
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: nobody has the FIFO open for reading yet
                raise _open_error(stream, path, exc) from exc
        now = loop.time()
        if now >= deadline:
            raise StdioError(f"{stream}: no client opened FIFO {path} for reading in time", stream=stream, path=path)
        await asyncio.sleep(min(pause, deadline - now))
        pause = min(pause * 2, _OPEN_POLL_MAX)
    try:
        hold = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        _close(fd)
        raise _open_error(stream, path, exc) from exc
    return _Target(fd, hold, pollable=True, description=f"fifo {path}")


def _open_stdin_fifo(path: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _open_error("stdin", path, exc) from exc
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        _close(fd)
        raise StdioError(f"stdin: {path} is not a FIFO", stream="stdin", path=path)
    return fd


def _create_log_file(path: str) -> None:
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as exc:
        raise _open_error("stdout", path, exc) from exc


def _open_error(stream: str, path: str, exc: OSError) -> StdioError:
    return StdioError(f"{stream}: cannot open {path}: {exc.strerror or exc}", stream=stream, path=path)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _unread(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


_AGAIN_SRC, _AGAIN_DST, _MORE, _EOF, _HUNG_UP = range(5)
#: What a `_read_chunk` result of 0 (EOF), -1 (EAGAIN) or -2 (pty EIO) means for a pump.
_READ_OUTCOME = {0: _EOF, -1: _AGAIN_SRC, -2: _HUNG_UP}


class _Pump:
    """Moves bytes from `src` (a non-blocking pipe/FIFO) to `dst` until EOF, driven by loop
    readiness callbacks. Owns `src`, `dst` and `hold` and closes them when it ends.

    Modes: splice (both ends pipes), read/write (files, or splice refused with EINVAL), and
    drain (the target failed: read and drop, so the writer on the other side never blocks).
    """

    __slots__ = ("_loop", "name", "src", "dst", "hold", "_pollable", "_mode", "_waiting", "_buf", "_pending", "done", "on_finish",
                 "_hangup_waited", "_hangup_delay", "source", "target", "copied", "dropped", "blocked_since",
                 "_copied_when_blocked")

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, src: int) -> None:
        self._loop = loop
        self.name = name
        self.src = src
        self.dst = -1
        self.hold = -1
        self._pollable = False
        self._mode = self._readwrite
        self._waiting = ""  # "src", "dst", "hangup" (a pty EIO retry is due) or "" (nothing)
        self._buf: bytearray | None = None
        self._pending: memoryview | None = None  # read but not yet written (read/write mode)
        #: resolves to True on EOF with everything written (or drained), False when stopped.
        self.done: asyncio.Future[bool] = loop.create_future()
        #: called with the same value as `done`, synchronously when the pump ends.
        self.on_finish: Callable[[bool], None] | None = None
        self._hangup_waited = 0.0  # seconds of EIO retries on a pty master, since its last data
        self._hangup_delay = _PTY_RETRY_FIRST
        #: What `src` and `dst` are, for `pyshim inspect` ("fifo /run/...", "pty", "container pipe").
        self.source = ""
        self.target = ""
        #: Bytes written to the target, and bytes read and dropped (no target, or it failed).
        self.copied = 0
        self.dropped = 0
        #: time.time() when the pump last began waiting for its target to take more, None when
        #: it is not waiting for it. Stamped on entering the wait, never per chunk.
        self.blocked_since: float | None = None
        self._copied_when_blocked = 0

    def __repr__(self) -> str:
        mode = self._mode.__name__.lstrip("_")
        return f"<_Pump {self.name} {mode} {'done' if self.done.done() else self._waiting or 'idle'}>"

    def describe(self, now: float) -> dict:
        """What this pump is doing, as JSON types (see ProcessIO.describe)."""
        queued = None
        if self.src != -1:
            try:
                queued = _unread(self.src)
            except OSError:
                pass  # not a pipe, FIFO or tty: its backlog cannot be asked for
        if self.done.done():
            state = "done" if self.done.result() else "stopped"
        elif self._waiting == "dst":
            state = "blocked on writer"
        elif self._waiting == "src":
            # Still registered after a full burst: data is there and the loop comes back to it.
            state = "copying" if queued else "waiting for data"
        elif self._waiting == "hangup":
            state = "waiting for the pty's last output"
        else:
            state = "not started"
        blocked_since = self.blocked_since if state == "blocked on writer" else None
        return {
            "stream": self.name,
            "source": self.source,
            "target": self.target,
            "mode": self._mode.__name__.lstrip("_"),
            "bytes": self.copied,
            "dropped_bytes": self.dropped,
            "queued_bytes": queued,
            "state": state,
            "blocked_since": blocked_since,
            "blocked_for_s": None if blocked_since is None else round(max(now - blocked_since, 0.0), 3),
        }

    def connect(self, dst: int, pollable: bool, splice: bool = True) -> None:
        """Set the target: `pollable` for pipes/FIFOs (epoll works, splice may), False for
        files, which are written with blocking writes (they never wait on a reader)."""
        self.dst = dst
        self._pollable = pollable
        self._mode = self._splice if (USE_SPLICE and pollable and splice) else self._readwrite

    def drain_only(self) -> None:
        """No target: read and drop everything until EOF."""
        self._mode = self._drain

    def start(self) -> None:
        if not self.done.done():
            self._wait("src")

    def stop(self) -> None:
        self._finish(False)

    def _wait(self, what: str) -> None:
        if what == "dst" and (self.blocked_since is None or self.copied != self._copied_when_blocked):
            # Blocked again after having moved bytes (a slow reader): the wait starts now, so
            # blocked_since says how long the target has taken nothing, not since when it is slow.
            self.blocked_since = time.time()
            self._copied_when_blocked = self.copied
        if what == self._waiting:
            return
        if what == "src":
            self.blocked_since = None
        self._unregister()
        if what == "src":
            self._loop.add_reader(self.src, self._step)
        elif self._pollable:
            self._loop.add_writer(self.dst, self._step)
        else:  # a device that said EAGAIN and cannot be polled: try again shortly
            self._loop.call_later(0.01, self._retry)
        self._waiting = what

    def _after_hangup(self) -> None:
        # A pty master read EIO: retry with backoff until PTY_EOF_GRACE has passed without data.
        if self._hangup_waited >= PTY_EOF_GRACE:
            self._finish(True)
            return
        self._unregister()
        delay = self._hangup_delay
        self._hangup_waited += delay
        self._hangup_delay = delay * 2
        self._waiting = "hangup"
        self._loop.call_later(delay, self._retry_after_hangup)

    def _retry_after_hangup(self) -> None:
        if self._waiting == "hangup":
            self._waiting = ""
            self._step()

    def _retry(self) -> None:
        if self._waiting == "dst":
            self._waiting = ""
            self._step()

    def _unregister(self) -> None:
        if self._waiting == "src":
            self._loop.remove_reader(self.src)
        elif self._waiting == "dst" and self._pollable:
            self._loop.remove_writer(self.dst)
        self._waiting = ""

    def _step(self) -> None:
        try:
            for _ in range(_BURST):
                outcome = self._mode()
                if outcome == _MORE:
                    continue
                if outcome == _EOF:
                    self._finish(True)
                elif outcome == _HUNG_UP:
                    self._after_hangup()
                elif outcome == _AGAIN_SRC:
                    self._wait("src")
                else:
                    self._wait("dst")
                return
            # Burst used up: stay registered, the loop calls us again after the others ran.
            if not self._waiting:
                self._wait("src")
        except Exception:
            log.exception("stdio %s: copy loop failed", self.name)
            self._finish(False)

    def _splice(self) -> int:
        try:
            n = os.splice(self.src, self.dst, _CHUNK, flags=os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            # EAGAIN says either "src empty" or "dst full"; the pipe's fill level tells which.
            return _AGAIN_DST if _unread(self.src) else _AGAIN_SRC
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                self._mode = self._readwrite
                return _MORE
            self._target_failed(exc)
            return _MORE
        self.copied += n
        return _MORE if n else _EOF

    def _read_chunk(self) -> int:
        """Read into the buffer: bytes read, 0 at EOF, -1 when nothing is there yet, -2 for
        EIO from a pty master (its slave side is all closed, but data may still be coming)."""
        if self._buf is None:
            self._buf = bytearray(_CHUNK)
        try:
            n = os.readv(self.src, [self._buf])
        except BlockingIOError:
            return -1
        except OSError as exc:
            if exc.errno == errno.EIO:
                return -2
            raise
        if n:
            self._hangup_waited = 0.0
            self._hangup_delay = _PTY_RETRY_FIRST
        return n

    def _readwrite(self) -> int:
        if self._pending is None:
            n = self._read_chunk()
            if n <= 0:
                return _READ_OUTCOME[n]
            self._pending = memoryview(self._buf)[:n]
        try:
            n = os.write(self.dst, self._pending)
        except BlockingIOError:
            return _AGAIN_DST
        except OSError as exc:
            self.dropped += len(self._pending)
            self._pending = None
            self._target_failed(exc)
            return _MORE
        self.copied += n
        self._pending = self._pending[n:] if n < len(self._pending) else None
        return _MORE

    def _drain(self) -> int:
        n = self._read_chunk()
        if n > 0:
            self.dropped += n
            return _MORE
        return _READ_OUTCOME[n]

    def _target_failed(self, exc: OSError) -> None:
        if self.name == "stdin":
            # The container closed its stdin (or exited): stop, as the Go shim does. Closing
            # our FIFO reader makes the client's writes fail instead of piling up.
            log.info("stdio stdin: container stopped reading: %s", exc.strerror or exc)
            self._mode = self._eof
            return
        log.warning("stdio %s: writing failed (%s); dropping the rest of this stream", self.name, exc.strerror or exc)
        self.target = f"/dev/null (writing to {self.target or 'the target'} failed: {exc.strerror or exc})"
        self._unregister()
        self._mode = self._drain
        _close(self.dst)
        self.dst = -1

    def _eof(self) -> int:
        return _EOF

    def _finish(self, flushed: bool) -> None:
        if self.done.done():
            return
        self._unregister()
        for fd in (self.src, self.dst, self.hold):
            if fd != -1:
                _close(fd)
        self.src = self.dst = self.hold = -1
        self._pending = None
        self._buf = None
        self.done.set_result(flushed)
        if self.on_finish is not None:
            on_finish, self.on_finish = self.on_finish, None
            on_finish(flushed)
