"""examples/audit on a real containerd (1.6, 1.7, 2.1) and runc, through `ctr run
--runtime-config-path`: three containers in two shims writing one audit file while 50 execs
run concurrently in each, then SIGKILL and delete; the file must hold exactly the expected lines,
whole and in order. And an unwritable audit file: the container still runs (the error is in
containerd's log), unless `required = true`, which refuses the create.

The shims must import the example (pyshim_audit) and this checkout's shim package, so these
tests start their own containerd per version with PYTHONPATH set for it (its shims inherit
containerd's environment); the session's containerd has whatever PYTHONPATH pytest had.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from conftest import E2E, VERSION_IDS, _slug
from containerd import REPO_ROOT, PrivateContainerd
from importing import containerd_importing
from test_lifecycle import PYSHIM, task_status
from waiting import wait_until

EXAMPLE_DIR = REPO_ROOT / "examples" / "audit"
EXECS = 50


@pytest.fixture(scope="module", params=VERSION_IDS)
def audit_containerd(request, busybox_image: Path):
    """A PrivateContainerd whose shims import this checkout's shim and pyshim_audit."""
    with containerd_importing(request.param, busybox_image, EXAMPLE_DIR) as c:
        yield c


@pytest.fixture
def ae2e(audit_containerd: PrivateContainerd, request) -> E2E:
    ns = audit_containerd.new_namespace(_slug(request.node.originalname, 24), image=audit_containerd.image_archive)
    yield E2E(audit_containerd, ns)
    audit_containerd.cleanup_namespace(ns)


def runtime_config(tmp_path: Path, audit_path: Path, **more) -> Path:
    config = tmp_path / "audit.toml"
    body = f'Handler = "pyshim_audit:Audit"\n[HandlerOptions]\npath = {json.dumps(str(audit_path))}\n'
    body += "".join(f"{key} = {json.dumps(value)}\n" for key, value in more.items())
    config.write_text(body)
    return config


def exec_status(cid_index: int, i: int) -> int:
    """The distinct exit status of exec i in container cid_index (1..50, 61..110, 121..170)."""
    return cid_index * 60 + i + 1


