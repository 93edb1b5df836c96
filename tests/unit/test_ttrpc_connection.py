"""Sans-IO connection cores: stream-id rules, status replies, response routing."""

from __future__ import annotations

import pytest

from shim.api.google.rpc import Status
from shim.api.ttrpc import KeyValue, Request, Response
from shim.framework.ttrpc.connection import ClientConnection, RequestReceived, ResponseReceived, ServerConnection
from shim.framework.ttrpc.frames import MAX_MESSAGE_SIZE, Flags, Frame, FrameDecoder, MessageType, ProtocolViolation, encode_frame
from shim.framework.ttrpc.status import Code, TtrpcError


def request_frame(stream_id: int, service="svc", method="M", payload=b"", **kw) -> bytes:
    return encode_frame(stream_id, MessageType.REQUEST, bytes(Request(service=service, method=method, payload=payload, **kw)))


def responses(data: bytes) -> list[tuple[int, Response]]:
    return [(f.stream_id, Response.parse(f.payload)) for f in FrameDecoder().feed(data)]


def status_of(response: Response) -> tuple[int, str]:
    return (response.status.code, response.status.message) if response.status else (0, "")


class TestServerConnection:
    def test_request_decoded_with_metadata_and_timeout(self):
        server = ServerConnection()
        md = [KeyValue(key="containerd-namespace-ttrpc", value="default")]
        (event,) = server.receive_data(request_frame(1, "containerd.task.v2.Task", "State", b"\x0a\x01x", timeout_nano=5, metadata=md))
        assert isinstance(event, RequestReceived)
        assert event.stream_id == 1
        assert event.request.service == "containerd.task.v2.Task"
        assert event.request.method == "State"
        assert event.request.payload == b"\x0a\x01x"
        assert event.request.timeout_nano == 5
        assert event.request.metadata[0].value == "default"
        assert server.active_streams == {1}
        assert server.data_to_send() == b""

    def test_success_response_has_no_status(self):
        server = ServerConnection()
        server.receive_data(request_frame(1))
        server.send_response(1, b"\x08\x2a")
        ((stream_id, response),) = responses(server.data_to_send())
        assert stream_id == 1 and response.status is None and response.payload == b"\x08\x2a"
        assert server.active_streams == frozenset()

    def test_error_response_carries_code_and_message(self):
        server = ServerConnection()
        server.receive_data(request_frame(1))
        server.send_response(1, code=Code.NOT_FOUND, message="process does not exist x")
        ((_, response),) = responses(server.data_to_send())
        assert status_of(response) == (5, "process does not exist x")

    def test_responses_in_completion_order(self):
        server = ServerConnection()
        server.receive_data(request_frame(1) + request_frame(3) + request_frame(5))
        for sid in (5, 1, 3):
            server.send_response(sid, bytes([sid]))
        assert [(sid, r.payload) for sid, r in responses(server.data_to_send())] == [(5, b"\x05"), (1, b"\x01"), (3, b"\x03")]

    def test_even_stream_id_rejected_connection_kept(self):
        server = ServerConnection()
        assert server.receive_data(request_frame(2)) == []
        ((sid, response),) = responses(server.data_to_send())
        assert sid == 2 and status_of(response) == (3, "StreamID must be odd for client initiated streams")
        assert len(server.receive_data(request_frame(3))) == 1

    def test_reused_or_decreasing_stream_id_rejected(self):
        server = ServerConnection()
        server.receive_data(request_frame(5))
        assert server.receive_data(request_frame(5) + request_frame(3)) == []
        codes = [(sid, status_of(r)) for sid, r in responses(server.data_to_send())]
        assert codes == [(5, (3, "StreamID cannot be re-used and must increment"))] * 1 + [
            (3, (3, "StreamID cannot be re-used and must increment"))
        ]

    def test_stream_id_zero_is_even(self):
        server = ServerConnection()
        assert server.receive_data(request_frame(0)) == []
        ((sid, response),) = responses(server.data_to_send())
        assert sid == 0 and status_of(response)[0] == Code.INVALID_ARGUMENT

    def test_undecodable_request_is_invalid_argument(self):
        server = ServerConnection()
        assert server.receive_data(encode_frame(1, MessageType.REQUEST, b"\x0a\xff\xff\xff")) == []
        ((sid, response),) = responses(server.data_to_send())
        assert sid == 1 and status_of(response)[0] == Code.INVALID_ARGUMENT
        assert "unmarshal request error" in status_of(response)[1]

    def test_oversized_request_resource_exhausted_and_next_request_served(self):
        server = ServerConnection()
        length = MAX_MESSAGE_SIZE + 1
        header = length.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([MessageType.REQUEST, 0])
        events = server.receive_data(header + b"\x00" * length + request_frame(3))
        assert [e.stream_id for e in events] == [3]
        ((sid, response),) = responses(server.data_to_send())
        assert sid == 1
        assert status_of(response) == (8, f"message length {length} exceed maximum message size of {MAX_MESSAGE_SIZE}")

    def test_oversized_response_becomes_resource_exhausted(self):
        server = ServerConnection()
        server.receive_data(request_frame(1))
        server.send_response(1, b"\x00" * MAX_MESSAGE_SIZE)
        ((_, response),) = responses(server.data_to_send())
        assert status_of(response)[0] == Code.RESOURCE_EXHAUSTED

    def test_data_frame_for_unknown_stream_answered_for_active_ignored(self):
        server = ServerConnection()
        server.receive_data(request_frame(1))
        server.receive_data(encode_frame(1, MessageType.DATA, b"", Flags.REMOTE_CLOSED))
        assert server.data_to_send() == b""
        server.receive_data(encode_frame(9, MessageType.DATA, b"x"))
        ((sid, response),) = responses(server.data_to_send())
        assert sid == 9 and status_of(response) == (3, "StreamID is no longer active")

    def test_response_frames_from_client_ignored(self):
        server = ServerConnection()
        assert server.receive_data(encode_frame(1, MessageType.RESPONSE, b"")) == []
        assert server.data_to_send() == b""

    def test_garbage_is_a_violation(self):
        server = ServerConnection()
        (event,) = server.receive_data(b"\x00\x00\x00\x00\x00\x00\x00\x01\x7f\x00")
        assert isinstance(event, ProtocolViolation)

    def test_truncated_header_at_eof_is_reported(self):
        server = ServerConnection()
        server.receive_data(b"\x00\x00")
        assert isinstance(server.receive_eof(), ProtocolViolation)
        assert ServerConnection().receive_eof() is None

    def test_send_response_twice_is_a_bug(self):
        server = ServerConnection()
        server.receive_data(request_frame(1))
        server.send_response(1)
        with pytest.raises(ValueError):
            server.send_response(1)


