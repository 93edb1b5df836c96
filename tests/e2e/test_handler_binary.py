"""A handler's own shim binary (shim.handler.run) on a real containerd (1.6, 1.7, 2.1).

The test makes `containerd-shim-pyshimtest-v2`, a three-line Python script calling
`shim.handler.run("pyshimtest_handler:AddEnv", runtime_type="io.containerd.pyshimtest.v2")`,
puts it on a private containerd's PATH, and runs containers with `ctr run --runtime
io.containerd.pyshimtest.v2` and no runtime options: the binary's default handler acts (its
env var is in the container), its daemons log under their own runtime type, are found as
that binary, group by io.containerd.pyshimtest.v2.group (and not by pyshim's own group
annotation), and go away with their containers; after a daemon is killed, the binary's
`delete` cleans up. Its zygote is its own, next to pyshim's.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import E2E, VERSION_IDS, _slug
from containerd import PrivateContainerd
from importing import containerd_importing
from test_lifecycle import _wait_stopped, mounts_of, task_status
from waiting import wait_gone, wait_until

RUNTIME = "io.containerd.pyshimtest.v2"
BINARY = "containerd-shim-pyshimtest-v2"

HANDLER_MODULE = '''\
"""The test binary's default handler: an env var in every container it creates."""

import logging

from shim.handler import Handler

log = logging.getLogger("pyshimtest_handler")


class AddEnv(Handler):
    async def create(self, container):
        container.spec["process"].setdefault("env", []).append("PYSHIMTEST_HANDLER=added")
        log.info("%s: PYSHIMTEST_HANDLER added", container.id)
