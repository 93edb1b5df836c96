"""The cgroup v2 tests (tests/v2) in a qemu guest that mounts only cgroup2, as one test here.

This machine mounts cgroup v1, so pyshim's cgroup v2 code (shim/framework/cgroups.py's CgroupV2: Stats
as io.containerd.cgroups.v2.Metrics, OOM kills from memory.events) can only run for real in a
VM.  hack/vm/run-in-vm boots one (the host's root read-only under a tmpfs overlay, this checkout
read-write, the checkout's .venv) and this test runs pytest over tests/v2 in it: one boot for
the whole subset, since under emulation (TCG, where KVM cannot run a stock kernel) every boot,
Python start and container costs seconds.  The inner pytest's output is shown when it fails.

If the VM cannot run (no qemu, no kernel) this test fails; PYSHIM_SKIP_V2VM=1 skips it, saying so.
On a cgroup v2 host tests/v2 runs directly in this session instead, and this test is skipped.

Environment (besides hack/vm/run-in-vm's PYSHIM_VM_*):
  PYSHIM_SKIP_V2VM=1   skip it
  PYSHIM_V2_VERSIONS   containerd versions inside (tests/v2/conftest.py; default 2.1)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from containerd import REPO_ROOT

from shim.framework import cgroups

VM_TIMEOUT = int(os.environ.get("PYSHIM_VM_TIMEOUT", "900"))


@pytest.mark.timeout(VM_TIMEOUT + 120)
def test_cgroup_v2_subset_passes_in_a_vm():
    if os.environ.get("PYSHIM_SKIP_V2VM") == "1":
        pytest.skip("PYSHIM_SKIP_V2VM=1: the cgroup v2 tests (tests/v2) did not run in a VM")
    if cgroups.is_unified():
        pytest.skip("this host is cgroup v2: tests/v2 runs directly in this session")
    # The guest gets our environment; pytest's own variables would confuse the inner pytest.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYSHIM_VM_TIMEOUT"] = str(VM_TIMEOUT)
    # The venv's python by path: a PATH wrapper (pyenv's shims) takes ~20 s under emulation.
    inner = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
             "-v", "-rfEs", "--durations=5", "tests/v2"]
    r = subprocess.run([str(REPO_ROOT / "hack" / "vm" / "run-in-vm"), *inner], cwd=REPO_ROOT, env=env,
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=VM_TIMEOUT + 60)
    output = f"--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr}"
    assert r.returncode == 0, f"tests/v2 in the cgroup v2 VM exited {r.returncode}\n{output}"
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert re.search(r"\b[1-9]\d* passed\b", summary) and not re.search(r"skipped|failed|error", summary), output
    print(f"tests/v2 in the cgroup v2 VM: {summary}\n{r.stderr.strip().splitlines()[-1]}")
