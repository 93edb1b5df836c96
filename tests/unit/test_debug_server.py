"""DebugServer over a real unix socket in tmp_path, on the test's own loop.

The daemon it describes is a stand-in: a service with a real ContainerRegistry (real
Container, InitProcess and ExecProcess objects, no OCI runtime behind them) and a publisher
with nothing queued. Clients are asyncio streams or raw sockets, each read to EOF, so a test
sees exactly the lines the daemon sent before it closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import time
from types import SimpleNamespace

import pytest

from shim.framework.container import Container, ContainerRegistry
from shim.framework.debug import server as server_module
from shim.framework.debug.server import Daemon, DebugServer
from shim.framework.debug.trace import TRACER
from shim.framework.debug.wire import MAX_REQUEST_LINE, ReplyReader, Request
from shim.framework.process import ExecProcess, InitProcess, Running, Stdio

pytestmark = pytest.mark.usefixtures("no_trace_sinks_left")

NAMESPACE = "pyshim-unit"


class QuietPublisher:
    """What the debug socket reads of shim.framework.events.EventPublisher: nothing queued."""

    pending = 0
    dropped = 0

    def pending_for(self, container_id: str) -> list[dict]:
        return []


class RuntimeStandIn:
    binary = "/usr/bin/runc"
    root = "/run/containerd/runc/" + NAMESPACE


def add_container(service, bundle: str, container_id: str, pid: int, *, execs: dict[str, int] | None = None) -> Container:
    init = InitProcess(container_id, bundle, Stdio(stdout="/dev/null"))
    init.pid = pid
    init.state = Running
    container = Container(container_id, bundle, NAMESPACE, None, RuntimeStandIn(), init)
    for exec_id, exec_pid in (execs or {}).items():
        process = ExecProcess(exec_id, container_id, bundle, Stdio(), {"args": ["sh"]})
        process.pid = exec_pid
        process.state = Running
        container.execs[exec_id] = process
    service.containers.add(container)
    return container






@pytest.fixture
def service(tmp_path):
    service = SimpleNamespace(containers=ContainerRegistry(NAMESPACE), publisher=QuietPublisher())
    add_container(service, str(tmp_path), "web", 4242, execs={"sh": 4250})
    stopped = add_container(service, str(tmp_path), "batch", 4300)
    stopped.init.set_exited(3, time.time_ns())
    return service


@pytest.fixture
async def server(no_trace_sinks_left, debug_dir, service):
    daemon = Daemon(service, SimpleNamespace(connection_count=2), NAMESPACE, "/run/containerd/s/abc",
                    "ttrpc", "io.containerd.pyshim.v2")
    debug = DebugServer(daemon)
    await debug.start(str(debug_dir / "abc.sock"))
    try:
        yield debug
    finally:
        await debug.close()


async def exchange(path: str, sent: bytes, *, half_close: bool = False, timeout: float = 5.0) -> list[dict]:
    """Every reply line the daemon sends after `sent`, until it closes the connection."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(sent)
        if half_close:
            writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(timeout):
            data = await reader.read()
    finally:
        writer.close()
    replies = ReplyReader()
    lines = replies.feed(data)
    replies.feed_eof()
    return lines


async def ask(path: str, request: Request) -> dict:
    replies = await exchange(path, request.encode())
    assert len(replies) == 1, replies
    return replies[0]


async def read_replies(reader: asyncio.StreamReader, count: int, timeout: float = 5.0) -> list[dict]:
    replies = ReplyReader()
    got: list[dict] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            data = await reader.read(1 << 16)
            assert data, f"closed after {got}"
            got += replies.feed(data)
    return got


# -- the socket file ---------------------------------------------------------------------------


async def test_socket_is_0600_in_a_0700_directory_and_removed_by_close(debug_dir, service):
    daemon = Daemon(service, None, NAMESPACE, "/run/containerd/s/abc", "ttrpc", "io.containerd.pyshim.v2")
    debug = DebugServer(daemon)
    path = str(debug_dir / "abc.sock")
    await debug.start(path)
    try:
        mode = os.stat(path).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        assert stat.S_IMODE(os.stat(debug_dir).st_mode) == 0o700
        assert daemon.debug_socket == path == debug.path
        assert (await ask(path, Request("ls")))["ok"]
    finally:
        await debug.close()
    assert not os.path.exists(path)
    await debug.close()  # twice is harmless


async def test_start_replaces_a_dead_daemons_socket_file(debug_dir, service):
    debug_dir.mkdir(mode=0o700)
    path = str(debug_dir / "abc.sock")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()  # the file stays, nobody listens
    debug = DebugServer(Daemon(service, None, NAMESPACE, "abc", "ttrpc", "io.containerd.pyshim.v2"))
    await debug.start(path)
    try:
        assert (await ask(path, Request("ls")))["ok"]
    finally:
        await debug.close()


