"""Status codes and the error type ttrpc carries in google.rpc.Status.

The codes are gRPC's; containerd maps them to its errdefs (NOT_FOUND, ALREADY_EXISTS,
FAILED_PRECONDITION, UNIMPLEMENTED ...), so a handler picks the code containerd's user
should see and raises `TtrpcError(code, message)`.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class TtrpcError(Exception):
    """A call that ended with a non-OK status, on either side of the wire."""

    def __init__(self, code: int, message: str = "") -> None:
        try:
            code = Code(code)
        except ValueError:
            pass  # keep codes we do not know: they still mean "failed"
        self.code = code
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, Code) else str(self.code)
        return f"{name}: {self.message}" if self.message else name

    def __repr__(self) -> str:
        return f"TtrpcError({self.code!r}, {self.message!r})"


class ConnectionClosed(TtrpcError):
    """The connection went away while the call was in flight (or before it was sent)."""

    def __init__(self, message: str = "ttrpc: closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)
