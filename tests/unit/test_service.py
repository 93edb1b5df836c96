"""TaskService's state machine and exit rules, in-process, over real short-lived processes.

The service is driven directly (no ttrpc) with:

* the real `Reaper`, with this pytest process as child subreaper for the duration of a test;
* a fake OCI runtime (`FakeRuntime`, same methods as `shim.runc.runtime.Runc`, injected through
  `TaskService(app=FakeApp(...))`). Like runc it starts every container process through a
  short-lived launcher (`sh`), so the process is re-parented to us and its exit reaches the
  service through a reaper subscription, exactly like a container's. `create` leaves the
  process blocked on a pipe until `start` (runc's exec fifo), writes the pid file and returns;
  `exec` launches and releases at once. Hooks let a test act while `create`/`start`/`exec`
  have not "returned" yet. With a private pid namespace in config.json, init's death kills
  the execs (what the kernel does); without one, they survive it (host pid namespace);
* a recording publisher that snapshots, for every /tasks/exit, what State and Wait answer at
  that instant.

The rules under test are those of shim/framework/service.py's docstring (containerd's
cmd/containerd-shim-runc-v2/spec/Shim.tla). Stdio is /dev/null (empty strings), no rootfs.
Every test ends with no child process and no fd left behind (checked by the fixture).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import time
from dataclasses import dataclass, field

import pytest

from shim.framework import service as service_module
from shim.api.containerd.task import v2 as task
from shim.api.containerd.v1.types import Status
from shim.api.google.protobuf import Any
from shim.framework.process import NOT_EXITED
from shim.framework.reaper import Exit, Reaper, set_child_subreaper
from shim.runc.app import RuncApp
from shim.runc.runtime import RuncError, classify
from shim.framework.service import TaskService
from shim.framework.ttrpc.status import Code, TtrpcError

NAMESPACE = "pyshim-unit"

# The launcher forks the held process, writes its pid and exits (as `runc create` does), so
# the process is re-parented to us. The held process waits for a line on fd 3 (`start`).
LAUNCH = 'p=$1; shift; "$@" & echo $! > "$p"'
HELD = 'read _ <&3; exec 3<&-; exec "$@"'


# -- helpers --------------------------------------------------------------------------------


def children() -> set[int]:
    """Pids whose parent is this process (zombies included)."""
    me = os.getpid()
    out = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:
            out.add(int(name))
    return out


WOULD_BLOCK = object()


def run_now(coro):
    """Result of a coroutine that finishes without suspending, else WOULD_BLOCK."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    return WOULD_BLOCK


def label(record: Record) -> tuple[str, str]:
    """("exit", "e1"), ("start", "c1"): what a record is about, for order assertions."""
    event = record.event
    who = getattr(event, "exec_id", "") or getattr(event, "id", "") or event.container_id
    return record.topic.rsplit("/", 1)[1], who


@dataclass
class Record:
    topic: str
    event: object
    #: For /tasks/exit: (StateResponse, WaitResponse or WOULD_BLOCK) taken at publish time.
    snapshot: tuple | None


class Recorder:
    """A publisher that records every event and what State/Wait said when an exit went out."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.service: TaskService | None = None
        self._waiters: list[asyncio.Future] = []
        self.on_publish = None  # a test's hook, called with (topic, event) before recording

    def publish(self, topic: str, event) -> None:
        if self.on_publish is not None:
            self.on_publish(topic, event)
        self.records.append(Record(topic, event, self._snapshot(topic, event)))
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _snapshot(self, topic: str, event):
        if topic != "/tasks/exit" or self.service is None:
            return None
        exec_id = "" if event.id == event.container_id else event.id
        try:
            state = run_now(self.service.state(task.StateRequest(id=event.container_id, exec_id=exec_id), None))
            wait = run_now(self.service.wait(task.WaitRequest(id=event.container_id, exec_id=exec_id), None))
        except TtrpcError as exc:
            return (exc, None)
        return (state, wait)

    def labels(self) -> list[tuple[str, str]]:
        return [label(r) for r in self.records]

    def find(self, topic: str, **fields) -> list[Record]:
        return [
            r for r in self.records
            if r.topic == topic and all(getattr(r.event, k) == v for k, v in fields.items())
        ]

    async def wait_for(self, topic: str, timeout: float = 5.0, **fields) -> Record:
        async with asyncio.timeout(timeout):
            while True:
                found = self.find(topic, **fields)
                if found:
                    return found[0]
                fut = asyncio.get_running_loop().create_future()
                self._waiters.append(fut)
                await fut


class Held:
    """A launched process and the write end of the pipe it waits on."""

    def __init__(self, pid: int, gate: int) -> None:
        self.pid = pid
        self.gate = gate

    def release(self) -> None:
        if self.gate == -1:
            return
        try:
            os.write(self.gate, b"\n")
        except BrokenPipeError:
            pass  # killed before it was started
        self.close()

    def close(self) -> None:
        if self.gate != -1:
            os.close(self.gate)
            self.gate = -1


class FakeRuntime:
    """shim.runc.runtime.Runc's interface over plain processes: one instance per container.

    config.json of the bundle: {"process": {"args": [...]}, "linux": {"namespaces": [...]}}
    and optionally {"fake": {"create_error": "..."}}.
    """

    def __init__(self, harness: Harness, *, reaper: Reaper, binary: str, root: str, log_path: str,
                 systemd_cgroup: bool) -> None:
        self.h = harness
        self.reaper = reaper
        self.calls: list[tuple] = []
        self.id = ""
        self.status = "absent"  # created, running, paused, stopped like `runc state`
        self.private_pid_ns = True
        self.init: Held | None = None
        self.execs: list[Held] = []
        self.exec_specs: list[dict] = []  # the process specs `exec` was given

    def processes(self) -> list[Held]:
        return [p for p in (self.init, *self.execs) if p is not None]

    async def _launch(self, args, pid_file: str, stdin, stdout, stderr) -> Held:
        r, w = os.pipe()
        try:
            result = await self.reaper.run(
                ["sh", "-c", LAUNCH, "launch", pid_file, "sh", "-c", HELD, "held", *args],
                stdin=stdin, stdout=stdout, stderr=stderr, extra_fds={3: r},
            )
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        if result.returncode != 0:
            os.close(w)
            raise RuncError(f"launcher: exit status {result.returncode}")
        with open(pid_file) as f:
            pid = int(f.read())
        self.h.pids.add(pid)
        return Held(pid, w)

    async def create(self, id, bundle, *, pid_file, console_socket=None, no_pivot=False,
                     no_new_keyring=False, stdin=None, stdout=None, stderr=None) -> None:
        self.calls.append(("create", id))
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
        error = spec.get("fake", {}).get("create_error")
        if error:
            raise RuncError(error, command="create")
        namespaces = (spec.get("linux") or {}).get("namespaces") or []
        self.private_pid_ns = any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
        self.init = await self._launch(spec["process"]["args"], pid_file, stdin, stdout, stderr)
        self.id = id
        self.status = "created"
        self.h.runtimes[id] = self
        if self.h.on_create is not None:
            await self.h.on_create(id, self.init.pid)

    async def start(self, id) -> None:
        self.calls.append(("start", id))
        if self.status != "created":
            raise RuncError(f"cannot start a container that is {self.status}", command="start")
        self.status = "running"
        assert self.init is not None
        self.init.release()
        if self.h.on_start is not None:
            await self.h.on_start(id, self.init.pid)

    async def exec(self, id, process_spec, *, pid_file, detach=True, console_socket=None,
                   stdin=None, stdout=None, stderr=None) -> None:
        self.calls.append(("exec", id))
        self.exec_specs.append(dict(process_spec))
        if self.status not in ("created", "running"):
            raise RuncError(f"cannot exec in a {self.status} container", command="exec")
        held = await self._launch(process_spec["args"], pid_file, stdin, stdout, stderr)
        self.execs.append(held)
        held.release()
        if self.h.on_exec is not None:
            await self.h.on_exec(id, held.pid)

    async def kill(self, id, signal, all=False) -> None:
        self.calls.append(("kill", id, int(signal), all))
        if self.status == "absent":
            raise classify(RuncError(f"container {id} does not exist", command="kill"))
        if all and self.h.fail_kill_all:
            raise RuncError("kill --all failed (test)", command="kill")
        if self.status == "stopped" and not all:
            raise classify(RuncError("container not running", command="kill"))
        for held in (self.processes() if all else [self.init]):
            self.h.signal(held.pid, signal)

    async def delete(self, id, force=False) -> None:
        self.calls.append(("delete", id, force))
        if self.status == "absent":
            raise classify(RuncError(f"container {id} does not exist", command="delete"))
        if self.status in ("running", "paused") and not force:
            raise RuncError(f"cannot delete container {id} that is not stopped: {self.status}", command="delete")
        victims = [p.pid for p in self.processes() if p.pid not in self.h.seen]
        for pid in victims:
            self.h.signal(pid, signal.SIGKILL)
        for pid in victims:  # runc delete returns once the container is gone
            await self.h.exit_seen(pid)
        self.status = "absent"

    async def ps(self, id) -> list[int]:
        self.calls.append(("ps", id))
        return [p.pid for p in self.processes() if p.pid not in self.h.seen]

    async def pause(self, id) -> None:
        self.calls.append(("pause", id))
        if self.status != "running":
            raise RuncError("container not running", command="pause")
        for p in self.processes():
            self.h.signal(p.pid, signal.SIGSTOP)
        self.status = "paused"

        if self.h.on_pause is not None:
            await self.h.on_pause(id, self.init.pid)

    async def resume(self, id) -> None:
        self.calls.append(("resume", id))
        if self.status != "paused":
            raise RuncError("container not paused", command="resume")
        for p in self.processes():
            self.h.signal(p.pid, signal.SIGCONT)
        self.status = "running"

    def close(self) -> None:
        for p in self.processes():
            p.close()


class FakeApp(RuncApp):
    """The runc app with FakeRuntime as its OCI runtime."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness

    def runtime(self, options, *, namespace, bundle, reaper):
        return self.harness.runtime_factory(reaper=reaper, binary=options.runtime_binary,
                                            root=options.runtime_root(namespace),
                                            log_path=os.path.join(bundle, "log.json"),
                                            systemd_cgroup=options.systemd_cgroup)


