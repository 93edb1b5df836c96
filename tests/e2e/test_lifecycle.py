"""`ctr run --runtime io.containerd.pyshim.v2` behaves like io.containerd.runc.v2.

Every test runs per containerd version (1.6, 1.7, 2.1) and OCI runtime (runc 1.1, runc 1.3,
crun; chosen by BinaryName, see runtimes.py), on the pairs of runtimes.DEFAULT_MATRIX.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from runtimes import missing_executable
from waiting import wait_gone, wait_until

pytestmark = pytest.mark.usefixtures("oci_runtime")

PYSHIM = "io.containerd.pyshim.v2"
RUNC = "io.containerd.runc.v2"
FIVE_MIB = 5 * 1024 * 1024


def run(e2e, *cmd: str, runtime: str = PYSHIM, cid: str | None = None, flags: tuple[str, ...] = (), **kw):
    cid = cid or e2e.new_id()
    return e2e.ctr("run", "--rm", *e2e.runtime(runtime), *flags, e2e.image, cid, *cmd, **kw)


def popen_ctr(e2e, *args: str, **kw) -> subprocess.Popen:
    c = e2e.containerd
    return subprocess.Popen(
        [str(c.bin_dir / "ctr"), "--address", c.address, "--namespace", e2e.namespace, *args],
        env=c.env(),
        cwd=c.dir,
        **kw,
    )


def read_until(stream, marker: str, timeout: float = 15) -> str:
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            chunk = os.read(stream.fileno(), 65536).decode(errors="replace")
            if not chunk:
                break
            seen += chunk
    assert marker in seen, f"{marker!r} not seen; got {seen!r}"
    return seen


def wait_subscribed(events: subprocess.Popen, containerd, namespace: str, timeout: float = 20) -> str:
    """Return once `ctr events` (events, its stdout a pipe) is subscribed: label the namespace
    (containerd publishes /namespaces/update) until that event comes out. ctr prints nothing
    when it has subscribed, and on a busy machine it may take seconds to get there: an event
    published before would be missed. Returns what was read."""
    seen = ""
    deadline = time.monotonic() + timeout
    for n in itertools.count():
        containerd.ctr("namespaces", "label", namespace, f"pyshim.test/events-probe={n}",
                       namespace=namespace, check=True)
        until = min(time.monotonic() + 0.5, deadline)
        while "/namespaces/update" not in seen and (left := until - time.monotonic()) > 0:
            ready, _, _ = select.select([events.stdout], [], [], left)
            if ready:
                chunk = os.read(events.stdout.fileno(), 65536).decode(errors="replace")
                assert chunk, f"ctr events ended; got {seen!r}"
                seen += chunk
        if "/namespaces/update" in seen:
            return seen
        assert time.monotonic() < deadline, f"ctr events not subscribed after {timeout}s; got {seen!r}"


def task_status(e2e, cid: str) -> str:
    for line in e2e.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[2]
    return ""


def pyshim_daemons(e2e) -> list[int]:
    """pids of pyshim daemons serving this containerd (their cwd is a bundle in its state dir)."""
    return list(e2e.containerd.pyshim_daemons())


def mounts_of(path) -> list[str]:
    """The lines of /proc/self/mountinfo that name path (a bundle, a containerd's dir)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]


@pytest.mark.parametrize("command, code", [(["true"], 0), (["sh", "-c", "exit 3"], 3), (["false"], 1)])
def test_exit_codes(e2e, command, code):
    r = run(e2e, *command)
    assert r.returncode == code, r


def test_stdout_and_stderr_apart(e2e):
    r = run(e2e, "sh", "-c", "echo out; echo err >&2; echo out2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\nout2\n", "err\n"), r


def test_five_mib_of_output_intact(e2e):
    r = run(e2e, "sh", "-c", f"yes 0123456789abcdef | head -c {FIVE_MIB}", timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == FIVE_MIB
    assert r.stdout == ("0123456789abcdef\n" * (FIVE_MIB // 17 + 1))[:FIVE_MIB]


@pytest.mark.parametrize("runtime", [PYSHIM, RUNC])
def test_stdin_piped_in_and_eof_propagated(e2e, runtime):
    # ctr sends CloseIO when its stdin reaches EOF, but only once the task exists: an EOF
    # before that is lost by ctr itself (with either shim), so the test closes stdin only
    # after the first line came back.
    proc = popen_ctr(e2e, "run", "--rm", *e2e.runtime(runtime), e2e.image, e2e.new_id(), "cat",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"hi\n")
        proc.stdin.flush()
        seen = read_until(proc.stdout, "hi\n")
        proc.stdin.write(b"there\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
        assert seen + proc.stdout.read().decode() == "hi\nthere\n"
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_gives_137(e2e):
    cid = e2e.new_id()
    proc = popen_ctr(e2e, "run", "--rm", *e2e.runtime(PYSHIM), e2e.image, cid, "sh", "-c", "echo ready; sleep 600",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stdout, "ready")
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        assert proc.wait(30) == 137
    finally:
        proc.kill()
        proc.communicate()


def test_own_exit_code_after_handling_sigterm(e2e):
    cid = e2e.new_id()
    script = "trap 'echo bye; exit 7' TERM; echo ready; while :; do sleep 0.1; done"
    proc = popen_ctr(e2e, "run", "--rm", *e2e.runtime(PYSHIM), e2e.image, cid, "sh", "-c", script,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stdout, "ready")
        e2e.ctr("task", "kill", "-s", "SIGTERM", cid, check=True)
        assert proc.wait(30) == 7
        assert "bye" in proc.stdout.read().decode()
    finally:
        proc.kill()
        proc.communicate()


def test_detached_then_ls_kill_rm(e2e):
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), e2e.image, cid, "sleep", "600", check=True)
    assert task_status(e2e, cid) == "RUNNING"
    pids = e2e.ctr("task", "ps", cid, check=True).stdout
    assert re.search(r"^\d+", pids.splitlines()[1]), pids
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    _wait_stopped(e2e, cid)
    # Killing an exited task is NOT_FOUND, which ctr reports as an error.
    again = e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
    assert again.returncode != 0 and "not found" in again.stderr, again
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)
    assert task_status(e2e, cid) == ""


def _mergeable_mappings(pid: int) -> list[str]:
    """The names of pid's mappings marked for KSM ("mg" in smaps' VmFlags)."""
    marked, name = [], ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("VmFlags:"):
            if "mg" in line.split()[1:]:
                marked.append(name)
        elif re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = line.split(None, 5)[5].strip() if len(line.split(None, 5)) > 5 else "[anon]"
    return marked


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/ksm"), reason="this kernel has no KSM")
def test_daemon_memory_is_offered_to_ksm_the_container_is_not(e2e):
    """shim/framework/ksm.py: the daemon inherits the zygote's marks; the container, exec'd
    through runc, starts with none (its memory is never merged with anything)."""
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), e2e.image, cid, "sleep", "600", check=True)
    try:
        line = next(l for l in e2e.ctr("task", "ls", check=True).stdout.splitlines() if l.split()[:1] == [cid])
        container_pid = int(line.split()[1])
        daemon = next(pid for pid in pyshim_daemons(e2e)
                      if any(cid in part for part in Path(f"/proc/{pid}/cmdline").read_text().split("\0")))
        # a daemon forked from the zygote has them at once; the first one, started without, soon
        wait_until(lambda: "[heap]" in _mergeable_mappings(daemon), timeout=15, what="the daemon's heap marked")
        assert _mergeable_mappings(container_pid) == []
    finally:
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
        _wait_stopped(e2e, cid)
        e2e.ctr("task", "rm", cid, check=True)
        e2e.ctr("container", "rm", cid, check=True)