async def test_umask_is_restored_after_start(debug_dir, service):
    before = os.umask(0o022)
    try:
        debug = DebugServer(Daemon(service, None, NAMESPACE, "abc", "ttrpc", "io.containerd.pyshim.v2"))
        await debug.start(str(debug_dir / "abc.sock"))
        await debug.close()
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


async def test_close_drops_connected_clients(server):
    reader, writer = await asyncio.open_unix_connection(server.path)
    try:
        writer.write(b'{"op":"trace"}\n')
        await read_replies(reader, 1)
        assert len(TRACER.sinks) == 1
        await server.close()
        assert TRACER.sinks == []
        async with asyncio.timeout(5):
            assert await reader.read() == b""
    finally:
        writer.close()


# -- one-shot requests -----------------------------------------------------------------------


async def test_ls_describes_the_daemon_and_its_tasks(server):
    reply = await ask(server.path, Request("ls"))
    assert reply["ok"] is True
    result = reply["result"]
    assert result["pid"] == os.getpid()
    assert result["namespace"] == NAMESPACE
    assert (result["protocol"], result["socket"], result["debug_socket"]) == (
        "ttrpc", "/run/containerd/s/abc", server.path)
    assert (result["clients"], result["trace_clients"]) == (2, 0)
    assert (result["events_pending"], result["events_dropped"]) == (0, 0)
    tasks = {task["id"]: task for task in result["tasks"]}
    assert set(tasks) == {"web", "batch"}
    assert (tasks["web"]["pid"], tasks["web"]["status"], tasks["web"]["exit_status"]) == (4242, "running", None)
    assert tasks["web"]["namespace"] == NAMESPACE
    assert [(e["id"], e["pid"], e["status"]) for e in tasks["web"]["execs"]] == [("sh", 4250, "running")]
    assert (tasks["batch"]["pid"], tasks["batch"]["status"], tasks["batch"]["exit_status"]) == (4300, "stopped", 3)
    assert "exited_at" in tasks["batch"]


async def test_ls_of_a_daemon_without_tasks(server, service):
    for container in list(service.containers):
        service.containers.remove(container)
    reply = await ask(server.path, Request("ls"))
    assert reply["ok"] and reply["result"]["tasks"] == []


async def test_inspect_a_container(server):
    TRACER.forget("web")
    reply = await ask(server.path, Request("inspect", id="web"))
    assert reply["ok"] is True
    web = reply["result"]
    assert (web["id"], web["pid"], web["daemon_pid"]) == ("web", 4242, os.getpid())
    assert [p["id"] for p in web["processes"]] == ["web", "sh"]
    assert web["processes"][0]["stdio"]["stdout"] == "/dev/null"
    assert web["runtime"] == {"type": "RuntimeStandIn", "binary": "/usr/bin/runc", "root": RuntimeStandIn.root}
    assert (web["cgroup"], web["handler"], web["events_pending"], web["commands"]) == (None, None, [], [])


async def test_inspect_in_the_daemons_namespace_by_name(server):
    reply = await ask(server.path, Request("inspect", id="web", namespace=NAMESPACE))
    assert reply["ok"] and reply["result"]["id"] == "web"


@pytest.mark.parametrize("request_", [Request("inspect", id="nope"), Request("inspect", id="web", namespace="other")])
async def test_inspect_of_an_unknown_container_is_an_error(server, request_):
    reply = await ask(server.path, request_)
    assert reply["ok"] is False
    assert f"container {request_.id} is not served by this daemon (pid {os.getpid()})" == reply["error"]


async def test_a_failure_while_describing_is_an_error_reply_and_the_daemon_goes_on(server, service, caplog):
    class BrokenPublisher(QuietPublisher):
        @property
        def pending(self):
            raise RuntimeError("publisher state is broken")

    service.publisher = BrokenPublisher()
    reply = await ask(server.path, Request("ls"))
    assert reply == {"ok": False, "error": "ls failed in the daemon: publisher state is broken"}
    assert "debug socket: ls failed" in caplog.text
    service.publisher = QuietPublisher()
    assert (await ask(server.path, Request("ls")))["ok"]


@pytest.fixture
def root_level():
    root = logging.getLogger()
    before = root.level
    yield root
    root.setLevel(before)


