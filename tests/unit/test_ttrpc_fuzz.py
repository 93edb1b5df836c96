"""Property tests: whatever bytes arrive, the cores answer with events, never with a crash,
and never hold more than one frame's worth of payload."""

from __future__ import annotations

import tracemalloc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.api.ttrpc import KeyValue, Request
from shim.framework.ttrpc.connection import ClientConnection, RequestReceived, ServerConnection
from shim.framework.ttrpc.frames import HEADER, HEADER_SIZE, MAX_MESSAGE_SIZE, FrameDecoder, encode_frame

# A fuzz run may be slow on a loaded CI machine; what matters is coverage, not speed.
fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for p in points + [len(data)]:
        pieces.append(data[start:p])
        start = p
    return pieces


def feed_all(core, pieces: list[bytes]) -> list:
    events = []
    for piece in pieces:
        events += core.receive_data(piece)
        assert len(core._decoder._buffer) < HEADER_SIZE + MAX_MESSAGE_SIZE
    core.receive_eof()
    core.data_to_send()
    return events


@fuzz
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0), max_size=8))
def test_server_core_survives_random_bytes(data, cuts):
    feed_all(ServerConnection(), chunked(data, cuts))


@fuzz
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=0), max_size=8))
def test_client_core_survives_random_bytes(data, cuts):
    client = ClientConnection()
    for _ in range(3):
        client.send_request("s", "m", b"")
    feed_all(client, chunked(data, cuts))


frame_st = st.tuples(
    st.integers(min_value=0, max_value=2**32 - 1),  # stream id
    st.integers(min_value=0, max_value=255),  # type
    st.integers(min_value=0, max_value=255),  # flags
    st.one_of(
        st.binary(max_size=256),
        st.builds(
            lambda s, m, p, t, md: bytes(
                Request(service=s, method=m, payload=p, timeout_nano=t, metadata=[KeyValue(key=k, value=v) for k, v in md])
            ),
            st.text(max_size=20),
            st.text(max_size=20),
            st.binary(max_size=64),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
        ),
    ),
)


@fuzz
@given(st.lists(frame_st, max_size=20), st.lists(st.integers(min_value=0), max_size=8))
def test_server_core_random_frame_sequences(frames, cuts):
    data = b"".join(HEADER.pack(len(p), sid, t, f) + p for sid, t, f, p in frames)
    server = ServerConnection()
    events = feed_all(server, chunked(data, cuts))
    # Every accepted request has an odd, strictly increasing stream id.
    ids = [e.stream_id for e in events if isinstance(e, RequestReceived)]
    assert all(i % 2 == 1 for i in ids)
    assert ids == sorted(set(ids))
    # Each can be answered exactly once.
    for i in ids:
        server.send_response(i)
    assert server.active_streams == frozenset()


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=MAX_MESSAGE_SIZE + 1, max_value=2**32 - 1), st.binary(min_size=1, max_size=64))
def test_announced_huge_length_costs_no_memory(length, filler):
    decoder = FrameDecoder()
    header = HEADER.pack(length, 1, 1, 0)
    chunk = (filler * (65536 // len(filler) + 1))[:65536]
    tracemalloc.start()
    try:
        decoder.feed(header)
        for _ in range(128):  # 8 MiB of the announced payload
            decoder.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decoder_buffer_bounded_for_max_size_frame():
    decoder = FrameDecoder()
    frame = encode_frame(1, 1, b"\x00" * MAX_MESSAGE_SIZE)
    for i in range(0, len(frame) - 1, 65536):
        decoder.feed(frame[i : i + 65536])
        assert len(decoder._buffer) < HEADER_SIZE + MAX_MESSAGE_SIZE
