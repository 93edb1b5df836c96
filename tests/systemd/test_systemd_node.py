"""pyshim on a node with the systemd cgroup driver, compared with runc-v2 in the same containerd.

What a kubelet with cgroupDriver=systemd does, done by a CRI client of our own: pods whose
cgroup parent is a systemd slice (kubepods-besteffort-pod<uid>.slice, ...), which containerd's
CRI turns into runc cgroup paths of the form "<slice>:cri-containerd:<id>"; runc (with
--systemd-cgroup, from SystemdCgroup = true) asks systemd over D-Bus for a transient
cri-containerd-<id>.scope in that slice.  Every scenario runs once on the `pyshim` handler and
once on `runc` (containerd-shim-runc-v2), and what a user can see of it (cgroups, units, exec
output, stats, OOM events, limits after an update, the freezer, the shim's own placement,
what is left in systemd afterwards) must be the same, ids aside.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import select
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import PYSHIM_HANDLER, RUNC_HANDLER
from containerd import IMAGE_REF, PrivateContainerd
from cri_client import CriClient
from cri_pods import CRI_NAMESPACE
from cri_pods import container_status as _status
from cri_pods import remove_pod as _remove_pod
from cri_pods import run_pod as _run_pod
from cri_pods import start_container as _start_container
from cri_pods import wait_exited as _wait_exited
from test_lifecycle import wait_subscribed

from shim.api.runtime import v1 as cri_v1

CGROUP_ROOT = Path("/sys/fs/cgroup")
MiB = 1 << 20
SLOW = 600  # seconds for one test: each scenario runs twice, under emulation

pytestmark = pytest.mark.timeout(SLOW)


# -- systemd ------------------------------------------------------------------------------------

def slice_path(unit: str) -> str:
    """The cgroup path of a slice unit, as systemd nests them by name:
    kubepods-besteffort-pod1.slice -> /kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice"""
    assert unit.endswith(".slice"), unit
    parts = unit[: -len(".slice")].split("-")
    return "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=60).stdout


def unit_properties(unit: str, *names: str) -> dict[str, str]:
    out = systemctl("show", unit, "--property", ",".join(names))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def units_matching(pattern: str) -> list[str]:
    """Every loaded unit whose name matches (active or not), e.g. stale scopes."""
    out = systemctl("list-units", "--all", "--plain", "--no-legend", pattern)
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def failed_units() -> list[str]:
    out = systemctl("list-units", "--failed", "--plain", "--no-legend")
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def proc_cgroup(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def cgroup_dirs(path: str) -> list[str]:
    """The cgroup directories at and under path ([] when there is none)."""
    top = CGROUP_ROOT / path.lstrip("/")
    if not top.is_dir():
        return []
    return sorted("/" + str(p.relative_to(CGROUP_ROOT)) for p in [top, *top.rglob("*")] if p.is_dir())


# -- pods -----------------------------------------------------------------------------------------

QOS_SLICES = {
    "besteffort": "kubepods-besteffort-pod{uid}.slice",
    "burstable": "kubepods-burstable-pod{uid}.slice",
    "guaranteed": "kubepods-pod{uid}.slice",
}


class Pod:
    """One pod sandbox of a handler, with the ids of what runs in it, so that the facts of two
    runs can be compared with the ids written as their roles."""

    def __init__(self, node: PrivateContainerd, handler: str, qos: str) -> None:
        self.node, self.handler = node, handler
        # kubelet writes a pod uid's dashes as underscores in slice names; a hex uuid has none
        self.uid = uuid.uuid4().hex
        self.slice = QOS_SLICES[qos].format(uid=self.uid)
        logs = node.dir / "pods" / self.uid
        logs.mkdir(parents=True)
        self.config = cri_v1.PodSandboxConfig(
            metadata=cri_v1.PodSandboxMetadata(name=f"sd-{handler}", uid=self.uid, namespace="e2e"),
            log_directory=str(logs),
            linux=cri_v1.LinuxPodSandboxConfig(
                cgroup_parent=self.slice,
                security_context=cri_v1.LinuxSandboxSecurityContext(namespace_options=cri_v1.NamespaceOption(
                    network=cri_v1.NamespaceMode.NODE, pid=cri_v1.NamespaceMode.POD,
                    ipc=cri_v1.NamespaceMode.POD)),
            ),
        )
        self.id = ""
        self.names: dict[str, str] = {}  # id -> role

    def role(self, id: str, name: str) -> str:
        self.names[id] = name
        return id

    def normal(self, value):
        """value with this pod's ids replaced by their roles (recursively through containers)."""
        if isinstance(value, str):
            for id, name in [*self.names.items(), (self.uid, "uid")]:
                value = value.replace(id, f"<{name}>")
            return value
        if isinstance(value, dict):
            return {self.normal(k): self.normal(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.normal(v) for v in value)
        return value

    async def start(self, client: CriClient) -> None:
        self.id = self.role(await _run_pod(client, self.config, self.handler), "sandbox")

    async def container(self, client: CriClient, name: str, *command: str,
                        resources: cri_v1.LinuxContainerResources | None = None) -> str:
        config = cri_v1.ContainerConfig(
            metadata=cri_v1.ContainerMetadata(name=name), image=cri_v1.ImageSpec(image=IMAGE_REF),
            command=list(command), log_path=f"{name}.log",
            linux=cri_v1.LinuxContainerConfig(resources=resources or cri_v1.LinuxContainerResources()))
        return self.role(await _start_container(client, self.id, self.config, config), name)

    async def remove(self, client: CriClient) -> None:
        if self.id:
            await _remove_pod(client, self.id)

    def forget_slice(self) -> None:
        """What the kubelet does once a pod is gone: its slice is stopped."""
        systemctl("stop", self.slice)


async def sandbox_pid(client: CriClient, pod: str) -> int:
    reply = await client.runtime("PodSandboxStatus", cri_v1.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True))
    return json.loads(reply.info["info"])["pid"]


