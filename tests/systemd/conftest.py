"""Fixtures for the systemd-node tests: containerd with CRI and SystemdCgroup = true, the
`pyshim` and `runc` (containerd-shim-runc-v2) runtime handlers side by side.

These tests need what a Kubernetes node with the systemd cgroup driver has: systemd as PID 1
with D-Bus, and only cgroup2.  Elsewhere nothing here is collected; on this project's cgroup
v1 machines tests/e2e/test_systemd_vm.py runs this folder in a qemu guest booted with the
host's systemd (hack/vm/run-in-vm with PYSHIM_VM_INIT=systemd).

Each node is a containerd version and the OCI runtime its handlers name by BinaryName: 1.7
with Debian 12's runc 1.1, 2.1 with runc 1.3, and 1.7 with crun (Debian 12's crun 1.8 refuses
containerd 2.x's OCI spec 1.2, "unknown version specified", under runc-v2 as under pyshim).

Environment:
  PYSHIM_SYSTEMD_NODES   comma-separated subset of the node ids (default: all of NODES)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from containerd import CriConfig, build_busybox_image, image_cache_dir  # noqa: E402
from cri_pods import running_cri  # noqa: E402
from guest_nodes import node_containerd, node_ids  # noqa: E402
from pause_image import PAUSE_IMAGE_REF  # noqa: E402

from shim.framework import cgroups  # noqa: E402


def systemd_node() -> bool:
    """systemd is PID 1 with its system bus, on a cgroup2-only hierarchy."""
    try:
        comm = Path("/proc/1/comm").read_text().strip()
    except OSError:
        return False
    return comm == "systemd" and cgroups.is_unified() and os.path.exists("/run/dbus/system_bus_socket")


if not systemd_node():
    collect_ignore_glob = ["test_*.py"]

NODE_IDS = node_ids("PYSHIM_SYSTEMD_NODES")
PYSHIM_HANDLER = "pyshim"
RUNC_HANDLER = "runc"


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    return build_busybox_image(image_cache_dir())


@pytest.fixture(scope="session", params=NODE_IDS)
def node(request: pytest.FixtureRequest, busybox_image: Path):
    """A started PrivateContainerd with CRI, both handlers on the systemd cgroup driver."""
    c = node_containerd(request.param, "pyshim-sd-", cri=CriConfig(
        sandbox_image=PAUSE_IMAGE_REF, handler=PYSHIM_HANDLER, runc_handler=RUNC_HANDLER, systemd_cgroup=True))
    with running_cri(c, busybox_image, timeout=120):
        yield c