@dataclass
class Harness:
    tmp_path: object
    reaper: Reaper
    recorder: Recorder
    service: TaskService | None = None
    runtimes: dict[str, FakeRuntime] = field(default_factory=dict)
    all_runtimes: list[FakeRuntime] = field(default_factory=list)
    #: Every container process the fake runtime launched.
    pids: set[int] = field(default_factory=set)
    #: Exits the service's on_exit has been handed, by pid.
    seen: dict[int, Exit] = field(default_factory=dict)
    shutdowns: int = 0
    fail_kill_all: bool = False
    # Hooks: async (container_id, pid) run before the runtime call returns.
    on_create: object = None
    on_start: object = None
    on_exec: object = None
    on_pause: object = None
    _seen_waiters: dict[int, list[asyncio.Future]] = field(default_factory=dict)
    _tasks: list[asyncio.Task] = field(default_factory=list)

    def task(self, coro) -> asyncio.Task:
        """A request running concurrently; cancelled at teardown if a failing test left it."""
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(t)
        return t

    def runtime_factory(self, **kwargs) -> FakeRuntime:
        runtime = FakeRuntime(self, **kwargs)
        self.all_runtimes.append(runtime)
        return runtime

    def saw(self, exit_: Exit) -> None:
        """Called right after service.on_exit(exit_)."""
        self.seen[exit_.pid] = exit_
        for runtime in self.runtimes.values():
            if runtime.init is not None and runtime.init.pid == exit_.pid and runtime.status != "absent":
                runtime.status = "stopped"
                if runtime.private_pid_ns:  # the kernel kills a pid namespace with its init
                    for held in runtime.execs:
                        self.signal(held.pid, signal.SIGKILL)
        for fut in self._seen_waiters.pop(exit_.pid, []):
            if not fut.done():
                fut.set_result(exit_)

    async def exit_seen(self, pid: int, timeout: float = 5.0) -> Exit:
        """Wait until the service's on_exit has been called for pid."""
        if pid in self.seen:
            return self.seen[pid]
        fut = asyncio.get_running_loop().create_future()
        self._seen_waiters.setdefault(pid, []).append(fut)
        async with asyncio.timeout(timeout):
            return await fut

    def signal(self, pid: int, signum: int) -> None:
        if pid in self.seen:
            return  # reaped: the pid may belong to someone else by now
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # -- requests -----------------------------------------------------------------------
    async def create(self, cid: str, *args: str, host_pid: bool = False, fake: dict | None = None):
        bundle = self.tmp_path / cid
        bundle.mkdir(exist_ok=True)
        namespaces = [{"type": "mount"}] + ([] if host_pid else [{"type": "pid"}])
        spec = {"process": {"args": list(args)}, "linux": {"namespaces": namespaces}}
        if fake:
            spec["fake"] = fake
        (bundle / "config.json").write_text(json.dumps(spec))
        async with asyncio.timeout(5):
            return await self.service.create(task.CreateTaskRequest(id=cid, bundle=str(bundle)), None)

    async def start(self, cid: str, exec_id: str = "", timeout: float = 5.0) -> task.StartResponse:
        async with asyncio.timeout(timeout):
            return await self.service.start(task.StartRequest(id=cid, exec_id=exec_id), None)

    async def exec(self, cid: str, exec_id: str, *args: str):
        spec = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
                   value=json.dumps({"args": list(args), "cwd": "/"}).encode())
        return await self.service.exec(task.ExecProcessRequest(id=cid, exec_id=exec_id, spec=spec), None)

    async def kill(self, cid: str, signum: int, exec_id: str = "", all: bool = False, timeout: float = 5.0):
        async with asyncio.timeout(timeout):
            return await self.service.kill(task.KillRequest(id=cid, exec_id=exec_id, signal=signum, all=all), None)

    async def state(self, cid: str, exec_id: str = "") -> task.StateResponse:
        return await self.service.state(task.StateRequest(id=cid, exec_id=exec_id), None)

    async def wait(self, cid: str, exec_id: str = "", timeout: float = 5.0) -> task.WaitResponse:
        async with asyncio.timeout(timeout):
            return await self.service.wait(task.WaitRequest(id=cid, exec_id=exec_id), None)

    async def delete(self, cid: str, exec_id: str = "", timeout: float = 5.0) -> task.DeleteResponse:
        async with asyncio.timeout(timeout):
            return await self.service.delete(task.DeleteRequest(id=cid, exec_id=exec_id), None)

    async def exited(self, cid: str, exec_id: str = "") -> Record:
        """The /tasks/exit of a process (waits for it)."""
        return await self.recorder.wait_for("/tasks/exit", container_id=cid, id=exec_id or cid)


