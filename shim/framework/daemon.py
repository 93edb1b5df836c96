"""The long-lived shim daemon: serves the Task API until containerd shuts it down.

It is a child subreaper (container processes are reparented to it when `runc create`
exits) and owns the one reaper; it ignores SIGPIPE (the log FIFO and the client FIFOs lose
their readers whenever containerd or a client goes away) and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import sys

# asyncio imports ssl if it can (7-17 ms and 1 MiB here); the daemon only speaks over unix
# sockets. A process that did import ssl already keeps it. (The gRPC mode needs no ssl either:
# grpclib imports it only for type checking.)
sys.modules.setdefault("ssl", None)

import asyncio  # noqa: E402
import logging  # noqa: E402

from shim.framework.logcontext import TASK_ID  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

log = logging.getLogger("shim")

PR_SET_CHILD_SUBREAPER = 36
#: Seconds between looks of a dense daemon waiting for a newcomer's Create before it exits.
DENSE_RECHECK = 1.0


class FifoLogHandler(logging.Handler):
    """Text lines to containerd's `log` FIFO, best effort: a write never blocks nor raises.

    containerd copies what it reads from the FIFO to its own log; while containerd is down
    nobody reads, and a full or reader-less FIFO just drops our lines.
    """

    def __init__(self, path: str, task_id: str, namespace: str) -> None:
        super().__init__()
        self._fd = -1
        from shim.framework.app import identity

        self._prefix = f"namespace={namespace} runtime={identity().runtime_type} id="
        self._task_id = task_id
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            pass

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd < 0:
            return
        try:
            # RFC 3339 with nanoseconds, as the Go shims' lines in containerd's log have it:
            # whole seconds cannot order a shim's lines against containerd's own.
            seconds = int(record.created)
            nanos = int((record.created - seconds) * 1e9)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{nanos:09d}"
            message = record.getMessage().replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            if record.exc_info:
                message += " " + self.formatException(record.exc_info).replace("\n", " | ")
            task_id = TASK_ID.get() or self._task_id  # the container this line is about
            line = f'time="{stamp}Z" level={record.levelname.lower()} msg="{message}" {self._prefix}{task_id}\n'
            os.write(self._fd, line.encode(errors="replace"))
        except Exception:
            pass  # logs are best effort: never let them hurt the shim


def _set_subreaper() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER): %s", os.strerror(ctypes.get_errno()))


#: The event loop a zygote's spare worker made while it waited (prepare_loop), for serve.
_prepared_loop: asyncio.AbstractEventLoop | None = None


def prepare_loop() -> None:
    """Make the event loop the daemon will serve on now, before there is a daemon to be."""
    global _prepared_loop
    _prepared_loop = asyncio.new_event_loop()


def serve(flags, listener) -> int:
    if not isinstance(listener, socket.socket):
        # start's bare _socket.socket (when it forks the daemon itself): asyncio needs the
        # socket module's class.
        listener = socket.socket(fileno=listener.detach())
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # Nothing our lines show needs the caller's frame, thread or process: the logging module
    # looks those up for every record unless told not to (its HOWTO's list of optimizations):
    # 1.5 of the ~4 us a record costs before our handler writes it.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = FifoLogHandler("log", flags.id, flags.namespace)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if flags.debug else logging.INFO)
    _set_subreaper()
    global _prepared_loop
    prepared, _prepared_loop = _prepared_loop, None
    try:
        with asyncio.Runner(loop_factory=(lambda: prepared) if prepared is not None else None) as runner:
            runner.run(_serve(flags, listener))
    except Exception:
        log.exception("shim daemon failed")
        return 1
    return 0


def serve_inherited(flags) -> int:
    """Serve mode when started like the Go shim's daemon: listening socket on fd 3 or -socket."""
    if flags.socket:
        path = flags.socket.removeprefix("unix://")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4096)
    else:
        listener = socket.socket(fileno=3)
    return serve(flags, listener)


