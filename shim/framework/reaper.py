"""The one owner of `waitpid`: spawning children and collecting every exit in the daemon.

The shim daemon is a child subreaper, so besides the commands it spawns itself (runc, loggers)
it also inherits container init and exec processes once `runc create` / `runc exec -d` exit.
Exactly one `Reaper` calls ``waitpid(-1, WNOHANG)`` (on SIGCHLD, on the loop thread) and
routes each exit:

* to the `watch` future of a pid we spawned (`spawn` registers it before returning, and the
  reaper only runs as a loop callback, so the exit cannot slip past the registration);
* otherwise to every open `Subscription` (that is how the task service learns that a
  container's init or exec process exited). A pid's exit goes to one place, never both.

Nothing else in the daemon may wait for children: `subprocess.Popen` (its ``__del__`` and
``_cleanup``) and asyncio's child watchers call waitpid on their pids and would either steal
an exit status or have theirs stolen (ECHILD, returncode 0). Use `Reaper.spawn` and
`Reaper.run` instead; they are built on ``os.posix_spawn`` and never wait themselves.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shim.framework.debug.trace import TRACER

__all__ = [
    "DEVNULL",
    "PIPE",
    "CommandTimeout",
    "Exit",
    "Reaper",
    "Result",
    "Subscription",
    "exit_code",
    "set_child_subreaper",
]

#: `Reaper.run` stdout/stderr: capture into `Result` (the default).
PIPE = -1
#: `Reaper.run` / `Reaper.spawn` stdio: /dev/null (same as passing None).
DEVNULL = -3

# Used when neither the daemon's environment nor the caller gives a PATH (containerd can start
# shims with a minimal environment); the same list Go's runc and the containerd shim assume.
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class Exit:
    """One reaped child."""

    pid: int
    #: Exit code, or 128 + signal number when the process was killed by a signal.
    status: int
    #: time.time_ns() when the reaper collected it.
    timestamp: int


@dataclass(frozen=True, slots=True)
class Result:
    """Outcome of `Reaper.run`. stdout/stderr are empty unless captured (PIPE)."""

    pid: int
    returncode: int
    stdout: bytes
    stderr: bytes
    exited_at: int


class CommandTimeout(TimeoutError):
    """`Reaper.run` hit its timeout; the process was SIGKILLed and reaped."""

    def __init__(self, argv: Sequence[str], timeout: float, stdout: bytes, stderr: bytes):
        super().__init__(f"{argv[0]} did not exit within {timeout:g}s; killed")
        self.argv = list(argv)
        self.timeout = timeout
        self.stdout = stdout
        self.stderr = stderr


def exit_code(wait_status: int) -> int:
    """A raw waitpid status as containerd reports it: the code, or 128+signal if signalled."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


