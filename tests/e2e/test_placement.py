"""Where the shim daemon runs: shim_cgroup, OOM score, who may talk to its socket.

* Options.shim_cgroup (here from a `--runtime-config-path` TOML, as CRI passes options to a
  non-runc runtime type) moves the daemon into that cgroup in every v1 hierarchy where it
  exists; a cgroup that does not exist fails the start with the Go shim's error, leaving
  no daemon and no socket behind.
* The daemon's oom_score_adj is containerd's + 1; the container's is the same as under
  io.containerd.runc.v2.
* A peer with another uid is refused by the daemon (SO_PEERCRED), even when the socket file
  lets it connect.
"""

from __future__ import annotations

import os
import struct
import uuid
from pathlib import Path

from containerd import IMAGE_REF
from peers import exchange_as_nobody
from test_restart import ctr, daemons, tasks
from waiting import wait_gone, wait_until

PYSHIM = "io.containerd.pyshim.v2"
RUNC = "io.containerd.runc.v2"
V1_ROOT = Path("/sys/fs/cgroup")


def run_d(c, cid, *flags, runtime=PYSHIM, cmd=("sleep", "600")):
    return ctr(c, "run", "-d", "--runtime", runtime, *flags, IMAGE_REF, cid, *cmd)


def stop_and_remove(c, cid):
    ctr(c, "task", "kill", "-s", "SIGKILL", cid)
    wait_until(lambda: tasks(c).get(cid) in ("STOPPED", None), 10, f"{cid} to stop")
    ctr(c, "task", "rm", cid)
    ctr(c, "container", "rm", cid, check=True)


def test_shim_cgroup_moves_the_daemon(own_containerd, tmp_path):
    c = own_containerd
    name = f"pyshim-e2e-{uuid.uuid4().hex[:8]}"
    made = []
    for controller in ("memory", "pids"):
        path = V1_ROOT / controller / name
        if (V1_ROOT / controller).is_dir() and not (V1_ROOT / "cgroup.controllers").exists():
            path.mkdir()
            made.append(path)
    if (V1_ROOT / "cgroup.controllers").exists():  # a cgroup v2 host
        (V1_ROOT / name).mkdir()
        made.append(V1_ROOT / name)
    config = tmp_path / "runtime.toml"
    config.write_text(f'ShimCgroup = "/{name}"\n')
    try:
        run_d(c, "placed", "--runtime-config-path", str(config)).check()
        (daemon,) = daemons(c)
        lines = Path(f"/proc/{daemon}/cgroup").read_text().splitlines()
        joined = [line for line in lines if line.endswith(f":/{name}")]
        assert len(joined) == len(made), lines
        container = int((c.bundle_dir(c.ns, "placed") / "init.pid").read_text())
        assert not [line for line in Path(f"/proc/{container}/cgroup").read_text().splitlines()
                    if name in line]  # the container has cgroups of its own
        stop_and_remove(c, "placed")
        wait_gone(lambda: daemons(c), 20, "the shim to exit")
    finally:
        for path in made:
            wait_gone(lambda p=path: (p / "cgroup.procs").read_text().strip(), 20, f"{path} to empty")
            path.rmdir()


def test_missing_shim_cgroup_fails_the_start_cleanly(own_containerd, tmp_path):
    c = own_containerd
    config = tmp_path / "runtime.toml"
    config.write_text('ShimCgroup = "/pyshim-no-such-cgroup"\n')
    r = run_d(c, "unplaced", "--runtime-config-path", str(config))
    assert r.returncode != 0
    assert "failed to load cgroup /pyshim-no-such-cgroup: cgroup deleted" in r.stderr, r
    # start SIGKILLs the daemon it could not place and returns: it dies a moment later
    wait_gone(lambda: daemons(c), 20, "the unplaced daemon to be gone")
    assert not os.path.exists(c.shim_socket_address(c.ns, "unplaced").removeprefix("unix://"))
    ctr(c, "container", "rm", "unplaced")


def test_oom_scores_like_runc_v2(own_containerd):
    c = own_containerd
    Path(f"/proc/{c.proc.pid}/oom_score_adj").write_text("300")  # raising needs no privilege
    show = ("cat", "/proc/self/oom_score_adj")
    ours = ctr(c, "run", "--rm", "--runtime", PYSHIM, IMAGE_REF, "ours", *show, check=True).stdout
    theirs = ctr(c, "run", "--rm", "--runtime", RUNC, IMAGE_REF, "theirs", *show, check=True).stdout
    assert ours == theirs, (ours, theirs)
    # the daemon of `ours` exits a moment after `ctr run --rm` returned
    wait_gone(lambda: daemons(c), 20, "the shim of the --rm container to exit")
    run_d(c, "scored").check()
    (daemon,) = daemons(c)
    assert Path(f"/proc/{daemon}/oom_score_adj").read_text().strip() == "301"
    stop_and_remove(c, "scored")
    wait_gone(lambda: daemons(c), 20, "the shim to exit")


def test_a_peer_with_another_uid_is_refused(own_containerd):
    c = own_containerd
    run_d(c, "guarded").check()
    path = c.shim_socket_address(c.ns, "guarded").removeprefix("unix://")
    payload = b"\x0a\x17containerd.task.v2.Task\x12\x07Connect"
    outcome = exchange_as_nobody(path, struct.pack(">IIBB", len(payload), 1, 1, 0) + payload)
    assert outcome == "closed", outcome
    assert tasks(c).get("guarded") == "RUNNING"  # and the daemon serves containerd on
    stop_and_remove(c, "guarded")
    wait_gone(lambda: daemons(c), 20, "the shim to exit")