@pytest.fixture
async def h(tmp_path):
    fds_before = set(os.listdir("/proc/self/fd"))
    children_before = children()
    set_child_subreaper(True)
    reaper = Reaper()
    reaper.start()
    recorder = Recorder()
    harness = Harness(tmp_path, reaper, recorder)

    def on_shutdown() -> None:
        harness.shutdowns += 1

    service = TaskService(NAMESPACE, recorder, reaper, on_shutdown, app=FakeApp(harness))
    harness.service = recorder.service = service
    original_on_exit = service.on_exit

    def on_exit(exit_):
        original_on_exit(exit_)
        harness.saw(exit_)

    service.on_exit = on_exit  # handle_exits calls self.on_exit
    exits = asyncio.get_running_loop().create_task(service.handle_exits(reaper.subscribe()))
    try:
        yield harness
    finally:
        for t in harness._tasks:
            t.cancel()
        await asyncio.gather(*harness._tasks, return_exceptions=True)
        left = [pid for pid in harness.pids if pid not in harness.seen]
        for pid in left:
            harness.signal(pid, signal.SIGKILL)
        try:
            for pid in left:
                await harness.exit_seen(pid)
        finally:
            for runtime in harness.all_runtimes:
                runtime.close()
            await service.close()
            reaper.stop()  # ends the subscription, hence handle_exits
            await asyncio.wait_for(exits, 5)
            set_child_subreaper(False)
    assert children() - children_before == set(), "a process was left behind"
    assert set(os.listdir("/proc/self/fd")) == fds_before, "an fd was left open"
    # Rule 4, checked for every exit of every test: marked exited before it was published.
    for record in recorder.find("/tasks/exit"):
        check_exited_at_publish(record)


def check_exited_at_publish(record: Record) -> None:
    event = record.event
    state, wait = record.snapshot
    assert not isinstance(state, Exception), state
    assert state.status == Status.STOPPED, f"{label(record)}: State said {state.status!r} when its exit went out"
    assert (state.exit_status, state.exited_at) == (event.exit_status, event.exited_at)
    assert wait is not WOULD_BLOCK, f"{label(record)}: Wait still blocked when its exit went out"
    assert (wait.exit_status, wait.exited_at) == (event.exit_status, event.exited_at)


async def settle() -> None:
    """Give the service's tasks every chance to publish something they should not."""
    await asyncio.sleep(0.05)


# -- rule 1/2: exits while starting -----------------------------------------------------------


async def test_init_exit_during_start_is_not_lost_and_follows_start(h):
    resp = await h.create("c1", "sh", "-c", "exit 3")
    seen_during_start = []

    async def on_start(cid, pid):
        # The process was released by `runc start` and dies before start "returns".
        seen_during_start.append(await h.exit_seen(pid))
        await settle()
        assert h.recorder.find("/tasks/exit") == [], "exit published before /tasks/start"

    h.on_start = on_start
    started = await h.start("c1")
    assert started.pid == resp.pid
    assert [e.pid for e in seen_during_start] == [resp.pid]
    record = await h.exited("c1")
    assert h.recorder.labels() == [("create", "c1"), ("start", "c1"), ("exit", "c1")]
    assert (record.event.pid, record.event.exit_status) == (resp.pid, 3)
    assert (await h.wait("c1")).exit_status == 3


async def test_init_exit_during_create_is_not_lost(h):
    # Bug (rule 1): an init dying before `runc create` returned (OOM, killed) was dropped as
    # an unknown pid: no /tasks/exit ever, Wait hung forever. containerd's shim catches it
    # (preStart(nil) in Create) and publishes the exit after /tasks/create.
    async def on_create(cid, pid):
        h.runtimes[cid].init.release()
        await h.exit_seen(pid)

    h.on_create = on_create
    resp = await h.create("c1", "sh", "-c", "exit 4")
    record = await h.exited("c1")
    assert h.recorder.labels() == [("create", "c1"), ("exit", "c1")]
    assert (record.event.pid, record.event.exit_status) == (resp.pid, 4)
    assert (await h.wait("c1")).exit_status == 4
    with pytest.raises(TtrpcError) as err:
        await h.start("c1")
    assert (err.value.code, err.value.message) == (Code.UNKNOWN, "cannot start a stopped process")
    deleted = await h.delete("c1")
    assert (deleted.pid, deleted.exit_status) == (resp.pid, 4)
    # what the `delete` command will print (shim/framework/delete_record.py)
    assert (h.tmp_path / "c1" / "deleted.pb").read_bytes() == bytes(deleted)


async def test_exec_exit_before_runc_exec_returns_is_published_after_exec_started(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sh", "-c", "exit 5")
    pid_known_at_reap = []

    async def on_exec(cid, pid):
        await h.exit_seen(pid)  # reaped while `runc exec` has not returned
        pid_known_at_reap.append((await h.state("c1", "e1")).pid)
        await settle()

    h.on_exec = on_exec
    started = await h.start("c1", "e1")
    assert pid_known_at_reap == [0]  # the service could not know whose exit it was
    record = await h.exited("c1", "e1")
    assert h.recorder.labels()[-3:] == [("exec-added", "e1"), ("exec-started", "e1"), ("exit", "e1")]
    assert (record.event.pid, record.event.exit_status) == (started.pid, 5)
    assert h.recorder.find("/tasks/exec-started", exec_id="e1")[0].event.pid == started.pid
    assert (await h.wait("c1", "e1")).exit_status == 5
    assert (await h.state("c1")).status == Status.RUNNING  # init unaffected


# -- rule 3: init's exit waits for starting and running execs -----------------------------------


@pytest.mark.parametrize("host_pid", [False, True], ids=["pid-ns", "host-pid"])
async def test_init_exit_during_exec_start_waits_for_exec_start_and_exit(h, host_pid):
    resp = await h.create("c1", "sleep", "30", host_pid=host_pid)
    await h.start("c1")
    await h.exec("c1", "e1", "sleep", "30")
    gate = asyncio.Event()
    exec_pid = asyncio.get_running_loop().create_future()

    async def on_exec(cid, pid):
        exec_pid.set_result(pid)
        await gate.wait()

    h.on_exec = on_exec
    starting = h.task(h.start("c1", "e1"))
    pid = await exec_pid
    await h.kill("c1", signal.SIGKILL)
    await h.exit_seen(resp.pid)
    if not host_pid:
        await h.exit_seen(pid)  # killed with its pid namespace, still "starting"
    await settle()
    assert h.recorder.find("/tasks/exit") == [], "init's exit went out while an exec was starting"
    gate.set()
    started = await starting
    assert started.pid == pid
    await h.exited("c1")
    assert h.recorder.labels()[-3:] == [("exec-started", "e1"), ("exit", "e1"), ("exit", "c1")]
    assert h.recorder.find("/tasks/exit", id="e1")[0].event.exit_status == 137


@pytest.mark.parametrize("host_pid", [False, True], ids=["pid-ns", "host-pid"])
async def test_exec_exits_are_published_before_init_exit(h, host_pid):
    resp = await h.create("c1", "sleep", "30", host_pid=host_pid)
    await h.start("c1")
    for exec_id in ("e1", "e2"):
        await h.exec("c1", exec_id, "sleep", "30")
        await h.start("c1", exec_id)
    await h.kill("c1", signal.SIGKILL)
    record = await h.exited("c1")
    labels = h.recorder.labels()
    assert labels[-1] == ("exit", "c1")
    assert sorted(labels[-3:-1]) == [("exit", "e1"), ("exit", "e2")]
    assert [r.event.exit_status for r in h.recorder.find("/tasks/exit")] == [137, 137, 137]
    assert record.event.pid == resp.pid
    kill_all = [c for c in h.runtimes["c1"].calls if c[0] == "kill" and c[3]]
    # Without a pid namespace of its own, the shim kills the execs (the kernel will not).
    assert kill_all == ([("kill", "c1", 9, True)] if host_pid else [])


async def test_init_exit_is_not_held_forever_by_a_surviving_exec(h, monkeypatch):
    monkeypatch.setattr(service_module, "EXEC_EXIT_TIMEOUT", 0.3)
    h.fail_kill_all = True  # host pid namespace and `kill --all` fails: the exec survives init
    await h.create("c1", "sleep", "30", host_pid=True)
    await h.start("c1")
    await h.exec("c1", "e1", "sleep", "30")
    await h.start("c1", "e1")
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    assert h.recorder.find("/tasks/exit", id="e1") == []
    assert (await h.state("c1", "e1")).status == Status.RUNNING
    await h.kill("c1", signal.SIGKILL, exec_id="e1")
    assert (await h.exited("c1", "e1")).event.exit_status == 137


@pytest.mark.parametrize("host_pid", [False, True], ids=["pid-ns", "shared-pid"])
async def test_init_exit_kills_the_rest_unless_the_pid_namespace_is_private(h, host_pid):
    # A pod's shared pid namespace: init's forked children outlive it and keep its output
    # open; runc-v2 kills them whenever init exits, with or without execs.
    await h.create("c1", "sleep", "30", host_pid=host_pid)
    await h.start("c1")
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    kill_all = [c for c in h.runtimes["c1"].calls if c[0] == "kill" and c[3]]
    assert kill_all == ([("kill", "c1", 9, True)] if host_pid else [])


async def test_init_exit_kills_the_rest_when_the_spec_cannot_be_read(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    (h.tmp_path / "c1" / "config.json").write_text("{not json")
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    assert ("kill", "c1", 9, True) in h.runtimes["c1"].calls


@pytest.mark.parametrize("spec", [{}, {"process": {"args": ["sh"]}}, {"linux": {"namespaces": [{"type": "pid"}]}},
                                  {"linux": {"namespaces": [{"type": "pid", "path": "/proc/1/ns/pid"}]}},
                                  {"linux": {"namespaces": None}}, {"linux": "odd"}])
def test_kill_all_on_init_exit_rule(tmp_path, spec):
    (tmp_path / "config.json").write_text(json.dumps(spec))
    private = spec.get("linux") == {"namespaces": [{"type": "pid"}]}
    assert service_module.kill_all_on_init_exit(str(tmp_path)) is (not private)
    assert service_module.kill_all_on_init_exit(str(tmp_path / "missing")) is True


@pytest.mark.parametrize("requested", [False, True])
async def test_exec_terminal_is_the_requests(h, requested):
    # containerd's Go client sends the container's own process spec (terminal false) and asks
    # for a TTY in the request; `ctr exec -t` sets both. The request wins, as in runc-v2.
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    spec = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
               value=json.dumps({"args": ["true"], "cwd": "/", "terminal": not requested}).encode())
    await h.service.exec(task.ExecProcessRequest(id="c1", exec_id="e1", spec=spec, terminal=requested), None)
    if requested:
        return  # a real console socket needs a runtime that sends a pty (tests/e2e/test_exec_tty.py)
    await h.start("c1", "e1")
    assert h.runtimes["c1"].exec_specs[-1]["terminal"] is False
    await h.exited("c1", "e1")


async def test_exec_process_spec_must_be_an_object(h):
    await h.create("c1", "sleep", "30")
    spec = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process", value=b"[1, 2]")
    await expect_error(h.service.exec(task.ExecProcessRequest(id="c1", exec_id="e1", spec=spec), None),
                       Code.INVALID_ARGUMENT, "exec e1: process spec must be a JSON object")


@pytest.mark.parametrize("in_spec,requested", [(False, True), (True, False), (True, True), (None, False)])
def test_align_terminal_rewrites_config_only_when_it_differs(tmp_path, in_spec, requested):
    process = {"args": ["sh"]} if in_spec is None else {"args": ["sh"], "terminal": in_spec}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"ociVersion": "1.0.2", "process": process}))
    before = config.stat().st_ino
    service_module.align_terminal(str(tmp_path), requested)
    spec = json.loads(config.read_text())
    assert bool(spec["process"].get("terminal")) is requested and spec["ociVersion"] == "1.0.2"
    assert (config.stat().st_ino == before) is (bool(in_spec) == requested)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


