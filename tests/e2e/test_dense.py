"""Dense mode (ContainersPerDaemon = N in the runtime options): one daemon per N containers.

On containerd 1.6, 1.7 and 2.1, with the options from a `--runtime-config-path` TOML file as
ctr passes them (CRI passes the same table):
* containers are packed into daemons of at most N, lowest seat first; a seat freed by a
  delete is taken by the next container; concurrent starts never overfill a daemon;
* a pod's containers (one group) stay in one daemon;
* the blast radius: SIGKILL of a dense daemon reports every container in it as containerd
  reports a dead shim, each with its real exit status (137 for the running ones, its own for
  one that had exited), and leaves no process, mount or socket behind;
* one container flooding its stdout does not hold up its neighbours' State and Exec;
* a bad value is refused by `start` with a clear error.
"""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import statistics
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from test_debug import _state_calls, daemon_of, ls_json
from test_lifecycle import mounts_of, popen_ctr, task_status, wait_subscribed
from waiting import wait_gone, wait_until

PYSHIM = "io.containerd.pyshim.v2"


def dense_config(tmp_path, n: int):
    config = tmp_path / f"dense-{n}.toml"
    config.write_text(f"ContainersPerDaemon = {n}\n")
    return config


def run_dense(e2e, config, cid: str, *flags: str, cmd=("sleep", "600")):
    return e2e.ctr("run", "-d", "--runtime", PYSHIM, "--runtime-config-path", str(config), *flags,
                   e2e.image, cid, *cmd)


def seats(e2e) -> dict[int, set[str]]:
    """daemon pid -> the container ids it serves, from `pyshim ls`."""
    return {d["pid"]: {t["id"] for t in d["tasks"]} for d in ls_json(e2e.namespace)}


def remove(e2e, cid: str) -> None:
    if task_status(e2e, cid) in ("RUNNING", "PAUSED"):
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_until(lambda: task_status(e2e, cid), 10, f"{cid} to stop", until=lambda s: s in ("STOPPED", ""))
    e2e.ctr("task", "rm", cid)
    e2e.ctr("container", "rm", cid, check=True)


def test_containers_are_packed_n_to_a_daemon(e2e, tmp_path):
    config = dense_config(tmp_path, 3)
    ids = [e2e.new_id("d") for _ in range(7)]
    for cid in ids:
        run_dense(e2e, config, cid).check()
    by_daemon = seats(e2e)
    assert sorted(len(members) for members in by_daemon.values()) == [1, 3, 3], by_daemon
    assert set().union(*by_daemon.values()) == set(ids)
    first = next(pid for pid, members in by_daemon.items() if ids[0] in members)
    assert by_daemon[first] == set(ids[:3])  # lowest seat first, in start order
    r = e2e.ctr("task", "exec", "--exec-id", "probe", ids[1], "sh", "-c", "echo $((6*7))")
    assert (r.returncode, r.stdout) == (0, "42\n"), r
    # A freed seat is taken by the next container; the daemon stays for the others.
    remove(e2e, ids[1])
    newcomer = e2e.new_id("n")
    run_dense(e2e, config, newcomer).check()
    assert seats(e2e)[first] == {ids[0], ids[2], newcomer}
    for cid in [i for i in ids if i != ids[1]] + [newcomer]:
        remove(e2e, cid)
    wait_gone(lambda: ls_json(e2e.namespace), 20, "the dense daemons to exit")


def test_concurrent_starts_never_overfill_a_daemon(e2e, tmp_path):
    config = dense_config(tmp_path, 4)
    ids = [e2e.new_id("c") for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda cid: run_dense(e2e, config, cid), ids))
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    sizes = sorted(len(members) for members in seats(e2e).values())
    assert sizes == [2, 4, 4], sizes
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(lambda cid: remove(e2e, cid), ids))
    wait_gone(lambda: ls_json(e2e.namespace), 20, "the dense daemons to exit")


def test_churn_reuses_a_leaving_daemon_safely(e2e, tmp_path):
    """A container that takes the seat of a daemon whose last container was just deleted
    must not land on a daemon that is exiting (the newcomer's start and the daemon's exit
    are decided under one lock)."""
    config = dense_config(tmp_path, 2)
    for round_ in range(8):
        cid = e2e.new_id(f"churn{round_}")
        r = e2e.ctr("run", "--rm", "--runtime", PYSHIM, "--runtime-config-path", str(config), e2e.image, cid,
                    "echo", "ok")
        assert (r.returncode, r.stdout) == (0, "ok\n"), r
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda n: e2e.ctr("run", "--rm", "--runtime", PYSHIM, "--runtime-config-path", str(config), e2e.image,
                              e2e.new_id(f"par{n}"), "echo", "ok"), range(12)))
    assert [(r.returncode, r.stdout) for r in results] == [(0, "ok\n")] * 12, [r.stderr for r in results]
    wait_gone(lambda: ls_json(e2e.namespace), 20, "the dense daemons to exit")


def test_a_pod_stays_in_one_daemon(e2e, tmp_path):
    config = dense_config(tmp_path, 2)
    pods = {f"pod{n}": [e2e.new_id(f"p{n}m") for _ in range(3)] for n in range(2)}
    for members in pods.values():
        group = ("--annotation", f"io.containerd.runc.v2.group={members[0]}")  # the sandbox's id, as CRI sets
        for cid in members:
            run_dense(e2e, config, cid, *group).check()
    by_daemon = seats(e2e)
    # Each pod is whole in one daemon (3 > N: a pod is never split); the second pod found
    # the first daemon full and opened the next seat.
    assert sorted(map(sorted, by_daemon.values())) == sorted(sorted(m) for m in pods.values()), by_daemon
    for members in pods.values():
        for cid in reversed(members):
            remove(e2e, cid)
    wait_gone(lambda: ls_json(e2e.namespace), 20, "the dense daemons to exit")


