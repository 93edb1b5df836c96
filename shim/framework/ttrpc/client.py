"""asyncio ttrpc client: a thin adapter over `ClientConnection`.

Any number of calls may be in flight on one connection; each waits on a future keyed by its
stream id, and responses are routed by that id alone, in whatever order the server answers
(the bug fixed in containerd/ttrpc#72 was a client that assumed otherwise). A call that times
out abandons its stream: the late response is dropped. When the connection drops, every
pending call fails with `ConnectionClosed`; reconnecting is the caller's choice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from .connection import ClientConnection, ResponseReceived
from .encode import encode
from .frames import ProtocolViolation
from .status import Code, ConnectionClosed, TtrpcError
from .wire import check_wellformed

log = logging.getLogger("shim.framework.ttrpc")

T = TypeVar("T")

Metadata = Mapping[str, str | Iterable[str]]


def socket_path(address: str) -> str:
    """Filesystem path (or abstract name) from a containerd-style socket address."""
    for prefix in ("unix://", "ttrpc+unix://"):
        if address.startswith(prefix):
            return address[len(prefix) :]
    return address


class Client:
    """One ttrpc connection used by concurrent calls."""

    def __init__(self, transport: asyncio.Transport, protocol: _ClientProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def connect(cls, address: str, *, timeout: float | None = 5.0) -> Client:
        """Dial a unix socket (`unix:///path`, `/path`, or `\\0abstract`)."""
        loop = asyncio.get_running_loop()
        path = socket_path(address)
        async with asyncio.timeout(timeout):
            transport, protocol = await loop.create_unix_connection(_ClientProtocol, path)
        assert isinstance(transport, asyncio.Transport)
        return cls(transport, protocol)

    @property
    def closed(self) -> bool:
        return self._protocol.closed

    async def call(
        self,
        service: str,
        method: str,
        request: Any,
        response_type: type[T],
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> T:
        """Send one unary request and return the decoded response; errors raise TtrpcError."""
        code, message, payload = await self.call_raw(
            service, method, encode(request), timeout=timeout, metadata=metadata
        )
        if code != Code.OK:
            raise TtrpcError(code, message)
        try:
            check_wellformed(payload)
            return response_type.parse(payload)  # type: ignore[attr-defined,no-any-return]
        except Exception as exc:
            raise TtrpcError(Code.INTERNAL, f"unmarshal {method} response: {exc}") from None

    async def call_raw(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> tuple[int, str, bytes]:
        """Like `call` but returns (code, message, payload) without decoding or raising on status."""
        protocol = self._protocol
        if protocol.closed:
            raise ConnectionClosed()
        pairs: list[tuple[str, str]] = []
        for key, values in (metadata or {}).items():
            for value in [values] if isinstance(values, str) else values:
                pairs.append((key, value))
        timeout_nano = int(timeout * 1e9) if timeout is not None and timeout > 0 else 0
        stream_id = protocol.core.send_request(service, method, payload, timeout_nano, pairs)
        future: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        protocol.waiters[stream_id] = future
        protocol.flush()
        try:
            async with asyncio.timeout(timeout):
                response = await future
        except TimeoutError:
            raise TtrpcError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: context deadline exceeded") from None
        finally:
            if protocol.waiters.pop(stream_id, None) is not None:
                protocol.core.abandon(stream_id)
        return response.code, response.message, response.payload

    async def close(self) -> None:
        self._transport.close()
        await self._protocol.wait_closed()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _ClientProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.core = ClientConnection()
        self.waiters: dict[int, asyncio.Future[ResponseReceived]] = {}
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        for event in self.core.receive_data(data):
            if isinstance(event, ResponseReceived):
                future = self.waiters.pop(event.stream_id, None)
                if future is not None and not future.done():
                    future.set_result(event)
            elif isinstance(event, ProtocolViolation):
                log.warning("ttrpc client: closing connection: %s", event.reason)
                self._fail(f"ttrpc: protocol error from server: {event.reason}")
                if self._transport is not None:
                    self._transport.abort()
                return

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail("ttrpc: closed" if exc is None else f"ttrpc: closed: {exc}")
        if not self._lost.done():
            self._lost.set_result(None)

    def _fail(self, message: str) -> None:
        self.closed = True
        waiters, self.waiters = self.waiters, {}
        for future in waiters.values():
            if not future.done():
                future.set_exception(ConnectionClosed(message))

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._lost)
