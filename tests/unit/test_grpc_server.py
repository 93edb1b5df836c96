"""The gRPC adapter over a real unix socket, driven by grpclib's client (no containerd needed);
and the protocol choice `start` makes (shim/framework/bootstrap.py)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile

import pytest
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from shim.api.containerd.task import v2 as task
from shim.api.google.protobuf import Empty
from shim.api.ttrpc import KeyValue
from shim.framework.bootstrap import (NOTE_ENV, GRPC_ON_CONTAINERD2_ENV, PROTOCOL_ENV, Protocol, choose,
                            containerd_major_version, major_from_modinfo)
from shim.framework.grpc_server import GrpcServer, RawCodec, grpc_status
from shim.framework.start import socket_address
from shim.framework.ttrpc import CallContext, Code, TtrpcError
from shim.framework.ttrpc.frames import MAX_MESSAGE_SIZE

SERVICE = "test.Echo"


@pytest.fixture
async def echo(tmp_path):
    """A GrpcServer with a few test methods; yields (server, socket path, record of calls)."""
    calls: dict[str, object] = {}
    server = GrpcServer(require_same_user=True)

    async def echo(request: KeyValue, ctx: CallContext) -> KeyValue:
        calls["context"] = ctx
        return KeyValue(key=request.key, value=request.value)

    async def sleep(request: KeyValue, ctx: CallContext) -> KeyValue:
        calls["sleep_started"] = True
        try:
            await asyncio.sleep(float(request.value))
        except asyncio.CancelledError:
            calls["sleep_cancelled"] = True
            raise
        return KeyValue(value="slept")

    async def boom(request: KeyValue, ctx: CallContext) -> KeyValue:
        raise RuntimeError("handler exploded")

    async def refuse(request: KeyValue, ctx: CallContext) -> KeyValue:
        raise TtrpcError(Code(int(request.value or 5)), f"process {request.key} not found")

    async def empty(request: KeyValue, ctx: CallContext) -> None:
        return None

    async def stop(request: KeyValue, ctx: CallContext) -> Empty:
        # what the TaskService's Shutdown does: stop the server right after replying
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(server.close()))
        return Empty()

    methods = dict(Echo=echo, Sleep=sleep, Boom=boom, Refuse=refuse, Empty=empty, Stop=stop)
    server.register_service(SERVICE, {name: (KeyValue, fn) for name, fn in methods.items()})
    path = str(tmp_path / "grpc.sock")
    await server.start(path=path)
    try:
        yield server, path, calls
    finally:
        await server.close()


async def call(path: str, method: str, payload: bytes, *, service: str = SERVICE, timeout: float | None = None,
               metadata: dict | None = None) -> bytes:
    channel = Channel(path=path, codec=RawCodec())
    try:
        async with channel.request(f"/{service}/{method}", Cardinality.UNARY_UNARY, None, None,
                                   timeout=timeout, metadata=metadata) as stream:
            await stream.send_message(payload, end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
            return reply
    finally:
        channel.close()


async def test_round_trip_and_context(echo):
    _, path, calls = echo
    reply = await call(path, "Echo", bytes(KeyValue(key="k", value="v")), timeout=5, metadata={"x-test": "1"})
    assert KeyValue.parse(reply) == KeyValue(key="k", value="v")
    ctx = calls["context"]
    assert (ctx.service, ctx.method, ctx.get("x-test")) == (SERVICE, "Echo", "1")
    assert ctx.deadline is not None and ctx.deadline > asyncio.get_running_loop().time()


async def test_empty_response_is_an_empty_message(echo):
    _, path, _ = echo
    assert await call(path, "Empty", b"") == b""


@pytest.mark.parametrize("code", [Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION, Code.UNIMPLEMENTED,
                                  Code.INVALID_ARGUMENT, Code.UNAVAILABLE])
async def test_ttrpc_error_becomes_the_same_grpc_status(echo, code):
    _, path, _ = echo
    with pytest.raises(GRPCError) as err:
        await call(path, "Refuse", bytes(KeyValue(key="p1", value=str(int(code)))))
    assert err.value.status.value == int(code)
    assert err.value.message == "process p1 not found"


async def test_handler_exception_is_unknown_with_its_text(echo):
    _, path, _ = echo
    with pytest.raises(GRPCError) as err:
        await call(path, "Boom", b"")
    assert (err.value.status, err.value.message) == (Status.UNKNOWN, "handler exploded")


@pytest.mark.parametrize("service, method", [(SERVICE, "Nope"), ("test.Missing", "Echo")])
async def test_unknown_method_or_service_is_unimplemented(echo, service, method):
    _, path, _ = echo
    with pytest.raises(GRPCError) as err:
        await call(path, method, b"", service=service)
    assert err.value.status is Status.UNIMPLEMENTED
    assert err.value.message == (f"unknown method Nope for service {SERVICE}" if method == "Nope"
                                 else "unknown service test.Missing")


@pytest.mark.parametrize("garbage", [b"\x0a\x05ab", b"\x07", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"])
async def test_malformed_request_is_invalid_argument(echo, garbage):
    _, path, _ = echo
    with pytest.raises(GRPCError) as err:
        await call(path, "Echo", garbage)
    assert err.value.status is Status.INVALID_ARGUMENT
    assert err.value.message.startswith("unmarshal Echo request: ")
    # the server is still fine
    assert KeyValue.parse(await call(path, "Echo", bytes(KeyValue(key="after")))).key == "after"


async def test_oversized_request_is_refused_before_it_is_read(echo):
    _, path, _ = echo
    with pytest.raises(GRPCError) as err:
        await call(path, "Echo", bytes(KeyValue(value="x" * (MAX_MESSAGE_SIZE + 1))))
    assert err.value.status is Status.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.message
    assert KeyValue.parse(await call(path, "Echo", bytes(KeyValue(key="after")))).key == "after"


async def test_request_without_message_is_invalid_argument(echo):
    _, path, _ = echo
    channel = Channel(path=path, codec=RawCodec())
    try:
        # client streaming: the only way grpclib's client ends a request without a message
        async with channel.request(f"/{SERVICE}/Echo", Cardinality.STREAM_UNARY, None, None) as stream:
            await stream.send_request(end=True)
            with pytest.raises(GRPCError) as err:
                await stream.recv_message()
        assert err.value.status is Status.INVALID_ARGUMENT
    finally:
        channel.close()


async def test_deadline_cancels_the_handler(echo):
    _, path, calls = echo
    # grpclib's client gives up at the same deadline, usually before our DEADLINE_EXCEEDED arrives
    with pytest.raises((GRPCError, asyncio.TimeoutError)) as err:
        await call(path, "Sleep", bytes(KeyValue(value="30")), timeout=0.2)
    if isinstance(err.value, GRPCError):
        assert err.value.status is Status.DEADLINE_EXCEEDED
    for _ in range(50):
        if calls.get("sleep_cancelled"):
            break
        await asyncio.sleep(0.02)
    assert calls["sleep_cancelled"]


async def test_close_cancels_blocked_calls_and_hangs_up(echo):
    server, path, calls = echo
    waiting = asyncio.ensure_future(call(path, "Sleep", bytes(KeyValue(value="30"))))
    while not calls.get("sleep_started"):
        await asyncio.sleep(0.01)
    await asyncio.wait_for(server.close(), 5)
    assert calls["sleep_cancelled"]
    with pytest.raises((GRPCError, StreamTerminatedError, ConnectionError)):
        await asyncio.wait_for(waiting, 5)
    assert server.connection_count == 0


async def test_reply_of_the_call_that_stops_the_server_goes_out(echo):
    _, path, _ = echo
    assert await asyncio.wait_for(call(path, "Stop", b""), 5) == b""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
async def test_peer_of_another_user_is_refused():
    server = GrpcServer(require_same_user=True)

    async def echo(request, ctx):
        return request

    server.register_service(SERVICE, {"Echo": (KeyValue, echo)})
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is not reachable by nobody
        os.chmod(tmp, 0o755)
        path = os.path.join(tmp, "s")
        await server.start(path=path)
        os.chmod(path, 0o777)
        probe = ("import socket,sys\n"
                 "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n"
                 "try:\n"
                 " s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n'); print(repr(s.recv(100)))\n"
                 "except (BrokenPipeError, ConnectionResetError):\n print(repr(b''))\n")
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-c", probe, path, user=65534, group=65534, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert out.strip() == b"b''", err  # dropped at once, not even our SETTINGS frame sent
            assert KeyValue.parse(await call(path, "Echo", bytes(KeyValue(key="me")))).key == "me"
        finally:
            await server.close()


async def test_serves_the_task_api_messages(tmp_path):
    """The TaskService's table served under both names, as the daemon registers it."""
    server = GrpcServer()

    async def state(request: task.StateRequest, ctx) -> task.StateResponse:
        return task.StateResponse(id=request.id, pid=42)

    for service in ("containerd.task.v2.Task", "containerd.task.v3.Task"):
        server.register_service(service, {"State": (task.StateRequest, state)})
    path = str(tmp_path / "task.sock")
    await server.start(path=path)
    try:
        for service in ("containerd.task.v2.Task", "containerd.task.v3.Task"):
            reply = await call(path, "State", bytes(task.StateRequest(id="c1")), service=service)
            assert task.StateResponse.parse(reply) == task.StateResponse(id="c1", pid=42)
    finally:
        await server.close()


