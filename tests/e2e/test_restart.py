"""containerd restarting (SIGTERM) or crashing (SIGKILL) under running pyshim containers.

Each test has a containerd of its own (fixture `own_containerd`: the session's is shared by
the other tests and must not restart under them). What is checked, on 1.6, 1.7 and 2.1:

* running tasks come back: `ctr task ls` lists them, exec, kill and delete work;
* an exit that happens while containerd is down is not lost (runc-v2 loses it on 1.7+, the
  task vanishes: containerd issue 6771): the task is listed STOPPED with its real status,
  `ctr task rm` returns that status, and the /tasks/exit event reaches containerd once it is
  back (containerd answered its Events.Forward: the shim's log line, copied into containerd's
  log, says so);
* afterwards no shim, mount or container process is left, and the daemon did not grow fds.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from containerd import IMAGE_REF, PrivateContainerd
from test_lifecycle import mounts_of, wait_subscribed
from waiting import wait_gone, wait_until

PYSHIM = "io.containerd.pyshim.v2"
# Exits 7 on SIGTERM (sh runs the trap between two sleeps).
TRAPPED = "trap 'exit 7' TERM; echo ready; while :; do sleep 0.1; done"


def ctr(c: PrivateContainerd, *args: str, **kw):
    return c.ctr(*args, namespace=c.ns, **kw)


def tasks(c: PrivateContainerd) -> dict[str, str]:
    out = ctr(c, "task", "ls", check=True).stdout.splitlines()[1:]
    return {f[0]: f[2] for f in (line.split() for line in out) if len(f) >= 3}


def daemons(c: PrivateContainerd) -> dict[int, str]:
    return c.pyshim_daemons()


def removed_status(r) -> int:
    """The exit status `ctr task rm` reports: its own exit code (1.x) or, in 2.x, a warning
    'task X exit with non-zero exit code N' and exit 0."""
    found = re.search(r"non-zero exit code (\d+)", r.stderr)
    return int(found.group(1)) if found and r.returncode == 0 else r.returncode


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_status(pid: int) -> dict[str, str]:
    """State, SigCgt, SigPnd... of a process ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: fields[k].strip() for k in ("State", "PPid", "SigPnd", "ShdPnd", "SigBlk", "SigCgt") if k in fields}


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for sig (SigCgt in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def forwarded_since(c: PrivateContainerd, offset: int, topic: str, task_id: str) -> list[str]:
    """Log lines of the restarted containerd saying it accepted `topic` from the shim of
    `task_id`: the shim logs (into the log FIFO containerd copies) each event containerd's
    Events.Forward answered OK after failed attempts."""
    with open(c.log_path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines()
            if f"forwarded {topic} event" in line and f"id={task_id}" in line]


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_tasks_and_an_exit_survive_a_containerd_restart(own_containerd, how):
    c = own_containerd
    ctr(c, "run", "-d", "--runtime", PYSHIM, IMAGE_REF, "keep", "sleep", "600", check=True)
    ctr(c, "run", "-d", "--runtime", PYSHIM, IMAGE_REF, "ends", "sh", "-c", TRAPPED, check=True)
    bundle = c.bundle_dir(c.ns, "ends")
    ends_pid = int((bundle / "init.pid").read_text())
    # SIGTERM before the shell has set its trap would end it with 143, and one that comes
    # while it is still between `trap` and its loop can be mishandled by busybox sh (seen:
    # exit status 2, or no exit at all). Its output cannot be read (detached): wait until it
    # has the handler and runs the loop's first `sleep`.
    wait_until(lambda: catches(ends_pid, signal.SIGTERM) and children(ends_pid), 20,
               "the container's shell to trap SIGTERM and run its loop")
    shims = daemons(c)
    assert len(shims) == 2, shims
    keep_shim = next(p for p, cwd in shims.items() if cwd.endswith("/keep"))
    fds_before = fd_count(keep_shim)

    c.stop_daemon(getattr(signal, how))
    os.kill(ends_pid, signal.SIGTERM)  # exits 7 while nobody can hear it
    wait_gone(lambda: proc_status(ends_pid), 20, "the container to exit and be reaped")
    # recorded once its output is flushed, a moment after it was reaped
    wait_until(lambda: (bundle / "init.exit").exists(), 10, "the exit to be recorded in the bundle")
    assert (bundle / "init.exit").read_text().split()[:2] == [str(ends_pid), "7"]
    time.sleep(0.5)  # the shim tries to publish /tasks/exit and finds nobody
    offset = c.restart_daemon()

    assert wait_until(lambda: tasks(c) if len(tasks(c)) == 2 else None, 10, "both tasks listed") == {
        "keep": "RUNNING", "ends": "STOPPED"}
    assert daemons(c) == shims  # the same daemons, reconnected
    try:
        wait_until(lambda: forwarded_since(c, offset, "/tasks/exit", "ends"), 15, "/tasks/exit delivered after the restart")
    except AssertionError:
        text = c.log_path.read_bytes()[offset:].decode(errors="replace")
        raise AssertionError("\n".join(line for line in text.splitlines() if "event" in line or "shim" in line)) from None

    r = ctr(c, "task", "exec", "--exec-id", "after", "keep", "echo", "exec after restart", timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "exec after restart", r
    assert removed_status(ctr(c, "task", "rm", "ends")) == 7  # the real status, not "killed"
    ctr(c, "task", "kill", "-s", "SIGKILL", "keep", check=True)
    wait_until(lambda: tasks(c).get("keep") == "STOPPED", 10, "keep to stop")
    # the exited process's pipes and handles are closed a moment after its exit is out
    wait_until(lambda: fd_count(keep_shim), 20, f"the daemon back to at most {fds_before} + 1 fds",
               until=lambda n: n <= fds_before + 1)
    assert removed_status(ctr(c, "task", "rm", "keep")) == 137
    for cid in ("keep", "ends"):
        ctr(c, "container", "rm", cid, check=True)
    wait_gone(lambda: daemons(c), 20, "the shims to exit")
    assert mounts_of(c.dir) == []  # each rootfs was unmounted by the Delete of its task


def test_running_exec_survives_a_containerd_crash(own_containerd):
    c = own_containerd
    ctr(c, "run", "-d", "--runtime", PYSHIM, IMAGE_REF, "box", "sleep", "600", check=True)
    ctr(c, "task", "exec", "-d", "--exec-id", "long", "box", "sleep", "600", check=True)
    before = sorted(re.findall(r"^\s*(\d+)", ctr(c, "task", "ps", "box", check=True).stdout, re.M))
    assert len(before) == 2, before
    c.stop_daemon(signal.SIGKILL)
    c.restart_daemon()

    def pids() -> list[str] | None:
        r = ctr(c, "task", "ps", "box")
        return sorted(re.findall(r"^\s*(\d+)", r.stdout, re.M)) if r.returncode == 0 else None

    # the same two processes, once the restarted containerd serves the task again
    assert wait_until(pids, 20, "`ctr task ps box` to answer after the restart") == before
    ctr(c, "task", "kill", "-s", "SIGKILL", "box", check=True)
    wait_until(lambda: tasks(c).get("box") == "STOPPED", 10, "box to stop")
    ctr(c, "task", "rm", "box")
    ctr(c, "container", "rm", "box", check=True)
    wait_gone(lambda: daemons(c), 20, "the shim to exit")


def test_a_killed_group_shim_is_cleaned_up_without_its_daemon(own_containerd):
    """SIGKILL the daemon of a two-container group: containerd runs `delete` for each task;
    afterwards no container process, mount, runc state or socket is left, containerd holds
    no more fds than before, and the task that had already exited reports its real status."""
    c = own_containerd
    group = ("--annotation", "io.containerd.pyshim.v2.group=crash-group")
    containerd_fds = fd_count(c.proc.pid)
    ctr(c, "run", "-d", "--runtime", PYSHIM, *group, IMAGE_REF, "alive", "sleep", "600", check=True)
    ctr(c, "run", "-d", "--runtime", PYSHIM, *group, IMAGE_REF, "done", "sh", "-c", "exit 3", check=True)
    wait_until(lambda: tasks(c).get("done") == "STOPPED", 10, "done to exit")
    (shim,) = daemons(c)
    alive_pid = int((c.bundle_dir(c.ns, "alive") / "init.pid").read_text())
    socket_path = (c.bundle_dir(c.ns, "alive") / "address").read_text().removeprefix("unix://")
    assert os.path.exists(socket_path)

    events = subprocess.Popen([str(c.bin_dir / "ctr"), "--address", c.address, "events"], env=c.env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = ""

    def exits() -> dict[str, int]:
        """The /tasks/exit events seen so far: container id -> exit status."""
        nonlocal seen
        while select.select([events.stdout], [], [], 0)[0]:
            chunk = os.read(events.stdout.fileno(), 65536).decode(errors="replace")
            if not chunk:
                break
            seen += chunk
        return {m.group(1): int(m.group(2)) for m in re.finditer(
            r'/tasks/exit \{"container_id":"(\w+)".*?"exit_status":(\d+)', seen)}

    try:
        wait_subscribed(events, c, c.ns)
        os.kill(shim, signal.SIGKILL)
        # containerd sees both connections drop and runs `containerd-shim-pyshim-v2 delete` for each
        wait_until(lambda: not os.path.exists(f"/proc/{alive_pid}"), 20, "runc delete --force to kill the container")
        wait_until(lambda: all(s in ("STOPPED", None) for s in (tasks(c).get("alive"), tasks(c).get("done"))), 20,
                   "containerd to mark both tasks stopped")
        wait_until(lambda: not os.path.exists(socket_path), 10, "the dead daemon's socket to be removed")
        # containerd publishes /tasks/exit from what `delete` answered: 3 for the task that had
        # exited (from <bundle>/init.exit; runc-v2 says 137), 137 for the one it killed.
        # Both are out once both deletes are done, which may be after the tasks are listed stopped.
        wait_until(exits, 20, "a /tasks/exit event for both tasks", until=lambda found: len(found) == 2)
        assert exits() == {"done": 3, "alive": 137}, seen
    finally:
        events.kill()
        events.communicate(timeout=10)
    for cid in ("alive", "done"):
        ctr(c, "task", "rm", cid)
        ctr(c, "container", "rm", cid, check=True)
    # containerd may drop a task before its `delete` has unmounted the rootfs and removed
    # the runc state: wait for what the deletes leave, i.e. nothing.
    wait_gone(lambda: mounts_of(c.dir), 20, "the deletes to unmount both rootfs")
    wait_gone(lambda: list((Path("/run/containerd/runc") / c.ns).glob("*")), 20,
              "the deletes to remove the runc state")
    assert not daemons(c)
    wait_until(lambda: fd_count(c.proc.pid), 20, f"containerd back to at most {containerd_fds} + 2 fds",
               until=lambda n: n <= containerd_fds + 2)
