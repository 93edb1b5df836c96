"""ttrpc for Python: containerd's lightweight RPC protocol over unix sockets.

Layers, from the wire up:
- `frames`: the 10-byte header framing (sans-IO);
- `connection`: per-connection stream bookkeeping and protocol rules (sans-IO);
- `server` / `client`: thin asyncio adapters that move bytes and run handlers.
"""

from .client import Client
from .server import CallContext, Server
from .status import Code, ConnectionClosed, TtrpcError

__all__ = ["CallContext", "Client", "Code", "ConnectionClosed", "Server", "TtrpcError"]
