"""The zygote: a warm parent whose forks run `start` and become its daemon, and every way it may
not be used.

Each test gets its own socket directory, so its zygote is its own; the zygote is started by a
short-lived helper process (as `start` starts it) so that it is reparented like in production,
and every zygote and daemon a test made is killed at the end.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from shim.framework import zygote, zygote_client

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="daemons join cgroups and serve like root shims")

# Plays containerd running the binary's start or delete: optionally joins cgroups and changes
# its settings, then forks "the command" (the binary's process, whose parent it is) which hands
# its argv to the zygote on a pipe for stdout and a file for stderr, and prints what it got.
HELPER = r"""
import json, os, sys
from shim.cli import IDENTITY
from shim.framework import zygote_client
from shim.framework.app import install
install(IDENTITY)  # as the binary's entry point does: the zygote is keyed by it
args = json.loads(sys.argv[1])
if args.get("start_only"):
    print(json.dumps({"started": zygote_client.start_zygote(zygote_client.socket_path(args["dir"]))}))
    sys.exit(0)
for procs in args.get("cgroups", []):
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
if args.get("settings"):  # what the command's process (and so its worker) has from containerd
    import resource
    os.nice(3)
    os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_NOFILE, (4321, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("500")  # raising needs no privilege
out_r, out_w = os.pipe()
err_path = os.path.join(args["dir"], "stderr-" + args.get("id", "x"))
pid = os.fork()
if pid == 0:
    os.chdir(args.get("cwd", "/"))
    os.dup2(out_w, 1)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(err, 2)
    os.close(out_r)
    report = os.open(args["report"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    code = zygote_client.run_warm([sys.argv[0], *args["argv"]], directory=args["dir"])
    os.write(report, json.dumps({"code": code, "error": zygote_client.last_error, "worker": zygote_client.last_worker,
                                 "cmdline": open("/proc/self/cmdline", "rb").read().decode(),
                                 "comm": open("/proc/self/comm").read()}).encode())
    os._exit(0 if code is None else code)
os.close(out_w)
stdout = b""
while chunk := os.read(out_r, 65536):  # EOF only once every holder of the pipe let go
    stdout += chunk
_, status = os.waitpid(pid, 0)
with open(args["report"]) as f:
    got = json.load(f)
with open(err_path, "rb") as f:
    got["stderr"] = f.read().decode(errors="replace")
got["stdout"] = stdout.decode(errors="replace")
got["stdout_hex"] = stdout.hex()
got["status"] = os.waitstatus_to_exitcode(status)
print(json.dumps(got))
"""


def _proc_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_stat(int(p)) or ["", "0"])[1] == str(pid)]


def _gone(pid: int) -> bool:
    """Exited and reaped (a zombie is not gone)."""
    return _stat(pid) is None


def _wait(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Env:
    """A socket dir, helpers to run `start`-like processes, and cleanup of what they made."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="zyg-", dir="/tmp")  # short: sun_path is 108 bytes
        self.path = zygote_client.socket_path(self.dir)
        self.daemons: list[int] = []
        self.env = {**os.environ, "PYSHIM_ZYGOTE_IDLE": "60"}
        self.env.pop("PYSHIM_ZYGOTE", None)

    def zygote_pids(self) -> list[int]:
        pids = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                cmd = _proc_cmdline(int(name))
                if cmd[:2] == ["pyshim-zygote", self.path]:
                    pids.append(int(name))
        # a spare that was just forked still shows its zygote's command line for a moment
        return [pid for pid in pids if int((_stat(pid) or ["Z", "0"])[1]) not in pids]

    def run_helper(self, args: dict, env: dict | None = None) -> dict:
        args = {"dir": self.dir, "report": os.path.join(self.dir, f"report-{uuid.uuid4().hex[:6]}"), **args}
        done = subprocess.run([sys.executable, "-c", HELPER, json.dumps(args)], env=env or self.env,
                              capture_output=True, timeout=30, cwd="/")
        assert done.returncode == 0, done.stderr.decode()
        return json.loads(done.stdout)

    def start_zygote(self, env: dict | None = None) -> int:
        assert self.run_helper({"start_only": True}, env)["started"]
        _wait(self.connectable, 30, "the zygote to listen")
        (pid,) = self.zygote_pids()
        return pid

    def connectable(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.path)
            return True
        except OSError:
            return False
        finally:
            probe.close()

    def bundle(self) -> str:
        bundle = tempfile.mkdtemp(prefix="bundle-", dir=self.dir)
        os.mkfifo(os.path.join(bundle, "log"))
        return bundle

    def close(self) -> None:
        for pid in [*self.zygote_pids(), *self.daemons]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            stat = _stat(pid)
            if stat is not None and int(stat[1]) == os.getpid():  # a zygote run_warm started from here
                os.waitpid(pid, 0)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def env():
    e = Env()
    try:
        yield e
    finally:
        e.close()


def test_disabled_by_environment(env, monkeypatch):
    monkeypatch.setenv("PYSHIM_ZYGOTE", "0")
    assert zygote_client.run_warm(["shim", "-id", "x", "start"], directory=env.dir) is None
    assert "disabled" in zygote_client.last_error
    assert os.listdir(env.dir) == []  # no zygote was started either


def test_installation_key_follows_version_and_python_environment(monkeypatch):
    key = zygote.installation_key()
    assert key == zygote.installation_key()
    monkeypatch.setattr(zygote_client, "__version__", "0.0.0-other")  # the name part of the key
    assert zygote.installation_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    assert zygote.installation_key() != key
    assert len(zygote_client.socket_path("/run/containerd/s")) < 108


def test_installation_key_follows_dependencies_not_the_bundle(monkeypatch, tmp_path):
    import site

    key = zygote.installation_key()
    # sys.path[0] is start's cwd under `python -m` (the bundle): it must not matter
    monkeypatch.setattr(sys, "path", [str(tmp_path / "bundle"), *sys.path])
    assert zygote.installation_key() == key
    # a pip install or upgrade adds or replaces entries of site-packages
    packages = tmp_path / "site-packages"
    packages.mkdir()
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(packages)])
    key = zygote.installation_key()
    os.utime(packages, ns=(0, 10**18))
    assert zygote.installation_key() != key


def test_no_zygote_starts_one_and_falls_back(env, monkeypatch):
    monkeypatch.setenv("PYSHIM_ZYGOTE_IDLE", "60")
    started = time.perf_counter()
    assert zygote_client.run_warm(["shim", "-id", "x", "start"], directory=env.dir) is None
    assert time.perf_counter() - started < 0.5  # it does not wait for the zygote
    _wait(env.connectable, 30, "the zygote to listen")
    (pid,) = env.zygote_pids()
    assert os.stat(env.path).st_mode & 0o777 == 0o600
    assert os.stat(env.dir).st_mode & 0o777 == 0o700
    # detached: own session, stdio on /dev/null, no fd but its own files
    stat = _stat(pid)
    assert stat is not None and int(stat[3]) == pid  # session id
    for fd in ("0", "1", "2"):
        assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
    others = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")} - {"/dev/null"}
    assert {o for o in others if not o.startswith("socket:")} == {env.path + ".lock"}  # lock, log
    # it holds the lock, so no second zygote can start
    lock = os.open(env.path + ".lock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(lock)


def test_concurrent_starts_make_one_zygote(env):
    procs = [subprocess.Popen([sys.executable, "-c", HELPER, json.dumps({"dir": env.dir, "start_only": True})],
                              env=env.env, stdout=subprocess.PIPE, cwd="/") for _ in range(6)]
    results = [json.loads(p.communicate(timeout=30)[0])["started"] for p in procs]
    assert results.count(True) == 1
    _wait(env.connectable, 30, "the zygote to listen")
    assert len(env.zygote_pids()) == 1


def test_a_zygote_that_fails_is_not_retried_at_every_start(env):
    # a recent attempt in the lock file and no zygote: starts fall back without spawning
    with open(env.path + ".lock", "w") as f:
        f.write(f"{time.time():.3f}\n")
    assert env.run_helper({"start_only": True}) == {"started": False}
    with open(env.path + ".lock", "w") as f:
        f.write(f"{time.time() - zygote_client.RESPAWN_DELAY - 1:.3f}\n")
    assert env.run_helper({"start_only": True}) == {"started": True}


@root_only
def test_start_in_a_worker_is_the_start_command_and_then_its_daemon(env):
    from shim.api.containerd.task import v2 as task
    from shim.api.google.protobuf import Empty
    from shim.framework.start import socket_address
    from shim.framework.ttrpc import Client

    zygote_env = {**env.env, "ZYGOTE_ONLY": "1"}
    zpid = env.start_zygote(zygote_env)

    # the command's cgroups differ from the zygote's: one v1 hierarchy and v2, if mounted
    cgroups = _test_cgroups()
    address = ""
    try:
        bundle = env.bundle()
        log_reader = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
        task_id = f"z-{uuid.uuid4().hex[:8]}"
        containerd = os.path.join(env.dir, "containerd.sock")
        start_env = {**env.env, "TTRPC_ADDRESS": os.path.join(env.dir, "nobody.ttrpc"), "START_MARK": task_id}
        _wait(lambda: len(_children(zpid)) == 1, 10, "the zygote's spare worker")
        (spare,) = _children(zpid)
        assert _proc_cmdline(spare) == ["pyshim-spare", env.path]
        started = time.perf_counter()
        got = env.run_helper({"id": task_id, "cwd": bundle, "settings": True,
                              "argv": ["-namespace", "unit", "-address", containerd, "-id", task_id, "start"],
                              "cgroups": [procs for procs, _, _ in cgroups]}, start_env)
        took = time.perf_counter() - started
        assert (got["code"], got["status"], got["stderr"]) == (0, 0, ""), got
        pid = got["worker"]
        env.daemons.append(pid)
        assert pid == spare  # forked ahead, it only had to take the request
        assert took < 5
        # what start prints and records, and containerd reads its output to EOF although the daemon runs on
        assert got["stdout"] == socket_address(containerd, "unit", task_id)
        with open(os.path.join(bundle, "address")) as f:
            assert f.read() == got["stdout"]
        address = got["stdout"]

        async def connect() -> int:
            async with await Client.connect(address) as client:
                reply = await client.call("containerd.task.v3.Task", "Connect", task.ConnectRequest(id=task_id),
                                          task.ConnectResponse, timeout=10)
                return reply.shim_pid

        assert asyncio.run(connect()) == pid

        # what `start`'s own fork would have been
        assert os.readlink(f"/proc/{pid}/cwd") == bundle
        stat = _stat(pid)
        assert stat is not None
        ppid, pgid, sid = int(stat[1]), int(stat[2]), int(stat[3])
        assert (ppid, pgid) == (zpid, pid) and sid != pid  # own group, not a session leader
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = {e.partition(b"=")[0]: e.partition(b"=")[2] for e in f.read().split(b"\0") if e}
        assert environ[b"START_MARK"] == task_id.encode()
        assert environ[b"TTRPC_ADDRESS"] == os.path.join(env.dir, "nobody.ttrpc").encode()
        assert b"ZYGOTE_ONLY" not in environ and b"PYSHIM_ZYGOTE_PAD" not in environ
        assert _proc_cmdline(pid) == [a for a in got["cmdline"].split("\0") if a]
        with open(f"/proc/{pid}/comm") as f:
            assert f.read() == got["comm"]
        assert _cgroups_of(pid, cgroups) == [rel for _, _, rel in cgroups]
        fds = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert env.path + ".lock" not in fds
        assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in ("0", "1", "2")} == {"/dev/null"}
        with open(f"/proc/{pid}/status") as f:
            status = {k: v.strip() for k, v in (line.split(":", 1) for line in f.read().splitlines())}
        assert int(status["SigBlk"], 16) == 0
        assert status["Umask"] == "0027"
        assert int(stat[16]) == 3  # nice
        with open(f"/proc/{pid}/limits") as f:
            assert [line.split()[3] for line in f if line.startswith("Max open files")] == ["4321"]
        with open(f"/proc/{pid}/oom_score_adj") as f:
            assert f.read().strip() == "501"  # one above the command's parent's (containerd's), as start sets it
        if os.path.isdir("/sys/kernel/mm/ksm"):  # the zygote's memory, offered to KSM, and so the daemon's
            with open(f"/proc/{pid}/smaps") as f:
                lines = f.read().splitlines()
            heap = next(i for i, line in enumerate(lines) if line.endswith("[heap]"))
            assert "mg" in next(line for line in lines[heap:] if line.startswith("VmFlags:")).split()

        async def shutdown() -> None:
            async with await Client.connect(address) as client:
                await client.call("containerd.task.v2.Task", "Shutdown", task.ShutdownRequest(id=task_id), Empty,
                                  timeout=10)

        asyncio.run(shutdown())
        _wait(lambda: _gone(pid), 15, "the daemon to exit and be reaped")
        assert not os.path.exists(address.removeprefix("unix://"))
        os.close(log_reader)
        assert env.zygote_pids() == [zpid]
        # the next command's worker, forked once nothing else asked for a while (QUIET_DELAY)
        _wait(lambda: [_proc_cmdline(p)[0] for p in _children(zpid)] == ["pyshim-spare"], 10, "the next spare")
    finally:
        _remove_cgroups(cgroups)
        if address:
            try:
                os.unlink(address.removeprefix("unix://"))
            except FileNotFoundError:
                pass


def test_a_bad_command_line_fails_in_the_worker_as_in_the_binary(env):
    from shim.cli import IDENTITY
    from shim.framework.flags import UsageError, parse_flags

    env.start_zygote()
    with pytest.raises(UsageError) as bad:
        parse_flags(["-no-such-flag", "start"])
    got = env.run_helper({"argv": ["-no-such-flag", "start"]})
    assert got["worker"] > 0 and got["code"] == 2 and got["status"] == 2, got
    assert (got["stdout"], got["stderr"]) == ("", f"{IDENTITY.binary_name}: {bad.value}\n")


@root_only
def test_a_dead_spare_costs_a_fork_not_the_start(env):
    from shim.framework.start import socket_address

    zpid = env.start_zygote()
    _wait(lambda: len(_children(zpid)) == 1, 10, "the zygote's spare worker")
    (spare,) = _children(zpid)
    os.kill(spare, signal.SIGKILL)
    _wait(lambda: spare not in _children(zpid), 10, "the killed spare to be reaped")
    bundle = env.bundle()
    log_reader = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
    task_id = f"nospare-{uuid.uuid4().hex[:6]}"
    containerd = os.path.join(env.dir, "containerd.sock")
    got = env.run_helper({"id": task_id, "cwd": bundle,
                          "argv": ["-namespace", "unit", "-address", containerd, "-id", task_id, "start"]})
    address = socket_address(containerd, "unit", task_id)
    try:
        assert (got["code"], got["stdout"]) == (0, address), got
        assert got["worker"] not in (0, spare)
        env.daemons.append(got["worker"])
        with open(env.path + ".lock") as f:
            assert "is gone" in f.read()  # the zygote says why it forked on the spot
        _wait(lambda: len(_children(zpid)) == 2, 10, "a new spare beside the daemon")
    finally:
        os.close(log_reader)
        try:
            os.unlink(address.removeprefix("unix://"))
        except FileNotFoundError:
            pass


@root_only
def test_a_worker_runs_nothing_without_go(env):
    env.start_zygote()
    bundle = env.bundle()
    out_r, out_w = os.pipe()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(env.path)
    request = {"v": zygote_client.PROTOCOL, "argv": ["shim", "-namespace", "unit", "-id", "nogo", "start"], "cwd": bundle,
               "env": dict(os.environ)}
    conn.sendmsg([json.dumps(request).encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, out_w, 2)))])
    os.close(out_w)
    pid = json.loads(conn.recv(65536))["pid"]
    env.daemons.append(pid)
    conn.close()  # a command that gave up (and runs itself): no "go"
    _wait(lambda: _gone(pid), 15, "the worker to give up")
    assert os.read(out_r, 100) == b""  # it printed nothing, and let go of the pipe
    os.close(out_r)
    assert sorted(os.listdir(bundle)) == ["log"]  # no address: nothing of start ran


