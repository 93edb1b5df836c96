"""A small CRI v1 client for the e2e tests: grpclib over containerd's socket, with the
betterproto2 messages hack/gen-protos makes from protos/cri/api.proto (shim.api.runtime.v1).

    async with CriClient(containerd.address) as cri:
        sandbox = await cri.runtime("RunPodSandbox", cri_v1.RunPodSandboxRequest(...))

The CRI plugin is served on containerd's main gRPC socket; it needs no namespace metadata
(it always uses k8s.io). A failed call raises grpclib's GRPCError (status and message).
"""

from __future__ import annotations

import betterproto2
from grpclib.client import Channel
from grpclib.const import Cardinality

from shim.api.runtime import v1 as cri_v1

RUNTIME_SERVICE = "runtime.v1.RuntimeService"
IMAGE_SERVICE = "runtime.v1.ImageService"


def _reply_type(method: str) -> type[betterproto2.Message]:
    return getattr(cri_v1, f"{method}Response")


class MessageCodec:
    """grpclib codec for betterproto2 messages (grpclib's own expects google.protobuf ones)."""

    __content_subtype__ = "proto"

    def encode(self, message, message_type) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type):
        return message_type.parse(data)


class CriClient:
    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._channel: Channel | None = None

    async def __aenter__(self) -> CriClient:
        self._channel = Channel(path=self.socket_path, codec=MessageCodec())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    async def _call(self, service: str, method: str, request: betterproto2.Message,
                    timeout: float | None):
        assert self._channel is not None, "use `async with CriClient(...)`"
        async with self._channel.request(
            f"/{service}/{method}", Cardinality.UNARY_UNARY, type(request), _reply_type(method),
            timeout=timeout or self.timeout,
        ) as stream:
            await stream.send_message(request, end=True)
            return await stream.recv_message()

    async def runtime(self, method: str, request: betterproto2.Message,
                      timeout: float | None = None):
        """RuntimeService.<method>(request); the reply is <method>Response."""
        return await self._call(RUNTIME_SERVICE, method, request, timeout)

    async def image(self, method: str, request: betterproto2.Message,
                    timeout: float | None = None):
        """ImageService.<method>(request)."""
        return await self._call(IMAGE_SERVICE, method, request, timeout)
