"""ttrpc framing, sans-IO: bytes in, frames out; frames in, bytes out.

Every ttrpc message on a connection is a 10-byte header followed by a protobuf payload:

    uint32 BE  payload length (header excluded)
    uint32 BE  stream id
    uint8      message type   (1 request, 2 response, 3 data)
    uint8      flags          (type specific)

No socket or event loop here: `FrameDecoder.feed` takes whatever chunk the transport read
(a partial header, several frames at once, anything) and returns whole frames. It never
holds more than one frame's worth of payload: an oversized payload is skipped as it
streams past, so a peer announcing a 4 GiB message costs us nothing but the bytes read.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10

#: Largest payload either side accepts (ttrpc's messageLengthMax, 4 MiB).
MAX_MESSAGE_SIZE = 4 << 20


class MessageType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3  # ttrpc >= 1.2 streaming; containerd's shim APIs are all unary


class Flags(enum.IntFlag):
    NONE = 0
    REMOTE_CLOSED = 0x1
    REMOTE_OPEN = 0x2
    NO_DATA = 0x4


class Frame(NamedTuple):
    stream_id: int
    type: int
    flags: int
    payload: bytes


class OversizedFrame(NamedTuple):
    """A frame whose payload exceeded MAX_MESSAGE_SIZE; the payload was discarded.

    The stream id is still known, so the receiver can answer that one stream with
    RESOURCE_EXHAUSTED and keep the connection.
    """

    stream_id: int
    type: int
    flags: int
    length: int


class ProtocolViolation(NamedTuple):
    """The byte stream cannot be framed any further; the connection must be closed."""

    reason: str


FrameEvent = Frame | OversizedFrame | ProtocolViolation


class FrameTooLarge(ValueError):
    """Raised when asked to encode a payload over MAX_MESSAGE_SIZE."""


def encode_frame(stream_id: int, message_type: int, payload: bytes, flags: int = 0) -> bytes:
    if len(payload) > MAX_MESSAGE_SIZE:
        raise FrameTooLarge(
            f"message length {len(payload)} exceed maximum message size of {MAX_MESSAGE_SIZE}"
        )
    return HEADER.pack(len(payload), stream_id, message_type, flags) + payload


_KNOWN_TYPES = frozenset(int(t) for t in MessageType)


class FrameDecoder:
    """Incremental frame decoder for one direction of one connection."""

    __slots__ = ("_buffer", "_skip", "_skipped_header", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of an oversized frame still to be thrown away
        self._skipped_header: tuple[int, int, int, int] | None = None
        self._failed = False

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def mid_frame(self) -> bool:
        """True when EOF now would cut a frame short (a truncated header or payload)."""
        return bool(self._buffer) or self._skip > 0

    def feed(self, data: bytes) -> list[FrameEvent]:
        if self._failed:
            return []
        events: list[FrameEvent] = []
        view = memoryview(data)
        if self._skip:
            taken = min(self._skip, len(view))
            self._skip -= taken
            view = view[taken:]
            if self._skip == 0:
                events.append(self._oversized_done())
        self._buffer += view
        buf = self._buffer
        offset = 0
        while len(buf) - offset >= HEADER_SIZE:
            length, stream_id, message_type, flags = HEADER.unpack_from(buf, offset)
            if message_type not in _KNOWN_TYPES:
                # Random bytes almost never carry a valid type: this is how garbage (an HTTP
                # client, a confused peer) is told apart from a real frame, before its length
                # field makes us wait for gigabytes that will never come.
                self._failed = True
                self._buffer = bytearray()
                events.append(ProtocolViolation(f"unknown message type {message_type:#x}"))
                return events
            if length > MAX_MESSAGE_SIZE:
                offset += HEADER_SIZE
                available = len(buf) - offset
                taken = min(available, length)
                offset += taken
                if taken == length:
                    events.append(OversizedFrame(stream_id, message_type, flags, length))
                else:
                    self._skip = length - taken
                    self._skipped_header = (stream_id, message_type, flags, length)
                    break
                continue
            end = offset + HEADER_SIZE + length
            if end > len(buf):
                break
            events.append(Frame(stream_id, message_type, flags, bytes(buf[offset + HEADER_SIZE : end])))
            offset = end
        if offset:
            del buf[:offset]
        return events

    def _oversized_done(self) -> OversizedFrame:
        assert self._skipped_header is not None
        stream_id, message_type, flags, length = self._skipped_header
        self._skipped_header = None
        return OversizedFrame(stream_id, message_type, flags, length)
