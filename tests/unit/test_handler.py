"""Custom handlers (shim.handler) driven through TaskService with the fake runtime of
test_service: hook order against the events, refusals, spec changes, failures and hangs."""

from __future__ import annotations

import asyncio
import json
import signal

import pytest

from shim.framework import hooks as hooks_module
from shim.api.containerd.task import v2 as task
from shim.api.google.protobuf import Any
from shim.api.runtimeoptions.v1 import Options as ConfigOptions
from shim.handler import Handler, Refused
from shim.runc.options import RuntimeOptions
from shim.framework.ttrpc.status import Code
from test_service import expect_error, h  # noqa: F401  (h is a fixture)

#: Hook calls of every Recording instance, in order: (hook, container id, detail).
CALLS: list[tuple] = []


class Recording(Handler):
    async def create(self, container):
        CALLS.append(("create", container.id, self.options.get("tag")))
        container.spec.setdefault("process", {}).setdefault("env", []).append("ADDED=1")
        container.annotations["handled-by"] = "recording"

    async def exec(self, container, process):
        CALLS.append(("exec", process.exec_id, process.spec.get("args")))
        if process.spec.get("args") == ["forbidden"]:
            raise Refused("exec of 'forbidden' is not allowed here")
        process.spec["env"] = ["FROM_HOOK=1"]

    async def started(self, container, process):
        CALLS.append(("started", process.exec_id or container.id, process.pid > 0))

    async def exited(self, container, process, exit):
        CALLS.append(("exited", process.exec_id or container.id, exit.status))

    async def deleted(self, container):
        CALLS.append(("deleted", container.id, None))


class Refusing(Handler):
    async def create(self, container):
        raise Refused(f"container {container.id} refused: privileged containers are not allowed")


class Broken(Handler):
    async def create(self, container):
        raise KeyError("oops")

    async def started(self, container, process):
        raise RuntimeError("started hook bug")


class Hanging(Handler):
    async def create(self, container):
        await asyncio.sleep(3600)


def handler_options(name: str, **table) -> Any:
    lines = [f'Handler = "test_handler:{name}"', "[HandlerOptions]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    body = "\n".join(lines).encode()
    return Any(type_url="runtimeoptions.v1.Options", value=bytes(ConfigOptions(config_body=body)))


async def create(h, cid: str, options: Any, *args: str, ctx=None):
    bundle = h.tmp_path / cid
    bundle.mkdir(exist_ok=True)
    spec = {"process": {"args": list(args) or ["sleep", "30"]}, "linux": {"namespaces": [{"type": "pid"}]}}
    (bundle / "config.json").write_text(json.dumps(spec))
    async with asyncio.timeout(5):
        return await h.service.create(task.CreateTaskRequest(id=cid, bundle=str(bundle), options=options), ctx)


def exec_request(cid: str, exec_id: str, *args: str) -> task.ExecProcessRequest:
    spec = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/Process",
               value=json.dumps({"args": list(args), "cwd": "/"}).encode())
    return task.ExecProcessRequest(id=cid, exec_id=exec_id, spec=spec)


def test_options_carry_handler_and_its_table():
    options = RuntimeOptions.from_toml(b'BinaryName = "crun"\nHandler = "m:C"\n[HandlerOptions]\nallow = ["/a"]\n', "t")
    assert (options.binary_name, options.handler, options.handler_options) == ("crun", "m:C", {"allow": ["/a"]})
    with pytest.raises(ValueError, match="HandlerOptions must be a dict"):
        RuntimeOptions.from_toml(b'HandlerOptions = "x"\n', "t")