async def test_exit_during_pause_leaves_the_task_stopped_not_paused(h):
    # `runc pause` succeeds, then init dies (killed by someone else) before the shim has
    # seen pause return: the exit's Stopped must win over the Paused that pause would set.
    await h.create("c1", "sleep", "30")
    await h.start("c1")

    async def on_pause(cid, pid):
        os.kill(pid, signal.SIGCONT)  # the fake froze it; let the SIGKILL act at once
        os.kill(pid, signal.SIGKILL)
        await h.exited("c1")  # the exit is handled while pause is still "running"

    h.on_pause = on_pause
    await h.service.pause(task.PauseRequest(id="c1"), None)
    state = await h.state("c1")
    assert (state.status, state.exit_status) == (Status.STOPPED, 137)
    await expect_error(h.service.resume(task.ResumeRequest(id="c1"), None), Code.UNKNOWN,
                       "cannot resume a stopped container")


async def test_exec_start_refused_once_init_exit_was_reaped(h):
    # Bug (rule 3): between init's reap and its /tasks/exit (held for a starting or running
    # exec) a new exec could still be started; it is not among the execs init's exit waits
    # for. containerd's shim refuses from the reap on (containerInitExit): FAILED_PRECONDITION.
    resp = await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sleep", "30")
    await h.exec("c1", "e2", "sleep", "30")
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def on_exec(cid, pid):
        entered.set()
        await gate.wait()

    h.on_exec = on_exec
    starting = h.task(h.start("c1", "e1"))
    await entered.wait()
    await h.kill("c1", signal.SIGKILL)
    await h.exit_seen(resp.pid)  # reaped; the exit is held for e1's start
    assert (await h.state("c1")).status == Status.RUNNING
    with pytest.raises(TtrpcError) as err:
        await h.start("c1", "e2")
    assert err.value.code == Code.FAILED_PRECONDITION
    assert err.value.message == "container c1 init process is not running: failed precondition"
    gate.set()
    await starting
    await h.exited("c1")
    assert h.recorder.labels()[-3:] == [("exec-started", "e1"), ("exit", "e1"), ("exit", "c1")]
    assert [c[0] for c in h.runtimes["c1"].calls].count("exec") == 1


async def test_early_exit_of_an_exec_while_a_later_exec_start_finished_first(h):
    # Bug (rule 1): the collectors of exits seen while execs start were removed with
    # list.remove, i.e. by equality: two empty collectors are equal, so the exec whose start
    # finished first removed the other one's. That exec's early exit was then never matched
    # (lost: no /tasks/exit, Wait hung) and its own removal raised ValueError, which skipped
    # the starting-exec count and so held init's exit forever.
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "a", "sleep", "30")
    await h.exec("c1", "b", "sleep", "30")
    gate = asyncio.Event()
    a_pid = asyncio.get_running_loop().create_future()

    async def on_exec(cid, pid):
        if not a_pid.done():  # the first `runc exec` (a) hangs until the gate opens
            a_pid.set_result(pid)
            await gate.wait()

    h.on_exec = on_exec
    start_a = h.task(h.start("c1", "a"))
    pid = await a_pid
    await h.start("c1", "b")  # starts and finishes while a is still starting
    h.signal(pid, signal.SIGKILL)  # a dies before its `runc exec` returned
    await h.exit_seen(pid)
    gate.set()
    assert (await start_a).pid == pid
    record = await h.exited("c1", "a")
    assert (record.event.pid, record.event.exit_status) == (pid, 137)
    assert h.recorder.labels().index(("exec-started", "a")) < h.recorder.labels().index(("exit", "a"))
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")  # not held by a miscounted starting exec
    assert h.recorder.labels()[-1] == ("exit", "c1")


# -- concurrent starts --------------------------------------------------------------------------


async def test_concurrent_start_of_init_is_refused(h):
    # Bug (rule 2): a second Start while the first was in flight failed in the runtime and,
    # on its way out, took init off the "starting" set; init's exit then went out before
    # /tasks/start, and the first Start set RUNNING over STOPPED afterwards.
    resp = await h.create("c1", "sh", "-c", "exit 2")
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def on_start(cid, pid):
        entered.set()
        await gate.wait()

    h.on_start = on_start
    first = h.task(h.start("c1"))
    await entered.wait()
    with pytest.raises(TtrpcError) as err:
        await h.start("c1")
    assert (err.value.code, err.value.message) == (Code.UNKNOWN, "cannot start a running process")
    await h.exit_seen(resp.pid)  # died while the first Start is still in flight
    await settle()
    gate.set()
    await first
    await h.exited("c1")
    assert h.recorder.labels() == [("create", "c1"), ("start", "c1"), ("exit", "c1")]
    assert (await h.state("c1")).status == Status.STOPPED