'''

SHIM_SCRIPT = f'''\
#!{sys.executable}
import sys
from shim.handler import run
sys.exit(run("pyshimtest_handler:AddEnv", runtime_type="{RUNTIME}"))
'''


@pytest.fixture(scope="module", params=VERSION_IDS)
def binary_containerd(request, busybox_image: Path, tmp_path_factory):
    """A PrivateContainerd with containerd-shim-pyshimtest-v2 on its PATH and the handler's
    module on its shims' PYTHONPATH; `.shim_binary` is the script's path."""
    where = tmp_path_factory.mktemp(f"handler-binary-{request.param}")
    bin_dir, modules = where / "bin", where / "modules"
    bin_dir.mkdir()
    modules.mkdir()
    (modules / "pyshimtest_handler.py").write_text(HANDLER_MODULE)
    shim_binary = bin_dir / BINARY
    shim_binary.write_text(SHIM_SCRIPT)
    shim_binary.chmod(0o755)
    with containerd_importing(request.param, busybox_image, modules, extra_path=(bin_dir,)) as c:
        c.shim_binary = shim_binary
        yield c


@pytest.fixture
def be2e(binary_containerd: PrivateContainerd, request) -> E2E:
    ns = binary_containerd.new_namespace(_slug(request.node.originalname, 24), image=binary_containerd.image_archive)
    yield E2E(binary_containerd, ns)
    binary_containerd.cleanup_namespace(ns)


def daemons(e2e: E2E) -> dict[int, str]:
    """The test binary's daemons serving this containerd: pid -> bundle."""
    return e2e.containerd.pyshim_daemons(BINARY)


def daemon_of(e2e: E2E, cid: str) -> int:
    (pid,) = [pid for pid, cwd in daemons(e2e).items() if cwd == str(e2e.bundle_dir(cid))]
    return pid


def remove(e2e: E2E, cid: str) -> None:
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    _wait_stopped(e2e, cid)
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)
    assert task_status(e2e, cid) == ""
    assert not e2e.bundle_dir(cid).exists()


def test_version_names_the_binary_and_its_runtime(binary_containerd):
    done = subprocess.run([str(binary_containerd.shim_binary), "-v"], capture_output=True, text=True,
                          env=binary_containerd.env(binary_containerd.containerd_env), timeout=30)
    assert done.returncode == 0, done
    lines = done.stdout.splitlines()
    assert lines[0] == f"{BINARY}:", done.stdout
    assert f"  Runtime:  {RUNTIME}" in lines, done.stdout


def test_run_applies_the_default_handler_and_logs_as_its_runtime(be2e):
    cid = be2e.new_id()
    r = be2e.ctr("run", "--rm", "--runtime", RUNTIME, be2e.image, cid, "env")
    assert r.returncode == 0, r
    assert "PYSHIMTEST_HANDLER=added" in r.stdout.splitlines(), r
    # the handler's log line, through the daemon's log FIFO into containerd's log
    wanted = f'msg="{cid}: PYSHIMTEST_HANDLER added" namespace={be2e.namespace} runtime={RUNTIME} id={cid}'
    wait_until(lambda: wanted in be2e.containerd.log_path.read_text(errors="replace"), 15,
               "the daemon's log line in containerd's log")
    assert f"runtime=io.containerd.pyshim.v2 id={cid}" not in be2e.containerd.log_path.read_text(errors="replace")


def test_detached_container_exec_and_removal(be2e):
    cid = be2e.new_id()
    be2e.ctr("run", "-d", "--runtime", RUNTIME, be2e.image, cid, "sleep", "600", check=True)
    daemon = daemon_of(be2e, cid)
    assert BINARY in Path(f"/proc/{daemon}/cmdline").read_bytes().decode(errors="replace")
    done = be2e.ctr("task", "exec", "--exec-id", "x1", cid, "sh", "-c", "echo from exec; exit 4")
    assert (done.returncode, done.stdout) == (4, "from exec\n"), done
    remove(be2e, cid)
    wait_gone(lambda: os.path.exists(f"/proc/{daemon}"), 20, "the daemon to exit after its last task")


def test_its_group_annotation_shares_one_daemon_and_pyshims_does_not(be2e):
    group = f"g-{be2e.new_id()}"
    first, second, other = be2e.new_id("a"), be2e.new_id("b"), be2e.new_id("pyshim-group")
    for cid, key in ((first, RUNTIME), (second, RUNTIME), (other, "io.containerd.pyshim.v2")):
        be2e.ctr("run", "-d", "--runtime", RUNTIME, "--annotation", f"{key}.group={group}",
                 be2e.image, cid, "sleep", "600", check=True)
    address = (be2e.bundle_dir(first) / "address").read_text()
    assert (be2e.bundle_dir(second) / "address").read_text() == address
    assert (be2e.bundle_dir(other) / "address").read_text() != address
    shared = daemon_of(be2e, first)
    assert [pid for pid, cwd in daemons(be2e).items() if cwd == str(be2e.bundle_dir(second))] == []
    assert daemon_of(be2e, other) != shared
    for cid in (first, second, other):
        assert task_status(be2e, cid) == "RUNNING"
        r = be2e.ctr("task", "exec", "--exec-id", "env", cid, "cat", "/proc/1/environ")
        assert "PYSHIMTEST_HANDLER=added" in r.stdout.split("\0"), r

    remove(be2e, first)
    assert task_status(be2e, second) == "RUNNING" and os.path.exists(f"/proc/{shared}")
    remove(be2e, second)
    remove(be2e, other)
    wait_gone(lambda: os.path.exists(f"/proc/{shared}"), 20, "the shared daemon to exit after its last task")


def test_pyshim_and_the_handler_binary_keep_their_own_identity_side_by_side(be2e):
    """Each binary's daemons come from its own zygote (keyed by the RuntimeIdentity): a
    pyshim container never gets the test binary's default handler, nor the reverse."""
    def env_of(runtime: str) -> list[str]:
        r = be2e.ctr("run", "--rm", "--runtime", runtime, be2e.image, be2e.new_id(), "env")
        assert r.returncode == 0, r
        return r.stdout.splitlines()

    for _ in range(2):  # the second round is served by warm zygotes
        assert "PYSHIMTEST_HANDLER=added" not in env_of("io.containerd.pyshim.v2")
        assert "PYSHIMTEST_HANDLER=added" in env_of(RUNTIME)
    # one zygote key (socket and its .lock) per binary
    locks = list(Path(be2e.containerd.env()["PYSHIM_ZYGOTE_DIR"]).glob("pyshim-zygote-*.lock"))
    assert len(locks) == 2, locks


def test_a_killed_daemon_is_cleaned_up_by_the_binarys_delete(be2e):
    cid = be2e.new_id()
    be2e.ctr("run", "-d", "--runtime", RUNTIME, be2e.image, cid, "sleep", "600", check=True)
    bundle = be2e.bundle_dir(cid)
    container_pid = int((bundle / "init.pid").read_text())
    os.kill(daemon_of(be2e, cid), signal.SIGKILL)
    # containerd runs `containerd-shim-pyshimtest-v2 delete`: runc delete --force, unmount
    wait_until(lambda: task_status(be2e, cid), 20, f"task {cid} to be STOPPED or gone",
               until=lambda s: s in ("STOPPED", ""))
    wait_gone(lambda: os.path.exists(f"/proc/{container_pid}"), 20, "delete to kill the container")
    wait_gone(lambda: mounts_of(bundle), 20, "delete to unmount the rootfs")
    be2e.ctr("task", "rm", cid)
    be2e.ctr("container", "rm", cid, check=True)
