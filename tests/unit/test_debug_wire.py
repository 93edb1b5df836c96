"""The debug protocol's sans-IO core (shim.framework.debug.wire), fed byte strings only.

What matters: whatever a client sends, the daemon gets a Request, None (not yet a whole
line) or a WireError whose text it can send back; no other exception ever escapes into the
daemon's loop. The client side (ReplyReader) holds to the same rule.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.framework.debug.wire import (
    LOG_LEVELS,
    MAX_REQUEST_LINE,
    OPS,
    ReplyReader,
    Request,
    RequestReader,
    WireError,
    encode_error,
    encode_ok,
    encode_record,
    parse_reply,
    parse_request,
)


def refusal(line: bytes) -> str:
    """The text of the WireError that parse_request raises for line."""
    with pytest.raises(WireError) as caught:
        parse_request(line)
    return str(caught.value)


# -- parse_request -------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_each_op_round_trips_through_encode(op):
    request = Request(op, id="web" if op == "inspect" else "", level="debug" if op == "log-level" else "")
    line = request.encode()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_request(line[:-1]) == request


def test_encode_leaves_out_empty_fields():
    assert json.loads(Request("ls").encode()) == {"op": "ls"}
    assert json.loads(Request("trace", id="web", namespace="k8s.io").encode()) == {
        "op": "trace", "id": "web", "namespace": "k8s.io"}


def test_trace_with_namespace_and_id():
    assert parse_request(b'{"op":"trace","id":"web","namespace":"k8s.io"}') == Request("trace", "web", "k8s.io")


@pytest.mark.parametrize("line", [b"", b"ls", b"{", b'{"op": "ls"', b"\xff\xfe\x00", b"{'op': 'ls'}", b"1" * 5000])
def test_not_json(line):
    assert refusal(line) == "request is not a JSON line"


@pytest.mark.parametrize("line", [b"[]", b'["ls"]', b'"ls"', b"42", b"null", b"true"])
def test_json_but_not_an_object(line):
    assert refusal(line) == "request must be a JSON object"


def test_deeply_nested_json_is_a_wire_error_not_a_recursion_error():
    # Fits in one request line, but deeper than the json module's recursion limit.
    depth = MAX_REQUEST_LINE // 2 - 20
    nested = b'{"op":"ls","id":' + b"[" * depth + b"]" * depth + b"}"
    assert len(nested) <= MAX_REQUEST_LINE
    assert "JSON" in refusal(nested)
    assert "JSON" in refusal(b"[" * MAX_REQUEST_LINE)


@pytest.mark.parametrize("line", [b"{}", b'{"op": "rm"}', b'{"op": "LS"}', b'{"op": null}', b'{"op": 1}',
                                  b'{"op": ["ls"]}', b'{"op": {"ls": 1}}', b'{"id": "web"}'])
def test_unknown_or_missing_op(line):
    message = refusal(line)
    assert message.startswith("unknown op ")
    assert "ls, inspect, trace, stacks, log-level" in message  # says what would do


@pytest.mark.parametrize("field", ["id", "namespace", "level"])
@pytest.mark.parametrize("value", [1, None, True, ["web"], {"a": "b"}, 1.5])
def test_fields_must_be_strings(field, value):
    line = json.dumps({"op": "ls", field: value}).encode()
    assert refusal(line) == f"{field} must be a string"


def test_unknown_fields_are_named():
    assert refusal(b'{"op": "ls", "all": true}') == "unknown field(s) all"
    assert refusal(b'{"op": "ls", "zz": 1, "aa": 2}') == "unknown field(s) aa, zz"


def test_inspect_needs_an_id():
    assert refusal(b'{"op": "inspect"}') == "inspect needs an id"
    assert refusal(b'{"op": "inspect", "id": ""}') == "inspect needs an id"


@pytest.mark.parametrize("level", ["", "loud", "verbose", "10"])
def test_log_level_must_be_known(level):
    message = refusal(json.dumps({"op": "log-level", "level": level}).encode())
    assert message.startswith(f"unknown log level {level!r}")
    assert "debug" in message and "warn" in message


@pytest.mark.parametrize("level", sorted(LOG_LEVELS) + ["DEBUG", "Warn"])
def test_log_levels_of_containerd_and_python_in_any_case(level):
    assert parse_request(json.dumps({"op": "log-level", "level": level}).encode()).level == level


# -- RequestReader ---------------------------------------------------------------------------


def test_request_reader_byte_by_byte():
    reader = RequestReader()
    line = b'{"op":"inspect","id":"web"}\n'
    for byte in line[:-1]:
        assert reader.feed(bytes([byte])) is None
    assert reader.feed(b"\n") == Request("inspect", id="web")
    assert reader.done
    reader.feed_eof()  # after a whole request, EOF is the client being done


def test_request_reader_ignores_what_follows_the_request():
    reader = RequestReader()
    assert reader.feed(b'{"op":"ls"}\n{"op":"stacks"}\n') == Request("ls")
    assert reader.feed(b"anything at all\n") is None
    assert reader.feed(b"x" * (MAX_REQUEST_LINE * 2)) is None


def test_request_line_of_exactly_the_limit_is_read():
    padding = MAX_REQUEST_LINE - len(b'{"op":"inspect","id":""}')
    line = b'{"op":"inspect","id":"' + b"x" * padding + b'"}'
    assert len(line) == MAX_REQUEST_LINE
    assert RequestReader().feed(line + b"\n") == Request("inspect", id="x" * padding)


def test_request_line_longer_than_the_limit_without_newline():
    reader = RequestReader()
    assert reader.feed(b"x" * MAX_REQUEST_LINE) is None  # may still end here
    with pytest.raises(WireError, match=f"longer than {MAX_REQUEST_LINE} bytes"):
        reader.feed(b"x")


def test_request_line_longer_than_the_limit_with_newline():
    with pytest.raises(WireError, match=f"longer than {MAX_REQUEST_LINE} bytes"):
        RequestReader().feed(b" " * (MAX_REQUEST_LINE + 1) + b'{"op":"ls"}\n')


@pytest.mark.parametrize("sent", [b"", b'{"op":"ls"}', b"{"])
def test_eof_before_a_whole_line(sent):
    reader = RequestReader()
    assert reader.feed(sent) is None
    with pytest.raises(WireError, match="closed before a whole request line"):
        reader.feed_eof()


def test_bad_line_is_refused_once_read_whole():
    reader = RequestReader()
    assert reader.feed(b'{"op":') is None
    with pytest.raises(WireError, match="unknown op 'rm'"):
        reader.feed(b'"rm"}\n')


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=2 * MAX_REQUEST_LINE), max_size=6), st.booleans())
def test_any_bytes_give_a_request_none_or_wire_error(chunks, eof):
    reader = RequestReader()
    for chunk in chunks:
        try:
            request = reader.feed(chunk)
        except WireError as exc:
            assert str(exc)
            return  # the server answers and closes here
        assert request is None or isinstance(request, Request)
    if eof:
        try:
            reader.feed_eof()
        except WireError as exc:
            assert str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["op", "id", "namespace", "level", "extra"]),
                       json_values | st.sampled_from(OPS + tuple(LOG_LEVELS)), max_size=5))
def test_any_json_object_gives_a_request_or_wire_error(fields):
    line = json.dumps(fields).encode()
    try:
        request = RequestReader().feed(line + b"\n")
    except WireError as exc:
        assert str(exc)
        return
    assert isinstance(request, Request) and request.op in OPS


# -- replies ---------------------------------------------------------------------------------


def test_reply_encoders_are_one_line_each():
    for line in (encode_ok({"a": [1, "x\ny"]}), encode_error("no\nway"), encode_record({"id": "web"})):
        assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert parse_reply(encode_ok(3)[:-1]) == {"ok": True, "result": 3}
    assert parse_reply(encode_error("bad")[:-1]) == {"ok": False, "error": "bad"}
    assert parse_reply(encode_record({"id": "web"})[:-1]) == {"record": {"id": "web"}}


def test_values_json_cannot_encode_are_sent_as_text():
    class Odd:
        def __str__(self) -> str:
            return "odd"

    assert parse_reply(encode_ok({"x": Odd()})[:-1]) == {"ok": True, "result": {"x": "odd"}}


def test_reply_reader_lines_split_across_feeds():
    stream = encode_ok({"pid": 7}) + encode_record({"id": "a"}) + encode_record({"id": "b"})
    reader = ReplyReader()
    replies = []
    for start in range(0, len(stream), 5):
        replies += reader.feed(stream[start:start + 5])
    assert replies == [{"ok": True, "result": {"pid": 7}}, {"record": {"id": "a"}}, {"record": {"id": "b"}}]
    reader.feed_eof()


def test_reply_reader_several_lines_in_one_feed():
    reader = ReplyReader()
    assert reader.feed(encode_ok(1) + encode_ok(2) + b'{"ok"') == [{"ok": True, "result": 1},
                                                                     {"ok": True, "result": 2}]
    assert reader.feed(b":false}\n") == [{"ok": False}]


@pytest.mark.parametrize("line, message", [
    (b"garbage", "reply is not a JSON line"),
    (b"\xff\xfe\xfd", "reply is not a JSON line"),
    (b"[1, 2]", "reply is not a debug protocol message"),
    (b'{"result": 1}', "reply is not a debug protocol message"),
    (b"null", "reply is not a debug protocol message"),
])
def test_reply_reader_garbage_lines(line, message):
    with pytest.raises(WireError, match=message):
        ReplyReader().feed(line + b"\n")


def test_reply_reader_deeply_nested_json_is_a_wire_error():
    with pytest.raises(WireError):
        ReplyReader().feed(b"[" * 100_000 + b"\n")


def test_reply_reader_eof_mid_line():
    reader = ReplyReader()
    assert reader.feed(encode_ok(1)[:-3]) == []
    with pytest.raises(WireError, match="closed in the middle of a reply line"):
        reader.feed_eof()


def test_reply_reader_line_limit():
    reader = ReplyReader(max_line=64)
    assert reader.feed(b"x" * 64) == []
    with pytest.raises(WireError, match="reply line longer than 64 bytes"):
        reader.feed(b"x")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=256), max_size=8))
def test_any_bytes_give_replies_or_wire_error(chunks):
    reader = ReplyReader(max_line=1024)
    try:
        for chunk in chunks:
            assert all(isinstance(reply, dict) for reply in reader.feed(chunk))
        reader.feed_eof()
    except WireError as exc:
        assert str(exc)

