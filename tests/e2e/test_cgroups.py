"""cgroup features through containerd: `ctr task metrics` (Stats), OOM events, Update.

Every test runs once per containerd version (1.6, 1.7, 2.1) with real runc, on this
machine's cgroup v1 hierarchy (containers are /<namespace>/<id> under each controller).
"""

from __future__ import annotations

import re
import subprocess
import time

from test_lifecycle import PYSHIM, popen_ctr, read_until


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
    proc = popen_ctr(e2e, "run", "--rm", "--runtime", PYSHIM, e2e.image, cid, "sh", "-c", script,
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