def _task_api_server():
    """A ttrpc server, or in gRPC mode (set by start, shim/framework/bootstrap.py) the gRPC adapter.

    grpclib (and h2) are imported only here, so the ttrpc daemon never pays for them.
    """
    from shim.framework.bootstrap import NOTE_ENV, PROTOCOL_ENV

    if os.environ.get(NOTE_ENV):
        log.warning("gRPC mode: %s", os.environ[NOTE_ENV])
    if os.environ.get(PROTOCOL_ENV) == "grpc":
        from shim.framework.grpc_server import GrpcServer

        return GrpcServer(require_same_user=True)
    from shim.framework.ttrpc import Server

    return Server(require_same_user=True)


async def _start_debug_server(flags, service, server, socket_path):
    """This daemon's debug socket (shim.framework.debug), or None when it cannot be made:
    seeing inside is worth a warning, never a container."""
    from shim.framework.app import identity
    from shim.framework.bootstrap import PROTOCOL_ENV
    from shim.framework.debug import debug_socket_path
    from shim.framework.debug.server import Daemon, DebugServer

    if not isinstance(socket_path, str) or not socket_path or socket_path.startswith("\0"):
        return None
    protocol = "grpc" if os.environ.get(PROTOCOL_ENV) == "grpc" else "ttrpc"
    daemon = Daemon(service, server, flags.namespace, socket_path, protocol, identity().runtime_type)
    debug = DebugServer(daemon)
    try:
        await debug.start(flags.debug_socket or debug_socket_path(socket_path))
    except OSError as exc:
        log.warning("no debug socket: %s", exc)
        return None
    return debug


def _dump_stacks() -> None:
    """SIGUSR1: every task's and thread's stack into containerd's log, as the Go shim does
    with its goroutines."""
    from shim.framework.debug.stacks import describe_stacks, format_stacks

    try:
        log.info("=== BEGIN stack dump ===\n%s=== END stack dump ===", format_stacks(describe_stacks()))
    except Exception:
        log.exception("stack dump failed")


async def _serve(flags, listener: socket.socket) -> None:
    from shim.framework.events import EventPublisher
    from shim.framework.reaper import Reaper
    from shim.framework.service import TaskService

    loop = asyncio.get_running_loop()
    asyncio.current_task().set_name("daemon")
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    socket_path = listener.getsockname()

    reaper = Reaper()
    reaper.start()
    publisher = EventPublisher(os.environ.get("TTRPC_ADDRESS", ""), flags.namespace)
    from shim.framework.dense import DENSE_ENV

    dense_dir = os.environ.get(DENSE_ENV, "")

    def leave() -> None:
        """No container left: exit, unless this is a dense daemon a start has just given
        another container to (its Create is on the way; look again in a moment)."""
        if not dense_dir:
            stop.set()
            return
        from shim.framework.dense import may_exit

        if service.containers:
            return  # the newcomer's Create came meanwhile
        if may_exit(dense_dir, socket_path, service.served_bundles):
            stop.set()
        else:
            loop.call_later(DENSE_RECHECK, leave)

    service = TaskService(flags.namespace, publisher, reaper, on_shutdown=leave)  # the installed app
    server = _task_api_server()
    service.register(server)
    await server.start(sock=listener)
    log.debug("serving %s on %s", type(server).__name__, socket_path)
    debug = await _start_debug_server(flags, service, server, socket_path)
    loop.add_signal_handler(signal.SIGUSR1, _dump_stacks)
    from shim.framework import ksm

    if not ksm.offered:  # not forked from a zygote, which marked what we inherited
        loop.call_later(ksm.LATE_OFFER_DELAY, ksm.offer_to_ksm)
    try:
        async with asyncio.TaskGroup() as tasks:
            # Named for `pyshim stacks`.
            publishing = tasks.create_task(publisher.run(), name="event publisher")
            exits = tasks.create_task(service.handle_exits(reaper.subscribe()), name="exit router")
            await stop.wait()
            log.debug("shutting down")
            await server.close()
            await service.close()
            exits.cancel()
            await publisher.close(flush_timeout=2.0)
            publishing.cancel()
    finally:
        if debug is not None:
            await debug.close()
        reaper.stop()
        if isinstance(socket_path, str) and socket_path and not socket_path.startswith("\0"):
            try:
                os.unlink(socket_path)
            except OSError:
                pass