def test_events_in_order(e2e):
    watcher = popen_ctr(e2e, "events", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_subscribed(watcher, e2e.containerd, e2e.namespace)
        cid = e2e.new_id()
        assert run(e2e, "true", cid=cid).returncode == 0
        seen = read_until(watcher.stdout, "/tasks/delete")
    finally:
        watcher.kill()
        watcher.communicate()
    topics = [m.group(1) for m in re.finditer(r" (/tasks/[a-z-]+) ", seen) if cid in seen]
    assert topics[:4] == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"], seen


def test_missing_executable_shows_runtime_error_like_runc_shim(e2e):
    ours = run(e2e, "/no/such/binary")
    theirs = run(e2e, "/no/such/binary", runtime=RUNC)
    assert ours.returncode == theirs.returncode != 0
    assert missing_executable(e2e.oci_kind, "/no/such/binary") in ours.stderr, ours

    def normalized(text: str) -> str:
        return re.sub(r"[0-9a-f]{6}\b|-\d+-", "X", text).strip()

    assert normalized(ours.stderr) == normalized(theirs.stderr)


def test_fifty_sequential_containers_leave_nothing_behind(e2e):
    before = set(pyshim_daemons(e2e))
    mounts_before = len(mounts_of(e2e.state))
    for _ in range(50):
        r = run(e2e, "true")
        assert r.returncode == 0, r
    # The last daemons exit (and are reaped) a moment after their `ctr run --rm` returned.
    wait_gone(lambda: set(pyshim_daemons(e2e)) - before, 20, "the shim daemons to exit")
    wait_until(lambda: mounts_of(e2e.state), 20, f"{mounts_before} mounts under the state dir again",
               until=lambda mounts: len(mounts) == mounts_before)
    bundles = e2e.state / "io.containerd.runtime.v2.task" / e2e.namespace
    assert not bundles.exists() or list(bundles.iterdir()) == []

    def zombies() -> list[str]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                if fields[0] == "Z" and int(fields[1]) in (os.getpid(), e2e.containerd.proc.pid):
                    found.append(entry)
        return found

    # An exited child is a zombie until its parent's wait: not reaped is what fails here.
    wait_gone(zombies, 20, "no unreaped children of pytest or containerd")


def test_second_task_on_the_group_socket(e2e):
    group = ("--annotation", f"io.containerd.runc.v2.group=g-{e2e.new_id()}")
    first, second = e2e.new_id("a"), e2e.new_id("b")
    for cid in (first, second):
        e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), *group, e2e.image, cid, "sleep", "600", check=True)
    address = (e2e.bundle_dir(first) / "address").read_text()
    assert (e2e.bundle_dir(second) / "address").read_text() == address
    daemons = [pid for pid in pyshim_daemons(e2e) if os.readlink(f"/proc/{pid}/cwd") == str(e2e.bundle_dir(first))]
    assert len(daemons) == 1
    assert task_status(e2e, first) == task_status(e2e, second) == "RUNNING"

    # Deleting the first container must not stop the shim serving the second.
    e2e.ctr("task", "kill", "-s", "SIGKILL", first, check=True)
    _wait_stopped(e2e, first)
    e2e.ctr("task", "rm", first, check=True)
    assert task_status(e2e, second) == "RUNNING"
    assert os.path.exists(f"/proc/{daemons[0]}")
    e2e.ctr("task", "kill", "-s", "SIGKILL", second, check=True)
    _wait_stopped(e2e, second)
    e2e.ctr("task", "rm", second, check=True)
    wait_gone(lambda: os.path.exists(f"/proc/{daemons[0]}"), 20, "the shim to exit after its last task")
    for cid in (first, second):
        e2e.ctr("container", "rm", cid, check=True)


