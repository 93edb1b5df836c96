"""The nodes the guests' tests run on (tests/v2, tests/systemd): a containerd version with
the OCI runtime its containers get (the `runc` on its PATH, which is also what handlers name
by BinaryName).

crun sits with containerd 1.6: Debian 12's crun 1.8 refuses the OCI spec 1.1+ that containerd
1.7 and 2.x write ("unknown version specified"), under runc-v2 as under pyshim.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from containerd import TARGETS, PrivateContainerd

#: node id -> (containerd version, OCI runtime binary)
NODES: dict[str, tuple[str, Path]] = {
    "2.1-runc1.3": ("2.1", TARGETS["2.1"].runc),
    "1.7-runc1.1": ("1.7", TARGETS["1.7"].runc),
    "1.6-crun": ("1.6", Path("/usr/bin/crun")),
}


def node_ids(variable: str) -> list[str]:
    """The node ids an environment variable picks (comma-separated), all by default."""
    return [n.strip() for n in os.environ.get(variable, ",".join(NODES)).split(",") if n.strip()]


def node_containerd(node_id: str, prefix: str, **kwargs) -> PrivateContainerd:
    """A PrivateContainerd (not started) for a node, in a fresh directory under /tmp (the
    guest's tmpfs: overlayfs snapshots need a non-overlay dir, and no stale private containerds
    of other runs are swept there); fails the test when the node's binaries are missing."""
    version, runtime = NODES[node_id]
    target = TARGETS[version]
    missing = target.missing() + ([] if runtime.exists() else [str(runtime)])
    if missing:
        pytest.fail(f"node {node_id}: not installed ({', '.join(missing)}); run hack/test")
    return PrivateContainerd(target, base_dir=Path(tempfile.mkdtemp(prefix=prefix)), runc=runtime, **kwargs)
