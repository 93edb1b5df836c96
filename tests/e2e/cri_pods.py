"""Pods through the CRI for the e2e tests: a PrivateContainerd started with the CRI plugin and
both test images known to it, and the steps of a kubelet (run a pod sandbox, start a container
in it, wait for its exit, remove the pod) over tests/e2e/cri_client.py.

Shared by tests/e2e (test_cri.py and the handler/dense tests) and tests/systemd, whose
conftest modules differ, hence not in a test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from containerd import IMAGE_REF, PrivateContainerd, image_cache_dir
from cri_client import CriClient
from pause_image import PAUSE_IMAGE_REF, build_pause_image
from shim.api.runtime import v1 as cri_v1

CRI_NAMESPACE = "k8s.io"
HANDLER = "pyshim"


@contextlib.contextmanager
def running_cri(c: PrivateContainerd, busybox_image: Path, timeout: float = 30.0):
    """Start a PrivateContainerd configured with the CRI plugin, with both images known to the
    CRI; on leaving, close it and fail on anything left behind."""
    pause = build_pause_image(image_cache_dir())
    # The pods' cgroup parent: a name close() treats as one of ours (cgroups are killed and
    # removed by namespace name).
    c.cgroup_parent = f"pyshim-{c.token}-cri-pods"
    c.namespaces.append(c.cgroup_parent)
    try:
        c.start(timeout)
        c.import_image(busybox_image, CRI_NAMESPACE)
        c.ctr("images", "import", "--no-unpack", str(pause), namespace=CRI_NAMESPACE,
              timeout=120, check=True)
        asyncio.run(wait_for_images(c, [IMAGE_REF, PAUSE_IMAGE_REF]))
    except BaseException:
        print(c.log_tail(60))
        c.close()
        raise
    yield c
    log_tail = c.log_tail(40)
    leftovers = c.close()
    assert not leftovers, "left behind:\n  " + "\n  ".join(leftovers) + f"\n{log_tail}"


async def wait_for_images(c: PrivateContainerd, refs: list[str], timeout: float = 20) -> None:
    """The CRI plugin learns of imported images from containerd's events: wait for it."""
    async with CriClient(c.address) as client:
        deadline = time.monotonic() + timeout
        for ref in refs:
            while True:
                reply = await client.image(
                    "ImageStatus", cri_v1.ImageStatusRequest(image=cri_v1.ImageSpec(image=ref)))
                if reply.image is not None and reply.image.id:
                    break
                assert time.monotonic() < deadline, f"the CRI plugin does not know {ref}"
                await asyncio.sleep(0.1)


async def run_pod(client: CriClient, config: cri_v1.PodSandboxConfig, handler: str = HANDLER) -> str:
    reply = await client.runtime("RunPodSandbox",
                                 cri_v1.RunPodSandboxRequest(config=config, runtime_handler=handler))
    return reply.pod_sandbox_id


async def start_container(client: CriClient, pod: str, config: cri_v1.PodSandboxConfig,
                           container: cri_v1.ContainerConfig) -> str:
    created = await client.runtime("CreateContainer", cri_v1.CreateContainerRequest(
        pod_sandbox_id=pod, config=container, sandbox_config=config))
    await client.runtime("StartContainer",
                         cri_v1.StartContainerRequest(container_id=created.container_id))
    return created.container_id


async def container_status(client: CriClient, cid: str) -> cri_v1.ContainerStatus:
    reply = await client.runtime("ContainerStatus", cri_v1.ContainerStatusRequest(container_id=cid))
    return reply.status


async def wait_exited(client: CriClient, cid: str, timeout: float = 20) -> cri_v1.ContainerStatus:
    deadline = time.monotonic() + timeout
    while (status := await container_status(client, cid)).state != cri_v1.ContainerState.CONTAINER_EXITED:
        assert time.monotonic() < deadline, f"{cid} did not exit: {status}"
        await asyncio.sleep(0.1)
    return status


async def remove_pod(client: CriClient, pod: str) -> None:
    await client.runtime("StopPodSandbox", cri_v1.StopPodSandboxRequest(pod_sandbox_id=pod))
    await client.runtime("RemovePodSandbox", cri_v1.RemovePodSandboxRequest(pod_sandbox_id=pod))