def _wait_stopped(e2e, cid: str) -> None:
    wait_until(lambda: task_status(e2e, cid), 20, f"task {cid} to be STOPPED", until=lambda s: s == "STOPPED")


def test_background_child_holding_stdout_does_not_hang(e2e):
    started = time.monotonic()
    r = run(e2e, "sh", "-c", "sleep 60 & echo done", timeout=40)
    assert (r.returncode, r.stdout) == (0, "done\n"), r
    assert time.monotonic() - started < 30


def test_killed_shim_is_cleaned_up_by_delete(e2e):
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), e2e.image, cid, "sleep", "600", check=True)
    bundle = e2e.bundle_dir(cid)
    (daemon,) = [pid for pid in pyshim_daemons(e2e) if os.readlink(f"/proc/{pid}/cwd") == str(bundle)]
    container_pid = int((bundle / "init.pid").read_text())
    os.kill(daemon, signal.SIGKILL)
    # containerd notices the dead connection, runs `containerd-shim-pyshim-v2 delete` and
    # publishes the task's exit with what delete returned (137).
    wait_until(lambda: task_status(e2e, cid), 20, f"task {cid} to be STOPPED or gone",
               until=lambda s: s in ("STOPPED", ""))
    # containerd may drop the task before its delete has finished: delete kills the container
    # (runc delete --force) and then unmounts the rootfs, both after the task is gone.
    wait_gone(lambda: os.path.exists(f"/proc/{container_pid}"), 20,
              "runc delete --force to kill the container")
    wait_gone(lambda: mounts_of(bundle), 20, "delete to unmount the rootfs")
    e2e.ctr("task", "rm", cid)
    e2e.ctr("container", "rm", cid, check=True)


