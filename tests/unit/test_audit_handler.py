"""examples/audit (pyshim_audit.Audit), driven directly with the handler's view objects: the
line format, durations, CRI annotations, concurrent appends, an unwritable file; and once
through TaskService with the fake runtime of test_service, loaded as the TOML names it."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "audit"))

import pyshim_audit  # noqa: E402
from pyshim_audit import Audit, rfc3339  # noqa: E402
from shim.api.runtimeoptions.v1 import Options as ConfigOptions  # noqa: E402
from shim.api.google.protobuf import Any  # noqa: E402
from shim.handler import ContainerInfo, ExitInfo, ProcessInfo, Refused  # noqa: E402
from test_handler import create as create_through_service, exec_request  # noqa: E402
from test_service import h  # noqa: E402,F401  (h is a fixture)

RFC3339_NS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$")
CRI = {
    "io.kubernetes.cri.sandbox-name": "web-7d9f",
    "io.kubernetes.cri.sandbox-namespace": "shop",
    "io.kubernetes.cri.container-name": "nginx",
    "io.kubernetes.cri.sandbox-id": "f00",
}
T0 = 1_750_000_000_000_000_000  # a whole second, in ns


def container(spec: dict | None = None, cid: str = "c1", pid: int = 0) -> ContainerInfo:
    return ContainerInfo(id=cid, namespace="k8s.io", bundle=f"/run/b/{cid}",
                         spec=spec if spec is not None else {"process": {"args": ["sleep", "9"]}}, pid=pid)


def process(exec_id: str = "", pid: int = 0, args: list[str] | None = None) -> ProcessInfo:
    return ProcessInfo(container_id="c1", exec_id=exec_id, spec={"args": args} if args else {}, pid=pid)


def exit_at(ns: int, status: int, pid: int) -> ExitInfo:
    return ExitInfo(status=status, exited_at=datetime.datetime.fromtimestamp(ns / 1e9, tz=datetime.timezone.utc),
                    pid=pid)


def lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


class Clock:
    """time.time_ns of pyshim_audit, set by the test."""

    def __init__(self, monkeypatch) -> None:
        self.now = T0
        monkeypatch.setattr(pyshim_audit.time, "time_ns", lambda: self.now)


async def test_a_lifecycle_as_lines(tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    path = tmp_path / "audit.jsonl"
    audit = Audit({"path": str(path)})
    c = container({"annotations": dict(CRI)})
    await audit.create(c)
    c.pid = 4242
    clock.now = T0 + 1_000_000_000
    await audit.started(c, process(pid=4242))
    clock.now = T0 + 2_000_000_000
    await audit.exec(c, process("e1", args=["sh", "-c", "exit 3"]))
    clock.now = T0 + 2_500_000_000
    await audit.started(c, process("e1", pid=4300))
    clock.now = T0 + 3_000_000_000
    await audit.exited(c, process("e1", pid=4300), exit_at(T0 + 2_750_000_000, 3, 4300))
    await audit.oom(c)
    clock.now = T0 + 9_000_000_000
    await audit.exited(c, process(pid=4242), exit_at(T0 + 8_000_000_000, 137, 4242))
    clock.now = T0 + 10_000_000_000
    await audit.deleted(c)

    got = lines(path)
    assert [(x["event"], x["exec_id"], x["pid"]) for x in got] == [
        ("create", "", 0), ("start", "", 4242), ("exec", "e1", 0), ("exec-started", "e1", 4300),
        ("exit", "e1", 4300), ("oom", "", 4242), ("exit", "", 4242), ("delete", "", 4242)]
    pod = {"pod_name": "web-7d9f", "pod_namespace": "shop", "container_name": "nginx"}
    for line in got:
        assert RFC3339_NS.match(line["time"]), line
        assert (line["namespace"], line["container_id"]) == ("k8s.io", "c1")
        assert {k: line[k] for k in pod} == pod
        assert "sandbox_id" not in line
    assert got[0]["time"] == "2025-06-15T15:06:40.000000000Z"
    assert got[2]["args"] == ["sh", "-c", "exit 3"] and got[2]["terminal"] is False
    assert got[4] == {
        "time": "2025-06-15T15:06:43.000000000Z", "event": "exit", "namespace": "k8s.io",
        "container_id": "c1", "exec_id": "e1", "pid": 4300, "status": 3,
        "exited_at": "2025-06-15T15:06:42.750000000Z", "started_at": "2025-06-15T15:06:42.500000000Z",
        "duration_s": 0.25, **pod}
    assert (got[6]["status"], got[6]["duration_s"]) == (137, 7.0)
    assert (got[7]["status"], got[7]["duration_s"]) == (137, 10.0)
    assert "status" not in got[1] and "duration_s" not in got[1]


async def test_durations_are_never_negative_and_absent_without_a_start(tmp_path, monkeypatch):
    clock = Clock(monkeypatch)
    path = tmp_path / "audit.jsonl"
    audit = Audit({"path": str(path)})
    c = container()
    await audit.create(c)
    clock.now = T0 + 5_000_000
    await audit.started(c, process("fast", pid=7))
    # reaped before the shim saw the start: the exit time is earlier than the start
    await audit.exited(c, process("fast", pid=7), exit_at(T0 + 4_000_000, 0, 7))
    await audit.exited(c, process(pid=6), exit_at(T0 + 6_000_000, 137, 6))  # init, never started
    fast, init = lines(path)[-2:]
    assert fast["duration_s"] == 0
    assert "duration_s" not in init and "started_at" not in init


def test_rfc3339_keeps_nanoseconds():
    assert rfc3339(0) == "1970-01-01T00:00:00.000000000Z"
    assert rfc3339(T0 + 123_456_789) == "2025-06-15T15:06:40.123456789Z"


async def test_without_annotations_there_are_no_pod_fields_and_the_spec_is_untouched(tmp_path):
    path = tmp_path / "audit.jsonl"
    spec = {"process": {"args": ["true"]}}
    await Audit({"path": str(path)}).create(container(spec))
    (line,) = lines(path)
    assert not {"pod_name", "pod_namespace", "container_name"} & set(line)
    assert spec == {"process": {"args": ["true"]}}  # no "annotations" added: no config.json rewrite


async def test_control_characters_and_unicode_stay_on_one_line(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = Audit({"path": str(path)})
    c = container()
    await audit.exec(c, process("e\n1", args=["sh", "-c", "echo 'a\nb\u2028c' ünï"]))
    (line,) = lines(path)
    assert line["exec_id"] == "e\n1" and line["args"][2] == "echo 'a\nb\u2028c' ünï"
    assert path.read_bytes().isascii()


async def test_an_unwritable_file_is_logged_not_raised(tmp_path, caplog):
    path = tmp_path / "missing-dir" / "audit.jsonl"
    audit = Audit({"path": str(path)})
    c = container()
    with caplog.at_level(logging.DEBUG, logger="pyshim_audit"):
        await audit.create(c)
        await audit.started(c, process(pid=5))
        await audit.exec(c, process("e1", args=["true"]))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text  # once, not per line
    assert f"cannot write the audit log {path} (No such file or directory)" in errors[0].getMessage()
    caplog.clear()
    path.parent.mkdir()
    await audit.exited(c, process(pid=5), exit_at(T0, 0, 5))
    assert "is written again; 3 line(s) were lost" in caplog.text
    assert [x["event"] for x in lines(path)] == ["exit"]


async def test_lost_lines_are_counted_at_delete(tmp_path, caplog):
    audit = Audit({"path": str(tmp_path / "no" / "audit.jsonl")})
    c = container()
    await audit.create(c)
    await audit.deleted(c)
    assert "c1: audit log" in caplog.text and "2 line(s) of this container were lost" in caplog.text


async def test_required_refuses_create_and_exec_only(tmp_path):
    path = tmp_path / "missing-dir" / "audit.jsonl"
    audit = Audit({"path": str(path), "required": True})
    c = container()
    with pytest.raises(Refused, match=rf"audit log {path} cannot be written \(No such file or directory\)"
                                      r" and the runtime handler requires it: create refused"):
        await audit.create(c)
    with pytest.raises(Refused, match="exec refused"):
        await audit.exec(c, process("e1", args=["true"]))
    await audit.started(c, process(pid=5))  # what already happened is not refused
    await audit.exited(c, process(pid=5), exit_at(T0, 0, 5))
    await audit.oom(c)
    await audit.deleted(c)
    path.parent.mkdir()
    await Audit({"path": str(path), "required": True}).create(c)
    assert len(lines(path)) == 1


@pytest.mark.parametrize("options, message", [
    ({"path": 3}, "HandlerOptions.path must be a non-empty string, not 3"),
    ({"path": ""}, "HandlerOptions.path must be a non-empty string, not ''"),
    ({"required": "yes"}, "HandlerOptions.required must be true or false, not 'yes'"),
])
def test_wrong_options_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Audit(options)


def test_defaults():
    audit = Audit(None)
    assert (audit.path, audit.required) == ("/var/log/pyshim-audit.jsonl", False)


def test_lines_from_many_processes_never_interleave(tmp_path):
    """Each line is one O_APPEND write: several shims (processes) appending lines larger
    than PIPE_BUF at once still leave whole lines only."""
    path = tmp_path / "audit.jsonl"
    writers, per_writer = 8, 300
    pids = []
    for w in range(writers):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (child)
            try:
                audit = Audit({"path": str(path)})
                c = container(cid=f"c{w}")
                for i in range(per_writer):
                    asyncio.run(audit.exec(c, process(f"e{i}", args=["x" * 6000, str(w), str(i)])))
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert os.waitpid(pid, 0)[1] == 0
    got = lines(path)
    assert len(got) == writers * per_writer
    assert sorted((x["container_id"], x["exec_id"]) for x in got) == sorted(
        (f"c{w}", f"e{i}") for w in range(writers) for i in range(per_writer))
    for w in range(writers):  # one writer's lines keep their order
        mine = [int(x["args"][2]) for x in got if x["container_id"] == f"c{w}"]
        assert mine == list(range(per_writer))


def audit_options(path: Path, **more) -> Any:
    body = f'Handler = "pyshim_audit:Audit"\n[HandlerOptions]\npath = {json.dumps(str(path))}\n'
    body += "".join(f"{k} = {json.dumps(v)}\n" for k, v in more.items())
    return Any(type_url="runtimeoptions.v1.Options", value=bytes(ConfigOptions(config_body=body.encode())))


async def test_through_the_shim_with_concurrent_execs(h, tmp_path):
    path = tmp_path / "audit.jsonl"
    await create_through_service(h, "c1", audit_options(path))
    bundle_spec = (h.tmp_path / "c1" / "config.json").read_text()
    assert "annotations" not in bundle_spec  # the hook changed nothing, so nothing was rewritten
    await h.start("c1")
    ids = [f"e{i}" for i in range(20)]
    await asyncio.gather(*(h.service.exec(exec_request("c1", e, "true"), None) for e in ids))
    await asyncio.gather(*(h.start("c1", e) for e in ids))
    await asyncio.gather(*(h.exited("c1", e) for e in ids))
    await h.kill("c1", signal.SIGKILL)
    await h.exited("c1")
    for e in ids:
        await h.delete("c1", e)
    await h.delete("c1")
    await asyncio.wait(list(h.service._hook_workers), timeout=5)  # notifications run in the background
    got = lines(path)
    events = [(x["event"], x["exec_id"]) for x in got]
    assert events[:2] == [("create", ""), ("start", "")] and events[-2:] == [("exit", ""), ("delete", "")]
    for e in ids:
        mine = [x["event"] for x in got if x["exec_id"] == e]
        assert mine == ["exec", "exec-started", "exit"], (e, mine)
    assert got[-1]["pid"] == got[1]["pid"] > 0 and got[-2]["status"] == 137


async def test_through_the_shim_required_refuses_create(h, tmp_path):
    from shim.framework.ttrpc.status import Code
    from test_service import expect_error

    path = tmp_path / "nowhere" / "audit.jsonl"
    await expect_error(create_through_service(h, "c1", audit_options(path, required=True)), Code.PERMISSION_DENIED,
                       f"audit log {path} cannot be written (No such file or directory) and the runtime "
                       "handler requires it: create refused")
    assert "c1" not in h.service.containers
