"""asyncio ttrpc server: a thin adapter over `ServerConnection`.

Each accepted connection gets a `_ServerProtocol`. Every request runs as its own task owned
by that connection, so a blocking `Wait` never delays a `State` on the same connection, and
responses go out in completion order. When the peer goes away its tasks are cancelled; when
the server closes, every connection and task is closed and awaited.

Nothing a peer sends can take the server down: protocol garbage closes that one connection
(with a log line), a failing handler becomes an error status on its stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .connection import RequestReceived, ServerConnection
from .encode import encode
from .frames import ProtocolViolation
from .status import Code, TtrpcError
from .wire import check_wellformed

log = logging.getLogger("shim.framework.ttrpc")

Handler = Callable[[Any, "CallContext"], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


@dataclass(slots=True)
class CallContext:
    """What a handler may want to know about the call besides its request message."""

    service: str
    method: str
    metadata: dict[str, list[str]] = field(default_factory=dict)
    #: loop.time() by which the caller stops waiting; None when it set no timeout.
    deadline: float | None = None
    peer: PeerCredentials | None = None

    def get(self, key: str) -> str | None:
        """First metadata value for key (keys are case-insensitive, like ttrpc's MD)."""
        values = self.metadata.get(key.lower())
        return values[0] if values else None


@dataclass(frozen=True, slots=True)
class Method:
    request_type: type
    handler: Handler


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return PeerCredentials(*struct.unpack("3i", raw))


class Server:
    """Serves registered ttrpc services on unix sockets."""

    def __init__(self, *, require_same_user: bool = False) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self._require_same_user = require_same_user
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[_ServerProtocol] = set()
        self._closed = asyncio.Event()

    # -- registration -------------------------------------------------------------------
    def register(self, service: str, method: str, request_type: type, handler: Handler) -> None:
        self._services.setdefault(service, {})[method] = Method(request_type, handler)

    def register_service(self, service: str, methods: Mapping[str, tuple[type, Handler]]) -> None:
        for name, (request_type, handler) in methods.items():
            self.register(service, name, request_type, handler)

    def lookup(self, service: str, method: str) -> Method:
        methods = self._services.get(service)
        if methods is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"service {service}")
        found = methods.get(method)
        if found is None:
            raise TtrpcError(Code.UNIMPLEMENTED, f"method {method}")
        return found

    # -- serving ------------------------------------------------------------------------
    async def start(self, *, sock: socket.socket | None = None, path: str | None = None) -> None:
        """Accept connections on an already listening socket or on a new socket at path."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(lambda: _ServerProtocol(self), path=path, sock=sock)
        self._servers.append(server)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Stop accepting, drop every connection, cancel and await every in-flight call."""
        for server in self._servers:
            server.close()
        connections = list(self._connections)
        tasks = [t for c in connections for t in c.tasks]
        for connection in connections:
            connection.close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        self._closed.set()

    def _allowed(self, peer: PeerCredentials | None) -> bool:
        if not self._require_same_user:
            return True
        return peer is not None and peer.uid == os.geteuid() and peer.gid == os.getegid()


class _ServerProtocol(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self._server = server
        self._core = ServerConnection()
        self._transport: asyncio.Transport | None = None
        self._peer: PeerCredentials | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        self._peer = peer_credentials(sock) if sock is not None else None
        if not self._server._allowed(self._peer):
            log.warning("ttrpc: refusing connection from %s: not the shim's own user", self._peer)
            transport.abort()
            return
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        for event in self._core.receive_data(data):
            if isinstance(event, RequestReceived):
                task = asyncio.get_running_loop().create_task(self._serve(event))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(event, ProtocolViolation):
                log.warning("ttrpc: closing connection from %s: %s", self._peer, event.reason)
                self._flush()
                self.close()
                return
        self._flush()

    def eof_received(self) -> bool:
        violation = self._core.receive_eof()
        if violation is not None:
            log.warning("ttrpc: connection from %s: %s", self._peer, violation.reason)
        return False  # let the transport close; in-flight calls are cancelled in connection_lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        for task in self.tasks:
            task.cancel()

    def pause_writing(self) -> None:
        # The peer is not reading its responses: stop reading its requests too, so a
        # client that never reads cannot make us buffer without bound.
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        for task in self.tasks:
            task.cancel()

    def _flush(self) -> None:
        data = self._core.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def _serve(self, event: RequestReceived) -> None:
        request = event.request
        payload, code, message = b"", Code.OK, ""
        try:
            payload = await self._call(request)
        except TtrpcError as exc:
            code, message = exc.code, exc.message
        except asyncio.CancelledError:
            self._core.abandon(event.stream_id)
            raise
        except Exception as exc:
            log.exception("ttrpc: %s/%s failed", request.service, request.method)
            code, message = Code.UNKNOWN, str(exc) or type(exc).__name__
        self._core.send_response(event.stream_id, payload, code, message)
        self._flush()

    async def _call(self, request: Any) -> bytes:
        method = self._server.lookup(request.service, request.method)
        try:
            check_wellformed(request.payload)
            message = method.request_type.parse(request.payload)
        except Exception as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"unmarshal {request.method} request: {exc}") from None
        metadata: dict[str, list[str]] = {}
        for kv in request.metadata:
            metadata.setdefault(kv.key.lower(), []).append(kv.value)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request.timeout_nano / 1e9 if request.timeout_nano > 0 else None
        context = CallContext(request.service, request.method, metadata, deadline, self._peer)
        try:
            async with asyncio.timeout_at(deadline):
                response = await method.handler(message, context)
        except TimeoutError:
            if deadline is not None and loop.time() >= deadline:
                raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{request.method}: context deadline exceeded") from None
            raise
        return encode(response) if response is not None else b""
