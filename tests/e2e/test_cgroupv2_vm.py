"""The cgroup v2 tests (tests/v2) in a qemu guest that mounts only cgroup2, as one test here,
and the systemd-node tests (tests/systemd) in one booted with systemd, as another.

This machine mounts cgroup v1, so pyshim's cgroup v2 code (shim/framework/cgroups.py's CgroupV2: Stats
as io.containerd.cgroups.v2.Metrics, OOM kills from memory.events) can only run for real in a
VM.  hack/vm/run-in-vm boots one (the host's root read-only under a tmpfs overlay, this checkout
read-write, the checkout's .venv) and this test runs pytest over tests/v2 in it: one boot for
the whole subset, since under emulation (TCG, where KVM cannot run a stock kernel) every boot,
Python start and container costs seconds.  The inner pytest's output is shown when it fails.

tests/systemd needs systemd as the guest's PID 1 (PYSHIM_VM_INIT=systemd: the host's own
systemd and D-Bus, booted into a target that runs only the tests; see hack/vm/init).

If the VM cannot run (no qemu, no kernel) these tests fail; PYSHIM_SKIP_V2VM=1 skips them, saying so.
On a cgroup v2 host tests/v2 runs directly in this session instead, and this test is skipped.

Environment (besides hack/vm/run-in-vm's PYSHIM_VM_*):
  PYSHIM_SKIP_V2VM=1     skip them
  PYSHIM_V2_NODES        containerd/runtime pairs inside (tests/v2/conftest.py; default all)
  PYSHIM_SYSTEMD_NODES   containerd/runtime pairs inside (tests/systemd/conftest.py; default all)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from containerd import REPO_ROOT

from shim.framework import cgroups

VM_TIMEOUT = int(os.environ.get("PYSHIM_VM_TIMEOUT", "900"))


def _run_in_vm(folder: str, init: str) -> None:
    """pytest over tests/<folder> inside a guest (hack/vm/run-in-vm, PYSHIM_VM_INIT=init); its
    output is shown when it fails, its summary line when it passes."""
    if os.environ.get("PYSHIM_SKIP_V2VM") == "1":
        pytest.skip(f"PYSHIM_SKIP_V2VM=1: tests/{folder} did not run in a VM")
    # The guest gets our environment; pytest's own variables would confuse the inner pytest.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYSHIM_VM_TIMEOUT"] = str(VM_TIMEOUT)
    env["PYSHIM_VM_INIT"] = init
    # The venv's python by path: a PATH wrapper (pyenv's shims) takes ~20 s under emulation.
    inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
             "-v", "-rfEs", "--durations=5", f"tests/{folder}"]
    r = subprocess.run([str(REPO_ROOT / "hack" / "vm" / "run-in-vm"), *inner], cwd=REPO_ROOT, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=VM_TIMEOUT + 60)
    output = f"--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"
    assert r.returncode == 0, f"tests/{folder} in the {init} VM exited {r.returncode}\n{output}"
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert re.search(r"\b[1-9]\d* passed\b", summary) and not re.search(r"skipped|failed|error", summary), output
    print(f"tests/{folder} in the {init} VM: {summary}\n{r.stderr.strip().splitlines()[-1]}")


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_cgroup_v2_subset_passes_in_a_vm():
    if cgroups.is_unified():
        pytest.skip("this host is cgroup v2: tests/v2 runs directly in this session")
    _run_in_vm("v2", "plain")


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_systemd_node_subset_passes_in_a_systemd_vm():
    """tests/systemd: containerd's CRI with SystemdCgroup = true, pyshim beside runc-v2, on a
    guest booted with systemd and D-Bus (where this host is such a node, it runs directly)."""
    if Path("/proc/1/comm").read_text().strip() == "systemd" and cgroups.is_unified():
        pytest.skip("this host is a systemd cgroup v2 node: tests/systemd runs directly in this session")
    _run_in_vm("systemd", "systemd")
