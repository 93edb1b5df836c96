"""Kubernetes' view of pyshim: containerd's CRI plugin with a `pyshim` runtime handler
(a RuntimeClass), driven by a real CRI v1 client (tests/e2e/cri_client.py) over containerd's
socket, and the grouping of a pod's containers into one shim.

Each containerd version gets its own private containerd with the CRI plugin enabled
(CriConfig in containerd.py); the pod sandbox is tests/e2e/pause.c in a locally built image.
Pods use the host network (no CNI plugin is installed) and a cgroup parent named after the
instance, so that its cleanup finds their cgroups.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from conftest import VERSION_IDS, installed_target
from containerd import IMAGE_REF, PYSHIM_RUNTIME, CriConfig, PrivateContainerd, image_cache_dir
from cri_client import CriClient
from cri_pods import CRI_NAMESPACE, HANDLER, running_cri
from cri_pods import container_status as _status
from cri_pods import remove_pod as _remove_pod
from cri_pods import run_pod as _run_pod
from cri_pods import start_container as _start_container
from cri_pods import wait_exited as _wait_exited
from pause_image import PAUSE_IMAGE_REF
from shim.api.runtime import v1 as cri_v1
from test_lifecycle import _wait_stopped, pyshim_daemons, task_status
from waiting import async_wait_until, not_

@pytest.fixture(scope="module", params=VERSION_IDS)
def cri(request: pytest.FixtureRequest, busybox_image: Path):
    """A started PrivateContainerd with the CRI plugin, both images known to the CRI."""
    target = installed_target(request.param)
    c = PrivateContainerd(target, cri=CriConfig(sandbox_image=PAUSE_IMAGE_REF, handler=HANDLER))
    with running_cri(c, busybox_image):
        yield c


def _daemons(c: PrivateContainerd) -> list[int]:
    return list(c.pyshim_daemons())


def _pod_config(c: PrivateContainerd, name: str) -> cri_v1.PodSandboxConfig:
    uid = uuid.uuid4().hex
    logs = c.dir / "pods" / uid
    logs.mkdir(parents=True)
    namespaces = cri_v1.NamespaceOption(
        network=cri_v1.NamespaceMode.NODE, pid=cri_v1.NamespaceMode.POD, ipc=cri_v1.NamespaceMode.POD
    )
    return cri_v1.PodSandboxConfig(
        metadata=cri_v1.PodSandboxMetadata(name=name, uid=uid, namespace="e2e"),
        log_directory=str(logs),
        labels={"app": name},
        linux=cri_v1.LinuxPodSandboxConfig(
            cgroup_parent=f"/{c.cgroup_parent}",
            security_context=cri_v1.LinuxSandboxSecurityContext(namespace_options=namespaces),
        ),
    )


def _container_config(name: str, *command: str, memory: int = 0) -> cri_v1.ContainerConfig:
    resources = cri_v1.LinuxContainerResources(
        memory_limit_in_bytes=memory, memory_swap_limit_in_bytes=memory
    )
    return cri_v1.ContainerConfig(
        metadata=cri_v1.ContainerMetadata(name=name),
        image=cri_v1.ImageSpec(image=IMAGE_REF),
        command=list(command),
        log_path=f"{name}.log",
        linux=cri_v1.LinuxContainerConfig(resources=resources),
    )


@contextlib.asynccontextmanager
async def _pod(client: CriClient, c: PrivateContainerd, name: str, handler: str = HANDLER,
               config: cri_v1.PodSandboxConfig | None = None):
    """A running pod sandbox (id, config) of a runtime handler, stopped and removed
    afterwards. When the body fails, containerd's log (with the shim's lines) is printed and
    the removal is best effort: the body's error is the one to see."""
    config = config or _pod_config(c, name)
    pod = await _run_pod(client, config, handler)
    try:
        yield pod, config
    except BaseException:
        print(f"--- containerd log tail ---\n{c.log_tail(200)}")
        with contextlib.suppress(Exception):
            await _remove_pod(client, pod)
        raise
    await _remove_pod(client, pod)


async def _wait_gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return alive


