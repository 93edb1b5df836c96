"""The debug protocol, sans-IO: bytes in, requests and replies out.

A client sends one request as one line of JSON, e.g. `{"op": "inspect", "id": "web"}`; the
daemon answers with lines of JSON: `{"ok": true, "result": ...}` or `{"ok": false, "error":
"..."}`, then closes, except that an accepted `trace` goes on with one `{"record": {...}}`
line per thing that happens until either side closes. Anything else a client sends (no
newline within MAX_REQUEST_LINE bytes, not JSON, an unknown op, a field of the wrong type) is
answered with an error line and the connection closed: bad input never reaches the daemon's
state.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

#: A request line longer than this is refused (the longest real one is ~200 bytes).
MAX_REQUEST_LINE = 4096
#: A reply line longer than this is refused by the client (a daemon with 10,000 execs
#: answers `ls` in well under this).
MAX_REPLY_LINE = 64 << 20

OPS = ("ls", "inspect", "trace", "stacks", "log-level")
#: containerd's (logrus) level names and Python's, to Python's.
LOG_LEVELS = {
    "trace": "DEBUG", "debug": "DEBUG", "info": "INFO", "warn": "WARNING", "warning": "WARNING",
    "error": "ERROR", "fatal": "CRITICAL", "panic": "CRITICAL", "critical": "CRITICAL",
}


class WireError(Exception):
    """The peer broke the protocol; str(exc) says how (and is what the daemon answers)."""


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    #: Container id: inspect's subject, trace's filter ("" = everything).
    id: str = ""
    #: containerd namespace the id is in ("" = any).
    namespace: str = ""
    #: log-level's new level (a key of LOG_LEVELS).
    level: str = ""

    def encode(self) -> bytes:
        fields = {k: v for k, v in asdict(self).items() if v or k == "op"}
        return _line(fields)


def _line(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


def encode_ok(result: Any) -> bytes:
    return _line({"ok": True, "result": result})


def encode_error(message: str) -> bytes:
    return _line({"ok": False, "error": message})


def encode_record(record: dict) -> bytes:
    return _line({"record": record})


def parse_request(line: bytes) -> Request:
    """One request line (without its newline) as a Request; WireError says what is wrong."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # `[[[[...` deeper than json can go fits in a line
        raise WireError("request is not a JSON line") from None
    if not isinstance(obj, dict):
        raise WireError("request must be a JSON object")
    op = obj.get("op")
    if op not in OPS:
        raise WireError(f"unknown op {op!r}: want one of {', '.join(OPS)}")
    fields: dict[str, str] = {}
    for name in ("id", "namespace", "level"):
        value = obj.get(name, "")
        if not isinstance(value, str):
            raise WireError(f"{name} must be a string")
        fields[name] = value
    unknown = sorted(set(obj) - {"op", "id", "namespace", "level"})
    if unknown:
        raise WireError(f"unknown field(s) {', '.join(unknown)}")
    request = Request(op, **fields)
    if op == "inspect" and not request.id:
        raise WireError("inspect needs an id")
    if op == "log-level" and request.level.lower() not in LOG_LEVELS:
        raise WireError(f"unknown log level {request.level!r}: want one of {', '.join(LOG_LEVELS)}")
    return request


class RequestReader:
    """Bytes from a client in, its one request out (the daemon reads nothing after it)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> Request | None:
        """The request once its line is complete, else None; WireError on bad input."""
        if self.done:
            return None  # bytes after the request are ignored
        self._buffer += data
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_REQUEST_LINE:
                raise WireError(f"request line longer than {MAX_REQUEST_LINE} bytes")
            return None
        if end > MAX_REQUEST_LINE:
            raise WireError(f"request line longer than {MAX_REQUEST_LINE} bytes")
        self.done = True
        line = bytes(self._buffer[:end])
        self._buffer.clear()
        return parse_request(line)

    def feed_eof(self) -> None:
        if not self.done:
            raise WireError("connection closed before a whole request line")


class ReplyReader:
    """Bytes from a daemon in, its reply lines (dicts) out."""

    def __init__(self, max_line: int = MAX_REPLY_LINE) -> None:
        self._buffer = bytearray()
        self._max_line = max_line

    def feed(self, data: bytes) -> list[dict]:
        self._buffer += data
        replies = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                break
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            replies.append(parse_reply(line))
        if len(self._buffer) > self._max_line:
            raise WireError(f"reply line longer than {self._max_line} bytes")
        return replies

    def feed_eof(self) -> None:
        if self._buffer:
            raise WireError("connection closed in the middle of a reply line")


def parse_reply(line: bytes) -> dict:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise WireError("reply is not a JSON line") from None
    if not isinstance(obj, dict) or not ({"ok", "record"} & obj.keys()):
        raise WireError("reply is not a debug protocol message")
    return obj