async def container_pid(client: CriClient, cid: str) -> int:
    reply = await client.runtime("ContainerStatus", cri_v1.ContainerStatusRequest(container_id=cid, verbose=True))
    return json.loads(reply.info["info"])["pid"]


async def both(node: PrivateContainerd, scenario, *args, handlers=None) -> dict[str, dict]:
    """Run scenario(client, pod, *args) -> facts once per handler, each in a pod of its own
    (removed afterwards, its slice stopped); the facts with ids as roles, by handler."""
    facts = {}
    async with CriClient(node.address, timeout=SLOW / 4) as client:
        for handler in handlers or (PYSHIM_HANDLER, RUNC_HANDLER):
            pod = Pod(node, handler, *args[:1] or ("besteffort",))
            try:
                await pod.start(client)
                facts[handler] = pod.normal(await scenario(client, pod, *args[1:]))
            except BaseException:
                print(f"--- {handler}: containerd log tail ---\n{node.log_tail(30)}")
                raise
            finally:
                try:
                    await pod.remove(client)
                finally:
                    pod.forget_slice()
    return facts


def assert_same(facts: dict[str, dict]) -> dict:
    ours, theirs = facts[PYSHIM_HANDLER], facts[RUNC_HANDLER]
    different = {k: (ours.get(k), theirs.get(k)) for k in {*ours, *theirs} if ours.get(k) != theirs.get(k)}
    assert not different, "pyshim (first) and runc-v2 (second) differ:\n" + "\n".join(
        f"  {k}: {a!r}\n  {' ' * len(k)}  {b!r}" for k, (a, b) in sorted(different.items()))
    return ours


async def eventually(predicate, timeout: float = 60) -> bool:
    """Whether predicate() comes true within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


def ctr(node: PrivateContainerd, *args: str) -> str:
    return node.ctr(*args, namespace=CRI_NAMESPACE, timeout=120, check=True).stdout


# -- the scenarios --------------------------------------------------------------------------------

async def lifecycle(client: CriClient, pod: Pod) -> dict:
    facts: dict[str, object] = {}
    pause = await sandbox_pid(client, pod.id)
    shim = ppid(pause)
    resources = cri_v1.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=64 * MiB)
    cid = await pod.container(client, "app", "sleep", "600", resources=resources)
    pid = await container_pid(client, cid)
    status = await _status(client, cid)
    facts["container state"] = status.state.name
    facts["sandbox cgroup"] = proc_cgroup(pause)
    facts["container cgroup"] = proc_cgroup(pid)
    for role, id in (("sandbox", pod.id), ("container", cid)):
        facts[f"{role} unit"] = unit_properties(
            f"cri-containerd-{id}.scope", "LoadState", "ActiveState", "SubState", "Slice", "Delegate",
            "MemoryMax", "CPUWeight")
    facts["pod slice"] = unit_properties(pod.slice, "LoadState", "ActiveState")
    container_cgroup = CGROUP_ROOT / proc_cgroup(pid).lstrip("/")
    facts["container limits"] = {name: (container_cgroup / name).read_text().strip()
                                 for name in ("memory.max", "cpu.weight", "pids.max")}
    r = await client.runtime("ExecSync", cri_v1.ExecSyncRequest(
        container_id=cid, cmd=["sh", "-c", "echo out; cat /proc/self/cgroup; echo err >&2; exit 3"], timeout=60))
    facts["exec"] = (r.stdout.decode(), r.stderr.decode(), r.exit_code)
    # the shim's own placement: in containerd's cgroup (the node's containerd.service; no
    # ShimCgroup is configured), its OOM score one above containerd's
    facts["shim parent of sandbox and container"] = ppid(pid) == shim
    facts["shim cgroup is containerd's"] = proc_cgroup(shim) == proc_cgroup(pod.node.proc.pid)
    facts["shim oom_score_adj"] = int(Path(f"/proc/{shim}/oom_score_adj").read_text()) - int(
        Path(f"/proc/{pod.node.proc.pid}/oom_score_adj").read_text())

    await client.runtime("StopContainer", cri_v1.StopContainerRequest(container_id=cid, timeout=10))
    stopped = await _wait_exited(client, cid, timeout=60)
    facts["stopped"] = (stopped.exit_code, stopped.reason)
    await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=cid))
    facts["container unit after removal"] = unit_properties(f"cri-containerd-{cid}.scope", "LoadState", "ActiveState")
    await pod.remove(client)
    pod.id = ""
    facts["shim exited with the pod"] = await eventually(lambda: not Path(f"/proc/{shim}").exists())
    facts["units left"] = [u for u in units_matching("cri-containerd-*") if any(i in u for i in pod.names)]
    facts["cgroups left under the pod slice"] = [d for d in cgroup_dirs(slice_path(pod.slice))
                                                 if d != slice_path(pod.slice)]
    facts["failed units"] = failed_units()
    return facts


def crun(node: PrivateContainerd) -> bool:
    """crun's systemd driver puts the process in a "container" cgroup below the scope and
    writes the limits there, not into the unit's properties (runc and runc-v2 alike)."""
    return node.runc.name == "crun"