async def test_log_level_debug_sets_the_root_logger(server, root_level):
    root_level.setLevel(logging.WARNING)
    reply = await ask(server.path, Request("log-level", level="debug"))
    assert reply == {"ok": True, "result": {"before": "warning", "after": "debug"}}
    assert root_level.level == logging.DEBUG
    reply = await ask(server.path, Request("log-level", level="WARN"))
    assert reply["result"] == {"before": "debug", "after": "warning"}
    assert root_level.level == logging.WARNING
    ls = await ask(server.path, Request("ls"))
    assert ls["result"]["log_level"] == "warning"


async def wait_for_release(event: asyncio.Event) -> None:
    await event.wait()


async def test_stacks_show_a_waiting_task_and_its_coroutine(server):
    event = asyncio.Event()
    waiting = asyncio.create_task(wait_for_release(event), name="held-by-the-test")
    await asyncio.sleep(0)  # let it reach its await
    try:
        reply = await ask(server.path, Request("stacks"))
    finally:
        event.set()
        await waiting
    assert reply["ok"] is True
    stacks = reply["result"]
    by_name = {task["name"]: task for task in stacks["tasks"]}
    held = by_name["held-by-the-test"]
    assert held["coroutine"] == "wait_for_release"
    assert held["done"] is False
    functions = [frame["function"] for frame in held["stack"]]
    assert functions[0] == "wait_for_release"
    assert "Event.wait" in functions
    assert held["stack"][0]["file"] == __file__
    assert held["waiting_on"] == "Event.wait"  # the innermost function, not a bare future
    (loop_thread,) = [thread for thread in stacks["threads"] if thread["name"] == "MainThread"]
    assert "event loop" in loop_thread["note"]
    assert isinstance(stacks["commands_running"], list)


# -- bad clients -----------------------------------------------------------------------------


@pytest.mark.parametrize("sent, half_close, error", [
    (b"not json\n", False, "request is not a JSON line"),
    (b'{"op":"rm"}\n', False, "unknown op 'rm'"),
    (b'{"op":"inspect"}\n', False, "inspect needs an id"),
    (b'{"op":"log-level","level":"loud"}\n', False, "unknown log level 'loud'"),
    (b'{"op":"ls","id":7}\n', False, "id must be a string"),
    (b"[" * 3000 + b"\n", False, "request is not a JSON line"),
    (b"x" * (MAX_REQUEST_LINE + 1), False, f"request line longer than {MAX_REQUEST_LINE} bytes"),
    (b'{"op":"ls"', True, "connection closed before a whole request line"),
    (b"", True, "connection closed before a whole request line"),
])
async def test_a_bad_request_gets_one_error_line_then_the_connection_closes(server, sent, half_close, error):
    replies = await exchange(server.path, sent, half_close=half_close)
    assert len(replies) == 1, replies
    assert replies[0]["ok"] is False
    assert error in replies[0]["error"]
    # ... and the daemon answers the next client as if nothing happened.
    assert (await ask(server.path, Request("ls")))["ok"]


async def test_a_client_that_sends_nothing_is_dropped_after_the_request_timeout(server, monkeypatch):
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 0.2)
    started = time.monotonic()
    replies = await exchange(server.path, b"", timeout=3)
    assert replies[0]["ok"] is False and "no request within" in replies[0]["error"]
    assert len(replies) == 1
    assert time.monotonic() - started < 2


async def test_a_client_that_stops_mid_line_is_dropped_after_the_request_timeout(server, monkeypatch):
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 0.2)
    replies = await exchange(server.path, b'{"op":', timeout=3)
    assert len(replies) == 1 and "no request within" in replies[0]["error"]


async def test_a_prompt_client_is_not_hit_by_the_request_timeout(server, monkeypatch):
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_unix_connection(server.path)
    try:
        writer.write(b'{"op":"trace"}\n')
        await read_replies(reader, 1)
        await asyncio.sleep(0.5)  # past the timeout: the trace is still on
        TRACER.exit("web", "", 4242, 0)
        (record,) = await read_replies(reader, 1)
        assert record["record"]["kind"] == "exit"
    finally:
        writer.close()
        await asyncio.sleep(0.05)  # the server sees the close and detaches


async def test_a_peer_that_is_not_allowed_is_refused(server, monkeypatch):
    asked: list[int] = []

    def allowed(uid: int) -> bool:
        asked.append(uid)
        return False

    monkeypatch.setattr(DebugServer, "allowed", staticmethod(allowed))
    replies = await exchange(server.path, Request("ls").encode())
    assert replies == [{"ok": False, "error": "permission denied: only root or the daemon's user may connect"}]
    assert asked == [os.geteuid()]
    assert server._clients == set()


async def test_a_refused_peer_that_sends_nothing_is_dropped_after_the_request_timeout(server, monkeypatch):
    monkeypatch.setattr(DebugServer, "allowed", staticmethod(lambda uid: False))
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT", 0.2)
    replies = await exchange(server.path, b"", timeout=3)
    assert replies == [{"ok": False, "error": "permission denied: only root or the daemon's user may connect"}]