def popen_exec(e2e: E2E, cid: str, exec_id: str, status: int) -> subprocess.Popen:
    c = e2e.containerd
    return subprocess.Popen(
        [str(c.bin_dir / "ctr"), "--address", c.address, "--namespace", e2e.namespace,
         "task", "exec", "--exec-id", exec_id, cid, "sh", "-c", f"exit {status}"],
        env=c.env(), cwd=c.dir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def read_lines(path: Path) -> list[dict]:
    """The audit file's lines, each of which must be one whole JSON object."""
    text = path.read_text()
    assert text.endswith("\n"), text[-300:]
    lines = []
    for n, raw in enumerate(text.split("\n")[:-1]):
        try:
            line = json.loads(raw)
        except ValueError:
            pytest.fail(f"line {n} is not one JSON object (partial or merged): {raw!r}")
        assert isinstance(line, dict) and line.get("event"), raw
        lines.append(line)
    return lines


def check_container(lines: list[dict], namespace: str, cid: str, statuses: dict[str, int]) -> None:
    """One container's lines: each event as often as it happened, with the right fields, and
    in the order of the container's life."""
    mine = [(n, line) for n, line in enumerate(lines) if line["container_id"] == cid]
    assert all(line["namespace"] == namespace for _, line in mine)
    init = [(n, line) for n, line in mine if line["exec_id"] == ""]
    assert [line["event"] for _, line in init] == ["create", "start", "exit", "delete"], init
    (create_at, create), (start_at, start), (exit_at, exit_), (delete_at, delete) = init
    assert create["pid"] == 0 and start["pid"] > 0
    assert exit_["pid"] == delete["pid"] == start["pid"]
    assert exit_["status"] == 137 and delete["status"] == 137  # SIGKILL
    assert 0 < exit_["duration_s"] <= delete["duration_s"]
    assert delete_at == mine[-1][0], "delete is the container's last line"

    execs = [(n, line) for n, line in mine if line["exec_id"]]
    counts = Counter(line["event"] for _, line in execs)
    assert counts == {"exec": len(statuses), "exec-started": len(statuses), "exit": len(statuses)}, counts
    for exec_id, status in statuses.items():
        these = [(n, line) for n, line in execs if line["exec_id"] == exec_id]
        assert [line["event"] for _, line in these] == ["exec", "exec-started", "exit"], these
        (added_at, added), (_, started), (ended_at, ended) = these
        assert added["args"] == ["sh", "-c", f"exit {status}"] and added["pid"] == 0
        assert ended["status"] == status
        assert ended["pid"] == started["pid"] > 0
        assert ended["duration_s"] >= 0
        assert start_at < added_at and ended_at < exit_at, "execs run between init's start and exit"
    times = [line["time"] for _, line in mine]
    assert times == sorted(times), "a shim's lines are written in time order"
    assert create_at < start_at


def test_concurrent_execs_in_shared_and_separate_shims_leave_whole_ordered_lines(ae2e, tmp_path):
    audit = tmp_path / "audit.jsonl"
    config = runtime_config(tmp_path, audit)
    # Two containers grouped in one shim (two Audit instances in one process), a third in a
    # shim of its own: 150 concurrent execs append to the file from two processes.
    group = ("--annotation", f"io.containerd.pyshim.v2.group=g-{ae2e.new_id()}")
    cids = [ae2e.new_id("grouped"), ae2e.new_id("grouped"), ae2e.new_id("alone")]
    for cid, flags in zip(cids, (group, group, ())):
        ae2e.ctr("run", "-d", "--runtime", PYSHIM, "--runtime-config-path", str(config), *flags,
                 ae2e.image, cid, "sleep", "600", check=True)
    assert len(ae2e.containerd.pyshim_daemons()) == 2, ae2e.containerd.pyshim_daemons()

    procs = {(k, i): popen_exec(ae2e, cid, f"x{i}", exec_status(k, i))
             for i in range(EXECS) for k, cid in enumerate(cids)}
    for (k, i), proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == exec_status(k, i), (k, i, proc.returncode, out, err)

    for cid in cids:
        ae2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    for cid in cids:
        wait_until(lambda cid=cid: task_status(ae2e, cid) == "STOPPED", 30, f"{cid} stopped")
        ae2e.ctr("task", "delete", cid, check=True)
        ae2e.ctr("container", "delete", cid, check=True)

    lines = read_lines(audit)
    assert len(lines) == len(cids) * (4 + 3 * EXECS)
    for k, cid in enumerate(cids):
        check_container(lines, ae2e.namespace, cid, {f"x{i}": exec_status(k, i) for i in range(EXECS)})


def test_an_unwritable_audit_file_does_not_stop_the_container(ae2e, tmp_path):
    audit = tmp_path / "no-such-dir" / "audit.jsonl"
    config = runtime_config(tmp_path, audit)
    cid = ae2e.new_id("unaudited")
    r = ae2e.ctr("run", "--rm", "--runtime", PYSHIM, "--runtime-config-path", str(config),
                 ae2e.image, cid, "sh", "-c", "echo ran; exit 3")
    assert (r.returncode, r.stdout.strip()) == (3, "ran"), r
    assert not audit.parent.exists()
    expected = f"{cid}: cannot write the audit log {audit} (No such file or directory): create lines are lost"
    wait_until(lambda: expected in ae2e.containerd.log_path.read_text(errors="replace"), 15,
               "the audit error in containerd's log")


def test_required_refuses_a_container_it_cannot_record(ae2e, tmp_path):
    audit = tmp_path / "no-such-dir" / "audit.jsonl"
    config = runtime_config(tmp_path, audit, required=True)
    cid = ae2e.new_id("refused")
    r = ae2e.ctr("run", "--rm", "--runtime", PYSHIM, "--runtime-config-path", str(config),
                 ae2e.image, cid, "true")
    assert r.returncode != 0
    assert (f"audit log {audit} cannot be written (No such file or directory) and the runtime handler "
            "requires it: create refused") in r.stderr, r
    assert task_status(ae2e, cid) == ""
