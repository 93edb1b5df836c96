"""asyncio Server and Client over real unix sockets (no containerd needed)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile

import pytest

from shim.api.ttrpc import KeyValue, Request, Response
from shim.framework.ttrpc import CallContext, Client, Code, ConnectionClosed, Server, TtrpcError
from shim.framework.ttrpc.frames import MAX_MESSAGE_SIZE, FrameDecoder, MessageType, encode_frame

SERVICE = "test.Echo"


@pytest.fixture
async def echo(tmp_path):
    """A server with a few test methods; yields (server, socket path, record of calls)."""
    calls: dict[str, object] = {}
    server = Server(require_same_user=True)

    async def echo(request: KeyValue, ctx: CallContext) -> KeyValue:
        return KeyValue(key=request.key, value=request.value)

    async def sleep(request: KeyValue, ctx: CallContext) -> KeyValue:
        calls["sleep_started"] = calls.get("sleep_started", 0) + 1
        try:
            await asyncio.sleep(float(request.value))
        except asyncio.CancelledError:
            calls["sleep_cancelled"] = True
            raise
        return KeyValue(key=request.key, value="slept")

    async def metadata(request: KeyValue, ctx: CallContext) -> KeyValue:
        remaining = "" if ctx.deadline is None else "yes"
        return KeyValue(key=",".join(ctx.metadata.get(request.key, [])), value=remaining)

    async def boom(request: KeyValue, ctx: CallContext) -> KeyValue:
        raise RuntimeError("handler exploded")

    async def refuse(request: KeyValue, ctx: CallContext) -> KeyValue:
        raise TtrpcError(Code.NOT_FOUND, f"process {request.key} not found")

    async def empty(request: KeyValue, ctx: CallContext) -> None:
        return None

    async def huge(request: KeyValue, ctx: CallContext) -> KeyValue:
        return KeyValue(value="x" * MAX_MESSAGE_SIZE)

    server.register_service(
        SERVICE,
        {
            name: (KeyValue, fn)
            for name, fn in dict(
                Echo=echo, Sleep=sleep, Metadata=metadata, Boom=boom, Refuse=refuse, Empty=empty, Huge=huge
            ).items()
        },
    )
    path = str(tmp_path / "ttrpc.sock")
    await server.start(path=path)
    try:
        yield server, path, calls
    finally:
        await server.close()


async def test_round_trip(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        reply = await client.call(SERVICE, "Echo", KeyValue(key="k", value="v"), KeyValue)
        assert (reply.key, reply.value) == ("k", "v")


async def test_unix_scheme_address(echo):
    _, path, _ = echo
    async with await Client.connect("unix://" + path) as client:
        assert (await client.call(SERVICE, "Echo", KeyValue(key="a"), KeyValue)).key == "a"


async def test_many_concurrent_calls_answered_in_completion_order(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        order: list[str] = []

        async def one(i: int) -> None:
            delay = (20 - i) * 0.01
            await client.call(SERVICE, "Sleep", KeyValue(key=str(i), value=str(delay)), KeyValue)
            order.append(str(i))

        async with asyncio.TaskGroup() as tg:
            for i in range(20):
                tg.create_task(one(i))
        assert order == [str(i) for i in reversed(range(20))]


async def test_blocking_call_does_not_delay_others(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        slow = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue))
        async with asyncio.timeout(2):
            for _ in range(50):
                await client.call(SERVICE, "Echo", KeyValue(key="x"), KeyValue)
        slow.cancel()


async def test_unknown_service_and_method(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call("no.Such", "Echo", KeyValue(), KeyValue)
        assert (err.value.code, err.value.message) == (Code.UNIMPLEMENTED, "service no.Such")
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Nope", KeyValue(), KeyValue)
        assert (err.value.code, err.value.message) == (Code.UNIMPLEMENTED, "method Nope")


async def test_undecodable_payload_is_invalid_argument(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        code, message, _ = await client.call_raw(SERVICE, "Echo", b"\x0a\xff\xff\xff\x0f")
        assert code == Code.INVALID_ARGUMENT and "unmarshal Echo request" in message


async def test_handler_errors_become_statuses_and_server_keeps_serving(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Boom", KeyValue(), KeyValue)
        assert (err.value.code, err.value.message) == (Code.UNKNOWN, "handler exploded")
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Refuse", KeyValue(key="p1"), KeyValue)
        assert (err.value.code, err.value.message) == (Code.NOT_FOUND, "process p1 not found")
        assert (await client.call(SERVICE, "Echo", KeyValue(key="ok"), KeyValue)).key == "ok"


async def test_none_response_is_empty_message(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        assert await client.call_raw(SERVICE, "Empty", b"") == (0, "", b"")


async def test_oversized_response_is_resource_exhausted(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Huge", KeyValue(), KeyValue)
        assert err.value.code == Code.RESOURCE_EXHAUSTED


async def test_metadata_and_deadline_reach_handler(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        reply = await client.call(SERVICE, "Metadata", KeyValue(key="x-a"), KeyValue, metadata={"X-A": ["1", "2"]}, timeout=5)
        assert (reply.key, reply.value) == ("1,2", "yes")
        reply = await client.call(SERVICE, "Metadata", KeyValue(key="x-a"), KeyValue)
        assert (reply.key, reply.value) == ("", "")


async def raw_exchange(path: str, data: bytes, expect: int) -> list:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    decoder, frames = FrameDecoder(), []
    async with asyncio.timeout(5):
        while len(frames) < expect:
            chunk = await reader.read(65536)
            assert chunk, "server closed the connection"
            frames += decoder.feed(chunk)
    writer.close()
    return [(f.stream_id, Response.parse(f.payload)) for f in frames]


async def test_server_enforces_timeout_nano(echo):
    _, path, calls = echo
    request = Request(service=SERVICE, method="Sleep", payload=bytes(KeyValue(value="30")), timeout_nano=100_000_000)
    ((sid, response),) = await raw_exchange(path, encode_frame(1, MessageType.REQUEST, bytes(request)), 1)
    assert sid == 1 and response.status.code == Code.DEADLINE_EXCEEDED
    assert calls["sleep_cancelled"]


async def test_client_timeout_abandons_stream_and_connection_goes_on(echo):
    _, path, _ = echo
    async with await Client.connect(path) as client:
        with pytest.raises(TtrpcError) as err:
            await client.call(SERVICE, "Sleep", KeyValue(value="0.3"), KeyValue, timeout=0.05)
        assert err.value.code == Code.DEADLINE_EXCEEDED
        await asyncio.sleep(0.4)  # the late answer arrives and must be dropped quietly
        assert (await client.call(SERVICE, "Echo", KeyValue(key="after"), KeyValue)).key == "after"


async def test_oversized_request_frame_answered_on_its_stream(echo):
    _, path, _ = echo
    length = MAX_MESSAGE_SIZE + 1
    header = length.to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([MessageType.REQUEST, 0])
    follow = encode_frame(3, MessageType.REQUEST, bytes(Request(service=SERVICE, method="Echo", payload=bytes(KeyValue(key="z")))))
    replies = await raw_exchange(path, header + b"\x00" * length + follow, 2)
    assert replies[0][0] == 1 and replies[0][1].status.code == Code.RESOURCE_EXHAUSTED
    assert replies[1][0] == 3 and KeyValue.parse(replies[1][1].payload).key == "z"


async def test_garbage_closes_only_that_connection(echo, caplog):
    server, path, _ = echo
    async with await Client.connect(path) as good:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server
        writer.close()
        assert (await good.call(SERVICE, "Echo", KeyValue(key="still"), KeyValue)).key == "still"
    assert "unknown message type" in caplog.text


async def test_truncated_header_then_close(echo, caplog):
    _, path, _ = echo
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(b"\x00\x00\x00")
    writer.write_eof()
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()
    async with await Client.connect(path) as client:
        assert (await client.call(SERVICE, "Echo", KeyValue(key="k"), KeyValue)).key == "k"
    assert "middle of a frame" in caplog.text


async def test_client_sees_connection_drop_and_server_cancels_handler(echo):
    server, path, calls = echo
    client = await Client.connect(path)
    pending = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue))
    while not calls.get("sleep_started"):
        await asyncio.sleep(0.01)
    await server.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(pending, 5)
    assert calls["sleep_cancelled"]
    assert client.closed
    with pytest.raises(ConnectionClosed):
        await client.call(SERVICE, "Echo", KeyValue(), KeyValue)


async def test_client_close_cancels_server_side_calls(echo):
    server, path, calls = echo
    client = await Client.connect(path)
    pending = asyncio.create_task(client.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue))
    while not calls.get("sleep_started"):
        await asyncio.sleep(0.01)
    await client.close()
    with pytest.raises(ConnectionClosed):
        await pending
    async with asyncio.timeout(5):
        while not calls.get("sleep_cancelled"):
            await asyncio.sleep(0.01)
    while server.connection_count:
        await asyncio.sleep(0.01)


async def test_serves_an_inherited_listening_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "s"))
    sock.listen(128)
    server = Server()

    async def hello(request: KeyValue, ctx: CallContext) -> KeyValue:
        return KeyValue(value="hello " + request.key)

    server.register(SERVICE, "Hello", KeyValue, hello)
    await server.start(sock=sock)
    try:
        async with await Client.connect(str(tmp_path / "s")) as client:
            assert (await client.call(SERVICE, "Hello", KeyValue(key="you"), KeyValue)).value == "hello you"
    finally:
        await server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
async def test_same_user_check_refuses_other_uid():
    server = Server(require_same_user=True)
    server.register(SERVICE, "Echo", KeyValue, lambda request, ctx: asyncio.sleep(0, request))
    with tempfile.TemporaryDirectory() as tmp:  # pytest's tmp_path is not reachable by nobody
        os.chmod(tmp, 0o755)
        path = os.path.join(tmp, "s")
        await server.start(path=path)
        os.chmod(path, 0o777)
        probe = (
            "import socket,sys\n"
            "s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n"
            "print(repr(s.recv(10)))\n"
        )
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        try:
            proc = await asyncio.create_subprocess_exec(
                python, "-c", probe, path, user=65534, group=65534, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert out.strip() == b"b''", err  # the server dropped the connection at once
            async with await Client.connect(path) as client:  # root, the same user, is served
                assert (await client.call(SERVICE, "Echo", KeyValue(key="me"), KeyValue)).key == "me"
        finally:
            await server.close()
