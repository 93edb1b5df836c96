"""examples/crun on a real containerd (1.6, 1.7, 2.1): the core lifecycle tests, each run
twice by the same body, once with pyshim's default backend (runc) and once with the
`pyshim_crun:UseCrun` handler (crun through shim.runc.crun.Crun, chosen by
`ctr run --runtime-config-path`), and each checking which runtime actually ran it.

How a test knows crun ran: the handler's `binary` is a wrapper named crun that appends its
arguments to a file before running the real crun, so a container created by crun has a
`create` line naming it there; while it runs, `crun list` (on the runtime root both backends
share, /run/containerd/runc/<namespace>) lists it and `runc list` does not; its bundle's
`runtime` file names the wrapper. With the runc backend, the reverse.

Differences between the two that are crun's own (not smoothed over by the shim), checked here:
its wording of a missing executable, and (crun 1.8) the ociVersion values and cgroup
layouts it accepts; see examples/crun/README.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import E2E, VERSION_IDS, _slug
from containerd import REPO_ROOT, RUNC_ROOT, PrivateContainerd
from importing import containerd_importing
from test_cgroup_features import _grpc_update, metrics, task_pid
from test_lifecycle import PYSHIM, _wait_stopped, mounts_of, popen_ctr, pyshim_daemons, read_until, task_status
from waiting import wait_gone, wait_until

from shim.framework import cgroups

EXAMPLE_DIR = REPO_ROOT / "examples" / "crun"
CRUN = shutil.which("crun") or "/usr/bin/crun"
HANDLER = "pyshim_crun:UseCrun"

# crun 1.8 refuses a hybrid cgroup layout whose cgroup2 hierarchy has controllers ("cgroups
# in hybrid mode not supported, drop all controllers from cgroupv2"); this machine's has
# hugetlb there. In a private mount namespace without that mount crun sees plain cgroup v1.
UNIFIED = Path("/sys/fs/cgroup/unified")


def _hybrid_with_v2_controllers() -> bool:
    try:
        return bool((UNIFIED / "cgroup.controllers").read_text().split())
    except OSError:
        return False


def crun_wrapper(path: Path, calls: Path) -> None:
    """An executable `path` (named crun) that records its arguments in `calls`, then runs crun."""
    if _hybrid_with_v2_controllers():
        run = (f"exec unshare --mount --propagation private sh -c "
               f"'umount {UNIFIED} 2>/dev/null; exec {CRUN} \"$@\"' crun \"$@\"")
    else:
        run = f'exec {CRUN} "$@"'
    path.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n{run}\n')
    path.chmod(0o755)


# containerd 1.7.24 and 2.1.9 write ociVersion 1.2.0 and 1.2.1, which crun 1.8 refuses
# ("unknown version specified": it takes only versions containing "1.0", i.e. 1.0.x and
# 1.1.x); the handler's oci_version option gives it one it takes. 1.6 writes 1.0.2-dev.
NEEDS_OCI_VERSION = {"1.7", "2.1"}


@dataclasses.dataclass
class Backend:
    """One way of running a container under pyshim: `name` is "runc" or "crun"."""

    name: str
    flags: tuple[str, ...]
    calls: Path
    wrapper: Path

    def created_by_crun(self, cid: str) -> bool:
        """Whether the crun wrapper was asked to create `cid`."""
        try:
            lines = self.calls.read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(" create " in f" {line} " and line.split()[-1] == cid for line in lines)

    def check_ran(self, cid: str) -> None:
        """Assert that this backend's runtime created `cid` (and the other one did not)."""
        assert self.created_by_crun(cid) == (self.name == "crun"), (self.name, cid)

    def check_running(self, e2e: E2E, cid: str) -> None:
        """Assert that this backend's runtime, and only it, knows `cid`, and that the bundle
        names it for `delete`."""
        self.check_ran(cid)
        root = str(RUNC_ROOT / e2e.namespace)
        listed = {name: listed_ids(binary, root) for name, binary in
                  (("crun", CRUN), ("runc", str(e2e.containerd.runc)))}
        other = "runc" if self.name == "crun" else "crun"
        assert cid in listed[self.name] and cid not in listed[other], listed
        runtime_file = e2e.bundle_dir(cid) / "runtime"
        if self.name == "crun":
            assert runtime_file.read_text() == str(self.wrapper)
        else:
            assert runtime_file.read_text() == ""  # no BinaryName: `delete` runs runc


