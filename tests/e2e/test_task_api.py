"""Task API calls beyond run/kill/delete through ctr: pause/resume, ps with execs, many execs
at once, and the order of exit events, compared with io.containerd.runc.v2 where it matters.

Every test runs per containerd version (1.6, 1.7, 2.1) and OCI runtime (runc 1.1, runc 1.3,
crun, by BinaryName; see runtimes.py).
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import time

import pytest

from test_lifecycle import PYSHIM, RUNC, _wait_stopped, popen_ctr, task_status, wait_subscribed

pytestmark = pytest.mark.usefixtures("oci_runtime")


class Events:
    """`ctr events` in the background; lines of one container's task events."""

    def __init__(self, e2e) -> None:
        self.proc = popen_ctr(e2e, "events", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buffer = ""
        try:
            wait_subscribed(self.proc, e2e.containerd, e2e.namespace)  # before the test acts
        except BaseException:
            self.close()
            raise

    def lines(self, cid: str) -> list[str]:
        return [ln for ln in self.buffer.splitlines() if cid in ln and "/tasks/" in ln]

    def wait_for(self, cid: str, predicate, timeout: float = 15.0) -> list[str]:
        """Read until predicate(lines of cid) holds; returns those lines."""
        deadline = time.monotonic() + timeout
        while not predicate(self.lines(cid)):
            left = deadline - time.monotonic()
            assert left > 0, f"events not seen for {cid}; got:\n{self.buffer}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode(errors="replace")
                assert chunk, f"ctr events ended: {self.proc.stderr.read().decode()}"
                self.buffer += chunk
        return self.lines(cid)

    def close(self) -> None:
        self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def events(e2e):
    ev = Events(e2e)
    yield ev
    ev.close()


def topics(lines: list[str]) -> list[str]:
    return [m.group(1) for ln in lines for m in [re.search(r" (/tasks/[a-z-]+) ", ln)] if m]


def start_sleeper(e2e, runtime: str = PYSHIM) -> str:
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(runtime), e2e.image, cid, "sleep", "600", check=True)
    return cid


def remove(e2e, cid: str) -> None:
    if task_status(e2e, cid) != "STOPPED":
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        _wait_stopped(e2e, cid)
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)


@pytest.mark.parametrize("runtime", [PYSHIM, RUNC])
def test_pause_and_resume(e2e, events, runtime):
    cid = start_sleeper(e2e, runtime)
    e2e.ctr("task", "pause", cid, check=True)
    assert task_status(e2e, cid) == "PAUSED"
    events.wait_for(cid, lambda lines: "/tasks/paused" in topics(lines))
    e2e.ctr("task", "resume", cid, check=True)
    assert task_status(e2e, cid) == "RUNNING"
    seen = events.wait_for(cid, lambda lines: "/tasks/resumed" in topics(lines))
    assert topics(seen)[-2:] == ["/tasks/paused", "/tasks/resumed"], seen
    # A paused task can still be killed, and then it is stopped, not paused.
    e2e.ctr("task", "pause", cid, check=True)
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    if e2e.oci_kind == "crun":
        # crun 1.8 signals a frozen container without thawing it (runc thaws it for SIGKILL):
        # the task stays PAUSED, under runc-v2 as under pyshim, until it is resumed.
        time.sleep(1)
        assert task_status(e2e, cid) == "PAUSED"
        e2e.ctr("task", "resume", cid, check=True)
    _wait_stopped(e2e, cid)
    refused = e2e.ctr("task", "pause", cid)
    assert refused.returncode != 0 and "cannot pause" in refused.stderr, refused
    refused = e2e.ctr("task", "resume", cid)
    assert refused.returncode != 0 and "cannot resume" in refused.stderr, refused
    remove(e2e, cid)


def test_ps_shows_exec_ids_like_runc_v2(e2e):
    def ps_with_exec(runtime: str) -> tuple[list[str], int]:
        cid = start_sleeper(e2e, runtime)
        e2e.ctr("task", "exec", "-d", "--exec-id", "e1", cid, "sleep", "600", check=True)
        out = e2e.ctr("task", "ps", cid, check=True).stdout
        init_pid = int((e2e.bundle_dir(cid) / "init.pid").read_text())
        remove(e2e, cid)
        return out.splitlines(), init_pid

    ours, our_init = ps_with_exec(PYSHIM)
    theirs, their_init = ps_with_exec(RUNC)
    assert len(ours) == 3, ours  # header, init, exec
    rows = {int(line.split()[0]): line.split(None, 1)[1:] for line in ours[1:]}
    assert rows.pop(our_init) == ["-"], ours
    (info,) = rows.values()
    assert "e1" in info[0], ours

    def normalized(lines: list[str], init_pid: int) -> list[str]:
        out = [" ".join(lines[0].split())]  # column widths follow the pids' digit counts
        for line in lines[1:]:
            pid, rest = line.split(None, 1)
            out.append(("INIT " if int(pid) == init_pid else "PID ") + rest)
        return sorted(out)

    assert normalized(ours, our_init) == normalized(theirs, their_init)


def test_fifty_concurrent_execs_and_a_responsive_shim(e2e):
    cid = start_sleeper(e2e)
    execs = [popen_ctr(e2e, "task", "exec", "--exec-id", f"x{i}", cid, "true",
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(50)]
    try:
        slowest = 0.0
        while any(p.poll() is None for p in execs):
            started = time.monotonic()
            assert task_status(e2e, cid) == "RUNNING"
            slowest = max(slowest, time.monotonic() - started)
        results = [(p.returncode, p.stderr.read().decode()) for p in execs]
    finally:
        for p in execs:
            p.kill()
            p.communicate()
    assert [r for r in results if r[0] != 0] == []
    assert slowest < 2.0, f"ctr task ls took {slowest:.2f}s during the execs"
    assert task_status(e2e, cid) == "RUNNING"
    remove(e2e, cid)


def test_exec_exit_is_published_before_init_exit(e2e, events):
    cid = start_sleeper(e2e)
    e2e.ctr("task", "exec", "-d", "--exec-id", "long", cid, "sleep", "600", check=True)
    events.wait_for(cid, lambda lines: "/tasks/exec-started" in topics(lines))
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)  # the pid namespace goes with init

    def exits(lines: list[str]) -> list[str]:
        return [ln for ln in lines if " /tasks/exit " in ln]

    seen = exits(events.wait_for(cid, lambda lines: len(exits(lines)) == 2))
    assert '"long"' in seen[0] and f'"{cid}"' in seen[1], seen
    _wait_stopped(e2e, cid)
    remove(e2e, cid)