async def test_hooks_run_in_order_and_change_what_runs(h):
    CALLS.clear()
    await create(h, "c1", handler_options("Recording", tag="t1"))
    spec = json.loads((h.tmp_path / "c1" / "config.json").read_text())
    assert "ADDED=1" in spec["process"]["env"] and spec["annotations"] == {"handled-by": "recording"}
    await h.start("c1")
    await h.service.exec(exec_request("c1", "e1", "true"), None)
    await h.start("c1", "e1")
    await h.exited("c1", "e1")
    assert h.runtimes["c1"].exec_specs[-1]["env"] == ["FROM_HOOK=1"]
    await expect_error(h.service.exec(exec_request("c1", "e2", "forbidden"), None),
                       Code.PERMISSION_DENIED, "exec of 'forbidden' is not allowed here")
    assert "e2" not in h.service.containers["c1"].execs
    assert h.recorder.find("/tasks/exec-added", exec_id="e2") == []
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    await h.delete("c1", "e1")
    await h.delete("c1")
    for _ in range(200):  # notification hooks run after their events, in the background
        if ("deleted", "c1", None) in CALLS:
            break
        await asyncio.sleep(0.01)
    assert CALLS.index(("started", "e1", True)) > CALLS.index(("exec", "e1", ["true"]))
    # create/exec run inside their requests; the notifications after their events, in
    # event order, in the background (no request waits for them).
    guarded = [c for c in CALLS if c[0] in ("create", "exec")]
    notified = [c for c in CALLS if c[0] not in ("create", "exec")]
    assert guarded == [("create", "c1", "t1"), ("exec", "e1", ["true"]), ("exec", "e2", ["forbidden"])]
    assert notified == [
        ("started", "c1", True),
        ("started", "e1", True),
        ("exited", "e1", 0),
        ("exited", "c1", 137),
        ("deleted", "c1", None),
    ]


async def test_the_request_terminal_wins_over_what_a_create_hook_wrote(h):
    class TerminalOn(Handler):
        async def create(self, container):
            container.spec["process"]["terminal"] = True

    globals()["TerminalOn"] = TerminalOn
    try:
        await create(h, "c1", handler_options("TerminalOn"))  # the request asks for no terminal
    finally:
        del globals()["TerminalOn"]
    spec = json.loads((h.tmp_path / "c1" / "config.json").read_text())
    assert spec["process"]["terminal"] is False
    assert [p.name for p in (h.tmp_path / "c1").iterdir() if p.name.startswith("config")] == ["config.json"]


async def test_refused_create_fails_with_its_message_and_leaves_nothing(h):
    await expect_error(create(h, "c1", handler_options("Refusing")), Code.PERMISSION_DENIED,
                       "container c1 refused: privileged containers are not allowed")
    assert h.runtimes == {} and "c1" not in h.service.containers
    assert h.recorder.records == []


async def test_a_broken_hook_is_a_clear_error_and_the_shim_goes_on(h, caplog):
    await expect_error(create(h, "c1", handler_options("Broken")), Code.UNKNOWN,
                       "handler test_handler:Broken.create failed: KeyError('oops')")
    assert "Traceback" in caplog.text and "KeyError: 'oops'" in caplog.text
    assert h.runtimes == {}
    await h.create("c2", "sleep", "30")  # the service still works
    await h.start("c2")


async def test_a_failing_notification_hook_is_logged_only(h, caplog):
    class Always(Broken):
        async def create(self, container):
            pass

    globals()["Always"] = Always
    try:
        await create(h, "c1", handler_options("Always"))
        await h.start("c1")
    finally:
        del globals()["Always"]
    for _ in range(100):  # notification hooks run after the request, in the background
        if "started hook bug" in caplog.text:
            break
        await asyncio.sleep(0.01)
    assert "started hook bug" in caplog.text


async def test_notifications_follow_event_order_and_never_hold_a_request(h):
    # An OOM's /tasks/oom goes out before init's /tasks/exit; a slow `started` hook must
    # neither delay Start nor let a later event's hook overtake it.
    order = []

    class Slow(Handler):
        async def started(self, container, process):
            await asyncio.sleep(0.3)
            order.append("started")

        async def oom(self, container):
            order.append("oom")

        async def exited(self, container, process, exit):
            order.append("exited")

    globals()["Slow"] = Slow
    try:
        await create(h, "c1", handler_options("Slow"))
        loop = asyncio.get_running_loop()
        begun = loop.time()
        await h.start("c1")
        assert loop.time() - begun < 0.25, "Start waited for the started hook"
        h.service._publish_oom("c1")  # as the cgroup's OOM notification does, before the exit
        await h.kill("c1", signal.SIGKILL)
        await h.exited("c1")
        await asyncio.wait(list(h.service._hook_workers), timeout=5)
    finally:
        del globals()["Slow"]
    assert order == ["started", "oom", "exited"]