@root_only
def test_zygote_refuses_what_it_does_not_run(env):
    env.start_zygote()
    assert zygote_client.run_warm(["shim", "-id", "x", "delete"], directory=env.dir) is None
    assert "not a command the zygote runs" in zygote_client.last_error
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(env.path)
    request = {"v": zygote_client.PROTOCOL, "argv": ["shim", "start"], "cwd": "/", "env": {}}
    conn.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, (1).to_bytes(4, sys.byteorder))])
    assert "expected three fds" in json.loads(conn.recv(65536))["error"]
    conn.close()


def test_stale_socket_file_falls_back_and_is_replaced(env):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(env.path)
    stale.close()  # a zygote killed with SIGKILL leaves this behind
    started = time.perf_counter()
    assert zygote_client.run_warm(["shim", "-id", "x", "start"], directory=env.dir) is None
    assert time.perf_counter() - started < 0.5
    assert "Connection refused" in zygote_client.last_error
    _wait(env.connectable, 30, "a new zygote to replace the stale socket")


def test_unresponsive_zygote_falls_back(env, monkeypatch):
    monkeypatch.setattr(zygote_client, "CLIENT_TIMEOUT", 0.3)
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hung.bind(env.path)
    hung.listen(4)  # accepts into the backlog, never answers
    try:
        started = time.perf_counter()
        assert zygote_client.run_warm(["shim", "-id", "x", "start"], directory=env.dir) is None
        assert time.perf_counter() - started < 2
        assert "timed out" in zygote_client.last_error
    finally:
        hung.close()
    assert env.zygote_pids() == []


