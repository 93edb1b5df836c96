"""cgroup v2 for real: a pyshim container's limits, Update, Stats and OOM on a unified hierarchy.

The v2 counterparts of tests/e2e/test_cgroup_features.py.  containerd puts a container in
/sys/fs/cgroup/<namespace>/<id>; runc writes the limits there, and pyshim reads that one
directory for Stats (io.containerd.cgroups.v2.Metrics) and watches its memory.events for OOM
kills.  /dev/vda, the VM's scratch disk, gives the io controller something to count.

Under emulation every container costs tens of seconds, so the first three tests share one
container (`limited`); the Update test changes it and so comes after the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_cgroup_features import _grpc_update, task_pid
from test_lifecycle import PYSHIM, popen_ctr, pyshim_daemons, read_until, wait_subscribed

from shim.framework import cgroups

MiB = 1024 * 1024
SCRATCH_DISK = "/dev/vda"
SLOW = 180  # seconds: what takes 1 s on the host can take 30 under emulation on a busy machine


@dataclasses.dataclass
class Limited:
    e2e: object  # conftest.E2E
    cid: str
    cgroup: Path

    def read(self, name: str) -> str:
        return (self.cgroup / name).read_text().strip()

    def metrics(self) -> dict:
        """`ctr task metrics --format json`: Go's JSON of the decoded Metrics (snake_case names,
        zero values left out)."""
        return json.loads(self.e2e.ctr("task", "metrics", "--format", "json", self.cid, check=True).stdout)


def busybox_rootfs(where: Path) -> Path:
    rootfs = where / "rootfs"
    for directory in ("bin", "dev", "proc", "sys", "tmp", "run"):
        (rootfs / directory).mkdir(parents=True)
    shutil.copy("/bin/busybox", rootfs / "bin" / "busybox")  # busybox-static
    for applet in ("sh", "dd", "echo", "sleep"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    return rootfs


def limited_spec(e2e, cid: str, rootfs: Path, script: str) -> dict:
    """ctr's default OCI spec with the limits ctr has no flags for (pids) and the scratch disk.
    With --config ctr takes the spec as it is: rootfs, args and cgroup path are ours to set."""
    spec = json.loads(e2e.ctr("oci", "spec", check=True).stdout)
    spec["root"] = {"path": str(rootfs)}
    spec["process"].update(args=["sh", "-c", script], env=["PATH=/bin"], terminal=False)
    linux = spec["linux"]
    linux["cgroupsPath"] = f"/{e2e.namespace}/{cid}"
    rdev = os.stat(SCRATCH_DISK).st_rdev
    disk = {"type": "b", "major": os.major(rdev), "minor": os.minor(rdev)}
    linux["devices"] = [*linux.get("devices", []), {"path": SCRATCH_DISK, **disk, "fileMode": 0o600, "uid": 0, "gid": 0}]
    resources = linux.setdefault("resources", {})
    resources["devices"] = [*resources.get("devices", []), {"allow": True, **disk, "access": "rwm"}]
    resources.update(memory={"limit": 64 * MiB}, cpu={"quota": 50000, "period": 100000}, pids={"limit": 32})
    return spec


@pytest.fixture(scope="module")
def limited(session_e2e, tmp_path_factory):
    """A container created with 64 MiB of memory, half a CPU and 32 pids that has read 8 MiB
    from the scratch disk and holds a 20 MiB tmpfs file (memory charged to it that stays)."""
    e2e = session_e2e
    cid = e2e.new_id("limited")
    where = tmp_path_factory.mktemp("limited")
    script = (f"dd if={SCRATCH_DISK} of=/dev/null bs=1M count=8 2>/dev/null; "
              "dd if=/dev/zero of=/dev/shm/fill bs=1M count=20 2>/dev/null; echo ready; sleep 600")
    spec = where / "config.json"
    spec.write_text(json.dumps(limited_spec(e2e, cid, busybox_rootfs(where), script)))
    proc = popen_ctr(e2e, "run", "--rm", "--runtime", PYSHIM, "--config", str(spec), cid,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stdout, "ready", timeout=SLOW)
        cgroup = cgroups.load(task_pid(e2e, cid))
        assert isinstance(cgroup, cgroups.CgroupV2), cgroup
        yield Limited(e2e, cid, Path(cgroup.directory))
    finally:
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
        try:
            proc.wait(SLOW)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def open_files(pid: int) -> list[str]:
    """What the process's fds point at ("anon_inode:[eventpoll]", paths, ...)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def test_limits_at_create_land_in_the_container_cgroup(limited):
    assert limited.cgroup == Path("/sys/fs/cgroup", limited.e2e.namespace, limited.cid)
    assert limited.read("memory.max") == str(64 * MiB)
    assert limited.read("cpu.max").split() == ["50000", "100000"]
    assert limited.read("pids.max") == "32"
    daemons = [p for p in pyshim_daemons(limited.e2e) if os.readlink(f"/proc/{p}/cwd").endswith("/" + limited.cid)]
    assert len(daemons) == 1
    # the OOM watch is armed: memory.events held open, its parent's too
    files = open_files(daemons[0])
    assert files.count(str(limited.cgroup / "memory.events")) == 1, files
    assert files.count(str(limited.cgroup.parent / "memory.events")) == 1, files
    # ... and quiet: a cgroup file stays readable, only its EPOLLPRI says it changed, so a
    # watch waiting for the wrong event would spin at 100 % CPU
    def cpu_ticks() -> int:
        fields = Path(f"/proc/{daemons[0]}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    before = cpu_ticks()
    time.sleep(3)
    assert cpu_ticks() - before < os.sysconf("SC_CLK_TCK"), "the idle daemon used a second of CPU in 3 s"


def test_metrics_are_v2_with_cpu_memory_pids_and_io(limited):
    # ctr prints its cgroup v2 table only for io.containerd.cgroups.v2.Metrics
    table = limited.e2e.ctr("task", "metrics", limited.cid, check=True).stdout
    assert "memory.usage_limit" in table and "cpu.usage_usec" in table, table
    metrics = limited.metrics()
    assert metrics["pids"]["current"] >= 1  # sh, or the sleep it execs
    assert metrics["pids"]["limit"] == 32
    assert metrics["cpu"]["usage_usec"] > 0
    assert metrics["cpu"]["usage_usec"] >= metrics["cpu"].get("user_usec", 0) + metrics["cpu"].get("system_usec", 0) > 0
    assert metrics["cpu"]["nr_periods"] > 0  # a quota is set, so CFS counts periods
    assert metrics["memory"]["usage"] >= 20 * MiB
    assert metrics["memory"]["shmem"] >= 20 * MiB
    assert metrics["memory"]["usage_limit"] == 64 * MiB
    assert metrics["memory"]["swap_limit"] == cgroups.MAX_UINT64
    assert "memory_events" not in metrics or not metrics["memory_events"].get("oom_kill")
    if limited.e2e.containerd.target.id != "1.6":  # 1.6's ctr decodes with a proto that has no psi
        assert "psi" in metrics["cpu"] and "psi" in metrics["memory"] and "psi" in metrics["io"]
    rdev = os.stat(SCRATCH_DISK).st_rdev
    disk = [e for e in metrics["io"]["usage"]
            if (e.get("major", 0), e.get("minor", 0)) == (os.major(rdev), os.minor(rdev))]
    assert disk and disk[0]["rbytes"] >= 8 * MiB and disk[0]["rios"] > 0, metrics["io"]


def test_update_through_containerd_changes_memory_cpu_and_pids(limited):
    from grpclib.exceptions import GRPCError

    e2e = limited.e2e
    resources = {"memory": {"limit": 128 * MiB}, "cpu": {"quota": 20000, "period": 100000}, "pids": {"limit": 42}}
    asyncio.run(_grpc_update(e2e.address, e2e.namespace, limited.cid, resources))
    assert limited.read("memory.max") == str(128 * MiB)
    assert limited.read("cpu.max").split() == ["20000", "100000"]
    assert limited.read("pids.max") == "42"
    metrics = limited.metrics()
    assert metrics["memory"]["usage_limit"] == 128 * MiB
    assert metrics["pids"]["limit"] == 42
    # refused before runc runs, in Go's words as runc-v2 does, and nothing changes
    with pytest.raises(GRPCError) as refused:
        asyncio.run(_grpc_update(e2e.address, e2e.namespace, limited.cid, {"cpu": {"shares": "many"}}))
    assert "json: cannot unmarshal string into Go struct field" in str(refused.value.message)
    assert limited.read("memory.max") == str(128 * MiB)


def test_oom_kill_published_before_exit(e2e):
    watcher = popen_ctr(e2e, "events", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_subscribed(watcher, e2e.containerd, e2e.namespace, timeout=SLOW)
        cid = e2e.new_id("oom")
        # The shell's command substitution grows to 100 MB in a 32 MiB cgroup: the OOM killer
        # picks the shell, the container's init.
        r = e2e.ctr("run", "--rm", "--runtime", PYSHIM, "--memory-limit", str(32 * MiB), e2e.image, cid,
                    "sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived", timeout=SLOW)
        seen = read_until(watcher.stdout, "/tasks/delete", timeout=SLOW)
    finally:
        watcher.kill()
        watcher.communicate()
    assert r.returncode == 137, r
    topics = [m.group(1) for line in seen.splitlines() if cid in line
              for m in [re.search(r" (/tasks/[a-z-]+) ", line)] if m]
    assert "/tasks/oom" in topics, seen
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), seen
