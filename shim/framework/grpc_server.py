"""gRPC server for the Task API: the same handlers as the ttrpc server, served by grpclib.

containerd 1.7+ talks gRPC to a shim whose `start` replied `protocol: grpc` (see
shim/framework/bootstrap.py). This adapter has the ttrpc `Server`'s interface (`register_service`,
`start`, `close`), so the daemon registers the TaskService on either without knowing which:

* every call is unary-unary; the request (at most 4 MiB, as over ttrpc) is checked
  (`check_wellformed`) and parsed here, so a bad request gets INVALID_ARGUMENT with the same
  text as over ttrpc;
* a handler's `TtrpcError(code, message)` becomes grpc-status `code` with grpc-message
  `message` (the codes are gRPC's on both protocols, containerd maps them the same way); any
  other exception is UNKNOWN with its text; an unknown service or method is UNIMPLEMENTED;
* only peers with the shim's own uid/gid are served (SO_PEERCRED), as the ttrpc server does;
* `close()` lets calls whose handler already returned send their reply (Shutdown's, above
  all), then cancels the others (a Wait blocks forever) and closes every connection.

Imported only in gRPC mode: grpclib, h2 and multidict cost the ttrpc daemon nothing. None of
them needs `ssl` (grpclib imports it only for type checking), so the daemon's ssl block stays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from typing import Any

from grpclib.const import Cardinality, Status
from grpclib.const import Handler as GrpcHandler
from grpclib.encoding.base import CodecBase
from grpclib.protocol import H2Protocol
from grpclib.server import Server as _GrpclibServer

from shim.framework.ttrpc.frames import MAX_MESSAGE_SIZE
from shim.framework.ttrpc.server import CallContext, Handler, Method, PeerCredentials, peer_credentials
from shim.framework.ttrpc.status import Code, TtrpcError
from shim.framework.ttrpc.wire import check_wellformed

log = logging.getLogger("shim.grpc")

#: How long `close()` waits for replies that are being sent when the server stops.
REPLY_FLUSH_TIMEOUT = 1.0


async def _read_request(stream, name: str) -> bytes:
    """The request message, at most MAX_MESSAGE_SIZE bytes (grpclib's own read has no limit).

    Reads grpclib's HTTP/2 stream (`_stream`, pinned < 0.5): 5-byte prefix (compressed flag,
    big-endian length), then the message. HTTP/2 flow control keeps what is buffered meanwhile
    within the stream window.
    """
    raw = stream._stream
    try:
        prefix = await raw.recv_data(5)
        if not prefix:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"{name}: no request message")
        if len(prefix) < 5:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"{name}: truncated message prefix")
        if prefix[0]:
            raise TtrpcError(Code.UNIMPLEMENTED, f"{name}: compressed messages are not supported")
        size = int.from_bytes(prefix[1:5], "big")
        if size > MAX_MESSAGE_SIZE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED,
                             f"{name}: received message larger than max ({size} vs. {MAX_MESSAGE_SIZE})")
        data = await raw.recv_data(size)
    except AssertionError:  # grpclib's buffer: the stream ended inside the message
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{name}: truncated request message") from None
    if len(data) != size:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"{name}: truncated request message")
    return bytes(data)


class RawCodec(CodecBase):
    """Messages stay bytes in grpclib: parsing is ours, so bad input gets our error text."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return message

    def decode(self, data: bytes, message_type: Any) -> bytes:
        return data


def grpc_status(code: int) -> Status:
    """The grpclib Status for a ttrpc/gRPC code (they are the same numbers); UNKNOWN otherwise."""
    try:
        status = Status(int(code))
    except ValueError:
        return Status.UNKNOWN
    return Status.UNKNOWN if status is Status.OK else status


class _PeerCheckedProtocol(H2Protocol):
    """grpclib's HTTP/2 protocol, refusing peers that are not the shim's own user (before
    they get as much as our SETTINGS frame)."""

    def __init__(self, server: GrpcServer, *args: Any) -> None:
        super().__init__(*args)
        self._owner = server
        self.transport: asyncio.BaseTransport | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        peer = peer_credentials(sock) if sock is not None else None
        if not self._owner._allowed(peer):
            log.warning("grpc: refusing connection from %s: not the shim's own user", peer)
            self._refused = True
            transport.abort()
            return
        self.transport = transport
        super().connection_made(transport)
        self._owner._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._owner._connections.discard(self)
        super().connection_lost(exc)


class _Server(_GrpclibServer):
    """grpclib's server with our protocol and our answer to unknown methods.

    `_protocol_factory` and `_mapping` are grpclib's own (the dependency is pinned < 0.5).
    """

    def __init__(self, owner: GrpcServer, handlers: list, **kwargs: Any) -> None:
        super().__init__(handlers, **kwargs)
        self._owner = owner
        self._mapping = _MethodTable(self._mapping)

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        return _PeerCheckedProtocol(self._owner, plain.handler, plain.config, plain.h2_config)


