"""The daemon's flight recorder (shim.framework.debug.trace): command history per container,
running commands, and records that go to sinks only while one is attached.

Most tests use their own Tracer; the Reaper tests use the global TRACER, as the daemon does,
and leave it as they found it.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from shim.framework.debug.trace import RECENT_COMMANDS, STDERR_TAIL, TRACER, Tracer
from shim.framework.logcontext import TASK_ID
from shim.framework.reaper import Reaper


class working_for:
    """Run the body as code serving container_id (what service.py sets per request)."""

    def __init__(self, container_id: str) -> None:
        self.container_id = container_id

    def __enter__(self) -> None:
        self._token = TASK_ID.set(self.container_id)

    def __exit__(self, *exc) -> None:
        TASK_ID.reset(self._token)


def run_command(tracer: Tracer, argv: list[str], *, pid: int = 100, exit_code: int | None = 0,
                stderr: bytes = b"") -> None:
    token = tracer.command_started(argv[0], argv)
    tracer.command_spawned(token, pid)
    tracer.command_finished(token, exit_code, stderr)


class Collected(list):
    """A sink: every record emitted while it is attached."""

    def __call__(self, record: dict) -> None:
        self.append(record)


# -- command history -------------------------------------------------------------------------


def test_a_finished_command_is_kept_under_its_container():
    tracer = Tracer()
    with working_for("web"):
        token = tracer.command_started("start", ["runc", "start", "web"])
        tracer.command_spawned(token, 321)
        tracer.command_finished(token, 0, b"")
    (command,) = tracer.recent_commands("web")
    assert command["id"] == "web"
    assert command["command"] == "start"
    assert command["argv"] == ["runc", "start", "web"]
    assert command["pid"] == 321
    assert command["exit_code"] == 0
    assert command["ms"] >= 0 and "running_for_ms" not in command
    assert abs(command["started"] - time.time()) < 5
    assert "stderr" not in command
    assert tracer.recent_commands("other") == []
    assert tracer.running_commands() == []


def test_only_the_last_commands_of_each_container_are_kept():
    tracer = Tracer()
    with working_for("web"):
        for n in range(RECENT_COMMANDS + 5):
            run_command(tracer, ["runc", "state", str(n)])
    with working_for("db"):
        run_command(tracer, ["runc", "create", "db"])
        run_command(tracer, ["runc", "start", "db"])
    web = tracer.recent_commands("web")
    assert len(web) == RECENT_COMMANDS
    assert [c["argv"][2] for c in web] == [str(n) for n in range(5, RECENT_COMMANDS + 5)]  # oldest first
    assert [c["argv"][1] for c in tracer.recent_commands("db")] == ["create", "start"]


def test_commands_outside_any_container_are_kept_under_the_empty_id():
    tracer = Tracer()
    run_command(tracer, ["runc", "features"])
    assert [c["argv"] for c in tracer.recent_commands("")] == [["runc", "features"]]


def test_the_container_is_the_one_the_command_started_for():
    tracer = Tracer()
    with working_for("web"):
        token = tracer.command_started("kill", ["runc", "kill", "web"])
    with working_for("db"):
        tracer.command_finished(token, 0)
    assert len(tracer.recent_commands("web")) == 1
    assert tracer.recent_commands("db") == []


def test_running_commands_until_they_finish():
    tracer = Tracer()
    with working_for("web"):
        slow = tracer.command_started("exec", ["runc", "exec", "web"])
        quick = tracer.command_started("state", ["runc", "state", "web"])
    tracer.command_spawned(slow, 555)  # quick has not even been spawned yet
    time.sleep(0.02)
    running = {c["command"]: c for c in tracer.running_commands()}
    assert set(running) == {"exec", "state"}
    assert running["exec"]["pid"] == 555 and running["state"]["pid"] == 0
    assert running["exec"]["running_for_ms"] >= 15
    assert "exit_code" not in running["exec"] and "ms" not in running["exec"]
    assert tracer.recent_commands("web") == []  # kept once finished

    tracer.command_finished(quick, 0)
    assert [c["command"] for c in tracer.running_commands()] == ["exec"]
    tracer.command_finished(slow, 0)
    assert tracer.running_commands() == []
    assert [c["command"] for c in tracer.recent_commands("web")] == ["state", "exec"]


def test_unknown_tokens_are_ignored():
    tracer = Tracer()
    tracer.command_spawned(12345, 1)
    tracer.command_finished(12345, 1, b"boom")
    token = tracer.command_started("state", ["runc", "state"])
    tracer.command_finished(token, 0)
    tracer.command_finished(token, 1, b"a second finish")  # e.g. a finally after a finally
    (command,) = tracer.recent_commands("")
    assert command["exit_code"] == 0 and "stderr" not in command


def test_forget_drops_a_containers_history_only():
    tracer = Tracer()
    with working_for("web"):
        run_command(tracer, ["runc", "delete", "web"])
        still_running = tracer.command_started("events", ["runc", "events", "web"])
    with working_for("db"):
        run_command(tracer, ["runc", "start", "db"])
    tracer.forget("web")
    tracer.forget("never-seen")
    assert tracer.recent_commands("web") == []
    assert len(tracer.recent_commands("db")) == 1
    assert [c["command"] for c in tracer.running_commands()] == ["events"]
    tracer.command_finished(still_running, 0)
    assert len(tracer.recent_commands("web")) == 1  # a command that outlived forget still lands


@pytest.mark.parametrize("exit_code, kept", [(0, False), (None, False), (1, True), (137, True)])
def test_stderr_is_kept_only_when_the_command_failed(exit_code, kept):
    tracer = Tracer()
    run_command(tracer, ["runc", "kill"], exit_code=exit_code, stderr=b"  container not running\n")
    (command,) = tracer.recent_commands("")
    assert command["exit_code"] == exit_code
    if kept:
        assert command["stderr"] == "container not running"
    else:
        assert "stderr" not in command


def test_only_the_tail_of_a_long_stderr_is_kept_and_bad_utf8_is_replaced():
    tracer = Tracer()
    stderr = b"x" * 10_000 + b"\xff" + b"y" * (STDERR_TAIL - 100) + b" the cause\n"
    run_command(tracer, ["runc", "create"], exit_code=1, stderr=stderr)
    (command,) = tracer.recent_commands("")
    kept = command["stderr"]
    assert kept.endswith("the cause")
    assert "\ufffd" in kept  # the undecodable byte, replaced
    assert len(kept) <= STDERR_TAIL
    assert kept.count("x") == STDERR_TAIL - (len(stderr) - 10_000)  # of the 10,000 only the tail's


def test_a_failed_command_without_stderr_has_no_stderr_field():
    tracer = Tracer()
    run_command(tracer, ["false"], exit_code=1)
    assert "stderr" not in tracer.recent_commands("")[0]


# -- sinks -----------------------------------------------------------------------------------


def test_without_sinks_nothing_is_emitted():
    tracer = Tracer()

    def emit(kind, record):
        raise AssertionError(f"{kind} emitted with no sink attached")

    tracer.emit = emit
    tracer.request("containerd.task.v2.Task", "State", "web", "", "OK", "", 0.001)
    tracer.event("/tasks/exit", "web", "queued")
    tracer.exit("web", "", 42, 0)
    run_command(tracer, ["runc", "state"])  # still kept for inspect, just not emitted
    assert len(tracer.recent_commands("")) == 1


def test_records_reach_every_attached_sink_with_kind_and_time():
    tracer = Tracer()
    first, second = Collected(), Collected()
    tracer.attach(first)
    tracer.attach(second)
    before = time.time()
    tracer.request("containerd.task.v2.Task", "Kill", "web", "sh", "NOT_FOUND", "process sh does not exist", 0.0025)
    tracer.event("/tasks/exit", "web", "retrying", 2, "connection refused")
    tracer.event("/tasks/start", "web", "delivered")
    tracer.exit("web", "sh", 77, 137)
    with working_for("web"):
        run_command(tracer, ["runc", "kill", "web", "9"], pid=88, exit_code=1, stderr=b"no such process")
    assert first == second
    assert [r["kind"] for r in first] == ["request", "event", "event", "exit", "command"]
    assert all(before <= r["time"] <= time.time() for r in first)
    request, retrying, delivered, exit_, command = first
    assert request == {"kind": "request", "time": request["time"], "service": "containerd.task.v2.Task",
                       "method": "Kill", "id": "web", "exec_id": "sh", "status": "NOT_FOUND",
                       "message": "process sh does not exist", "ms": 2.5}
    assert (retrying["attempts"], retrying["message"], retrying["state"]) == (2, "connection refused", "retrying")
    assert "attempts" not in delivered and "message" not in delivered
    assert (exit_["id"], exit_["exec_id"], exit_["pid"], exit_["status"]) == ("web", "sh", 77, 137)
    assert (command["id"], command["pid"], command["exit_code"], command["stderr"]) == ("web", 88, 1, "no such process")


def test_a_sink_that_detaches_itself_while_called_does_not_cost_the_others_the_record():
    tracer = Tracer()
    later = Collected()

    def once(record):
        tracer.detach(once)

    tracer.attach(once)
    tracer.attach(later)
    tracer.exit("web", "", 1, 0)
    tracer.exit("web", "", 2, 0)
    assert [r["pid"] for r in later] == [1, 2]
    assert tracer.sinks == [later]
    tracer.detach(once)  # detaching twice is harmless
    tracer.detach(later)
    assert tracer.sinks == []


# -- the reaper reports what it runs ---------------------------------------------------------


@pytest.fixture
async def reaper():
    reaper = Reaper()
    reaper.start()
    try:
        yield reaper
    finally:
        reaper.stop()


@pytest.fixture
def traced():
    """Records the global TRACER emits during the test, under a container id of the test's."""
    collected = Collected()
    TRACER.attach(collected)
    try:
        with working_for("reaper-traced"):
            yield collected
    finally:
        TRACER.detach(collected)
        TRACER.forget("reaper-traced")