def test_delete_command_without_daemon_is_idempotent(e2e):
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), e2e.image, cid, "sleep", "600", check=True)
    bundle = e2e.bundle_dir(cid)
    (daemon,) = [pid for pid in pyshim_daemons(e2e) if os.readlink(f"/proc/{pid}/cwd") == str(bundle)]
    os.kill(daemon, signal.SIGSTOP)  # the daemon cannot help; containerd does not notice
    try:
        from shim.api.containerd.task.v2 import DeleteResponse

        argv = [str(e2e.containerd.shim_bin_dir / "containerd-shim-pyshim-v2"), "-namespace", e2e.namespace,
                "-address", e2e.address, "-publish-binary", "containerd", "-id", cid, "-bundle", str(bundle), "delete"]
        for _ in range(2):
            started = time.monotonic()
            done = subprocess.run(argv, cwd=bundle, capture_output=True, timeout=10, env=e2e.containerd.env())
            assert done.returncode == 0, done.stderr
            assert time.monotonic() - started < 5
            response = DeleteResponse.parse(done.stdout)
            assert response.exit_status == 137 and response.exited_at.year >= 2024
        assert mounts_of(bundle) == []  # delete unmounted it before it exited
    finally:
        # SIGKILL ends a stopped process too; a SIGCONT after it could find it already
        # reaped (ProcessLookupError, seen on 1.7).
        os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: task_status(e2e, cid), 20, f"task {cid} to be STOPPED or gone",
               until=lambda s: s in ("STOPPED", ""))
    e2e.ctr("task", "rm", cid)
    e2e.ctr("container", "rm", cid, check=True)


@pytest.mark.parametrize("runtime", [PYSHIM, RUNC])
def test_exec_output_exit_code_and_errors(e2e, runtime):
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(runtime), e2e.image, cid, "sleep", "600", check=True)
    done = e2e.ctr("task", "exec", "--exec-id", "x1", cid, "sh", "-c", "echo from exec; echo e >&2; exit 5")
    assert (done.returncode, done.stdout, done.stderr) == (5, "from exec\n", "e\n"), done
    # stdin through an exec, EOF after the first line came back (see the init stdin test).
    proc = popen_ctr(e2e, "task", "exec", "--exec-id", "x2", cid, "cat",
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"to exec\n")
        proc.stdin.flush()
        read_until(proc.stdout, "to exec\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()
    missing = e2e.ctr("task", "exec", "--exec-id", "x3", cid, "/nonexistent")
    assert missing.returncode != 0
    assert missing_executable(e2e.oci_kind, "/nonexistent") in missing.stderr, missing
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    _wait_stopped(e2e, cid)
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)
