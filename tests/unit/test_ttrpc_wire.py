"""The strict wire check that guards betterproto2's lenient parser."""

import pytest

from shim.framework.ttrpc.wire import MalformedMessage, check_wellformed


@pytest.mark.parametrize(
    "data",
    [b"", b"\x08\x96\x01", b"\x0a\x02hi", b"\x09" + b"\x00" * 8, b"\x0d" + b"\x00" * 4, b"\x0a\x00\x10\x01"],
)
def test_wellformed(data):
    check_wellformed(data)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x0a\xff\xff\xff\x0f", "past the end"),
        (b"\x0a\x05ab", "past the end"),
        (b"\x0f", "invalid wire type 7"),
        (b"\x0b", "invalid wire type 3"),
        (b"\xff", "truncated varint"),
        (b"\x08", "truncated varint"),
        (b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
        (b"\x00\x01", "field number 0"),
        (b"\x09\x00", "past the end"),
    ],
)
def test_malformed(data, reason):
    with pytest.raises(MalformedMessage, match=reason):
        check_wellformed(data)


def test_hand_encoded_delete_response_matches_generated_code():
    import datetime

    from shim.api.containerd.task.v2 import DeleteResponse
    from shim.framework.delete import delete_response

    for pid, status, ns in [(0, 137, 1_700_000_000_123_456_000), (4242, 0, 5_000), (2**31, 255, 0)]:
        when = datetime.datetime.fromtimestamp(ns // 1000 / 1e6, tz=datetime.timezone.utc)
        ours = DeleteResponse.parse(delete_response(pid, status, ns))
        assert (ours.pid, ours.exit_status) == (pid, status)
        assert ours.exited_at == when
        assert delete_response(pid, status, ns) == bytes(DeleteResponse(pid=pid, exit_status=status, exited_at=when))