async def test_reaper_run_reports_true_and_false(reaper, traced):
    succeeded = await reaper.run(["/bin/true"])
    failed = await reaper.run(["/bin/false"], label="check")
    assert [(r["kind"], r["command"], r["argv"], r["pid"], r["exit_code"]) for r in traced] == [
        ("command", "true", ["/bin/true"], succeeded.pid, 0),
        ("command", "check", ["/bin/false"], failed.pid, 1),
    ]
    assert all(r["id"] == "reaper-traced" and r["ms"] >= 0 for r in traced)
    kept = TRACER.recent_commands("reaper-traced")
    assert [(c["command"], c["exit_code"]) for c in kept] == [("true", 0), ("check", 1)]


async def test_reaper_run_reports_a_failed_commands_stderr(reaper, traced):
    await reaper.run(["sh", "-c", "echo fine >&2"])
    await reaper.run(["sh", "-c", "echo 'container not found' >&2; exit 3"])
    assert "stderr" not in traced[0]
    assert (traced[1]["exit_code"], traced[1]["stderr"]) == (3, "container not found")


async def test_a_command_the_reaper_runs_is_listed_as_running_until_it_exits(reaper, traced):
    run = asyncio.create_task(reaper.run(["sleep", "0.3"], label="sleeper"))
    async with asyncio.timeout(5):
        while not any(c["command"] == "sleeper" and c["pid"] for c in TRACER.running_commands()):
            await asyncio.sleep(0.01)
    (running,) = [c for c in TRACER.running_commands() if c["command"] == "sleeper"]
    assert running["id"] == "reaper-traced" and running["argv"] == ["sleep", "0.3"]
    assert traced == []  # nothing emitted before it finishes
    result = await run
    assert not [c for c in TRACER.running_commands() if c["command"] == "sleeper"]
    assert [(r["pid"], r["exit_code"]) for r in traced] == [(result.pid, 0)]
