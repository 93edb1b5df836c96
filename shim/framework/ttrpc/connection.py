"""Per-connection ttrpc state machines, sans-IO.

`ServerConnection` and `ClientConnection` turn received bytes into events and calls into
bytes to send. They own stream bookkeeping and every protocol rule; the asyncio adapters in
server.py and client.py only move bytes and run handlers.

Rules kept here (containerd/ttrpc 1.2 behaviour, which 1.1 peers also satisfy):
- client streams have odd ids, start at 1 and strictly increase; the server answers an even
  or re-used id with INVALID_ARGUMENT on that stream and keeps the connection;
- a payload over 4 MiB is answered with RESOURCE_EXHAUSTED on its stream (server) or fails
  its call (client), and the connection goes on;
- an undecodable Request is INVALID_ARGUMENT on its stream;
- an unknown frame type means the byte stream is garbage: the connection is closed;
- responses are matched to calls by stream id only, in whatever order they arrive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from shim.api.google.rpc import Status
from shim.api.ttrpc import KeyValue, Request, Response

from .frames import (
    MAX_MESSAGE_SIZE,
    FrameDecoder,
    Frame,
    MessageType,
    OversizedFrame,
    ProtocolViolation,
    encode_frame,
)
from .encode import encode
from .status import Code, ConnectionClosed, TtrpcError
from .wire import check_wellformed

MAX_STREAM_ID = (1 << 32) - 1


class RequestReceived(NamedTuple):
    stream_id: int
    request: Request


class ResponseReceived(NamedTuple):
    stream_id: int
    code: int
    message: str
    payload: bytes


def _oversize_message(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MAX_MESSAGE_SIZE}"


def _encode_response(stream_id: int, payload: bytes, code: int, message: str) -> bytes:
    if code == Code.OK:
        # Like the Go server, leave status unset on success: clients read "no status" as OK.
        response = Response(payload=payload)
    else:
        response = Response(status=Status(code=int(code), message=message), payload=payload)
    return encode_frame(stream_id, MessageType.RESPONSE, encode(response))


class ServerConnection:
    """Server side of one ttrpc connection."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._last_stream_id = 0
        self._active: set[int] = set()
        self._outgoing = bytearray()

    @property
    def active_streams(self) -> frozenset[int]:
        return frozenset(self._active)

    def receive_data(self, data: bytes) -> list[RequestReceived | ProtocolViolation]:
        events: list[RequestReceived | ProtocolViolation] = []
        for frame in self._decoder.feed(data):
            if isinstance(frame, ProtocolViolation):
                events.append(frame)
            elif isinstance(frame, OversizedFrame):
                if frame.type == MessageType.REQUEST:
                    self._reject(frame.stream_id, Code.RESOURCE_EXHAUSTED, _oversize_message(frame.length))
            elif frame.type == MessageType.REQUEST:
                event = self._on_request(frame)
                if event is not None:
                    events.append(event)
            elif frame.type == MessageType.DATA:
                # All shim APIs are unary: a data frame can only belong to a stream we are not
                # reading. Answer only streams we do not know, as ttrpc 1.2 does.
                if frame.stream_id not in self._active:
                    self._reject(frame.stream_id, Code.INVALID_ARGUMENT, "StreamID is no longer active")
            # Response frames sent to a server are ignored, as the Go server does.
        return events

    def receive_eof(self) -> ProtocolViolation | None:
        """The peer closed its side; report a frame cut short by it."""
        if self._decoder.mid_frame:
            return ProtocolViolation("connection closed in the middle of a frame")
        return None

    def _on_request(self, frame: Frame) -> RequestReceived | None:
        stream_id = frame.stream_id
        if stream_id % 2 != 1:
            self._reject(stream_id, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            return None
        if stream_id <= self._last_stream_id:
            self._reject(stream_id, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment")
            return None
        self._last_stream_id = stream_id
        try:
            check_wellformed(frame.payload)
            request = Request.parse(frame.payload)
        except Exception as exc:  # betterproto raises many types on malformed input
            self._reject(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return None
        self._active.add(stream_id)
        return RequestReceived(stream_id, request)

    def _reject(self, stream_id: int, code: Code, message: str) -> None:
        self._outgoing += _encode_response(stream_id, b"", code, message)

    def send_response(self, stream_id: int, payload: bytes = b"", code: int = Code.OK, message: str = "") -> None:
        """Queue the one response of an active stream; the stream is then finished."""
        if stream_id not in self._active:
            raise ValueError(f"stream {stream_id} is not awaiting a response")
        self._active.discard(stream_id)
        if len(payload) > MAX_MESSAGE_SIZE - 64:
            payload, code, message = b"", Code.RESOURCE_EXHAUSTED, _oversize_message(len(payload))
        self._outgoing += _encode_response(stream_id, payload, code, message)

    def abandon(self, stream_id: int) -> None:
        """Forget a stream without answering it (its connection is going away)."""
        self._active.discard(stream_id)

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data


class ClientConnection:
    """Client side of one ttrpc connection."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._next_stream_id = 1
        self._pending: set[int] = set()
        self._outgoing = bytearray()

    @property
    def pending_streams(self) -> frozenset[int]:
        return frozenset(self._pending)

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> int:
        """Queue a request on a new stream and return the stream id."""
        request = Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=timeout_nano,
            metadata=[KeyValue(key=k, value=v) for k, v in metadata],
        )
        encoded = encode(request)
        if len(encoded) > MAX_MESSAGE_SIZE:
            raise TtrpcError(Code.RESOURCE_EXHAUSTED, _oversize_message(len(encoded)))
        stream_id = self._next_stream_id
        if stream_id > MAX_STREAM_ID:
            raise ConnectionClosed("ttrpc: stream ids exhausted on this connection")
        self._next_stream_id += 2
        self._pending.add(stream_id)
        self._outgoing += encode_frame(stream_id, MessageType.REQUEST, encoded)
        return stream_id

    def abandon(self, stream_id: int) -> None:
        """Stop waiting for a stream (its call timed out); a late response is dropped."""
        self._pending.discard(stream_id)

    def receive_data(self, data: bytes) -> list[ResponseReceived | ProtocolViolation]:
        events: list[ResponseReceived | ProtocolViolation] = []
        for frame in self._decoder.feed(data):
            if isinstance(frame, ProtocolViolation):
                events.append(frame)
                continue
            if frame.type != MessageType.RESPONSE or frame.stream_id not in self._pending:
                continue  # late answer to an abandoned call, or a frame type we never asked for
            self._pending.discard(frame.stream_id)
            if isinstance(frame, OversizedFrame):
                events.append(
                    ResponseReceived(frame.stream_id, Code.RESOURCE_EXHAUSTED, _oversize_message(frame.length), b"")
                )
                continue
            try:
                check_wellformed(frame.payload)
                response = Response.parse(frame.payload)
            except Exception as exc:
                events.append(ResponseReceived(frame.stream_id, Code.INTERNAL, f"unmarshal response error: {exc}", b""))
                continue
            status = response.status
            code = status.code if status is not None else Code.OK
            message = status.message if status is not None else ""
            events.append(ResponseReceived(frame.stream_id, code, message, response.payload))
        return events

    def receive_eof(self) -> ProtocolViolation | None:
        if self._decoder.mid_frame:
            return ProtocolViolation("connection closed in the middle of a frame")
        return None

    def data_to_send(self) -> bytes:
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data
