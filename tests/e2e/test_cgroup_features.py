"""cgroup features through containerd: `ctr task metrics` (Stats), OOM events, Update.

Every test runs per containerd version (1.6, 1.7, 2.1) and OCI runtime (runc 1.1, runc 1.3,
crun, by BinaryName; see runtimes.py), on this machine's cgroup v1 hierarchy (containers are /<namespace>/<id> under each controller).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time

import pytest

from test_lifecycle import PYSHIM, popen_ctr, pyshim_daemons, read_until, wait_subscribed

from shim.framework import cgroups

pytestmark = pytest.mark.usefixtures("oci_runtime")


def metrics(e2e, cid: str) -> dict[str, str]:
    """`ctr task metrics` as {metric: value} (the table ctr prints from our v1 Metrics)."""
    out = e2e.ctr("task", "metrics", cid, check=True).stdout
    table = {}
    for line in out.split("METRIC", 1)[1].splitlines()[1:]:
        parts = line.split(None, 1)
        if len(parts) == 2:
            table[parts[0]] = parts[1].strip()
    return table


def stop(e2e, cid: str) -> None:
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if e2e.ctr("task", "rm", cid).returncode == 0:
            break
        time.sleep(0.1)
    e2e.ctr("container", "rm", cid, check=True)


def test_metrics_plausible_and_memory_follows_allocation(e2e):
    cid = e2e.new_id()
    # A tmpfs file is charged to the cgroup and stays (a shell variable's memory may not).
    script = "echo ready; read x; head -c 20000000 /dev/zero > /dev/shm/fill; echo grown; sleep 600"
    proc = popen_ctr(e2e, "run", "--rm", *e2e.runtime(PYSHIM), e2e.image, cid, "sh", "-c", script,
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(proc.stdout, "ready")
        before = metrics(e2e, cid)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        read_until(proc.stdout, "grown", timeout=60)
        after = metrics(e2e, cid)
    finally:
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
        proc.kill()
        proc.wait()
    assert 0 < int(before["memory.usage_in_bytes"]) < 20_000_000
    assert int(after["memory.usage_in_bytes"]) > int(before["memory.usage_in_bytes"]) + 15_000_000
    assert int(after["memory.stat.cache"]) >= 20_000_000
    assert int(before["memory.limit_in_bytes"]) > 2**60  # no limit given: the kernel's "unlimited"
    assert int(before["pids.current"]) >= 1
    assert int(after["cpuacct.usage"]) > int(before["cpuacct.usage"]) > 0


def test_oom_kill_published_before_exit(e2e):
    watcher = popen_ctr(e2e, "events", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_subscribed(watcher, e2e.containerd, e2e.namespace)
        cid = e2e.new_id()
        # The shell's command substitution grows to 100 MB in a 32 MiB cgroup: the OOM killer
        # picks the shell, the container's init.
        r = e2e.ctr("run", "--rm", *e2e.runtime(PYSHIM), "--memory-limit", "33554432", e2e.image, cid,
                    "sh", "-c", "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo survived", timeout=120)
        seen = read_until(watcher.stdout, "/tasks/delete")
    finally:
        watcher.kill()
        watcher.communicate()
    assert r.returncode == 137, r
    topics = [m.group(1) for line in seen.splitlines() if cid in line
              for m in [re.search(r" (/tasks/[a-z-]+) ", line)] if m]
    assert "/tasks/oom" in topics, seen
    assert topics.index("/tasks/oom") < topics.index("/tasks/exit"), seen


def eventfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return count


def test_oom_eventfd_closed_when_the_container_is_deleted(e2e):
    # Two containers on one shim: the first keeps it alive while the second comes and goes.
    group = ("--annotation", f"io.containerd.runc.v2.group=g-{e2e.new_id()}")
    keeper, passer = e2e.new_id("keep"), e2e.new_id("pass")
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), *group, e2e.image, keeper, "sleep", "600", check=True)
    try:
        daemons = [p for p in pyshim_daemons(e2e) if os.readlink(f"/proc/{p}/cwd") == str(e2e.bundle_dir(keeper))]
        assert len(daemons) == 1
        assert eventfds(daemons[0]) == 1  # the keeper's OOM watch
        for _ in range(3):
            r = e2e.ctr("run", "--rm", *e2e.runtime(PYSHIM), *group, e2e.image, passer, "true")
            assert r.returncode == 0, r
        assert eventfds(daemons[0]) == 1
    finally:
        stop(e2e, keeper)


LINUX_RESOURCES = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"


async def _grpc_update(address: str, namespace: str, cid: str, resources: dict) -> None:
    """containerd's gRPC Tasks.Update (ctr cannot set memory through `ctr task update` on 1.6)."""
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    from cri_client import MessageCodec

    from shim.api.containerd.services.tasks.v1 import UpdateTaskRequest
    from shim.api.google.protobuf import Any, Empty

    channel = Channel(path=address, codec=MessageCodec())
    try:
        request = UpdateTaskRequest(
            container_id=cid, resources=Any(type_url=LINUX_RESOURCES, value=json.dumps(resources).encode())
        )
        async with channel.request("/containerd.services.tasks.v1.Tasks/Update", Cardinality.UNARY_UNARY,
                                   UpdateTaskRequest, Empty, timeout=30,
                                   metadata={"containerd-namespace": namespace}) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_message()
    finally:
        channel.close()


def task_pid(e2e, cid: str) -> int:
    for line in e2e.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"no task {cid}")


def test_update_memory_limit_through_containerd(e2e):
    from grpclib.exceptions import GRPCError

    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), "--memory-limit", "33554432", e2e.image, cid, "sleep", "600", check=True)
    try:
        memory = cgroups.load(task_pid(e2e, cid)).directories["memory"]
        limit = os.path.join(memory, "memory.limit_in_bytes")
        assert open(limit).read().strip() == "33554432"
        asyncio.run(_grpc_update(e2e.address, e2e.namespace, cid, {"memory": {"limit": 67108864}}))
        assert open(limit).read().strip() == "67108864"
        assert metrics(e2e, cid)["memory.limit_in_bytes"] == "67108864"
        # refused by the shim in Go's words, as runc-v2 refuses it (test_runtime_errors.py)
        try:
            asyncio.run(_grpc_update(e2e.address, e2e.namespace, cid, {"cpu": {"shares": "many"}}))
        except GRPCError as exc:
            assert "json: cannot unmarshal string into Go struct field" in str(exc.message), exc
        else:
            raise AssertionError("an update with invalid resources was accepted")
        assert open(limit).read().strip() == "67108864"
    finally:
        stop(e2e, cid)
