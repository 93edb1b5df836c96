"""The daemon's debug socket: answers `pyshim` requests on the daemon's own loop.

Who may connect: root or the daemon's own user. The socket file is 0600 in a 0700 directory
and each connection's peer credentials are checked again (as the Task API socket does), and
it is a path, never in the abstract namespace, where any process of the network namespace
could reach it (CVE-2020-15257).

Nothing here may hold up the Task API: requests are answered from in-memory state in one
loop turn; trace records are written without waiting, and a trace client that stops reading
is dropped once MAX_TRACE_BACKLOG bytes wait for it; a client that sends no request in
REQUEST_TIMEOUT seconds is dropped too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from dataclasses import dataclass, field

from shim.framework.debug import DEBUG_DIR
from shim.framework.debug.trace import TRACER
from shim.framework.debug.wire import LOG_LEVELS, Request, RequestReader, WireError, encode_error, encode_ok, encode_record
from shim.framework.ttrpc.server import peer_credentials

log = logging.getLogger("shim.framework.debug")

#: Bytes of trace records that may wait for a client before it is dropped.
MAX_TRACE_BACKLOG = 256 << 10
#: Seconds a client has to send its request line.
REQUEST_TIMEOUT = 10.0


@dataclass(slots=True)
class Daemon:
    """What the debug socket describes: set up by shim.framework.daemon."""

    service: object  # shim.framework.service.TaskService
    task_server: object  # the ttrpc Server or GrpcServer (for its connection count)
    namespace: str
    task_socket: str
    protocol: str  # "ttrpc" or "grpc"
    runtime_type: str
    started: float = field(default_factory=time.time)
    debug_socket: str = ""


class DebugServer:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.path = ""
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[_DebugConnection] = set()

    async def start(self, path: str) -> None:
        """Listen at path (replacing a dead daemon's socket file left there)."""
        os.makedirs(DEBUG_DIR, mode=0o700, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                os.unlink(path)  # same name = same Task API socket, which start found dead
            except FileNotFoundError:
                pass
            old_umask = os.umask(0o177)  # created 0600: no window where others may connect
            try:
                listener.bind(path)
            finally:
                os.umask(old_umask)
            listener.listen(16)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(lambda: _DebugConnection(self), sock=listener)
        except BaseException:
            listener.close()
            raise
        self.path = path
        self.daemon.debug_socket = path

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.drop()
        if self.path:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = ""

    @staticmethod
    def allowed(uid: int) -> bool:
        return uid == 0 or uid == os.geteuid()

    def answer(self, request: Request) -> object:
        """The result of a one-shot request; WireError for what cannot be answered."""
        if request.op == "ls":
            from shim.framework.debug.snapshot import describe_daemon

            return describe_daemon(self.daemon)
        if request.op == "inspect":
            from shim.framework.debug.snapshot import describe_container

            found = describe_container(self.daemon, request.id, request.namespace)
            if found is None:
                raise WireError(f"container {request.id} is not served by this daemon (pid {os.getpid()})")
            return found
        if request.op == "stacks":
            from shim.framework.debug.stacks import describe_stacks

            return describe_stacks()
        if request.op == "log-level":
            root = logging.getLogger()
            before = logging.getLevelName(root.level).lower()
            root.setLevel(LOG_LEVELS[request.level.lower()])
            after = logging.getLevelName(root.level).lower()
            log.info("log level changed from %s to %s by a debug client", before, after)
            return {"before": before, "after": after}
        raise WireError(f"op {request.op} is not answered once")  # trace is handled apart


class _DebugConnection(asyncio.Protocol):
    def __init__(self, server: DebugServer) -> None:
        self._server = server
        self._reader = RequestReader()
        self._transport: asyncio.Transport | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._filter: tuple[str, str] | None = None  # (namespace, id) a trace follows
        self._refused = False  # a peer that may not connect

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else None
        self._request_timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._timed_out)
        if peer is None or not self._server.allowed(peer.uid):
            log.warning("debug socket: refusing connection from %s: not root nor the daemon's user", peer)
            # Said before the request is read, and closed once it is: closing with the
            # request unread would reset the connection and lose this line.
            self._refused = True
            transport.write(encode_error("permission denied: only root or the daemon's user may connect"))
            return
        self._server._clients.add(self)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._close()
            return
        try:
            request = self._reader.feed(data)
        except WireError as exc:
            self._fail(str(exc))
            return
        if request is None:
            return
        self._cancel_timer()
        if request.op == "trace":
            self._start_trace(request)
            return
        try:
            reply = encode_ok(self._server.answer(request))
        except WireError as exc:
            self._fail(str(exc))
            return
        except Exception as exc:  # a bug in describing must not cost the daemon anything
            log.exception("debug socket: %s failed", request.op)
            self._fail(f"{request.op} failed in the daemon: {exc}")
            return
        self._write(reply)
        self._close()

    def eof_received(self) -> bool:
        if self._refused:
            return False
        try:
            self._reader.feed_eof()
        except WireError as exc:
            self._fail(str(exc))
        # A trace ends when the client shuts down its side: that is how the daemon learns
        # at once that a client went away (a half-open trace could only be found out by
        # the next failing write).
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        TRACER.detach(self._on_record)
        self._server._clients.discard(self)

    # -- trace ----------------------------------------------------------------------------
    def _start_trace(self, request: Request) -> None:
        self._filter = (request.namespace, request.id)
        self._write(encode_ok({"pid": os.getpid(), "namespace": self._server.daemon.namespace}))
        TRACER.attach(self._on_record)

    def _on_record(self, record: dict) -> None:
        namespace, container_id = self._filter or ("", "")
        if container_id and record.get("id") != container_id:
            return
        if namespace and namespace != self._server.daemon.namespace:
            return
        transport = self._transport
        if transport is None or transport.is_closing():
            TRACER.detach(self._on_record)
            return
        if transport.get_write_buffer_size() > MAX_TRACE_BACKLOG:
            log.warning("debug socket: dropping a trace client that stopped reading (%d bytes waiting)",
                        transport.get_write_buffer_size())
            self.drop()
            return
        transport.write(encode_record(record))

    # -- plumbing -------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _fail(self, message: str) -> None:
        self._write(encode_error(message))
        self._close()

    def _close(self) -> None:
        TRACER.detach(self._on_record)
        if self._transport is not None:
            self._transport.close()  # after what is buffered is written, unless it never is:
            asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, self._transport.abort)

    def drop(self) -> None:
        TRACER.detach(self._on_record)
        if self._transport is not None:
            self._transport.abort()  # without waiting for the client to read anything

    def _timed_out(self) -> None:
        self._request_timer = None
        if self._refused:
            self.drop()
            return
        self._fail(f"no request within {REQUEST_TIMEOUT:g}s")

    def _cancel_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