async def test_concurrent_start_of_exec_is_refused(h):
    # Bug: two Starts of one exec both ran `runc exec`: two processes for one exec id, the
    # second pid overwriting the first.
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sleep", "30")
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def on_exec(cid, pid):
        entered.set()
        await gate.wait()

    h.on_exec = on_exec
    first = h.task(h.start("c1", "e1"))
    await entered.wait()
    with pytest.raises(TtrpcError) as err:
        await h.start("c1", "e1")
    assert (err.value.code, err.value.message) == (Code.UNKNOWN, "cannot start a running process")
    gate.set()
    started = await first
    assert [c[0] for c in h.runtimes["c1"].calls].count("exec") == 1
    assert (await h.state("c1", "e1")).pid == started.pid
    assert len(h.recorder.find("/tasks/exec-started")) == 1


# -- rule 4/5: marked exited before publishing; 128+signal ------------------------------------


async def test_process_is_marked_exited_when_its_exit_is_published(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sh", "-c", "exit 6")
    waits = [h.task(h.wait("c1")), h.task(h.wait("c1", "e1"))]
    await h.start("c1", "e1")
    exec_exit = await h.exited("c1", "e1")
    await h.kill("c1", signal.SIGTERM)
    init_exit = await h.exited("c1")
    for record, waiter in ((exec_exit, waits[1]), (init_exit, waits[0])):
        check_exited_at_publish(record)  # State STOPPED, Wait answering, same status and time
        state, _ = record.snapshot
        assert state.status == Status.STOPPED
        waited = await asyncio.wait_for(waiter, 1)  # a Wait that was blocked before the exit
        assert (waited.exit_status, waited.exited_at) == (record.event.exit_status, record.event.exited_at)
    assert (exec_exit.event.exit_status, init_exit.event.exit_status) == (6, 143)


# Not SIGINT/SIGQUIT: the fake's processes are background jobs of a non-interactive sh,
# which POSIX starts with those ignored (a real container's processes do not).
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1])
async def test_signalled_processes_report_128_plus_signal(h, signum):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sleep", "30")
    await h.exec("c1", "e2", "sh", "-c", f"kill -{int(signum)} $$; sleep 5")
    await h.start("c1", "e1")
    await h.start("c1", "e2")
    await h.kill("c1", signum, exec_id="e1")
    assert (await h.exited("c1", "e1")).event.exit_status == 128 + signum
    assert (await h.exited("c1", "e2")).event.exit_status == 128 + signum
    await h.kill("c1", signum)
    assert (await h.exited("c1")).event.exit_status == 128 + signum
    assert (await h.wait("c1")).exit_status == 128 + signum


# -- rule 8: the plain lifecycle --------------------------------------------------------------


async def test_plain_lifecycle_events(h):
    before = datetime.datetime.now(datetime.timezone.utc)
    created = await h.create("c1", "sh", "-c", "sleep 0.05; exit 7")
    assert created.pid > 0
    state = await h.state("c1")
    assert (state.status, state.pid, state.exited_at) == (Status.CREATED, created.pid, NOT_EXITED)
    started = await h.start("c1")
    assert started.pid == created.pid
    assert (await h.state("c1")).status == Status.RUNNING
    waited = await h.wait("c1")
    deleted = await h.delete("c1")
    after = datetime.datetime.now(datetime.timezone.utc)

    assert h.recorder.labels() == [("create", "c1"), ("start", "c1"), ("exit", "c1"), ("delete", "c1")]
    create, start, exit_, delete = (r.event for r in h.recorder.records)
    assert (create.container_id, create.bundle, create.pid) == ("c1", str(h.tmp_path / "c1"), created.pid)
    assert (create.io.stdin, create.io.stdout, create.io.stderr, create.io.terminal) == ("", "", "", False)
    assert create.rootfs == []
    assert (start.container_id, start.pid) == ("c1", created.pid)
    assert (exit_.container_id, exit_.id, exit_.pid, exit_.exit_status) == ("c1", "c1", created.pid, 7)
    assert before <= exit_.exited_at <= after
    assert (delete.container_id, delete.pid, delete.exit_status, delete.exited_at) == (
        "c1", created.pid, 7, exit_.exited_at)
    assert (waited.exit_status, waited.exited_at) == (7, exit_.exited_at)
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (created.pid, 7, exit_.exited_at)
    assert h.service.containers.keys() == []


async def test_exec_lifecycle_events_and_delete(h):
    created = await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sh", "-c", "exit 9")
    assert (await h.state("c1", "e1")).status == Status.CREATED
    started = await h.start("c1", "e1")
    record = await h.exited("c1", "e1")
    assert (record.event.container_id, record.event.id, record.event.pid) == ("c1", "e1", started.pid)
    assert record.event.exited_at > NOT_EXITED
    deleted = await h.delete("c1", "e1")
    assert (deleted.pid, deleted.exit_status, deleted.exited_at) == (started.pid, 9, record.event.exited_at)
    with pytest.raises(TtrpcError) as err:
        await h.state("c1", "e1")
    assert err.value.code == Code.NOT_FOUND
    pids = await h.service.pids(task.PidsRequest(id="c1"), None)
    assert [p.pid for p in pids.processes] == [created.pid]
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    await h.delete("c1")
    assert h.recorder.labels() == [
        ("create", "c1"), ("start", "c1"), ("exec-added", "e1"), ("exec-started", "e1"),
        ("exit", "e1"), ("exit", "c1"), ("delete", "c1"),
    ]


async def test_delete_of_a_created_container(h):
    created = await h.create("c1", "sleep", "30")
    deleted = await h.delete("c1")
    assert deleted.pid == created.pid
    assert ("delete", "c1", False) in h.runtimes["c1"].calls
    await settle()
    labels = h.recorder.labels()
    assert labels[0] == ("create", "c1") and labels[-1] == ("delete", "c1")
    assert h.service.containers.keys() == []


async def test_create_failure_leaves_nothing(h):
    with pytest.raises(TtrpcError) as err:
        await h.create("c1", "true", fake={"create_error": "exec: \"nosuch\": executable file not found"})
    assert err.value.code == Code.UNKNOWN
    assert err.value.message == 'OCI runtime create failed: exec: "nosuch": executable file not found'
    assert h.service.containers.keys() == [] and h.recorder.records == []
    with pytest.raises(TtrpcError) as err:
        await h.state("c1")
    assert err.value.code == Code.NOT_FOUND


# -- rule 7: the state machine ----------------------------------------------------------------


async def expect_error(coro, code: Code, message: str) -> None:
    with pytest.raises(TtrpcError) as err:
        await coro
    assert (err.value.code, err.value.message) == (code, message)