async def _wait_cmdline(pid: int, cmdline: bytes, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/cmdline").read_bytes() != cmdline:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _state(pid: int) -> str:
    """The process state letter of pid ("Z" for a zombie), "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is pid."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append((int(entry), fields[0]))
    return out


async def test_pod_runs_on_pyshim_with_one_shim_for_its_containers(cri):
    async with CriClient(cri.address) as client:
        version = await client.runtime("Version", cri_v1.VersionRequest(version="v1"))
        assert version.runtime_api_version == "v1"
        assert _daemons(cri) == []

        async with _pod(client, cri, "grouped") as (pod, config):
            sandbox = await client.runtime("PodSandboxStatus", cri_v1.PodSandboxStatusRequest(
                pod_sandbox_id=pod, verbose=True))
            assert sandbox.status.state == cri_v1.PodSandboxState.SANDBOX_READY
            assert sandbox.status.runtime_handler == HANDLER
            info = json.loads(sandbox.info["info"])
            pause_pid = info["pid"]
            # The sandbox is the pause program, run by pyshim (`runc start` returns before
            # runc's init has exec'd it).
            assert await _wait_cmdline(pause_pid, b"/pause\0")
            assert info["runtimeType"] == PYSHIM_RUNTIME
            daemons = _daemons(cri)
            assert len(daemons) == 1, daemons
            # The handler's options reached runc: its state is under the configured Root.
            assert (cri.cri_runc_root / CRI_NAMESPACE / pod).is_dir()

            cids = [
                await _start_container(client, pod, config, _container_config(f"c{i}", "sleep", "600"))
                for i in range(3)
            ]
            # A pod of 3 containers (and its pause container): exactly one pyshim process.
            assert _daemons(cri) == daemons
            # containerd 2.x attaches a pod's containers to its sandbox's shim without running
            # `start` for them, as the shim announces Task API version 3 there (runc-v2 does);
            # 1.x runs `start`, which finds the pod's daemon by the sandbox id.
            for cid in cids:
                bundle = cri.bundle_dir(CRI_NAMESPACE, cid)
                if cri.target.id.startswith("2"):
                    assert not (bundle / "address").exists() and (bundle / "bootstrap.json").exists(), cid
                else:
                    assert (bundle / "address").exists(), cid
            for cid in cids:
                status = await _status(client, cid)
                assert status.state == cri_v1.ContainerState.CONTAINER_RUNNING, status
                assert status.started_at > 0

            first = cids[0]
            r = await client.runtime("ExecSync", cri_v1.ExecSyncRequest(
                container_id=first, cmd=["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30))
            assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 3)
            # An orphan in the pod's PID namespace goes to the pause process, which reaps it.
            r = await client.runtime("ExecSync", cri_v1.ExecSyncRequest(
                container_id=first, cmd=["sh", "-c", "(sleep 0.2 &); exit 0"], timeout=30))
            assert r.exit_code == 0, r
            # The orphan exits after 0.2 s (later on a busy machine) and pause reaps it: no
            # child of pause left, in particular no zombie.
            await async_wait_until(lambda: _children(pause_pid), 20, "pause to reap the orphan", until=not_)

            stats = (await client.runtime(
                "ContainerStats", cri_v1.ContainerStatsRequest(container_id=first))).stats
            assert stats.attributes.id == first
            assert stats.memory.working_set_bytes.value > 0, stats
            assert stats.cpu.usage_core_nano_seconds is not None and stats.cpu.timestamp > 0, stats

            # Stop and remove one container: the shim keeps serving the others.
            await client.runtime("StopContainer", cri_v1.StopContainerRequest(container_id=first, timeout=5))
            status = await _wait_exited(client, first)
            assert (status.exit_code, status.reason) == (143, "Error"), status
            await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=first))
            listed = await client.runtime("ListContainers", cri_v1.ListContainersRequest(
                filter=cri_v1.ContainerFilter(pod_sandbox_id=pod)))
            assert sorted(c.id for c in listed.containers) == sorted(cids[1:])
            assert _daemons(cri) == daemons
            r = await client.runtime("ExecSync", cri_v1.ExecSyncRequest(
                container_id=cids[1], cmd=["echo", "still here"], timeout=30))
            assert r.stdout == b"still here\n"
        # The group's last task is gone: so is its shim, and its socket.
        assert await _wait_gone(daemons) == [], "the pod's shim outlived the pod"
        assert not (cri.cri_runc_root / CRI_NAMESPACE / pod).exists()


async def test_shared_pid_namespace_child_holding_stdout_does_not_hang_the_pod(cri):
    """A container in the pod's pid namespace (shareProcessNamespace) whose init forks a
    long-lived child that keeps stdout open (any forking server does). When init is killed
    at StopContainer, nothing kills the child: the kernel only does that for a private pid
    namespace. runc-v2 runs `runc kill --all` on init's exit then; so must we, or the output
    never closes and the pod hangs at StopPodSandbox."""
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "shared-pid") as (pod, config):
            # SIGTERM at StopContainer ends init (sh); its background child lives on.
            container = _container_config(
                "forker", "sh", "-c", "sleep 1000 & while :; do sleep 1; done")
            container.linux.security_context = cri_v1.LinuxContainerSecurityContext(
                namespace_options=cri_v1.NamespaceOption(pid=cri_v1.NamespaceMode.POD))
            cid = await _start_container(client, pod, config, container)
            verbose = await client.runtime("ContainerStatus", cri_v1.ContainerStatusRequest(
                container_id=cid, verbose=True))
            init_pid = json.loads(verbose.info["info"])["pid"]
            deadline = time.monotonic() + 10
            while not (forked := [p for p, _ in _children(init_pid) if
                                  Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x001000\x00"]):
                assert time.monotonic() < deadline, "the container's child did not start"
                await asyncio.sleep(0.05)

            started = time.monotonic()
            async with asyncio.timeout(30):
                await client.runtime("StopContainer", cri_v1.StopContainerRequest(container_id=cid, timeout=2))
            status = await _wait_exited(client, cid)
            assert (status.exit_code, status.reason) == (143, "Error"), status
            # Killed with init, before its exit was published (its output closed with it), not
            # 2 s later at `runc delete`, nor when the pod goes.
            assert [p for p in forked if _state(p) not in ("", "Z")] == [], "init's child outlived it"
            assert f"{cid}: output still open" not in cri.log_tail(400)
            assert await _wait_gone(forked, 10) == []
            assert time.monotonic() - started < 20
            async with asyncio.timeout(30):
                await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=cid))
        # _pod stopped and removed the sandbox (each call bounded by the client's deadline);
        # the module's fixture fails on any process, mount or cgroup left behind.
        assert await _wait_gone([init_pid], 10) == []


async def test_oom_killed_container_says_so(cri):
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "oom") as (pod, config):
            cid = await _start_container(client, pod, config, _container_config(
                "hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1",
                memory=32 << 20))
            status = await _wait_exited(client, cid)
            assert (status.reason, status.exit_code) == ("OOMKilled", 137), status


def test_group_annotation_puts_containers_in_one_shim(e2e):
    """io.containerd.pyshim.v2.group, our equivalent of io.containerd.runc.v2.group."""
    group = ("--annotation", f"io.containerd.pyshim.v2.group=g-{e2e.new_id()}")
    cids = [e2e.new_id(f"g{i}") for i in range(3)]
    for cid in cids:
        e2e.ctr("run", "-d", "--runtime", PYSHIM_RUNTIME, *group, e2e.image, cid, "sleep", "600",
                check=True)
    addresses = {(e2e.bundle_dir(cid) / "address").read_text() for cid in cids}
    assert len(addresses) == 1, addresses
    # other tests' shims may still be exiting: count the daemons in this test's namespace
    ours = [p for p in pyshim_daemons(e2e) if os.readlink(f"/proc/{p}/cwd").startswith(f"{e2e.bundle_dir('')}/")]
    daemons = [p for p in ours if os.readlink(f"/proc/{p}/cwd") == str(e2e.bundle_dir(cids[0]))]
    assert len(daemons) == 1 and ours == daemons, ours
    for cid in cids:
        assert task_status(e2e, cid) == "RUNNING"
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        _wait_stopped(e2e, cid)
        e2e.ctr("task", "rm", cid, check=True)
        if cid != cids[-1]:
            assert os.path.exists(f"/proc/{daemons[0]}"), "the shim exited with tasks left"
    assert asyncio.run(_wait_gone(daemons, 10)) == [], "the shim outlived its last task"
    for cid in cids:
        e2e.ctr("container", "rm", cid, check=True)


def test_runtime_info_through_containerd(e2e, tmp_path):
    """containerd 2.x runs `-info` for `ctr plugins inspect-runtime` (and for CRI): the same
    features document as the runc shim's, for the same runc, and the options echoed."""
    if e2e.version.startswith("1."):
        pytest.skip("containerd 1.x never asks a shim for -info")
    runc = str(e2e.containerd.runc)
    config = tmp_path / "pyshim.toml"
    config.write_text(f"BinaryName = {json.dumps(runc)}\n")
    ours = json.loads(e2e.ctr("plugins", "inspect-runtime", "--runtime", PYSHIM_RUNTIME,
                              "--runtime-config-path", str(config), check=True).stdout)
    theirs = json.loads(e2e.ctr("plugins", "inspect-runtime", "--runtime", "io.containerd.runc.v2",
                                "--runc-binary", runc, check=True).stdout)
    assert ours["Name"] == PYSHIM_RUNTIME
    assert ours["Features"] == theirs["Features"] and ours["Features"]["ociVersionMin"]
    assert ours["Options"]["config_path"] == str(config), ours["Options"]