def listed_ids(binary: str, root: str) -> set[str]:
    """The container ids `<binary> --root <root> list` shows (empty when the root is)."""
    done = subprocess.run([binary, "--root", root, "list", "--quiet"], capture_output=True, text=True)
    return set(done.stdout.split())


@pytest.fixture(scope="module", params=VERSION_IDS)
def crun_containerd(request, busybox_image: Path):
    with containerd_importing(request.param, busybox_image, EXAMPLE_DIR) as c:
        yield c


@pytest.fixture(scope="module")
def crun_setup(crun_containerd: PrivateContainerd, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(the runtime config naming the handler, the wrapper, its calls file) for this version."""
    where = tmp_path_factory.mktemp(f"crun-{crun_containerd.target.id}")
    (where / "bin").mkdir()
    wrapper, calls = where / "bin" / "crun", where / "calls"
    crun_wrapper(wrapper, calls)
    options = {"binary": str(wrapper)}
    if crun_containerd.target.id in NEEDS_OCI_VERSION:
        options["oci_version"] = "1.1.0"
    config = where / "crun.toml"
    config.write_text(runtime_config(options))
    return config, wrapper, calls


def runtime_config(options: dict) -> str:
    body = f'Handler = "{HANDLER}"\n[HandlerOptions]\n'
    return body + "".join(f"{key} = {json.dumps(value)}\n" for key, value in options.items())


@pytest.fixture
def ce2e(crun_containerd: PrivateContainerd, request) -> E2E:
    ns = crun_containerd.new_namespace(_slug(request.node.originalname, 24), image=crun_containerd.image_archive)
    yield E2E(crun_containerd, ns)
    crun_containerd.cleanup_namespace(ns)


@pytest.fixture(params=["runc", "crun"])
def backend(request, crun_setup) -> Backend:
    config, wrapper, calls = crun_setup
    flags = ("--runtime", PYSHIM)
    if request.param == "crun":
        flags += ("--runtime-config-path", str(config))
    return Backend(request.param, flags, calls, wrapper)


def run(e2e: E2E, backend: Backend, *cmd: str, cid: str | None = None, **kw):
    cid = cid or e2e.new_id()
    r = e2e.ctr("run", "--rm", *backend.flags, e2e.image, cid, *cmd, **kw)
    backend.check_ran(cid)
    return r


def run_detached(e2e: E2E, backend: Backend, *cmd: str, flags: tuple[str, ...] = ()) -> str:
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *backend.flags, *flags, e2e.image, cid, *(cmd or ("sleep", "600")), check=True)
    backend.check_running(e2e, cid)
    return cid


def remove(e2e: E2E, cid: str) -> None:
    """SIGKILL, wait for STOPPED, a second SIGKILL (NOT_FOUND), `ctr task rm`, `ctr container
    rm`: the task is gone from both runtimes."""
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    _wait_stopped(e2e, cid)
    # killing an exited task is NOT_FOUND, whichever runtime's words said so
    again = e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
    assert again.returncode != 0 and "not found" in again.stderr, again
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)
    assert task_status(e2e, cid) == ""
    root = str(RUNC_ROOT / e2e.namespace)
    assert cid not in listed_ids(CRUN, root) | listed_ids(str(e2e.containerd.runc), root)


# -- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("command, code", [(["true"], 0), (["sh", "-c", "exit 3"], 3), (["false"], 1)])
def test_exit_codes(ce2e, backend, command, code):
    r = run(ce2e, backend, *command)
    assert r.returncode == code, r


def test_stdout_and_stderr_apart(ce2e, backend):
    r = run(ce2e, backend, "sh", "-c", "echo out; echo err >&2; echo out2")
    assert (r.returncode, r.stdout, r.stderr) == (0, "out\nout2\n", "err\n"), r


def test_stdin_piped_in_and_eof_propagated(ce2e, backend):
    # EOF only after the first line came back: ctr loses an EOF before the task exists.
    cid = ce2e.new_id()
    proc = popen_ctr(ce2e, "run", "--rm", *backend.flags, ce2e.image, cid, "cat",
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
    backend.check_ran(cid)


#: What the user sees when an exec's executable is missing: each runtime's own words
#: (`ctr` shows them after containerd's and the shim's prefixes).
MISSING_EXECUTABLE = {
    "runc": 'exec: "/nonexistent": stat /nonexistent: no such file or directory',
    "crun": "executable file `/nonexistent` not found in $PATH: No such file or directory",
}


def test_exec_output_exit_code_and_errors(ce2e, backend):
    cid = run_detached(ce2e, backend)
    done = ce2e.ctr("task", "exec", "--exec-id", "x1", cid, "sh", "-c", "echo from exec; echo e >&2; exit 5")
    assert (done.returncode, done.stdout, done.stderr) == (5, "from exec\n", "e\n"), done
    proc = popen_ctr(ce2e, "task", "exec", "--exec-id", "x2", cid, "cat",
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
    missing = ce2e.ctr("task", "exec", "--exec-id", "x3", cid, "/nonexistent")
    assert missing.returncode != 0
    assert "OCI runtime exec failed: " in missing.stderr, missing
    assert MISSING_EXECUTABLE[backend.name] in missing.stderr, missing
    # the container is unharmed, and the failed exec's id can be used again
    again = ce2e.ctr("task", "exec", "--exec-id", "x3", cid, "echo", "again")
    assert (again.returncode, again.stdout) == (0, "again\n"), again
    remove(ce2e, cid)


def test_sigkill_gives_137(ce2e, backend):
    cid = ce2e.new_id()
    proc = popen_ctr(ce2e, "run", "--rm", *backend.flags, ce2e.image, cid, "sh", "-c", "echo ready; sleep 600",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stdout, "ready")
        backend.check_running(ce2e, cid)
        ce2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        assert proc.wait(30) == 137
    finally:
        proc.kill()
        proc.communicate()


def test_sigterm_to_an_exec_gives_143_and_wait_returns_it(ce2e, backend):
    cid = run_detached(ce2e, backend)
    # An exec is not its pid namespace's init: SIGTERM's default action ends it.
    proc = popen_ctr(ce2e, "task", "exec", "--exec-id", "sleeper", cid, "sh", "-c", "echo ready; exec sleep 600",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stdout, "ready")
        ce2e.ctr("task", "kill", "--exec-id", "sleeper", "-s", "SIGTERM", cid, check=True)
        assert proc.wait(30) == 143
    finally:
        proc.kill()
        proc.communicate()
    assert task_status(ce2e, cid) == "RUNNING"
    remove(ce2e, cid)


def test_pause_resume_ps_and_metrics(ce2e, backend):
    cid = run_detached(ce2e, backend, "sh", "-c", "while :; do echo tick > /tmp/tick; sleep 0.05; done")
    pid = task_pid(ce2e, cid)
    ps = ce2e.ctr("task", "ps", cid, check=True).stdout
    pids = {int(line.split()[0]) for line in ps.splitlines()[1:] if re.match(r"\s*\d+", line)}
    assert pid in pids, ps

    ce2e.ctr("task", "pause", cid, check=True)
    assert task_status(ce2e, cid) == "PAUSED"
    freezer = cgroups.load(pid).directories["freezer"]
    assert Path(freezer, "freezer.state").read_text().strip() == "FROZEN"
    ce2e.ctr("task", "resume", cid, check=True)
    assert task_status(ce2e, cid) == "RUNNING"
    assert Path(freezer, "freezer.state").read_text().strip() == "THAWED"

    table = metrics(ce2e, cid)
    assert int(table["pids.current"]) >= 1, table
    assert int(table["memory.usage_in_bytes"]) > 0, table
    remove(ce2e, cid)


def test_update_pids_and_cpu(ce2e, backend):
    cid = run_detached(ce2e, backend)
    directories = cgroups.load(task_pid(ce2e, cid)).directories
    resources = {"pids": {"limit": 42}, "cpu": {"quota": 20000, "period": 100000}}
    asyncio.run(_grpc_update(ce2e.address, ce2e.namespace, cid, resources))
    assert Path(directories["pids"], "pids.max").read_text().strip() == "42"
    assert Path(directories["cpu"], "cpu.cfs_quota_us").read_text().strip() == "20000"
    assert Path(directories["cpu"], "cpu.cfs_period_us").read_text().strip() == "100000"
    assert metrics(ce2e, cid)["pids.limit"] == "42"
    remove(ce2e, cid)


def test_delete_of_an_exited_task_and_forced_delete_of_a_running_one(ce2e, backend):
    root = str(RUNC_ROOT / ce2e.namespace)
    exited = run_detached(ce2e, backend, "sh", "-c", "exit 7")
    _wait_stopped(ce2e, exited)
    ce2e.ctr("task", "rm", exited, check=True)
    assert exited not in listed_ids(CRUN, root) | listed_ids(str(ce2e.containerd.runc), root)
    ce2e.ctr("container", "rm", exited, check=True)

    running = run_detached(ce2e, backend)
    ce2e.ctr("task", "rm", "-f", running, check=True)
    assert task_status(ce2e, running) == ""
    assert running not in listed_ids(CRUN, root) | listed_ids(str(ce2e.containerd.runc), root)
    ce2e.ctr("container", "rm", running, check=True)


def test_killed_shim_is_cleaned_up_by_delete(ce2e, backend):
    cid = run_detached(ce2e, backend)
    bundle = ce2e.bundle_dir(cid)
    (daemon,) = [pid for pid in pyshim_daemons(ce2e) if os.readlink(f"/proc/{pid}/cwd") == str(bundle)]
    container_pid = int((bundle / "init.pid").read_text())
    calls_before = backend.calls.read_text() if backend.calls.exists() else ""
    os.kill(daemon, signal.SIGKILL)
    # containerd runs `containerd-shim-pyshim-v2 delete`, which kills the container with the
    # runtime the bundle's `runtime` file names (crun), or with runc.
    wait_until(lambda: task_status(ce2e, cid), 20, f"task {cid} to be STOPPED or gone",
               until=lambda s: s in ("STOPPED", ""))
    wait_gone(lambda: os.path.exists(f"/proc/{container_pid}"), 20, "delete --force to kill the container")
    wait_gone(lambda: mounts_of(bundle), 20, "delete to unmount the rootfs")
    calls = backend.calls.read_text()[len(calls_before):] if backend.calls.exists() else ""
    forced = [line for line in calls.splitlines() if line.endswith(f"delete --force {cid}")]
    assert len(forced) == (1 if backend.name == "crun" else 0), calls
    ce2e.ctr("task", "rm", cid)
    ce2e.ctr("container", "rm", cid, check=True)
    root = str(RUNC_ROOT / ce2e.namespace)
    assert cid not in listed_ids(CRUN, root) | listed_ids(str(ce2e.containerd.runc), root)


# -- crun's own behaviour --------------------------------------------------------------------


def test_crun_refuses_oci_version_1_2_without_the_option(ce2e, crun_setup, tmp_path):
    """Documents crun 1.8's version check: the specs of containerd 1.7 and 2.x need `oci_version`."""
    _, wrapper, _ = crun_setup
    config = tmp_path / "plain.toml"
    config.write_text(runtime_config({"binary": str(wrapper)}))
    cid = ce2e.new_id()
    r = ce2e.ctr("run", "--rm", "--runtime", PYSHIM, "--runtime-config-path", str(config), ce2e.image, cid,
                 "echo", "ran")
    if ce2e.version in NEEDS_OCI_VERSION:
        assert r.returncode != 0 and "OCI runtime create failed: unknown version specified" in r.stderr, r
    else:
        assert (r.returncode, r.stdout) == (0, "ran\n"), r
