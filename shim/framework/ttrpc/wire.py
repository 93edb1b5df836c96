"""A strict well-formedness check of protobuf wire data.

betterproto2's parser is lenient: it accepts truncated input and turns a bad wire type into a
None field. containerd's Go peers reject such bytes, and so must we, before a handler sees a
half-decoded request. This walks the top level of a message: every tag and varint must end,
every length must fit, every wire type must be one of 0, 1, 2, 5 (groups are long gone).
"""

from __future__ import annotations


class MalformedMessage(ValueError):
    pass


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise MalformedMessage("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise MalformedMessage("varint longer than 10 bytes")


def check_wellformed(data: bytes) -> None:
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos, end)
        wire_type, field_number = key & 7, key >> 3
        if field_number == 0:
            raise MalformedMessage("field number 0")
        if wire_type == 0:
            _, pos = _varint(data, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            length, pos = _varint(data, pos, end)
            pos += length
        elif wire_type == 5:
            pos += 4
        else:
            raise MalformedMessage(f"field {field_number} has invalid wire type {wire_type}")
        if pos > end:
            raise MalformedMessage(f"field {field_number} runs past the end of the message")


def string_fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields at the top level of a message, last one wins.

    Enough to peek at a message without importing the protobuf runtime (the `start` path
    uses it to tell containerd 2.3's BootstrapParams from runtime options).
    """
    check_wellformed(data)
    found: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos, end)
        wire_type, field_number = key & 7, key >> 3
        if wire_type == 0:
            _, pos = _varint(data, pos, end)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            length, pos = _varint(data, pos, end)
            found[field_number] = data[pos : pos + length]
            pos += length
    return found


def _encode_varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # int64 two's complement, as protobuf encodes negative varints
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_varint_field(field_number: int, value: int) -> bytes:
    """A varint field, omitted when zero (proto3 default)."""
    return _encode_varint(field_number << 3) + _encode_varint(value) if value else b""


def encode_bytes_field(field_number: int, value: bytes) -> bytes:
    return _encode_varint(field_number << 3 | 2) + _encode_varint(len(value)) + value


def encode_timestamp(seconds: int, nanos: int) -> bytes:
    """google.protobuf.Timestamp, for the few hand-encoded messages of the short-lived commands."""
    return encode_varint_field(1, seconds) + encode_varint_field(2, nanos)