def set_child_subreaper(enabled: bool = True) -> None:
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to this process."""
    import ctypes  # only the daemon's startup (and tests) pay for ctypes

    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


class Subscription:
    """Exits of processes nobody `watch`ed, in reap order, from the moment of `subscribe()`.

    Use ``await sub.get()``, ``async for exit in sub`` (ends after `close`) or ``with``.
    The queue is unbounded: a subscriber that stops reading must `close` its subscription.
    """

    _CLOSED = object()

    def __init__(self, reaper: Reaper):
        self._reaper = reaper
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = False

    def _put(self, item: Exit) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> Exit:
        """The next exit; raises EOFError once the subscription is closed and drained."""
        if self.closed and self._queue.empty():
            raise EOFError("subscription closed")
        item = await self._queue.get()
        if item is self._CLOSED:
            self._queue.put_nowait(item)  # wake any other getter too
            raise EOFError("subscription closed")
        return item  # type: ignore[return-value]

    def get_nowait(self) -> Exit | None:
        """The next exit if one is queued, else None."""
        try:
            item = self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None
        if item is self._CLOSED:
            self._queue.put_nowait(item)
            return None
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop receiving; queued exits can still be read, then iteration ends."""
        if not self.closed:
            self.closed = True
            self._reaper._subscribers.discard(self)
            self._queue.put_nowait(self._CLOSED)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Exit:
        try:
            return await self.get()
        except EOFError:
            raise StopAsyncIteration from None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reaper:
    """Spawns children and reaps all of them; see the module docstring for the routing rules.

    Every method must be called on the loop thread. `start` must run in the main thread
    (asyncio installs signal handlers only there).
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchers: dict[int, asyncio.Future[Exit]] = {}
        self._subscribers: set[Subscription] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Install the SIGCHLD handler and collect anything that already exited."""
        if self._loop is not None:
            raise RuntimeError("reaper already started")
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def stop(self) -> None:
        """Remove the handler, end all subscriptions and cancel pending watches.

        Children still running stay unreaped (zombies once they exit) until the next start.
        """
        if self._loop is None:
            return
        self._loop.remove_signal_handler(signal.SIGCHLD)
        self._loop = None
        for sub in list(self._subscribers):
            sub.close()
        watchers, self._watchers = self._watchers, {}
        for fut in watchers.values():
            fut.cancel()

    async def __aenter__(self) -> Reaper:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._loop is not None

    # -- exits -----------------------------------------------------------------------------------

    def reap(self) -> None:
        """Collect every exited child now (SIGCHLD does this; callable directly, e.g. in tests)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._deliver(Exit(pid, exit_code(status), time.time_ns()))

    def _deliver(self, exit: Exit) -> None:
        fut = self._watchers.pop(exit.pid, None)
        if fut is not None:
            # A cancelled watcher (its `run` was cancelled) just drops the exit: the pid was
            # ours, so it must not look like a container process to subscribers.
            if not fut.done():
                fut.set_result(exit)
            return
        for sub in list(self._subscribers):
            sub._put(exit)

    def watch(self, pid: int) -> asyncio.Future[Exit]:
        """Future for the exit of `pid`, which must be a child not yet reaped.

        `spawn` already registers its pids; watch() then returns that same future. Watching a
        pid that is not ours (a container init read from a pid file) is racy: its exit may
        already have gone to subscribers, so use a subscription for those.
        """
        loop = self._require_loop()
        fut = self._watchers.get(pid)
        if fut is None or fut.cancelled():
            fut = self._watchers[pid] = loop.create_future()
        return fut

    def subscribe(self) -> Subscription:
        """A new `Subscription` to exits of unwatched processes (from now on)."""
        self._require_loop()
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("reaper is not started")
        return self._loop

    # -- spawning --------------------------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        extra_fds: Mapping[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        start_new_session: bool = False,
    ) -> int:
        """Start argv with posix_spawn and `watch` its pid; returns the pid.

        stdin/stdout/stderr are fds to put on 0/1/2 (None or DEVNULL: /dev/null);
        extra_fds maps a target fd number in the child (>= 3) to an fd of ours. The child
        gets those and nothing else: any stray inheritable fd of this process is closed in
        the child. argv[0] is looked up on the daemon's PATH unless it contains a slash
        (FileNotFoundError if missing). env defaults to os.environ. The caller keeps
        ownership of the fds it passed. The child starts with default dispositions for
        SIGPIPE/SIGXFSZ (Python ignores them) and an empty signal mask. (glibc's posix_spawn
        leaves its two internal signals, 32 and 33, ignored in the child; a Go runc keeps
        that for the container. Nothing uses them outside glibc, and Python cannot undo it.)
        """
        self._require_loop()
        if not argv:
            raise ValueError("empty argv")
        path = _find_executable(argv[0])
        mapping: dict[int, int] = {}
        devnull: int | None = None
        for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
            if fd is None or fd == DEVNULL:
                if devnull is None:
                    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                fd = devnull
            elif fd < 0:
                raise ValueError(f"fd {fd} for child fd {target} (PIPE is only for run())")
            mapping[target] = fd
        for target, fd in (extra_fds or {}).items():
            if target < 3:
                raise ValueError(f"extra_fds target {target}: use stdin/stdout/stderr")
            mapping[target] = fd
        # Move every source above the highest target first (close-on-exec copies), so that no
        # dup2 can overwrite a source still to be used and no source equals its target (a
        # same-number dup2 would leave FD_CLOEXEC set and the child would lose the fd).
        floor = max(mapping) + 1
        sources: dict[int, int] = {}
        try:
            for fd in set(mapping.values()):
                sources[fd] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
            actions: list[tuple[int, ...]] = [
                (os.POSIX_SPAWN_DUP2, sources[fd], target) for target, fd in mapping.items()
            ]
            keep = set(mapping) | set(sources.values())
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _stray_inheritable_fds(keep)]
            pid = os.posix_spawn(
                path,
                list(argv),
                os.environ if env is None else env,
                file_actions=actions,
                setsid=start_new_session,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
                setsigmask=(),
            )
            # Registered before we return to the loop, i.e. before the reaper can run.
            self.watch(pid)
            return pid
        finally:
            for fd in sources.values():
                os.close(fd)
            if devnull is not None:
                os.close(devnull)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        stdin: int | None = None,
        stdout: int | None = PIPE,
        stderr: int | None = PIPE,
        extra_fds: Mapping[int, int] | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        start_new_session: bool = False,
        label: str = "",
    ) -> Result:
        """Run a short-lived command to completion and return its status and captured output.

        `input` is written to its stdin (then closed); otherwise `stdin` is an fd or None
        (/dev/null). stdout/stderr: PIPE captures (default), an fd is passed through, None is
        /dev/null. Output is collected until the process exits plus whatever is still buffered
        in the pipe then; a grandchild that keeps the pipe open does not hold us up.

        On timeout the process is SIGKILLed, reaped, and CommandTimeout raised. If the caller
        is cancelled the process is SIGKILLed and the reaper collects it later.

        Each run is reported to the daemon's trace (shim.framework.debug.trace) under `label`
        (what the command does, e.g. runc's subcommand; the program's name by default).
        """
        loop = self._require_loop()
        if input is not None and stdin is not None:
            raise ValueError("pass either input or stdin")
        token = TRACER.command_started(label or os.path.basename(argv[0]), argv)
        exit_code: int | None = None
        captured_stderr = b""
        child_fds: list[int] = []  # the child's pipe ends, closed right after spawning
        readers: list[_PipeReader | None] = []
        writer: _PipeWriter | None = None
        pid: int | None = None
        try:
            if input is not None:
                r, w = os.pipe()
                child_fds.append(r)
                writer = _PipeWriter(loop, w, input)
                stdin = r
            out_fds: list[int | None] = []
            for fd in (stdout, stderr):
                reader = None
                if fd == PIPE:
                    r, w = os.pipe()
                    reader = _PipeReader(loop, r)
                    child_fds.append(w)
                    fd = w
                readers.append(reader)
                out_fds.append(fd)
            pid = self.spawn(
                argv,
                stdin=stdin,
                stdout=out_fds[0],
                stderr=out_fds[1],
                extra_fds=extra_fds,
                env=env,
                start_new_session=start_new_session,
            )
            TRACER.command_spawned(token, pid)
            exited = self._watchers[pid]
            # Our copies of the child's ends go now, or we would never see EOF / EPIPE.
            while child_fds:
                os.close(child_fds.pop())
            for reader in readers:
                if reader is not None:
                    reader.start()
            if writer is not None:
                writer.start()

            # asyncio.wait, unlike wait_for, never cancels the future it waits on.
            done, _ = await asyncio.wait((exited,), timeout=timeout)
            if not done:
                _kill(pid)
                await exited
            exit = exited.result()
            pid = None
            out, err = (b"" if r is None else r.finish() for r in readers)
            exit_code, captured_stderr = exit.status, err
            if not done:
                raise CommandTimeout(argv, timeout or 0.0, out, err)
            return Result(exit.pid, exit.status, out, err, exit.timestamp)
        finally:
            TRACER.command_finished(token, exit_code, captured_stderr)
            if pid is not None:  # cancelled (or failed) while the child runs
                _kill(pid)
            for fd in child_fds:
                os.close(fd)
            for reader in readers:
                if reader is not None:
                    reader.close()
            if writer is not None:
                writer.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # cannot happen before we reap it, but harmless


class _PipeReader:
    """Collects a non-blocking pipe's data from loop callbacks until EOF or `finish`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int):
        self.loop = loop
        self.fd: int | None = fd
        self.chunks: list[bytes] = []
        self._registered = False

    def start(self) -> None:
        assert self.fd is not None
        os.set_blocking(self.fd, False)
        self.loop.add_reader(self.fd, self._read)
        self._registered = True

    def _read(self) -> None:
        assert self.fd is not None
        while True:
            try:
                data = os.read(self.fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._unregister()  # EOF stays readable: keep the callback from spinning
                return
            self.chunks.append(data)

    def finish(self) -> bytes:
        """Everything read so far plus what is buffered now; then close.

        Once the process has exited, all it wrote is in the pipe; a descendant that still
        holds the write end may add more, which is not this command's output.
        """
        if self.fd is not None:
            self._read()
        self.close()
        return b"".join(self.chunks)

    def _unregister(self) -> None:
        if self._registered:
            assert self.fd is not None
            self.loop.remove_reader(self.fd)
            self._registered = False

    def close(self) -> None:
        self._unregister()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _PipeWriter:
    """Feeds `data` into a non-blocking pipe from loop callbacks, then closes it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, data: bytes):
        self.loop = loop
        self.fd: int | None = fd
        self.view = memoryview(data)
        self._registered = False

    def start(self) -> None:
        assert self.fd is not None
        os.set_blocking(self.fd, False)
        self._write()
        if self.fd is not None:
            self.loop.add_writer(self.fd, self._write)
            self._registered = True

    def _write(self) -> None:
        assert self.fd is not None
        try:
            while self.view:
                n = os.write(self.fd, self.view)
                self.view = self.view[n:]
        except BlockingIOError:
            return
        except BrokenPipeError:
            # The child closed its stdin or exited without reading it all: like
            # subprocess.communicate, that is the child's business, not an error.
            pass
        self.close()

    def close(self) -> None:
        if self.fd is None:
            return
        if self._registered:
            self.loop.remove_writer(self.fd)
            self._registered = False
        os.close(self.fd)
        self.fd = None


def _find_executable(name: str) -> str:
    """Explicit PATH lookup on the daemon's own PATH (as Go's exec.LookPath does)."""
    if "/" in name:
        return name
    for d in (os.environ.get("PATH") or _DEFAULT_PATH).split(os.pathsep):
        candidate = os.path.join(d or ".", name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, f"executable file not found in $PATH: {name!r}", name)


def _stray_inheritable_fds(keep: set[int]) -> list[int]:
    """Our fds that a child would inherit (no FD_CLOEXEC), except those in `keep`.

    Python opens everything close-on-exec, but fds inherited by the daemon (a socket handed
    down by `start`, or one opened by C code) may not be; a container must never get them.
    """
    stray = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep:
            continue
        try:
            if os.get_inheritable(fd):
                stray.append(fd)
        except OSError:
            pass  # the directory fd used by listdir, closed by now
    return stray