class _MethodTable(dict):
    """'/<service>/<method>' -> handler, answering UNIMPLEMENTED for any other path itself.

    grpclib answers an unknown path with a response that has no content-type, which Go's gRPC
    client reads as UNKNOWN "malformed header"; containerd needs UNIMPLEMENTED.
    """

    def get(self, path: str, default: Any = None) -> GrpcHandler:
        found = super().get(path)
        if found is not None:
            return found
        service, _, method = path.lstrip("/").partition("/")
        known = any(key.startswith(f"/{service}/") for key in self)
        message = f"unknown method {method} for service {service}" if known else f"unknown service {service}"

        async def unimplemented(stream) -> None:
            await stream.send_trailing_metadata(status=Status.UNIMPLEMENTED, status_message=message)

        return GrpcHandler(unimplemented, Cardinality.UNARY_UNARY, None, None)


class _Mapping:
    """What grpclib serves: '/<service>/<method>' -> unary-unary handler (its IServable)."""

    def __init__(self, handlers: dict[str, GrpcHandler]) -> None:
        self._handlers = handlers

    def __mapping__(self) -> dict[str, GrpcHandler]:
        return self._handlers


class GrpcServer:
    """Serves registered services over gRPC on unix sockets (ttrpc `Server`'s interface)."""

    def __init__(self, *, require_same_user: bool = False) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self._require_same_user = require_same_user
        self._server: _Server | None = None
        self._connections: set[_PeerCheckedProtocol] = set()
        #: Every call in progress, and those of them whose handler returned (reply on its way).
        self._calls: set[asyncio.Task] = set()
        self._replying: set[asyncio.Task] = set()

    # -- registration -------------------------------------------------------------------
    def register(self, service: str, method: str, request_type: type, handler: Handler) -> None:
        if self._server is not None:
            raise RuntimeError("register before start()")
        self._services.setdefault(service, {})[method] = Method(request_type, handler)

    def register_service(self, service: str, methods: Mapping[str, tuple[type, Handler]]) -> None:
        for name, (request_type, handler) in methods.items():
            self.register(service, name, request_type, handler)

    # -- serving ------------------------------------------------------------------------
    async def start(self, *, sock: socket.socket | None = None, path: str | None = None) -> None:
        """Accept connections on an already listening socket or on a new socket at path."""
        handlers = {
            f"/{service}/{name}": GrpcHandler(self._unary(service, name, method), Cardinality.UNARY_UNARY, None, None)
            for service, methods in self._services.items()
            for name, method in methods.items()
        }
        self._server = _Server(self, [_Mapping(handlers)], codec=RawCodec())
        if path is not None:
            await self._server.start(path=path)
        else:
            await self._server.start(sock=sock)  # asyncio's create_server takes a unix socket too

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def close(self) -> None:
        """Let replies being sent go out, then stop accepting, cancel every call and hang up."""
        server, self._server = self._server, None
        if server is None:
            return
        if self._replying:
            await asyncio.wait(list(self._replying), timeout=REPLY_FLUSH_TIMEOUT)
        server.close()  # stops accepting and cancels every running call
        for connection in list(self._connections):
            if connection.transport is not None:
                connection.transport.close()
        self._connections.clear()
        if self._calls:
            await asyncio.gather(*self._calls, return_exceptions=True)
        await server.wait_closed()

    def _allowed(self, peer: PeerCredentials | None) -> bool:
        if not self._require_same_user:
            return True
        return peer is not None and peer.uid == os.geteuid() and peer.gid == os.getegid()

    def _unary(self, service: str, name: str, method: Method):
        async def call(stream) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._calls.add(task)
            try:
                await self._serve(stream, task, service, name, method)
            finally:
                self._calls.discard(task)
                self._replying.discard(task)

        return call

    async def _serve(self, stream, task: asyncio.Task, service: str, name: str, method: Method) -> None:
        payload, status, message = b"", Status.OK, None
        try:
            payload = await self._call(stream, service, name, method)
        except TtrpcError as exc:
            status, message = grpc_status(exc.code), exc.message
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("grpc: %s/%s failed", service, name)
            status, message = Status.UNKNOWN, str(exc) or type(exc).__name__
        self._replying.add(task)
        if status is Status.OK:
            await stream.send_message(payload)
        await stream.send_trailing_metadata(status=status, status_message=message)

    async def _call(self, stream, service: str, name: str, method: Method) -> bytes:
        data = await _read_request(stream, name)
        try:
            check_wellformed(data)
            request = method.request_type.parse(data)
        except Exception as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"unmarshal {name} request: {exc}") from None
        metadata: dict[str, list[str]] = {}
        for key, value in (stream.metadata or {}).items():
            metadata.setdefault(key.lower(), []).append(value if isinstance(value, str) else repr(value))
        loop = asyncio.get_running_loop()
        deadline = None
        if stream.deadline is not None:
            deadline = loop.time() + stream.deadline.time_remaining()
        # grpclib itself cancels the call at its deadline and answers DEADLINE_EXCEEDED.
        context = CallContext(service, name, metadata, deadline, None)
        response = await method.handler(request, context)
        return bytes(response) if response is not None else b""
