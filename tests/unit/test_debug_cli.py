"""The `pyshim` command (shim.framework.debug.cli): its text formats on hand-made answers,
and finding daemons in a debug directory of real DebugServers on the test's loop.

The command's socket calls block, so they run in a thread (asyncio.to_thread) while the
loop serves the daemons' side.

The formats must survive answers with fields missing: a daemon keeps running across an
upgrade of pyshim, so the command may talk to a daemon older (or newer) than itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from types import SimpleNamespace

import pytest

from shim.framework.container import Container, ContainerRegistry
from shim.framework.debug import cli
from shim.framework.debug.cli import CommandError, all_daemons, find_daemon, format_inspect, format_ls, format_record
from shim.framework.debug.server import Daemon, DebugServer
from shim.framework.debug.trace import TRACER
from shim.framework.process import InitProcess, Running, Stdio

pytestmark = pytest.mark.usefixtures("no_trace_sinks_left")

# -- format_ls -------------------------------------------------------------------------------

DAEMON = {
    "pid": 4100, "namespace": "k8s.io", "protocol": "ttrpc", "socket": "/run/containerd/s/abc",
    "uptime_s": 3725, "pss_bytes": 21 << 20, "private_bytes": 18 << 20, "fds": 23, "clients": 1,
    "events_pending": 0,
    "tasks": [
        {"id": "web", "pid": 4242, "status": "running", "exit_status": None, "namespace": "k8s.io",
         "execs": [{"id": "sh", "pid": 4250, "status": "stopped", "exit_status": 130}]},
        {"id": "batch", "pid": 4300, "status": "stopped", "exit_status": 3, "namespace": "k8s.io", "execs": []},
    ],
}


def test_format_ls_shows_each_daemon_and_its_tasks_and_execs():
    text = format_ls([DAEMON])
    header, row, *tasks = text.splitlines()
    assert header.split()[:3] == ["DAEMON", "NAMESPACE", "PROTO"]
    assert row.split()[:4] == ["4100", "k8s.io", "ttrpc", "1h02m"]
    assert "21.0MiB" in row and "18.0MiB" in row and "/run/containerd/s/abc" in row
    assert tasks == [
        "    task web  pid 4242  running  exit -",
        "      exec sh  pid 4250  stopped  exit 130",
        "    task batch  pid 4300  stopped  exit 3",
    ]


def test_format_ls_of_nothing():
    assert format_ls([]) == "no pyshim daemons\n"


@pytest.mark.parametrize("daemon", [{}, {"pid": 7}, {"tasks": [{}]}, {"tasks": [{"id": "web", "execs": [{}]}]}])
def test_format_ls_with_fields_missing(daemon):
    text = format_ls([daemon, DAEMON])
    assert "4100" in text and "task web  pid 4242" in text


# -- format_inspect --------------------------------------------------------------------------

CONTAINER = {
    "id": "web", "namespace": "k8s.io", "pid": 4242, "status": "running", "exit_status": None,
    "bundle": "/run/containerd/io.containerd.runtime.v2.task/k8s.io/web",
    "daemon": {"pid": 4100, "protocol": "ttrpc", "socket": "/run/containerd/s/abc", "pss_bytes": 21 << 20, "fds": 23},
    "runtime": {"type": "Runc", "binary": "/usr/bin/runc", "root": "/run/containerd/runc/k8s.io"},
    "cgroup": {"version": 2, "path": "/sys/fs/cgroup/k8s.io/web", "memory_bytes": 5 << 20,
               "memory_limit_bytes": None, "pids": 3, "cpu_usage_ns": 1_500_000_000},
    "handler": {"name": "audit", "class": "AuditHandler", "hooks": ["create", "exit"],
                "notifications_queued": 2, "notification_running": "exit"},
    "processes": [
        {"id": "web", "pid": 4242, "status": "running", "exit_status": None, "terminal": False,
         "stdio": {"stdin": "", "stdout": "/run/fifo/out", "stderr": "/run/fifo/err"},
         "pumps": [{"stream": "stdout", "source": "pipe:[1]", "target": "/run/fifo/out", "bytes": 1024,
                    "state": "blocked", "blocked_since": 1.0, "blocked_for_s": 12.5},
                   {"stream": "logger", "pid": 4260, "state": "running", "argv": ["/usr/bin/logger", "-t", "web"]}]},
        {"id": "sh", "pid": 4250, "status": "running", "exit_status": None, "terminal": True,
         "stdio": {"stdin": "/run/fifo/in", "stdout": "", "stderr": ""}, "pumps": []},
    ],
    "commands_running": [{"id": "web", "command": "exec", "argv": ["runc", "exec", "web"], "pid": 4270,
                          "running_for_ms": 2500.0}],
    "commands": [{"id": "web", "command": "create", "argv": ["runc", "create", "web"], "pid": 4201,
                  "started": time.time(), "ms": 41.5, "exit_code": 0},
                 {"id": "web", "command": "kill", "argv": ["runc", "kill", "web"], "pid": 4202,
                  "started": time.time(), "ms": 3.0, "exit_code": 1, "stderr": "container not running"}],
    "events_pending": [{"topic": "/tasks/exit", "in_flight": True}, {"topic": "/tasks/delete", "in_flight": False}],
}


def test_format_inspect_shows_the_container_its_processes_and_commands():
    text = format_inspect(CONTAINER)
    assert text.startswith("container web (namespace k8s.io)\n")
    assert "running, pid 4242, exit -" in text
    assert "pid 4100, ttrpc on /run/containerd/s/abc" in text
    assert "/usr/bin/runc  root /run/containerd/runc/k8s.io" in text
    assert "v2 /sys/fs/cgroup/k8s.io/web: memory 5.0MiB (limit none), pids 3, cpu 1.50s" in text
    assert "audit (AuditHandler; hooks: create, exit; 2 notification(s) queued, running exit)" in text
    assert "init: pid 4242, running" in text
    assert "exec sh: pid 4250, running, exit -, tty" in text
    assert "stdin  /run/fifo/in" in text  # without pumps, the stdio paths
    assert "copy stdout: pipe:[1] -> /run/fifo/out, 1024 bytes, blocked for 12.5s" in text
    assert "logger pid 4260, running: /usr/bin/logger -t web" in text
    assert "last commands (2 kept, 1 running)" in text
    assert "RUNNING for 2.5s, pid 4270: runc exec web" in text
    assert "stderr: container not running" in text
    assert "events waiting for containerd: 2" in text and "/tasks/exit (in flight)" in text


@pytest.mark.parametrize("field", sorted(CONTAINER))
def test_format_inspect_with_a_field_missing(field):
    container = {k: v for k, v in CONTAINER.items() if k != field}
    text = format_inspect(container)
    assert "web" in text


def test_format_inspect_of_an_empty_answer():
    assert format_inspect({}).startswith("container ")


def test_format_inspect_with_fields_missing_inside_the_lists():
    container = dict(CONTAINER, processes=[{}, {"id": "sh", "pumps": [{}, {"stream": "logger"}]}],
                     commands=[{}], commands_running=[{}], events_pending=[{}],
                     cgroup={"version": 1}, handler={"class": "Handler"})
    text = format_inspect(container)
    assert "last commands (1 kept, 1 running)" in text
    assert "exec sh" in text


# -- format_record ---------------------------------------------------------------------------

NOW = time.time()


@pytest.mark.parametrize("record, expected", [
    ({"kind": "request", "time": NOW, "service": "containerd.task.v2.Task", "method": "Start", "id": "web",
      "exec_id": "", "status": "OK", "message": "", "ms": 1.25},
     "task.v2.Task/Start id=web OK 1.2ms"),
    ({"kind": "request", "time": NOW, "service": "containerd.task.v2.Task", "method": "Kill", "id": "web",
      "exec_id": "sh", "status": "NOT_FOUND", "message": "process sh does not exist", "ms": 0.5},
     "task.v2.Task/Kill id=web exec=sh NOT_FOUND (process sh does not exist) 0.5ms"),
    ({"kind": "command", "time": NOW, "id": "web", "command": "start", "argv": ["/usr/bin/runc", "start", "web"],
      "pid": 4201, "ms": 40.0, "exit_code": 0},
     "runc start id=web pid=4201 exit=0 40.0ms"),
    ({"kind": "command", "time": NOW, "id": "web", "command": "kill", "argv": ["runc"], "pid": 4202,
      "ms": 3.0, "exit_code": 1, "stderr": "container not running"},
     "runc kill id=web pid=4202 exit=1 3.0ms stderr='container not running'"),
    ({"kind": "event", "time": NOW, "topic": "/tasks/exit", "id": "web", "state": "retrying", "attempts": 2,
      "message": "connection refused"},
     "/tasks/exit id=web retrying attempt 2 (connection refused)"),
    ({"kind": "exit", "time": NOW, "id": "web", "exec_id": "sh", "pid": 4250, "status": 137},
     "id=web exec=sh pid=4250 status=137"),
])
def test_format_record_of_each_kind(record, expected):
    line = format_record(4100, record)
    assert line.startswith(time.strftime("%H:%M:%S", time.localtime(NOW)))
    assert f" [4100] {record['kind']:<7} " in line
    assert line.endswith(expected)


@pytest.mark.parametrize("record", [
    {}, {"kind": "request"}, {"kind": "request", "message": "refused"}, {"kind": "command"},
    {"kind": "command", "argv": []}, {"kind": "event"}, {"kind": "exit"}, {"kind": "new-kind", "id": "web"},
    {"time": NOW},
])
def test_format_record_with_fields_missing(record):
    line = format_record(4100, record)
    assert "[4100]" in line


def test_format_record_of_an_unknown_kind_shows_it_whole():
    line = format_record(4100, {"kind": "oom", "id": "web", "time": NOW})
    assert line.endswith('{"kind": "oom", "id": "web", "time": %r}' % NOW)


# -- finding daemons ---------------------------------------------------------------------------


class QuietPublisher:
    pending = 0
    dropped = 0

    def pending_for(self, container_id: str) -> list[dict]:
        return []


def stand_in_service(namespace: str, tmp_path, tasks: dict[tuple[str, str], int]):
    """A service whose registry holds running containers, by (namespace, id): pid."""
    service = SimpleNamespace(containers=ContainerRegistry(namespace), publisher=QuietPublisher())
    for (task_namespace, container_id), pid in tasks.items():
        init = InitProcess(container_id, str(tmp_path), Stdio())
        init.pid, init.state = pid, Running
        service.containers.add(Container(container_id, str(tmp_path), task_namespace, None, None, init))
    return service






@pytest.fixture
async def serve(no_trace_sinks_left, debug_dir, tmp_path):
    """Start a DebugServer in debug_dir for a daemon of namespace serving tasks."""
    servers: list[DebugServer] = []

    async def start(name: str, namespace: str, tasks: dict[tuple[str, str], int]) -> DebugServer:
        service = stand_in_service(namespace, tmp_path, tasks)
        daemon = Daemon(service, SimpleNamespace(connection_count=0), namespace, f"/run/containerd/s/{name}",
                        "ttrpc", "io.containerd.pyshim.v2")
        server = DebugServer(daemon)
        await server.start(str(debug_dir / f"{name}.sock"))
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


def leave_a_dead_socket(path: str) -> None:
    """What a killed daemon leaves: a socket file nobody listens on (connect: ECONNREFUSED)."""
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()


async def test_all_daemons_lists_the_live_one_and_removes_a_dead_ones_socket(serve, debug_dir):
    live = await serve("live", "k8s.io", {("k8s.io", "web"): 4242})
    dead = str(debug_dir / "dead.sock")
    leave_a_dead_socket(dead)
    (debug_dir / "notes.txt").write_text("not a socket name: not asked")

    daemons, problems = await asyncio.to_thread(all_daemons, str(debug_dir))
    assert problems == []
    (daemon,) = daemons
    assert daemon["pid"] == os.getpid() and daemon["debug_socket"] == live.path
    assert [(t["id"], t["pid"]) for t in daemon["tasks"]] == [("web", 4242)]
    assert not os.path.exists(dead)
    assert (debug_dir / "notes.txt").exists()


async def test_all_daemons_of_a_missing_directory_is_none():
    assert all_daemons("/nonexistent/pyshim-debug") == ([], [])


async def test_a_daemon_that_answers_garbage_is_a_problem_not_a_crash(serve, debug_dir):
    await serve("live", "k8s.io", {("k8s.io", "web"): 4242})

    async def garbage(reader, writer):
        await reader.readline()
        writer.write(b"this is not the debug protocol\n")
        await writer.drain()
        writer.close()

    impostor = await asyncio.start_unix_server(garbage, str(debug_dir / "impostor.sock"))
    try:
        daemons, problems = await asyncio.to_thread(all_daemons, str(debug_dir))
    finally:
        impostor.close()
    assert [d["namespace"] for d in daemons] == ["k8s.io"]
    (problem,) = problems
    assert "impostor.sock" in problem and "reply is not a JSON line" in problem


async def test_find_daemon_of_an_unknown_container(serve, debug_dir):
    await serve("live", "k8s.io", {("k8s.io", "web"): 4242})
    with pytest.raises(CommandError, match="^no pyshim daemon serves container nope$"):
        await asyncio.to_thread(find_daemon, str(debug_dir), "nope", "")
    with pytest.raises(CommandError, match="^no pyshim daemon serves container web in namespace default$"):
        await asyncio.to_thread(find_daemon, str(debug_dir), "web", "default")


async def test_find_daemon_in_an_empty_directory(debug_dir):
    with pytest.raises(CommandError, match="no pyshim daemon serves container web"):
        find_daemon(str(debug_dir), "web", "")


async def test_find_daemon_of_one_id_in_two_namespaces_asks_for_one(serve, debug_dir):
    await serve("a", "ns-a", {("ns-a", "web"): 1001})
    in_b = await serve("b", "ns-b", {("ns-b", "web"): 2002, ("ns-b", "db"): 2003})
    with pytest.raises(CommandError, match=r"container web is in several namespaces \(ns-a, ns-b\): pick one with -n"):
        await asyncio.to_thread(find_daemon, str(debug_dir), "web", "")
    found = await asyncio.to_thread(find_daemon, str(debug_dir), "web", "ns-b")
    assert found["debug_socket"] == in_b.path
    assert (await asyncio.to_thread(find_daemon, str(debug_dir), "db", ""))["debug_socket"] == in_b.path


async def test_find_daemon_names_the_tasks_namespaces_of_one_group_daemon(serve, debug_dir):
    # One daemon may serve containers of one id in two namespaces: the choice is between
    # the tasks' namespaces, whatever namespace the daemon was started for.
    group = await serve("group", "ns-a", {("ns-a", "web"): 1001, ("ns-b", "web"): 2002})
    with pytest.raises(CommandError, match=r"container web is in several namespaces \(ns-a, ns-b\): pick one with -n"):
        await asyncio.to_thread(find_daemon, str(debug_dir), "web", "")
    assert (await asyncio.to_thread(find_daemon, str(debug_dir), "web", "ns-b"))["debug_socket"] == group.path


async def test_find_daemon_tells_what_could_not_be_asked(debug_dir):
    debug_dir.mkdir()

    async def silent(reader, writer):
        await reader.readline()
        writer.close()

    impostor = await asyncio.start_unix_server(silent, str(debug_dir / "silent.sock"))
    try:
        with pytest.raises(CommandError) as caught:
            await asyncio.to_thread(find_daemon, str(debug_dir), "web", "")
    finally:
        impostor.close()
    assert "no pyshim daemon serves container web (" in str(caught.value)
    assert "closed the connection without an answer" in str(caught.value)


# -- main ------------------------------------------------------------------------------------


def test_log_level_with_an_unknown_level_is_a_usage_error(capsys):
    assert cli.main(["log-level", "x", "loud"]) == 2
    err = capsys.readouterr().err
    assert "unknown log level 'loud'" in err and "debug" in err


def test_an_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["rm", "web"])
    assert exited.value.code == 2


def test_inspect_of_a_container_nobody_serves(debug_dir, capsys):
    assert cli.main(["--debug-dir", str(debug_dir), "inspect", "web"]) == 1
    assert capsys.readouterr().err == "pyshim: no pyshim daemon serves container web\n"


def test_ls_with_no_daemons(debug_dir, capsys):
    assert cli.main(["--debug-dir", str(debug_dir), "ls"]) == 0
    assert capsys.readouterr().out == "no pyshim daemons\n"


async def test_ls_inspect_and_log_level_against_a_live_daemon(serve, debug_dir, capsys):
    await serve("live", "k8s.io", {("k8s.io", "web"): 4242})
    directory = ["--debug-dir", str(debug_dir)]

    assert await asyncio.to_thread(cli.main, [*directory, "ls"]) == 0
    out = capsys.readouterr().out
    assert str(os.getpid()) in out and "task web  pid 4242  running" in out

    assert await asyncio.to_thread(cli.main, [*directory, "inspect", "web"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("container web (namespace k8s.io)") and "init: pid 4242, running" in out

    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.INFO)
        assert await asyncio.to_thread(cli.main, [*directory, "log-level", "web", "debug"]) == 0
        assert root.level == logging.DEBUG
        assert capsys.readouterr().out == f"daemon {os.getpid()}: log level info -> debug\n"
    finally:
        root.setLevel(before)


async def test_trace_prints_the_records_of_its_container_until_the_daemon_goes(serve, debug_dir, capsys):
    live = await serve("live", "k8s.io", {("k8s.io", "web"): 4242})
    tracing = asyncio.create_task(asyncio.to_thread(cli.main, ["--debug-dir", str(debug_dir), "trace", "web"]))
    async with asyncio.timeout(5):
        while not TRACER.sinks:
            await asyncio.sleep(0.01)
    TRACER.exit("db", "", 5000, 0)
    TRACER.exit("web", "", 4242, 137)
    await asyncio.sleep(0.2)  # written before the daemon goes away
    await live.close()
    async with asyncio.timeout(5):
        assert await tracing == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    assert "exit" in line and "id=web pid=4242 status=137" in line
    assert "tracing container web" in captured.err
    assert "closed the trace" in captured.err


def test_trace_stops_on_sigint_even_when_started_with_sigint_ignored():
    # A shell's background job (and what it starts) has SIGINT ignored, and Python then installs
    # no handler of its own: `pyshim trace` must still end on SIGINT, and on SIGTERM.
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job starts\n"
        "from shim.framework.debug.cli import _stop_on_interrupt_and_term\n"
        "_stop_on_interrupt_and_term()\n"
        "for signum in (signal.SIGINT, signal.SIGTERM):\n"
        "    try:\n"
        "        os.kill(os.getpid(), signum)\n"
        "        signal.pause()\n"
        "    except KeyboardInterrupt:\n"
        "        print(signum)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=10)
    assert done.stdout.split() == [str(int(signal.SIGINT)), str(int(signal.SIGTERM))], done.stderr