async def test_start_twice(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await expect_error(h.start("c1"), Code.UNKNOWN, "cannot start a running process")
    await h.exec("c1", "e1", "sleep", "30")
    await h.start("c1", "e1")
    await expect_error(h.start("c1", "e1"), Code.UNKNOWN, "cannot start a running process")


async def test_delete_running_process(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await expect_error(h.delete("c1"), Code.UNKNOWN, "cannot delete a running process")
    await h.exec("c1", "e1", "sleep", "30")
    await h.start("c1", "e1")
    await expect_error(h.delete("c1", "e1"), Code.UNKNOWN, "cannot delete a running process")
    assert not any(c[0] == "delete" for c in h.runtimes["c1"].calls)
    assert "c1" in h.service.containers
    assert not (h.tmp_path / "c1" / "deleted.pb").exists()  # the command must still clean up


async def test_kill_exited_process(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "true")
    await h.start("c1", "e1")
    await h.exited("c1", "e1")
    await expect_error(h.kill("c1", signal.SIGTERM, exec_id="e1"), Code.NOT_FOUND, "process already finished: not found")
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    calls = len(h.runtimes["c1"].calls)
    await expect_error(h.kill("c1", signal.SIGKILL), Code.NOT_FOUND, "process already finished: not found")
    assert len(h.runtimes["c1"].calls) == calls  # answered without asking the runtime
    # With `all`, the runtime is asked (what init left in a shared pid namespace may live on).
    await h.kill("c1", signal.SIGKILL, all=True)
    assert h.runtimes["c1"].calls[calls:] == [("kill", "c1", 9, True)]


async def test_kill_maps_runtime_errors(h):
    # Init reaped but its exit not processed yet: the runtime answers, the code is NOT_FOUND.
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    h.runtimes["c1"].status = "stopped"
    await expect_error(h.kill("c1", signal.SIGTERM), Code.NOT_FOUND, "process already finished: not found")
    h.runtimes["c1"].status = "running"
    await h.exec("c1", "e1", "sleep", "30")
    await expect_error(h.kill("c1", signal.SIGTERM, exec_id="e1"), Code.FAILED_PRECONDITION,
                       "process e1 has not been started: failed precondition")


async def test_exec_on_stopped_container(h):
    await h.create("c1", "true")
    await h.start("c1")
    await h.exited("c1")
    await expect_error(h.exec("c1", "e1", "true"), Code.UNKNOWN, "cannot exec in a stopped state")
    assert "e1" not in h.service.containers["c1"].execs


async def test_unknown_container_and_exec(h):
    message = "container nosuch not found: not found"
    for call in (
        h.state("nosuch"), h.start("nosuch"), h.delete("nosuch"), h.kill("nosuch", 9),
        h.exec("nosuch", "e1", "true"), h.wait("nosuch"),
        h.service.pids(task.PidsRequest(id="nosuch"), None),
        h.service.pause(task.PauseRequest(id="nosuch"), None),
        h.service.close_io(task.CloseIoRequest(id="nosuch"), None),
    ):
        await expect_error(call, Code.NOT_FOUND, message)
    await h.create("c1", "sleep", "30")
    for call in (h.state("c1", "nope"), h.start("c1", "nope"), h.delete("c1", "nope"), h.kill("c1", 9, exec_id="nope")):
        await expect_error(call, Code.NOT_FOUND, "process nope does not exist: not found")


async def test_duplicate_exec_id(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "sleep", "30")
    await expect_error(h.exec("c1", "e1", "true"), Code.ALREADY_EXISTS, "id e1: already exists")
    await expect_error(h.exec("c1", "", "true"), Code.INVALID_ARGUMENT, "exec id must not be empty")
    await expect_error(h.create("c1", "true"), Code.ALREADY_EXISTS, "container c1: already exists")
    assert len(h.recorder.find("/tasks/exec-added")) == 1


async def test_start_exec_after_init_exited(h):
    await h.create("c1", "sleep", "30")
    await h.start("c1")
    await h.exec("c1", "e1", "true")
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    await expect_error(h.start("c1", "e1"), Code.FAILED_PRECONDITION,
                       "container c1 init process is not running: failed precondition")
    assert not any(c[0] == "exec" for c in h.runtimes["c1"].calls)


async def test_pause_and_resume(h):
    await h.create("c1", "sleep", "30")
    await expect_error(h.service.pause(task.PauseRequest(id="c1"), None), Code.UNKNOWN, "cannot pause a created process")
    await h.start("c1")
    await h.service.pause(task.PauseRequest(id="c1"), None)
    assert (await h.state("c1")).status == Status.PAUSED
    await expect_error(h.service.pause(task.PauseRequest(id="c1"), None), Code.UNKNOWN, "cannot pause a paused container")
    await expect_error(h.exec("c1", "e1", "true"), Code.UNKNOWN, "cannot exec in a paused state")
    await expect_error(h.start("c1"), Code.UNKNOWN, "cannot start a paused process")
    await h.service.resume(task.ResumeRequest(id="c1"), None)
    assert (await h.state("c1")).status == Status.RUNNING
    await expect_error(h.service.resume(task.ResumeRequest(id="c1"), None), Code.UNKNOWN, "cannot resume a running process")
    assert h.recorder.labels()[-2:] == [("paused", "c1"), ("resumed", "c1")]


async def test_shutdown_only_without_containers(h):
    await h.create("c1", "true")
    await h.service.shutdown(task.ShutdownRequest(id="c1"), None)
    await asyncio.sleep(0)
    assert h.shutdowns == 0
    await h.start("c1")
    await h.exited("c1")
    await h.delete("c1")
    await h.service.shutdown(task.ShutdownRequest(id="c1"), None)
    await asyncio.sleep(0)
    assert h.shutdowns == 1


async def test_connect(h):
    resp = await h.service.connect(task.ConnectRequest(id="nosuch"), None)
    assert (resp.shim_pid, resp.task_pid) == (os.getpid(), 0)
    created = await h.create("c1", "sleep", "30")
    resp = await h.service.connect(task.ConnectRequest(id="c1"), None)
    assert (resp.shim_pid, resp.task_pid) == (os.getpid(), created.pid)


async def test_fake_processes_are_reparented_to_us_and_reaped_through_the_subscription(h):
    # What the other tests rely on: like runc's, the fake's processes are not children of a
    # spawn() we watch but orphans re-parented to this subreaper, reaped by the service.
    t0 = time.monotonic()
    created = await h.create("c1", "true")
    assert created.pid in children()
    await h.start("c1")
    await h.exited("c1")
    assert created.pid in h.seen and created.pid not in children()
    assert time.monotonic() - t0 < 2


async def test_init_exit_is_recorded_in_the_bundle_and_pids_lists_it(h):
    # Durability (issue 5): the exit is in the bundle before /tasks/exit goes out, and Pids
    # of a stopped task lists the exited init so that a restarted containerd keeps the task.
    from shim.framework import exit_record

    created = await h.create("c1", "sh", "-c", "exit 3")
    bundle = str(h.tmp_path / "c1")
    seen_at_publish = []
    h.recorder.on_publish = lambda topic, event: seen_at_publish.append(exit_record.read(bundle)) \
        if topic == "/tasks/exit" else None
    await h.start("c1")
    record = await h.exited("c1")
    pid, status, exited_at_ns = exit_record.read(bundle)
    assert (pid, status) == (created.pid, 3)
    assert seen_at_publish == [(pid, status, exited_at_ns)]
    exited_at = record.event.exited_at
    assert abs(exited_at.timestamp() - exited_at_ns / 1e9) < 1e-5
    pids = await h.service.pids(task.PidsRequest(id="c1"), None)
    assert [p.pid for p in pids.processes] == [created.pid]
    await h.delete("c1")


def test_exit_record_round_trip_and_garbage(tmp_path):
    from shim.framework import exit_record

    assert exit_record.read(str(tmp_path)) is None
    exit_record.write(str(tmp_path), 42, 137, 1_700_000_000_123_456_789)
    assert exit_record.read(str(tmp_path)) == (42, 137, 1_700_000_000_123_456_789)
    assert sorted(os.listdir(tmp_path)) == ["init.exit"]
    for garbage in ("", "1 2", "a b c", "1 2 3 4", "-1 0 5", "1 0 0"):
        (tmp_path / "init.exit").write_text(garbage)
        assert exit_record.read(str(tmp_path)) is None


# -- checkpoint / restore ---------------------------------------------------------------------


class CheckpointingRuntime(FakeRuntime):
    """FakeRuntime with `checkpoint` (like runc: the dump needs no process help; without
    leave_running the container is stopped afterwards) and `restore` (launches the bundle's
    process already released, as `runc restore --detach` returns with it running)."""

    def __init__(self, harness: Harness, **kwargs) -> None:
        super().__init__(harness, **kwargs)
        #: checkpoint: raise RuncError with this text after writing dump.log into the work path.
        self.checkpoint_error: str | None = None
        self.restore_error: str | None = None
        self.on_restore = None  # async (container_id, pid) before restore "returns"

    async def checkpoint(self, id, criu, *, leave_running=False, pre_dump=False) -> None:
        from shim.runc.runtime import Runc

        self.calls.append(("checkpoint", id, criu, leave_running))
        self.argv = Runc(self.reaper, log_path="/b/log.json").argv(
            *Runc.checkpoint_args(id, criu, leave_running=leave_running))
        if self.status not in ("running", "paused"):
            raise RuncError("container is not running", command="checkpoint")
        os.makedirs(criu.work_path, exist_ok=True)  # CRIU creates it
        if self.checkpoint_error is not None:
            with open(os.path.join(criu.work_path, "dump.log"), "w") as f:
                f.write("(00.000001) Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds\n")
            raise RuncError(self.checkpoint_error, command="checkpoint", returncode=1, argv=self.argv)
        if not leave_running:
            for held in self.processes():
                self.h.signal(held.pid, signal.SIGKILL)

    async def restore(self, id, bundle, criu, *, pid_file, console_socket=None, no_pivot=False,
                      no_subreaper=True, detach=True, stdin=None, stdout=None, stderr=None) -> None:
        self.calls.append(("restore", id, criu, os.path.basename(pid_file), console_socket, no_subreaper, detach))
        if self.restore_error is not None:
            raise RuncError(self.restore_error, command="restore")
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
        slave = -1
        if console_socket:  # as runc: a new pty, its master sent over the socket
            import socket as socket_module

            master, slave = os.openpty()
            try:
                with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as conn:
                    conn.connect(console_socket)
                    socket_module.send_fds(conn, [b"/dev/pts/fake"], [master])
            finally:
                os.close(master)
            stdin = stdout = stderr = slave
        try:
            self.init = await self._launch(spec["process"]["args"], pid_file, stdin, stdout, stderr)
        finally:
            if slave != -1:
                os.close(slave)
        self.id = id
        self.status = "running"
        self.h.runtimes[id] = self
        self.init.release()
        if self.on_restore is not None:
            await self.on_restore(id, self.init.pid)


@pytest.fixture
def ch(h):
    """The harness with CheckpointingRuntime as every container's runtime."""

    def factory(**kwargs):
        runtime = CheckpointingRuntime(h, **kwargs)
        h.all_runtimes.append(runtime)
        return runtime

    h.runtime_factory = factory
    return h


def checkpoint_options(**fields) -> Any:
    from shim.api.containerd.runc.v1 import CheckpointOptions

    return Any(type_url="containerd.runc.v1.CheckpointOptions", value=bytes(CheckpointOptions(**fields)))


async def checkpoint(h: Harness, cid: str, path: str = "/ckpt/image", options: Any | None = None) -> None:
    async with asyncio.timeout(5):
        await h.service.checkpoint(task.CheckpointTaskRequest(id=cid, path=path, options=options), None)


async def create_restored(h: Harness, cid: str, *args: str, checkpoint: str = "/ckpt/image", parent: str = "",
                          **request_fields):
    bundle = h.tmp_path / cid
    bundle.mkdir(exist_ok=True)
    spec = {"process": {"args": list(args)}, "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    request = task.CreateTaskRequest(id=cid, bundle=str(bundle), checkpoint=checkpoint, parent_checkpoint=parent,
                                     **request_fields)
    async with asyncio.timeout(5):
        return await h.service.create(request, None)


def runtime_calls(h: Harness, cid: str, name: str) -> list[tuple]:
    return [c for c in h.service.containers[cid].runtime.calls if c[0] == name]


async def test_checkpoint_is_refused_before_start_and_after_exit(ch):
    await ch.create("c1", "sleep", "30")
    await expect_error(checkpoint(ch, "c1"), Code.UNKNOWN, "cannot checkpoint a task in created state")
    await ch.start("c1")
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await expect_error(checkpoint(ch, "c1"), Code.UNKNOWN, "cannot checkpoint a stopped container")
    assert runtime_calls(ch, "c1", "checkpoint") == []
    await expect_error(checkpoint(ch, "nosuch"), Code.NOT_FOUND, "container nosuch not found: not found")
    await ch.delete("c1")


async def test_checkpoint_leaves_running_by_default_with_a_removed_work_dir(ch):
    created = await ch.create("c1", "sleep", "30")
    await ch.start("c1")
    bundle = ch.tmp_path / "c1"
    await checkpoint(ch, "c1", "/ckpt/image")  # no options at all (ctr with a non-runc runtime name)
    ((_, _, criu, leave_running),) = runtime_calls(ch, "c1", "checkpoint")
    assert leave_running is True
    assert (criu.image_path, criu.work_path) == ("/ckpt/image", str(bundle / "work" / "criu-work"))
    assert not (bundle / "work" / "criu-work").exists()  # the default work dir is the shim's to remove
    assert ch.service.containers["c1"].runtime.argv == [
        "runc", "--root", "/run/containerd/runc", "--log", "/b/log.json", "--log-format", "json",
        "checkpoint", "--image-path", "/ckpt/image", "--work-path", str(bundle / "work" / "criu-work"),
        "--leave-running", "c1",
    ]
    state = await ch.state("c1")
    assert (state.status, state.pid) == (Status.RUNNING, created.pid)
    assert [r.topic for r in ch.recorder.records] == ["/tasks/create", "/tasks/start"]  # no event of ours
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await ch.delete("c1")


async def test_checkpoint_options_reach_the_runtime(ch, tmp_path):
    await ch.create("c1", "sleep", "30")
    await ch.start("c1")
    work = tmp_path / "my-work"
    options = checkpoint_options(
        open_tcp=True, external_unix_sockets=True, terminal=True, file_locks=True,
        empty_namespaces=["network", "ipc"], work_path=str(work), image_path="/ignored/when/path/given",
    )
    await checkpoint(ch, "c1", "/ckpt/image", options)
    assert ch.service.containers["c1"].runtime.argv[7:] == [
        "checkpoint", "--image-path", "/ckpt/image", "--work-path", str(work), "--tcp-established",
        "--ext-unix-sk", "--shell-job", "--file-locks", "--empty-ns", "network", "--empty-ns", "ipc",
        "--leave-running", "c1",
    ]
    assert work.is_dir()  # a work path the client chose is kept
    # No path in the request: the options' image path.
    await checkpoint(ch, "c1", "", checkpoint_options(image_path="/from/options"))
    assert runtime_calls(ch, "c1", "checkpoint")[-1][2].image_path == "/from/options"
    # Paused (ctr pauses around a checkpoint): allowed.
    await ch.service.pause(task.PauseRequest(id="c1"), None)
    await checkpoint(ch, "c1")
    assert len(runtime_calls(ch, "c1", "checkpoint")) == 3
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await ch.delete("c1")


async def test_checkpoint_with_exit_stops_the_container(ch):
    created = await ch.create("c1", "sleep", "30")
    await ch.start("c1")
    await checkpoint(ch, "c1", options=checkpoint_options(exit=True))
    assert runtime_calls(ch, "c1", "checkpoint")[0][3] is False  # no --leave-running
    assert "--leave-running" not in ch.service.containers["c1"].runtime.argv
    record = await ch.exited("c1")
    assert (record.event.pid, record.event.exit_status) == (created.pid, 128 + signal.SIGKILL)
    assert (await ch.wait("c1")).exit_status == 137
    await ch.delete("c1")


async def test_failed_checkpoint_keeps_criu_log_and_the_task_usable(ch):
    await ch.create("c1", "sleep", "30")
    await ch.start("c1")
    bundle = ch.tmp_path / "c1"
    ch.service.containers["c1"].runtime.checkpoint_error = "criu failed: type NOTIFY errno 0\nlog file: /x/dump.log"
    await expect_error(checkpoint(ch, "c1"), Code.UNKNOWN,
                       "runc did not terminate successfully: exit status 1: criu failed: type NOTIFY errno 0"
                       f" path= {bundle / 'criu-dump.log'}")
    assert "vDSO area bounds" in (bundle / "criu-dump.log").read_text()
    assert not (bundle / "work" / "criu-work").exists()
    assert (await ch.state("c1")).status == Status.RUNNING
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await ch.delete("c1")


async def test_failed_checkpoint_without_a_dump_log_still_names_the_path(ch):
    await ch.create("c1", "sleep", "30")
    await ch.start("c1")
    runtime = ch.service.containers["c1"].runtime
    runtime.status = "stopped"  # the runtime refuses before CRIU ran: no dump.log to copy
    bundle = ch.tmp_path / "c1"
    await expect_error(checkpoint(ch, "c1"), Code.UNKNOWN, f"container is not running path= {bundle / 'criu-dump.log'}")
    assert not (bundle / "criu-dump.log").exists()
    runtime.status = "running"
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await ch.delete("c1")


@pytest.mark.parametrize("options, message", [
    (Any(type_url="containerd.runc.v1.Options", value=b""),
     "checkpoint options of type 'containerd.runc.v1.Options': expected containerd.runc.v1.CheckpointOptions"),
    (Any(type_url="type.googleapis.com/containerd.runc.v1.CheckpointOptions", value=b"\x08"), None),  # a truncated varint
])
async def test_bad_checkpoint_options_are_invalid_argument(ch, options, message):
    await ch.create("c1", "sleep", "30")
    await ch.start("c1")
    with pytest.raises(TtrpcError) as err:
        await checkpoint(ch, "c1", options=options)
    assert err.value.code == Code.INVALID_ARGUMENT
    if message is not None:
        assert err.value.message == message
    else:
        assert "do not decode" in err.value.message
    assert runtime_calls(ch, "c1", "checkpoint") == []
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await ch.delete("c1")


async def test_create_from_checkpoint_restores_at_start(ch):
    created = await create_restored(ch, "c1", "sh", "-c", "exit 6", checkpoint="/ckpt/c1", parent="/ckpt/parent")
    bundle = ch.tmp_path / "c1"
    assert created.pid == 0
    runtime = ch.service.containers["c1"].runtime
    assert runtime.calls == []  # no `runc create`
    state = await ch.state("c1")
    assert (state.status, state.pid) == (Status.CREATED, 0)
    assert ch.recorder.find("/tasks/create")[0].event.checkpoint == "/ckpt/c1"
    assert ch.recorder.find("/tasks/create")[0].event.pid == 0
    await expect_error(ch.exec("c1", "e1", "true"), Code.UNKNOWN, "cannot exec in a created state")
    await expect_error(checkpoint(ch, "c1"), Code.UNKNOWN, "cannot checkpoint a task in created state")
    await expect_error(ch.service.pause(task.PauseRequest(id="c1"), None), Code.UNKNOWN, "cannot pause a created process")
    started = await ch.start("c1")
    ((_, _, criu, pid_file, console, no_subreaper, detach),) = runtime_calls(ch, "c1", "restore")
    assert (criu.image_path, criu.work_path, criu.parent_path) == ("/ckpt/c1", str(bundle / "work"), "/ckpt/parent")
    assert (pid_file, console, no_subreaper, detach) == ("init.pid", None, True, True)
    assert started.pid > 0 and started.pid == runtime.init.pid
    record = await ch.exited("c1")
    assert ch.recorder.labels() == [("create", "c1"), ("start", "c1"), ("exit", "c1")]
    assert ch.recorder.find("/tasks/start")[0].event.pid == started.pid
    assert (record.event.pid, record.event.exit_status) == (started.pid, 6)
    assert (await ch.wait("c1")).exit_status == 6
    await expect_error(ch.start("c1"), Code.UNKNOWN, "cannot start a stopped process")
    deleted = await ch.delete("c1")
    assert (deleted.pid, deleted.exit_status) == (started.pid, 6)


async def test_restored_init_exit_during_restore_follows_start(ch):
    await create_restored(ch, "c1", "sh", "-c", "exit 2")

    async def on_restore(cid, pid):
        await ch.exit_seen(pid)  # the restored process died before `runc restore` returned
        await settle()
        assert ch.recorder.find("/tasks/exit") == [], "exit published before /tasks/start"

    ch.service.containers["c1"].runtime.on_restore = on_restore
    started = await ch.start("c1")
    record = await ch.exited("c1")
    assert ch.recorder.labels() == [("create", "c1"), ("start", "c1"), ("exit", "c1")]
    assert (record.event.pid, record.event.exit_status) == (started.pid, 2)
    await ch.delete("c1")


async def test_restore_uses_the_criu_work_path_option_and_exec_works_after(ch):
    from shim.runc.options import RuntimeOptions

    bundle = ch.tmp_path / "c1"
    bundle.mkdir()
    # Create writes the options it was given; the runc options' criu_work_path is what restore uses.
    original = RuntimeOptions.from_any

    def with_work_path(any_message):
        options = original(any_message)
        options.criu_work_path = "/var/criu-work"
        return options

    RuntimeOptions.from_any = staticmethod(with_work_path)
    try:
        await create_restored(ch, "c1", "sleep", "30")
    finally:
        RuntimeOptions.from_any = original
    await ch.start("c1")
    assert runtime_calls(ch, "c1", "restore")[0][2].work_path == "/var/criu-work"
    await ch.exec("c1", "e1", "sh", "-c", "exit 1")
    await ch.start("c1", "e1")
    assert (await ch.exited("c1", "e1")).event.exit_status == 1
    await ch.kill("c1", signal.SIGKILL)
    await ch.exited("c1")
    await ch.delete("c1", "e1")
    await ch.delete("c1")


async def test_failed_restore_leaves_a_created_task_that_deletes_cleanly(ch):
    await create_restored(ch, "c1", "sleep", "30")
    ch.service.containers["c1"].runtime.restore_error = "criu failed: type RESTORE errno 0"
    await expect_error(ch.start("c1"), Code.UNKNOWN, "OCI runtime restore failed: criu failed: type RESTORE errno 0")
    state = await ch.state("c1")
    assert (state.status, state.pid) == (Status.CREATED, 0)
    await expect_error(ch.kill("c1", signal.SIGKILL), Code.NOT_FOUND, "no such container: not found")
    deleted = await ch.delete("c1")
    assert deleted.pid == 0
    assert ch.service.containers.keys() == []
    assert ch.recorder.labels() == [("create", "c1"), ("delete", "c1")]


async def test_delete_of_a_restored_task_never_started(ch):
    await create_restored(ch, "c1", "sleep", "30")
    await ch.delete("c1")
    assert ch.service.containers.keys() == []
    assert [c[0] for c in ch.all_runtimes[0].calls] == ["delete"]


async def test_restore_with_a_terminal_gets_its_console_at_start(ch):
    output = ch.tmp_path / "c1.out"
    output.touch()  # a regular file as stdout: appended to
    await create_restored(ch, "c1", "sh", "-c", "[ -t 1 ] && echo restored on a tty; exit 5",
                          terminal=True, stdout=str(output))
    started = await ch.start("c1")
    ((*_, console, _, _),) = runtime_calls(ch, "c1", "restore")
    assert console and not os.path.exists(console)  # a fresh socket, removed once the master came
    record = await ch.exited("c1")
    assert (record.event.pid, record.event.exit_status) == (started.pid, 5)
    assert "restored on a tty" in output.read_text()
    await ch.delete("c1")