def test_a_killed_dense_daemon_reports_every_container_dead(e2e, tmp_path):
    config = dense_config(tmp_path, 10)
    running = [e2e.new_id("r") for _ in range(3)]
    exited = e2e.new_id("x")
    for cid in running:
        run_dense(e2e, config, cid).check()
    run_dense(e2e, config, exited, cmd=("sh", "-c", "exit 7")).check()
    wait_until(lambda: task_status(e2e, exited), 10, "the short one to exit", until=lambda s: s == "STOPPED")
    (daemon,) = ls_json(e2e.namespace)
    assert {t["id"] for t in daemon["tasks"]} == {*running, exited}
    container_pids = {cid: int((e2e.bundle_dir(cid) / "init.pid").read_text()) for cid in running}
    wanted = {**{cid: 137 for cid in running}, exited: 7}
    watcher = popen_ctr(e2e, "events", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_subscribed(watcher, e2e.containerd, e2e.namespace)
        os.kill(daemon["pid"], signal.SIGKILL)
        statuses = _exit_statuses(watcher.stdout, set(wanted), timeout=30)
    finally:
        watcher.kill()
        watcher.communicate()
    assert statuses == wanted
    for cid in wanted:
        wait_until(lambda c=cid: task_status(e2e, c), 20, f"{cid} to be reported dead",
                   until=lambda s: s in ("STOPPED", ""))
    for cid, pid in container_pids.items():
        wait_gone(lambda p=pid: os.path.exists(f"/proc/{p}"), 20, f"{cid}'s process to be killed by delete")
        wait_gone(lambda c=cid: mounts_of(e2e.bundle_dir(c)), 20, f"{cid}'s rootfs to be unmounted")
    wait_gone(lambda: os.path.exists(daemon["debug_socket"]) or os.path.exists(daemon["socket"].removeprefix("unix://")),
              20, "the dead daemon's sockets to be removed")
    for cid in [*running, exited]:
        e2e.ctr("task", "rm", cid)
        e2e.ctr("container", "rm", cid, check=True)


def _exit_statuses(stream, ids: set[str], timeout: float) -> dict[str, int]:
    """The exit status of each of ids as `ctr events` reports it in /tasks/exit (last wins)."""
    seen, statuses = "", {}
    deadline = time.monotonic() + timeout
    while set(statuses) != ids and time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(stream.fileno(), 65536).decode(errors="replace")
        if not chunk:
            break
        seen += chunk
        for line in seen.splitlines():
            found = re.search(r'/tasks/exit .*"container_id":"([^"]+)".*"exit_status":(\d+)', line)
            if found and found.group(1) in ids:
                statuses[found.group(1)] = int(found.group(2))
    assert set(statuses) == ids, f"exits seen {statuses}; events:\n{seen}"
    return statuses


def test_a_flooding_neighbour_does_not_hold_up_state_and_exec(e2e, tmp_path):
    config = dense_config(tmp_path, 5)
    flood, quiet = e2e.new_id("flood"), e2e.new_id("quiet")
    sink = tmp_path / "flood.log"
    run_dense(e2e, config, flood, "--log-uri", f"file://{sink}", cmd=("yes", "flooding the daemon's stdio")).check()
    run_dense(e2e, config, quiet).check()
    daemon = daemon_of(e2e.namespace, quiet)
    assert {t["id"] for t in daemon["tasks"]} == {flood, quiet}
    wait_until(lambda: sink.exists() and sink.stat().st_size > 1 << 20, 20, "the flood to be under way")
    latencies = []
    started = time.monotonic()
    if daemon["protocol"] == "ttrpc":
        latencies = asyncio.run(_state_calls(daemon["socket"], quiet, 200, 1))
    # Exec in the flooder's daemon, and (for reference) in a daemon of its own: on a small
    # machine the flood takes CPU from everything, shared daemon or not.
    apart = e2e.new_id("apart")
    e2e.ctr("run", "-d", "--runtime", PYSHIM, e2e.image, apart, "sleep", "600", check=True)
    execs = {quiet: [], apart: []}
    for n in range(5):
        for cid in execs:
            began = time.monotonic()
            r = e2e.ctr("task", "exec", "--exec-id", f"e{n}", cid, "true")
            execs[cid].append(time.monotonic() - began)
            assert r.returncode == 0, r
    copied = sink.stat().st_size
    print(f"while {copied >> 20} MiB flowed: State p50 {statistics.median(latencies) * 1e3:.2f} ms,"
          f" max {max(latencies) * 1e3:.1f} ms over {len(latencies)} calls; ctr task exec median"
          f" {statistics.median(execs[quiet]) * 1e3:.0f} ms in the flooder's daemon,"
          f" {statistics.median(execs[apart]) * 1e3:.0f} ms in a daemon of its own"
          f" (took {time.monotonic() - started:.1f}s)")
    # Loose on purpose (machines are noisy): a daemon monopolized by the flood would show seconds.
    assert max(latencies) < 1.0
    for cid in (flood, quiet, apart):
        remove(e2e, cid)
    sink.unlink()


def test_a_bad_value_is_refused_by_start(e2e, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("ContainersPerDaemon = 0\n")
    cid = e2e.new_id()
    r = run_dense(e2e, config, cid)
    assert r.returncode != 0 and "ContainersPerDaemon must be a positive integer, not 0" in r.stderr, r
    e2e.ctr("container", "rm", cid)
    assert Counter() == Counter(t["id"] for d in ls_json(e2e.namespace) for t in d["tasks"])