def test_zygote_exits_when_idle_and_so_does_its_spare(env):
    pid = env.start_zygote({**env.env, "PYSHIM_ZYGOTE_IDLE": "1"})
    spares = _children(pid)
    _wait(lambda: (_stat(pid) or ["Z"])[0] == "Z", 10, "the idle zygote to exit")
    _wait(lambda: all(_gone(s) or (_stat(s) or ["Z"])[0] == "Z" for s in spares), 10, "its spare to exit")
    assert not os.path.exists(env.path)
    lock = os.open(env.path + ".lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    finally:
        os.close(lock)
    assert sorted(os.listdir(env.dir)) == [os.path.basename(env.path) + ".lock"]
    with open(env.path + ".lock") as f:
        assert "exiting (idle)" in f.read()


# -- cgroups ------------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, set[str], str]]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _dev, mountpoint, fstype, opts = line.split()[:4]
            if fstype in ("cgroup", "cgroup2"):
                out.append((fstype, set(opts.split(",")), mountpoint))
    return out


def _test_cgroups() -> list[tuple[str, str, str]]:
    """New child cgroups of ours in v2 and in one v1 hierarchy (where mounted):
    [(its cgroup.procs, hierarchy as /proc/<pid>/cgroup names it, path it shows)]."""
    with open("/proc/self/cgroup") as f:
        mine = {parts[1]: parts[2] for parts in (line.rstrip("\n").split(":", 2) for line in f)}
    mounts = _mounts()
    chosen = []
    v2 = next((mp for fs, _opts, mp in mounts if fs == "cgroup2"), None)
    if v2 is not None and "" in mine:
        chosen.append(("", v2))
    for hierarchy in mine:
        if hierarchy and set(hierarchy.split(",")) & {"pids", "freezer", "name=systemd"}:
            mp = next((mp for fs, opts, mp in mounts if fs == "cgroup" and set(hierarchy.split(",")) <= opts), None)
            if mp is not None:
                chosen.append((hierarchy, mp))
                break
    name = f"pyshim-zygote-test-{uuid.uuid4().hex[:8]}"
    out = []
    for hierarchy, mountpoint in chosen:
        rel = mine[hierarchy].rstrip("/") + "/" + name
        try:
            os.mkdir(mountpoint + rel)
        except OSError:
            continue
        out.append((os.path.join(mountpoint + rel, "cgroup.procs"), hierarchy, rel))
    if not out:
        pytest.skip("no cgroup hierarchy to make a test cgroup in")
    return out


def _cgroups_of(pid: int, cgroups: list[tuple[str, str, str]]) -> list[str]:
    with open(f"/proc/{pid}/cgroup") as f:
        lines = {parts[1]: parts[2] for parts in (line.rstrip("\n").split(":", 2) for line in f)}
    return [lines.get(hierarchy, "") for _procs, hierarchy, _rel in cgroups]


def _remove_cgroups(cgroups: list[tuple[str, str, str]]) -> None:
    for procs, _hierarchy, _rel in cgroups:
        directory = os.path.dirname(procs)
        try:
            with open(procs) as f:
                for pid in f.read().split():
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
        for _ in range(100):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


@root_only
def test_sigterm_stops_the_zygote_not_its_daemons(env):
    from shim.api.containerd.task import v2 as task
    from shim.api.google.protobuf import Empty
    from shim.framework.ttrpc import Client

    zpid = env.start_zygote()
    bundle = env.bundle()
    log_reader = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
    task_id = f"survivor-{uuid.uuid4().hex[:6]}"
    got = env.run_helper({"id": task_id, "cwd": bundle, "argv": [
        "-namespace", "unit", "-address", os.path.join(env.dir, "containerd.sock"), "-id", task_id, "start"]})
    assert got["code"] == 0, got
    pid, address = got["worker"], got["stdout"]
    env.daemons.append(pid)
    os.kill(zpid, signal.SIGTERM)
    _wait(lambda: (_stat(zpid) or ["Z"])[0] == "Z", 10, "the zygote to exit")
    assert not os.path.exists(env.path)

    async def talk() -> int:
        async with await Client.connect(address) as client:
            reply = await client.call("containerd.task.v3.Task", "Connect", task.ConnectRequest(id=task_id),
                                      task.ConnectResponse, timeout=10)
            await client.call("containerd.task.v2.Task", "Shutdown", task.ShutdownRequest(id=task_id), Empty,
                              timeout=10)
            return reply.shim_pid

    assert asyncio.run(talk()) == pid
    _wait(lambda: _gone(pid), 15, "the orphaned daemon to exit and be reaped")
    os.close(log_reader)


def test_after_a_request_the_zygote_waits_for_a_quiet_moment(tmp_path):
    """What run() does between requests: a pending command means busy (fork the spare at once);
    a changed installation is noticed when it checks."""
    z = zygote.Zygote(str(tmp_path / "z.sock"), -1, 60.0)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(z.path)
    server.listen(4)
    z.server = server
    try:
        started = time.monotonic()
        assert not z.next_request_within(0.05)
        assert time.monotonic() - started >= 0.04
        command = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command.connect(z.path)
        assert z.next_request_within(5)
        command.close()
    finally:
        server.close()
    z.check_installation()
    assert not z.stale and z.key_checked > 0
    z.key = "files of another installation"
    z.check_installation()
    assert z.stale