@pytest.mark.parametrize("qos", ["besteffort", "burstable", "guaranteed"])
async def test_pod_lifecycle_cgroups_units_and_shim_placement(node, qos):
    facts = assert_same(await both(node, lifecycle, qos))
    pod_slice = slice_path(QOS_SLICES[qos].format(uid="<uid>"))
    below = "/container" if crun(node) else ""
    assert facts["container cgroup"] == f"{pod_slice}/cri-containerd-<app>.scope{below}", facts
    assert facts["sandbox cgroup"] == f"{pod_slice}/cri-containerd-<sandbox>.scope{below}", facts
    assert facts["container unit"]["ActiveState"] == "active", facts
    assert facts["container unit"]["Slice"] == QOS_SLICES[qos].format(uid="<uid>"), facts
    assert facts["container limits"]["memory.max"] == str(64 * MiB), facts
    assert facts["exec"] == ("out\n0::/\n", "err\n", 3), facts  # its own cgroup namespace
    assert facts["shim parent of sandbox and container"] and facts["shim cgroup is containerd's"], facts
    assert facts["stopped"] == (143, "Error"), facts  # SIGTERM: sleep is not the pod's PID 1
    assert facts["shim exited with the pod"], facts
    assert facts["units left"] == [] and facts["cgroups left under the pod slice"] == [], facts
    assert facts["failed units"] == [], facts


