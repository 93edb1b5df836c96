"""Dense mode through Kubernetes' door: a CRI runtime handler whose options table has
ContainersPerDaemon = 3, on containerd 1.6, 1.7 and 2.1.

The CRI passes a non-runc runtime's options to the shim as runtimeoptions.v1 TOML (a ConfigPath
file in 1.6, the ConfigBody in 1.7 and 2.1: CriConfig), and puts a pod's containers into its
sandbox's group: a pod shares a daemon with other pods while its seat has room, is never
split, and the next pod opens the next seat once that daemon is full.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import pytest

from conftest import VERSION_IDS, installed_target
from containerd import CriConfig, PrivateContainerd
from cri_client import CriClient
from pause_image import PAUSE_IMAGE_REF
from shim.api.runtime import v1 as cri_v1
from cri_pods import running_cri
from test_cri import (
    CRI_NAMESPACE,
    _container_config,
    _pod_config,
    _remove_pod,
    _run_pod,
    _start_container,
    _wait_gone,
)
from test_debug import ls_json

DENSE = "pyshim-dense"
PER_DAEMON = 3


@pytest.fixture(scope="module", params=VERSION_IDS)
def cri(request: pytest.FixtureRequest, busybox_image: Path):
    target = installed_target(request.param)
    c = PrivateContainerd(target, cri=CriConfig(sandbox_image=PAUSE_IMAGE_REF))
    c.cri = dataclasses.replace(c.cri, extra_handlers={DENSE: {"ContainersPerDaemon": PER_DAEMON}})
    with running_cri(c, busybox_image):
        yield c


def _seats(c: PrivateContainerd) -> dict[int, set[str]]:
    """This containerd's pyshim daemons (pid) -> the CRI containers each serves (`pyshim ls`;
    the sandbox's pause container has the pod's id)."""
    ours = c.pyshim_daemons()
    return {d["pid"]: {t["id"] for t in d["tasks"]} for d in ls_json(CRI_NAMESPACE) if d["pid"] in ours}


async def _pod_with(client: CriClient, c: PrivateContainerd, name: str, containers: int) -> list[str]:
    """A dense pod with `containers` sleepers: [sandbox id, container ids...]."""
    config = _pod_config(c, name)
    pod = await _run_pod(client, config, DENSE)
    ids = [pod]
    for n in range(containers):
        ids.append(await _start_container(client, pod, config, _container_config(f"{name}-c{n}", "sleep", "600")))
    return ids


async def _tear_down(client: CriClient, pod: list[str]) -> None:
    """As the kubelet ends a pod: its containers, then the sandbox."""
    for cid in pod[1:]:
        await client.runtime("StopContainer", cri_v1.StopContainerRequest(container_id=cid, timeout=1))
        await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=cid))
    await _remove_pod(client, pod[0])


async def test_pods_are_packed_whole_into_dense_daemons(cri):
    async with CriClient(cri.address) as client:
        pods = []
        try:
            # Seat 0: pod a (2 containers counting the sandbox), then pod b, whose sandbox
            # finds a seat with room and whose containers follow it past N (a pod is never
            # split); pod c finds seat 0 full and opens seat 1.
            for name, containers in (("a", 1), ("b", 2), ("c", 1)):
                pods.append(await _pod_with(client, cri, name, containers))
            a, b, c = pods
            seats = _seats(cri)
            assert sorted(map(sorted, seats.values())) == sorted([sorted(a + b), sorted(c)]), seats
            (shared,) = [pid for pid, members in seats.items() if a[0] in members]
            (alone,) = [pid for pid, members in seats.items() if c[0] in members]
            for cid in a[1:] + b[1:] + c[1:]:
                status = (await client.runtime("ContainerStatus",
                                               cri_v1.ContainerStatusRequest(container_id=cid))).status
                assert status.state == cri_v1.ContainerState.CONTAINER_RUNNING, status
            r = await client.runtime("ExecSync", cri_v1.ExecSyncRequest(
                container_id=b[2], cmd=["sh", "-c", "echo $((6*7))"], timeout=30))
            assert (r.stdout, r.exit_code) == (b"42\n", 0), r

            # Pod a goes: its daemon stays for pod b, and serves b alone.
            await _tear_down(client, pods.pop(0))
            assert _seats(cri) == {shared: set(b), alone: set(c)}
        except BaseException:
            print(f"--- containerd log tail ---\n{cri.log_tail(200)}")
            for pod in pods:  # best effort: the body's error is the one to see
                with contextlib.suppress(Exception):
                    await _tear_down(client, pod)
            raise
        for pod in pods:
            await _tear_down(client, pod)
        # Every pod gone: so is every daemon (and its socket: running_cri's close checks).
        assert await _wait_gone([shared, alone]) == [], "a dense daemon outlived its pods"
        assert cri.pyshim_daemons() == {}
