"""`encode(message)`: the bytes of a betterproto2 message, as `bytes(message)` gives them, faster.

Every request the daemon answers and every event it publishes is serialized (the response, its
ttrpc envelope; the event, its Any, its ForwardRequest). betterproto2's `__bytes__` works field
by field through generic helpers and builds a fresh default value for every field it looks at:
~36 us for a StateResponse here, a quarter of the daemon's CPU for a State call. Here each
message class is compiled once into a list of field encoders with the field's key bytes and
default value worked out ahead, which gives the same bytes in a fraction of the time.

Same bytes, not merely equivalent ones (tests/unit/test_encode.py compares them for every
message class of shim.api): fields in declaration order, a field skipped when it is None or
equal to its default, a set message field written even when empty, map entries written whole,
unknown fields appended. A class with anything this module does not know (fixed-width and
zigzag numbers, floats, pydantic dataclasses) is left to betterproto2 as a whole.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import betterproto2

_VARINT_TYPES = frozenset((betterproto2.TYPE_ENUM, betterproto2.TYPE_BOOL, betterproto2.TYPE_INT32,
                           betterproto2.TYPE_INT64, betterproto2.TYPE_UINT32, betterproto2.TYPE_UINT64))
_SMALL = [bytes((i,)) for i in range(128)]

#: message class -> its encoder, or None: betterproto2 encodes it
_compiled: dict[type, Callable[[Any], bytes] | None] = {}


def encode(message: Any) -> bytes:
    """bytes(message), computed by the class's compiled encoder when it has one."""
    cls = type(message)
    try:
        encoder = _compiled[cls]
    except KeyError:
        encoder = _compiled[cls] = _compile(cls)
    return encoder(message) if encoder is not None else bytes(message)


def varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _SMALL[value]
    if value < 0:
        value += 1 << 64  # negative int32/int64/enum values take ten bytes, as in Go
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _scalar(proto_type: str, unwrap) -> Callable[[Any], bytes] | None:
    """The payload of one value of proto_type (no key): a varint, the raw bytes or the message."""
    if proto_type in _VARINT_TYPES:
        return lambda value: varint(int(value))
    if proto_type == betterproto2.TYPE_STRING:
        return lambda value: value.encode("utf-8")
    if proto_type == betterproto2.TYPE_BYTES:
        return bytes
    if proto_type == betterproto2.TYPE_MESSAGE:
        if unwrap is not None:
            return lambda value: encode(unwrap().from_wrapped(value))
        return encode
    return None


def _single(number: int, proto_type: str, unwrap) -> Callable[[Any], bytes] | None:
    """Key and payload of one value (betterproto2's _serialize_single)."""
    payload = _scalar(proto_type, unwrap)
    if payload is None:
        return None
    if proto_type in _VARINT_TYPES:
        key = varint(number << 3)
        return lambda value: key + payload(value)
    key = varint((number << 3) | 2)

    def length_delimited(value) -> bytes:
        data = payload(value)
        return key + varint(len(data)) + data
    return length_delimited


def _field(name: str, meta, default: Any) -> Callable[[Any, bytearray], None] | None:
    if meta.map_meta:
        key_meta, value_meta = meta.map_meta
        encode_key = _single(1, key_meta.proto_type, None)
        encode_value = _single(2, value_meta.proto_type, value_meta.unwrap)
        if encode_key is None or encode_value is None:
            return None
        entry_key = varint((meta.number << 3) | 2)

        def write_map(value, out: bytearray) -> None:
            for k, v in value.items():
                entry = encode_key(k) + encode_value(v)
                out += entry_key
                out += varint(len(entry))
                out += entry
        write = write_map
    elif meta.repeated and meta.proto_type in betterproto2.PACKED_TYPES:
        if meta.proto_type not in _VARINT_TYPES:
            return None
        packed_key = varint((meta.number << 3) | 2)

        def write_packed(value, out: bytearray) -> None:
            data = b"".join(varint(int(item)) for item in value)
            out += packed_key
            out += varint(len(data))
            out += data
        write = write_packed
    else:
        single = _single(meta.number, meta.proto_type, meta.unwrap)
        if single is None:
            return None
        if meta.repeated:
            def write_repeated(value, out: bytearray) -> None:
                for item in value:
                    out += single(item)
            write = write_repeated
        else:
            def write_one(value, out: bytearray) -> None:
                out += single(value)
            write = write_one

    def field(message, out: bytearray) -> None:
        value = getattr(message, name)
        if value is None or value == default:
            return
        write(value, out)
    return field


def _compile(cls: type) -> Callable[[Any], bytes] | None:
    pydantic = getattr(betterproto2, "pydantic", None)
    if pydantic is not None and pydantic.dataclasses.is_pydantic_dataclass(cls):
        return None  # validated when serialized: betterproto2's business
    try:
        metadata = cls._betterproto  # a class property, made on first use
    except Exception:
        return None
    fields = []
    for name, meta in metadata.meta_by_field_name.items():
        field = _field(name, meta, metadata.default_gen[name]())
        if field is None:
            return None
        fields.append(field)

    def encode_message(message) -> bytes:
        out = bytearray()
        for field in fields:
            field(message, out)
        out += message._unknown_fields
        return bytes(out)
    return encode_message