def test_grpc_status_mapping():
    assert grpc_status(Code.NOT_FOUND) is Status.NOT_FOUND
    assert grpc_status(Code.UNIMPLEMENTED) is Status.UNIMPLEMENTED
    assert grpc_status(Code.OK) is Status.UNKNOWN  # an error never reads as success
    assert grpc_status(99) is Status.UNKNOWN


def test_ttrpc_daemon_does_not_import_grpclib():
    """The ttrpc daemon's imports stay as they were: no grpclib, h2 or ssl."""
    script = ("import sys, shim.framework.daemon, shim.framework.service, shim.framework.ttrpc.server, shim.framework.start;"
              "print(sorted(m for m in ('grpclib', 'h2', 'ssl') if sys.modules.get(m)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the protocol start announces ---------------------------------------------------------------

CONTAINERD_1_7 = "path\tgithub.com/containerd/containerd/cmd/containerd\nbuild\t-trimpath=true\n"
CONTAINERD_2_1 = ("path\tgithub.com/containerd/containerd/v2/cmd/containerd\n"
                  "mod\tgithub.com/containerd/containerd/v2\tv2.1.4\th1:x\n")
EMBEDDED_2_0 = ("path\tgithub.com/k3s-io/k3s/cmd/server\nmod\tgithub.com/k3s-io/k3s\t(devel)\n"
                "dep\tgithub.com/containerd/containerd/api\tv1.8.0\th1:x\n"
                "dep\tgithub.com/containerd/containerd/v2\tv2.0.4\n=>\tgithub.com/k3s-io/containerd/v2\tv2.0.4-k3s2\n")


@pytest.mark.parametrize("modinfo, major", [(CONTAINERD_1_7, 1), (CONTAINERD_2_1, 2), (EMBEDDED_2_0, 2),
                                            ("path\tgithub.com/containerd/containerd\n", 1),
                                            ("path\tgithub.com/other/tool\ndep\tgithub.com/containerd/containerd/api\tv1\n",
                                             None), ("", None)])
def test_containerd_major_from_module_info(modinfo, major):
    assert major_from_modinfo(modinfo) == major


def test_containerd_major_of_real_binaries(tmp_path):
    assert containerd_major_version(sys.executable) is None  # not Go
    assert containerd_major_version(str(tmp_path / "missing")) is None
    (tmp_path / "junk").write_bytes(b"\x7fELF" + b"\xff" * 100)
    assert containerd_major_version(str(tmp_path / "junk")) is None
    for path, major in (("/opt/pyshim-deps/containerd-1.7.24/bin/containerd", 1),
                        ("/opt/pyshim-deps/containerd-2.1.9/bin/containerd", 2), ("/usr/bin/containerd", 1)):
        if os.path.exists(path):
            assert containerd_major_version(path) == major, path


def test_choice(tmp_path, monkeypatch):
    import shim.framework.bootstrap as bootstrap

    majors = {"/c17": 1, "/c21": 2}
    monkeypatch.setattr(bootstrap, "containerd_major_version", majors.get)
    env17 = {"MAX_SHIM_VERSION": "2", PROTOCOL_ENV: "grpc"}
    assert choose({}, "/c21", False) == Protocol("ttrpc")
    assert choose({PROTOCOL_ENV: "TTRPC"}, "/c21", False) == Protocol("ttrpc")
    on17 = choose(env17, "/c17", False)
    assert (on17.name, on17.version, "30 minutes" in on17.note) == ("grpc", 2, True)  # logged caveat
    # containerd 2.x would take version 3, but drops gRPC shims at once: ttrpc unless forced
    dropped = choose(env17, "/c21", False)
    assert (dropped.name, dropped.version, "containerd 2.x drops" in dropped.note) == ("ttrpc", 3, True)
    forced = {**env17, GRPC_ON_CONTAINERD2_ENV: "1"}
    assert choose(forced, "/c21", False) == Protocol("grpc", 3)
    assert choose(forced, "/c21", True) == Protocol("grpc", 3)  # 2.3's BootstrapParams
    assert choose(forced, "/c17", False) == on17
    assert choose({**forced, "MAX_SHIM_VERSION": "3"}, "/unknown", False) == Protocol("grpc", 3)
    assert choose(env17, "/c17", True).name == "ttrpc"  # BootstrapParams: a 2.x, unforced
    fallback = choose({PROTOCOL_ENV: "grpc"}, "/c17", False)  # containerd 1.6
    assert (fallback.name, "1.6" in fallback.note) == ("ttrpc", True)
    fallback = choose(env17, "/unknown", False)
    assert (fallback.name, "/unknown" in fallback.note) == ("ttrpc", True)
    assert choose({PROTOCOL_ENV: "http"}, "/c17", False).name == "ttrpc"


def test_ttrpc_announces_version_3_to_containerd_2(monkeypatch):
    # As containerd 2.x's own runc shim: then 2.x attaches a pod's containers to the
    # sandbox's shim without `start` (protocol reference §2.10). 1.6 and 1.7 get the plain
    # address, and so does a containerd whose version cannot be read.
    import shim.framework.bootstrap as bootstrap

    majors = {"/c17": 1, "/c21": 2}
    monkeypatch.setattr(bootstrap, "containerd_major_version", majors.get)
    assert choose({"MAX_SHIM_VERSION": "2"}, "/c21", False) == Protocol("ttrpc", 3)
    assert choose({"MAX_SHIM_VERSION": "2"}, "/c17", False) == Protocol("ttrpc", 2)
    assert choose({"MAX_SHIM_VERSION": "2"}, "/unknown", False) == Protocol("ttrpc", 2)
    assert choose({}, "/c21", False) == Protocol("ttrpc", 2)  # 1.6 sets no MAX_SHIM_VERSION
    v3 = Protocol("ttrpc", 3)
    assert json.loads(v3.reply("unix:///run/containerd/s/ab")) == {
        "version": 3, "address": "unix:///run/containerd/s/ab", "protocol": "ttrpc"}
    assert v3.address_file("unix:///run/containerd/s/ab") == "unix:///run/containerd/s/ab"
    assert Protocol("grpc", 2).address_file("/run/containerd/s/cd") == Protocol("grpc", 2).reply("/run/containerd/s/cd")


def test_replies_and_environment():
    address = socket_address("/run/containerd/containerd.sock", "default", "c1", grpc=True)
    assert address.startswith("/run/containerd/s/") and address != socket_address(
        "/run/containerd/containerd.sock", "default", "c1").removeprefix("unix://")
    assert json.loads(Protocol("grpc", 2).reply(address)) == {"version": 2, "address": address, "protocol": "grpc"}
    assert Protocol("ttrpc").reply("unix:///x") == "unix:///x"
    env = {NOTE_ENV: "old"}
    Protocol("grpc", 3).export(env)
    assert env == {PROTOCOL_ENV: "grpc"}
    Protocol("ttrpc", note="why").export(env)
    assert env == {PROTOCOL_ENV: "ttrpc", NOTE_ENV: "why"}