class TestClientConnection:
    def test_stream_ids_odd_and_increasing(self):
        client = ClientConnection()
        ids = [client.send_request("s", "m", b"") for _ in range(4)]
        assert ids == [1, 3, 5, 7]
        frames = FrameDecoder().feed(client.data_to_send())
        assert [f.stream_id for f in frames] == ids
        assert all(f.type == MessageType.REQUEST and f.flags == 0 for f in frames)

    def test_request_fields(self):
        client = ClientConnection()
        client.send_request("containerd.task.v2.Task", "Connect", b"\x0a\x02id", 1_000_000, [("k", "a"), ("k", "b")])
        (frame,) = FrameDecoder().feed(client.data_to_send())
        request = Request.parse(frame.payload)
        assert (request.service, request.method, request.payload, request.timeout_nano) == (
            "containerd.task.v2.Task",
            "Connect",
            b"\x0a\x02id",
            1_000_000,
        )
        assert [(kv.key, kv.value) for kv in request.metadata] == [("k", "a"), ("k", "b")]

    def test_out_of_order_responses_routed_by_stream_id(self):
        client = ClientConnection()
        a, b = client.send_request("s", "m", b""), client.send_request("s", "m", b"")
        data = encode_frame(b, MessageType.RESPONSE, bytes(Response(payload=b"B")))
        data += encode_frame(a, MessageType.RESPONSE, bytes(Response(status=Status(code=5, message="nope"))))
        assert client.receive_data(data) == [ResponseReceived(b, 0, "", b"B"), ResponseReceived(a, 5, "nope", b"")]
        assert client.pending_streams == frozenset()

    def test_late_response_for_abandoned_stream_dropped(self):
        client = ClientConnection()
        sid = client.send_request("s", "m", b"")
        client.abandon(sid)
        assert client.receive_data(encode_frame(sid, MessageType.RESPONSE, bytes(Response()))) == []

    def test_response_for_unknown_stream_dropped(self):
        assert ClientConnection().receive_data(encode_frame(41, MessageType.RESPONSE, b"")) == []

    def test_undecodable_response_fails_only_that_call(self):
        client = ClientConnection()
        sid = client.send_request("s", "m", b"")
        (event,) = client.receive_data(encode_frame(sid, MessageType.RESPONSE, b"\x12\xff\xff"))
        assert event.stream_id == sid and event.code == Code.INTERNAL

    def test_oversized_response_fails_only_that_call(self):
        client = ClientConnection()
        sid = client.send_request("s", "m", b"")
        length = MAX_MESSAGE_SIZE + 1
        header = length.to_bytes(4, "big") + sid.to_bytes(4, "big") + bytes([MessageType.RESPONSE, 0])
        (event,) = client.receive_data(header + b"\x00" * length)
        assert event.stream_id == sid and event.code == Code.RESOURCE_EXHAUSTED

    def test_oversized_request_refused_before_sending(self):
        client = ClientConnection()
        with pytest.raises(TtrpcError) as err:
            client.send_request("s", "m", b"\x00" * MAX_MESSAGE_SIZE)
        assert err.value.code == Code.RESOURCE_EXHAUSTED
        assert client.data_to_send() == b""


def test_client_and_server_cores_talk():
    client, server = ClientConnection(), ServerConnection()
    sid = client.send_request("svc", "Echo", b"ping")
    (event,) = server.receive_data(client.data_to_send())
    server.send_response(event.stream_id, event.request.payload + b"!")
    assert client.receive_data(server.data_to_send()) == [ResponseReceived(sid, 0, "", b"ping!")]


def test_frame_type_values():
    assert [int(t) for t in MessageType] == [1, 2, 3]
    assert Frame(1, 1, 0, b"") == (1, 1, 0, b"")