def test_allowed_is_root_or_the_daemons_user():
    assert DebugServer.allowed(0)
    assert DebugServer.allowed(os.geteuid())
    assert not DebugServer.allowed(65534) or os.geteuid() == 65534


# A real peer with another uid: tests/e2e/test_debug.py::test_only_root_may_use_the_debug_socket.


# -- trace -----------------------------------------------------------------------------------


async def test_trace_sends_records_filtered_by_the_id_asked_for(server):
    clients = {}
    for name, request in (("web", Request("trace", id="web")), ("all", Request("trace")),
                          ("other-ns", Request("trace", namespace="other"))):
        reader, writer = await asyncio.open_unix_connection(server.path)
        writer.write(request.encode())
        (accepted,) = await read_replies(reader, 1)
        assert accepted == {"ok": True, "result": {"pid": os.getpid(), "namespace": NAMESPACE}}
        clients[name] = (reader, writer)
    try:
        assert len(TRACER.sinks) == 3
        assert (await ask(server.path, Request("ls")))["result"]["trace_clients"] == 3
        TRACER.exit("batch", "", 4300, 3)
        TRACER.request("containerd.task.v2.Task", "Start", "web", "", "OK", "", 0.0012)
        TRACER.event("/tasks/start", "web", "sent")
        TRACER.exit("web", "sh", 4250, 0)

        web = [reply["record"] for reply in await read_replies(clients["web"][0], 3)]
        assert [(r["kind"], r["id"]) for r in web] == [("request", "web"), ("event", "web"), ("exit", "web")]
        assert web[0]["method"] == "Start" and web[0]["status"] == "OK" and web[0]["ms"] == 1.2
        assert web[2]["exec_id"] == "sh" and web[2]["pid"] == 4250
        assert all(isinstance(r["time"], float) for r in web)

        everything = [reply["record"] for reply in await read_replies(clients["all"][0], 4)]
        assert [(r["kind"], r["id"]) for r in everything] == [
            ("exit", "batch"), ("request", "web"), ("event", "web"), ("exit", "web")]
        assert everything[0]["status"] == 3
    finally:
        for _, writer in clients.values():
            writer.close()
    async with asyncio.timeout(5):
        while TRACER.sinks:  # each connection_lost detaches its client
            await asyncio.sleep(0.01)
    # The client that asked for another namespace got nothing but its acceptance.
    assert clients["other-ns"][0].at_eof() or await clients["other-ns"][0].read() == b""


async def test_trace_client_that_closes_is_detached(server):
    reader, writer = await asyncio.open_unix_connection(server.path)
    writer.write(Request("trace", id="web").encode())
    await read_replies(reader, 1)
    assert len(TRACER.sinks) == 1
    writer.close()
    async with asyncio.timeout(5):
        while TRACER.sinks:
            await asyncio.sleep(0.01)
    TRACER.exit("web", "", 1, 0)  # nothing left to write to


async def test_a_trace_client_that_stops_reading_is_dropped(server, monkeypatch, caplog):
    monkeypatch.setattr(server_module, "MAX_TRACE_BACKLOG", 16 << 10)
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        await loop.sock_connect(client, server.path)
        await loop.sock_sendall(client, Request("trace").encode())
        accepted = ReplyReader()
        async with asyncio.timeout(5):
            while not accepted.feed(await loop.sock_recv(client, 1)):
                pass  # byte by byte: nothing of the records that follow is read
        assert len(TRACER.sinks) == 1

        # From here on the client reads nothing. The daemon's emits must neither block nor
        # pile up: once the backlog is over the limit the client goes.
        message = "m" * 200
        started = time.monotonic()
        emitted = 0
        while TRACER.sinks and emitted < 100_000:
            TRACER.request("containerd.task.v2.Task", "State", "web", "", "OK", message, 0.0001)
            emitted += 1
        elapsed = time.monotonic() - started
        assert TRACER.sinks == [], f"still attached after {emitted} records"
        assert elapsed < 2, f"{emitted} records took {elapsed:.1f}s"
        assert "dropping a trace client that stopped reading" in caplog.text

        started = time.monotonic()
        for _ in range(1000):  # with nobody attached, a record costs next to nothing
            TRACER.request("containerd.task.v2.Task", "State", "web", "", "OK", message, 0.0001)
        assert time.monotonic() - started < 0.5

        async with asyncio.timeout(5):
            while server._clients:  # the aborted connection is gone from the server too
                await asyncio.sleep(0.01)
    finally:
        client.close()
    # ... and the daemon still serves everyone else.
    assert (await ask(server.path, Request("ls")))["ok"]
