"""Fixtures for the cgroup v2 tests: a private containerd per version, as tests/e2e has.

These tests need a host whose /sys/fs/cgroup is cgroup2 (unified only).  Elsewhere nothing here
is collected: on cgroup v1 machines tests/e2e/test_cgroupv2_vm.py runs this folder inside a
qemu guest that mounts only cgroup2 (hack/vm/run-in-vm) and fails when it does not pass.

They reuse tests/e2e's helpers (PrivateContainerd, the busybox image, the ctr and gRPC helpers
of its tests); the `e2e` fixture here has the same shape as tests/e2e's.

Each node (tests/e2e/guest_nodes.py) is a containerd version and the OCI runtime it runs, as
the `runc` on its PATH that containerd's runc shim and pyshim both call by default: 2.1 with
runc 1.3, 1.7 with Debian 12's runc 1.1, 1.6 with crun.

Environment:
  PYSHIM_V2_NODES   comma-separated subset of the node ids (default: all of NODES; each costs
                    about a minute under emulation)
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from containerd import IMAGE_REF, PrivateContainerd, build_busybox_image, image_cache_dir  # noqa: E402
from guest_nodes import node_containerd, node_ids  # noqa: E402

from shim.framework import cgroups  # noqa: E402

if not cgroups.is_unified():
    collect_ignore_glob = ["test_*.py"]

NODE_IDS = node_ids("PYSHIM_V2_NODES")


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    return build_busybox_image(image_cache_dir())


@pytest.fixture(scope="session", params=NODE_IDS)
def containerd(request: pytest.FixtureRequest, busybox_image: Path):
    c = node_containerd(request.param, "pyshim-v2-")
    c.image_archive = busybox_image
    try:
        c.start(timeout=120)
    except BaseException:
        c.close()
        raise
    yield c
    log_tail = c.log_tail(40)
    leftovers = c.close()
    if leftovers:
        pytest.fail(f"node {request.param}: left behind:\n  " + "\n  ".join(leftovers)
                    + f"\ncontainerd log tail:\n{log_tail}")


@dataclasses.dataclass
class E2E:
    """Per-test handle: a fresh namespace with the test image on the session's containerd."""

    containerd: PrivateContainerd
    namespace: str
    image: str = IMAGE_REF
    _ids: itertools.count = dataclasses.field(default_factory=itertools.count)

    def new_id(self, prefix: str = "c") -> str:
        id = f"{prefix}-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self.containerd.note_task(self.namespace, id)
        return id

    def ctr(self, *args: str, **kw):
        kw.setdefault("namespace", self.namespace)
        kw.setdefault("timeout", 180)
        return self.containerd.ctr(*args, **kw)

    @property
    def address(self) -> str:
        return self.containerd.address

    @property
    def state(self) -> Path:
        return self.containerd.state


@pytest.fixture(scope="session")
def session_e2e(containerd: PrivateContainerd) -> E2E:
    """One namespace per containerd: importing the image costs seconds under emulation, and
    every test uses its own container ids.  Tasks left behind are killed when the session's
    containerd is closed (tests here may share a container: see test_cgroupv2.py)."""
    return E2E(containerd, containerd.new_namespace("v2", image=containerd.image_archive))


@pytest.fixture
def e2e(session_e2e: E2E) -> E2E:
    return session_e2e