async def update_stats_pause(client: CriClient, pod: Pod) -> dict:
    facts: dict[str, object] = {}
    resources = cri_v1.LinuxContainerResources(cpu_period=100000, cpu_quota=50000,
                                               memory_limit_in_bytes=64 * MiB)
    # some CPU time and memory to show in the stats
    cid = await pod.container(client, "busy", "sh", "-c", "dd if=/dev/zero of=/dev/shm/f bs=1M count=8; "
                              "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; exec sleep 600",
                              resources=resources)
    pid = await container_pid(client, cid)
    cgroup = CGROUP_ROOT / proc_cgroup(pid).lstrip("/")
    unit = f"cri-containerd-{cid}.scope"
    assert await eventually(lambda: Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")), "the loop ran on"

    stats = (await client.runtime("ContainerStats", cri_v1.ContainerStatsRequest(container_id=cid))).stats
    facts["stats"] = {"cpu > 0": stats.cpu.usage_core_nano_seconds.value > 0,
                      "memory working set >= 8 MiB": stats.memory.working_set_bytes.value >= 8 * MiB,
                      "attributes": (stats.attributes.id == cid, stats.attributes.metadata.name)}
    metrics = json.loads(ctr(pod.node, "task", "metrics", "--format", "json", cid))
    facts["metrics sections"] = sorted(metrics)
    facts["metrics pids.current"] = metrics.get("pids", {}).get("current")
    facts["metrics memory.max"] = metrics.get("memory", {}).get("usage_limit")

    facts["before update"] = (unit_properties(unit, "MemoryMax", "CPUQuotaPerSecUSec"),
                              (cgroup / "memory.max").read_text().strip(), (cgroup / "cpu.max").read_text().strip())
    await client.runtime("UpdateContainerResources", cri_v1.UpdateContainerResourcesRequest(
        container_id=cid, linux=cri_v1.LinuxContainerResources(
            cpu_period=100000, cpu_quota=20000, memory_limit_in_bytes=128 * MiB)))
    facts["after update"] = (unit_properties(unit, "MemoryMax", "CPUQuotaPerSecUSec"),
                             (cgroup / "memory.max").read_text().strip(), (cgroup / "cpu.max").read_text().strip())
    status = await _status(client, cid)
    facts["status resources"] = (status.resources.linux.memory_limit_in_bytes, status.resources.linux.cpu_quota) \
        if status.resources and status.resources.linux else None

    ctr(pod.node, "task", "pause", cid)
    facts["paused"] = (task_status(pod.node, cid), (cgroup / "cgroup.freeze").read_text().strip(),
                       "frozen 1" in (cgroup / "cgroup.events").read_text())
    ctr(pod.node, "task", "resume", cid)
    facts["resumed"] = (task_status(pod.node, cid), (cgroup / "cgroup.freeze").read_text().strip())
    return facts


def task_status(node: PrivateContainerd, cid: str) -> str:
    for line in ctr(node, "task", "ls").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return ""


async def test_stats_update_and_pause(node):
    facts = assert_same(await both(node, update_stats_pause))
    assert all(v is True for k, v in facts["stats"].items() if k != "attributes"), facts
    assert facts["stats"]["attributes"] == (True, "busy"), facts
    assert {"cpu", "memory", "pids"} <= set(facts["metrics sections"]), facts
    assert facts["metrics pids.current"] and facts["metrics memory.max"] == 64 * MiB, facts
    assert facts["before update"][1:] == (str(64 * MiB), "50000 100000"), facts
    assert facts["after update"][1:] == (str(128 * MiB), "20000 100000"), facts
    if not crun(node):
        assert facts["before update"][0] == {"MemoryMax": str(64 * MiB), "CPUQuotaPerSecUSec": "500ms"}, facts
        assert facts["after update"][0] == {"MemoryMax": str(128 * MiB), "CPUQuotaPerSecUSec": "200ms"}, facts
    assert facts["paused"] == ("PAUSED", "1", True) and facts["resumed"] == ("RUNNING", "0"), facts


async def oom(client: CriClient, pod: Pod) -> dict:
    node = pod.node
    events = subprocess.Popen([str(node.bin_dir / "ctr"), "--address", node.address, "--namespace",
                               CRI_NAMESPACE, "events"], stdout=subprocess.PIPE, env=node.env(), cwd=node.dir)
    try:
        seen = wait_subscribed(events, node, CRI_NAMESPACE)
        cid = await pod.container(client, "hog", "dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1",
                                  resources=cri_v1.LinuxContainerResources(memory_limit_in_bytes=32 * MiB,
                                                                           memory_swap_limit_in_bytes=32 * MiB))
        status = await _wait_exited(client, cid, timeout=120)
        deadline = time.monotonic() + 60
        while f'"container_id":"{cid}"' not in seen.split("/tasks/exit", 1)[-1] and time.monotonic() < deadline:
            ready, _, _ = select.select([events.stdout], [], [], 1)
            if ready:
                seen += os.read(events.stdout.fileno(), 65536).decode(errors="replace")
    finally:
        events.kill()
        events.wait()
    topics = [m.group(1) for line in seen.splitlines() if cid in line
              and (m := re.search(r" (/tasks/(?:oom|exit))\b", line))]
    return {"status": (status.state.name, status.reason, status.exit_code), "events": topics}


async def test_oom_kill_is_reported_before_the_exit(node):
    """The one place where pyshim is not compared for equality: when the OOM-killed process
    was the last in its scope, systemd removes the scope's cgroup at once, and runc-v2, woken
    by inotify from a kernel work queue, often finds memory.events gone and reports a plain
    exit ("Error").  pyshim polls the open file and must report the OOM every time (three
    pods here); runc-v2's outcome is printed."""
    for attempt in range(3):
        facts = await both(node, oom, "besteffort", handlers=(PYSHIM_HANDLER,) if attempt else None)
        ours = facts[PYSHIM_HANDLER]
        assert ours["status"] == ("CONTAINER_EXITED", "OOMKilled", 137), (attempt, facts)
        assert ours["events"] == ["/tasks/oom", "/tasks/exit"], (attempt, facts)
        if RUNC_HANDLER in facts:
            theirs = facts[RUNC_HANDLER]
            print(f"runc-v2 on the same OOM: {theirs}")
            assert theirs["status"][2] == 137 and theirs["events"][-1:] == ["/tasks/exit"], facts
