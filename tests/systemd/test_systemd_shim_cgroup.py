"""ShimCgroup on a systemd node: each shim moves itself into the cgroup the runtime options
name before it answers containerd, pyshim as runc-v2 does, and its containers still land in
their scopes.

The cgroup is one the test makes below its own service's (which, like containerd.service,
has Delegate=yes): a slice's cgroup would refuse processes under cgroup v2's no-internal-
processes rule, for runc-v2 as for pyshim.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from conftest import NODE_IDS, PYSHIM_HANDLER, RUNC_HANDLER
from containerd import CriConfig
from cri_client import CriClient
from cri_pods import running_cri
from guest_nodes import node_containerd
from pause_image import PAUSE_IMAGE_REF
from test_systemd_node import (
    CGROUP_ROOT,
    SLOW,
    Pod,
    assert_same,
    both,
    container_pid,
    ppid,
    proc_cgroup,
    sandbox_pid,
    slice_path,
)

pytestmark = pytest.mark.timeout(SLOW)


@pytest.fixture(scope="module")
def placed(busybox_image: Path):
    """(a containerd whose handlers both have ShimCgroup, that cgroup's path) on the first node."""
    shims = f"{proc_cgroup(os.getpid())}/shims-{uuid.uuid4().hex[:8]}"
    directory = CGROUP_ROOT / shims.lstrip("/")
    directory.mkdir()
    try:
        c = node_containerd(NODE_IDS[0], "pyshim-sd-", cri=CriConfig(
            sandbox_image=PAUSE_IMAGE_REF, handler=PYSHIM_HANDLER, runc_handler=RUNC_HANDLER,
            systemd_cgroup=True, shim_cgroup=shims))
        with running_cri(c, busybox_image, timeout=120):
            yield c, shims
    finally:
        directory.rmdir()  # fails (and so the test) if a shim were still in it


async def in_shim_cgroup(client: CriClient, pod: Pod) -> dict:
    pause = await sandbox_pid(client, pod.id)
    shim = ppid(pause)
    cid = await pod.container(client, "app", "sleep", "600")
    pid = await container_pid(client, cid)
    return {
        "shim cgroup": proc_cgroup(shim),
        "shim serves the container too": ppid(pid) == shim,
        "shim oom_score_adj above containerd's": int(Path(f"/proc/{shim}/oom_score_adj").read_text())
        - int(Path(f"/proc/{pod.node.proc.pid}/oom_score_adj").read_text()),
        "container cgroup": proc_cgroup(pid),
    }


async def test_shims_join_the_shim_cgroup_like_runc_v2(placed):
    node, shims = placed
    facts = assert_same(await both(node, in_shim_cgroup))
    assert facts["shim cgroup"] == shims, facts
    assert facts["shim serves the container too"], facts
    assert facts["container cgroup"].startswith(slice_path("kubepods-besteffort-pod<uid>.slice") + "/cri-containerd-<app>.scope"), facts
