"""ttrpc for Python: containerd's lightweight RPC protocol over unix sockets.

Layers, from the wire up:
- `frames`: the 10-byte header framing (sans-IO);
- `wire`: a strict protobuf well-formedness check;
- `connection`: per-connection stream bookkeeping and protocol rules (sans-IO);
- `server` / `client`: thin asyncio adapters that move bytes and run handlers.

The names below load on first use, so that `shim.framework.ttrpc.status` or `shim.framework.ttrpc.wire` can
be imported on the `start` path without pulling in asyncio and the protobuf runtime.
"""

from __future__ import annotations

import sys

_EXPORTS = {
    "Client": "client",
    "CallContext": "server",
    "Server": "server",
    "Code": "status",
    "ConnectionClosed": "status",
    "TtrpcError": "status",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # __import__, not importlib.import_module: `delete` imports this package (for .wire), and
    # importlib with warnings costs it ~0.5 ms.
    __import__(f"{__name__}.{module}")
    value = getattr(sys.modules[f"{__name__}.{module}"], name)
    globals()[name] = value
    return value
