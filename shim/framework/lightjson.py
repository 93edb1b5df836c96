"""JSON for the short-lived commands (`start`, `delete`), without importing `json`.

`import json` costs a short command ~5 ms here: json.decoder imports `re`, which imports
`enum`, `functools` and `collections`. The C accelerator `_json` that `json` itself uses does
the real work without any of them: its scanner parses, its string encoder quotes. Only what
those commands read and write goes through here (config.json's annotations, the zygote
request, a gRPC start reply): dicts, lists, strings, ints, floats, booleans and null.
"""

from __future__ import annotations

import _json


class _Context:
    """The settings json.JSONDecoder gives its C scanner: json.loads' defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}[name]


_scan = _json.make_scanner(_Context())
_WHITESPACE = " \t\n\r"


def loads(text: str | bytes):
    """Like json.loads for a whole document; ValueError when it is not one."""
    if isinstance(text, (bytes, bytearray)):
        text = text.decode("utf-8")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
    except StopIteration:
        raise ValueError(f"not JSON at offset {start}") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError(f"extra data after the JSON value at offset {end}")
    return value


def dumps(value) -> str:
    """Compact JSON (as json.dumps(value, separators=(",", ":"))) for plain data."""
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return float.__repr__(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dumps(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