async def test_a_hanging_hook_is_bounded_by_the_request_deadline(h):
    class Ctx:
        deadline = asyncio.get_running_loop().time() + 0.3

    with pytest.raises(hooks_module.TtrpcError) as err:
        await create(h, "c1", handler_options("Hanging"), ctx=Ctx())
    assert err.value.code == Code.DEADLINE_EXCEEDED
    assert err.value.message.startswith("handler test_handler:Hanging.create did not finish within 0.")
    assert h.runtimes == {}


async def test_a_handler_that_cannot_be_loaded(h, monkeypatch):
    await expect_error(create(h, "c1", handler_options("Missing")), Code.INVALID_ARGUMENT,
                       "runtime option Handler = 'test_handler:Missing': cannot load it: "
                       "AttributeError(\"module 'test_handler' has no attribute 'Missing'\")")
    with pytest.raises(hooks_module.TtrpcError, match="expected"):
        hooks_module.load_handler("no-colon", {})
    with pytest.raises(hooks_module.TtrpcError, match="not a shim.handler.Handler subclass"):
        hooks_module.load_handler("json:JSONDecoder", {})


class Gated(Handler):
    """Its `started` waits for the test to open `gate`."""

    gate: asyncio.Event

    async def started(self, container, process):
        await self.gate.wait()

    async def deleted(self, container):
        pass

    def runtime(self, container, default):
        return default


class GatedAndRefusing(Gated):
    async def create(self, container):
        raise Refused("no")


async def test_describe_shows_the_handler_its_hooks_and_its_queue():
    from shim.framework.handler_api import ContainerInfo, ProcessInfo

    handler = Gated({})
    handler.gate = asyncio.Event()
    runner = hooks_module.HandlerRunner(handler, "test_handler:Gated", ContainerInfo("c1", "ns", "/b", {}))
    assert runner.describe() == {
        "name": "test_handler:Gated", "class": "test_handler.Gated", "notifications_queued": 0,
        "notification_running": None, "hooks": ["started", "deleted", "runtime"],
    }
    inherited = hooks_module.HandlerRunner(GatedAndRefusing({}), "m:C", ContainerInfo("c2", "ns", "/b", {}))
    assert inherited.describe()["hooks"] == ["create", "started", "deleted", "runtime"]
    process = ProcessInfo("c1", "", {})
    runner.post("started", process)
    worker = runner.post("deleted")
    await asyncio.sleep(0.01)  # the worker took `started` and waits in it
    described = runner.describe()
    assert (described["notification_running"], described["notifications_queued"]) == ("started", 1)
    handler.gate.set()
    await asyncio.wait_for(worker, 5)
    described = runner.describe()
    assert (described["notification_running"], described["notifications_queued"]) == (None, 0)


def test_a_handler_named_by_a_pth_file_loads_in_a_daemon_started_without_site(monkeypatch, tmp_path):
    """A daemon forked by `python -S` `start` lacks the .pth files' paths until it asks site."""
    import sys
    import types

    hooks = hooks_module
    (tmp_path / "pth_named_handler.py").write_text(
        "from shim.handler import Handler\nclass H(Handler):\n    pass\n")
    ran = []

    def site_main():
        ran.append(True)
        monkeypatch.syspath_prepend(str(tmp_path))

    from shim.framework import start

    fake_sys = types.SimpleNamespace(flags=types.SimpleNamespace(no_site=1), modules={})
    monkeypatch.setattr(start, "sys", fake_sys)
    monkeypatch.setitem(sys.modules, "site", types.SimpleNamespace(main=site_main))
    start.complete_sys_path()  # what a daemon forked by such a start does first
    handler = hooks.load_handler("pth_named_handler:H", {})
    assert ran == [True] and type(handler).__name__ == "H"
