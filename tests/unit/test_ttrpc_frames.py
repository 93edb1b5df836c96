"""Framing: split, coalesced, oversized, zero-length and garbage input."""

from __future__ import annotations

import pytest

from shim.framework.ttrpc.frames import (
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Flags,
    Frame,
    FrameDecoder,
    FrameTooLarge,
    MessageType,
    OversizedFrame,
    ProtocolViolation,
    encode_frame,
)


def test_header_layout_is_big_endian_length_stream_type_flags():
    assert encode_frame(0x01020304, MessageType.RESPONSE, b"xy", Flags.REMOTE_CLOSED) == (
        b"\x00\x00\x00\x02" b"\x01\x02\x03\x04" b"\x02" b"\x01" b"xy"
    )
    assert HEADER_SIZE == 10


def test_whole_frame_in_one_chunk():
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(1, MessageType.REQUEST, b"hello")) == [Frame(1, 1, 0, b"hello")]
    assert not decoder.mid_frame


def test_frame_split_at_every_byte():
    data = encode_frame(7, MessageType.REQUEST, b"payload", Flags.REMOTE_OPEN)
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        events = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert events == [Frame(7, 1, 2, b"payload")], cut


def test_byte_by_byte():
    data = encode_frame(3, MessageType.DATA, b"abc", Flags.REMOTE_CLOSED | Flags.NO_DATA)
    decoder = FrameDecoder()
    events = []
    for i in range(len(data)):
        events += decoder.feed(data[i : i + 1])
        if i < len(data) - 1:
            assert decoder.mid_frame
    assert events == [Frame(3, 3, 5, b"abc")]


def test_coalesced_frames_and_a_trailing_partial():
    frames = [encode_frame(i, MessageType.REQUEST, bytes([i]) * i) for i in (1, 3, 5)]
    tail = encode_frame(7, MessageType.REQUEST, b"tail")
    decoder = FrameDecoder()
    events = decoder.feed(b"".join(frames) + tail[:4])
    assert [e.stream_id for e in events] == [1, 3, 5]
    assert decoder.mid_frame
    assert decoder.feed(tail[4:]) == [Frame(7, 1, 0, b"tail")]


def test_zero_length_payload():
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(9, MessageType.RESPONSE, b"")) == [Frame(9, 2, 0, b"")]


def test_max_size_payload_is_accepted():
    payload = b"\x00" * MAX_MESSAGE_SIZE
    decoder = FrameDecoder()
    (frame,) = decoder.feed(encode_frame(1, MessageType.REQUEST, payload))
    assert isinstance(frame, Frame) and len(frame.payload) == MAX_MESSAGE_SIZE


def test_encoder_refuses_oversized_payload():
    with pytest.raises(FrameTooLarge, match="exceed maximum message size of 4194304"):
        encode_frame(1, MessageType.REQUEST, b"\x00" * (MAX_MESSAGE_SIZE + 1))


def test_oversized_payload_is_skipped_without_buffering():
    length = MAX_MESSAGE_SIZE + 1
    header = (length).to_bytes(4, "big") + (5).to_bytes(4, "big") + bytes([1, 0])
    decoder = FrameDecoder()
    assert decoder.feed(header) == []
    chunk = b"\xff" * 65536
    sent = 0
    while sent + len(chunk) < length:
        assert decoder.feed(chunk) == []
        assert len(decoder._buffer) == 0  # nothing of the oversized payload is kept
        sent += len(chunk)
    rest = length - sent
    follow = encode_frame(7, MessageType.REQUEST, b"next")
    events = decoder.feed(b"\xff" * rest + follow)
    assert events == [OversizedFrame(5, 1, 0, length), Frame(7, 1, 0, b"next")]


def test_oversized_frame_inside_one_chunk():
    length = MAX_MESSAGE_SIZE + 10
    data = length.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([1, 0]) + b"\x00" * length
    data += encode_frame(3, MessageType.REQUEST, b"ok")
    assert FrameDecoder().feed(data) == [OversizedFrame(1, 1, 0, length), Frame(3, 1, 0, b"ok")]


def test_unknown_type_is_a_protocol_violation_and_decoder_stops():
    decoder = FrameDecoder()
    events = decoder.feed(encode_frame(1, MessageType.REQUEST, b"a") + b"GET / HTTP/1.1\r\n\r\n")
    assert events[0] == Frame(1, 1, 0, b"a")
    assert isinstance(events[1], ProtocolViolation)
    assert decoder.failed
    assert decoder.feed(encode_frame(3, MessageType.REQUEST, b"a")) == []


def test_truncated_header_is_mid_frame():
    decoder = FrameDecoder()
    decoder.feed(b"\x00\x00\x00")
    assert decoder.mid_frame
