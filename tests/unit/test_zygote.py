"""The zygote: a warm parent that forks daemons for `start`, and every way it may not be used.

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

from shim.framework import zygote
from shim.framework.flags import Flags

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="daemons join cgroups and serve like root shims")

# Plays the start command: optionally joins cgroups, binds a listening socket and asks the
# zygote for a daemon (or only starts a zygote), prints what it got, exits.
HELPER = r"""
import json, os, socket, sys
from shim.cli import IDENTITY
from shim.framework import zygote
from shim.framework.app import install
from shim.framework.flags import Flags
install(IDENTITY)  # as the binary's entry point does: the zygote is keyed by it
args = json.loads(sys.argv[1])
if args.get("start_only"):
    print(json.dumps({"started": zygote.start_zygote(zygote.socket_path(args["dir"]))}))
    sys.exit(0)
for procs in args.get("cgroups", []):
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
if args.get("settings"):  # what a daemon must take on from its start command
    import resource
    os.nice(3)
    os.umask(0o027)
    resource.setrlimit(resource.RLIMIT_NOFILE, (4321, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("500")  # raising needs no privilege
path = args["address"]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
listener.listen(16)
flags = Flags(namespace="unit", id=args["id"], address="/run/nowhere/containerd.sock",
              publish_binary="containerd", action="start")
pid = zygote.spawn_daemon(flags, listener, args["bundle"], directory=args["dir"])
if pid and args.get("settings"):  # as start's adjust_oom_score does, at once
    with open(f"/proc/{pid}/oom_score_adj", "w") as f:
        f.write("501")
print(json.dumps({"pid": pid, "error": zygote.last_error, "cgroup": open("/proc/self/cgroup").read(),
                  "cmdline": open("/proc/self/cmdline", "rb").read().decode(), "comm": open("/proc/self/comm").read()}))
sys.stdout.flush()
os._exit(0)  # as start does: the daemon must not need us once it has its "go"
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
        self.path = zygote.socket_path(self.dir)
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
        return pids

    def run_helper(self, args: dict, env: dict | None = None) -> dict:
        args = {"dir": self.dir, **args}
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
            if stat is not None and int(stat[1]) == os.getpid():  # a zygote spawn_daemon started from here
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
    a, b = socket.socketpair()
    try:
        assert zygote.spawn_daemon(Flags(id="x"), a, "/", directory=env.dir) is None
    finally:
        a.close()
        b.close()
    assert "disabled" in zygote.last_error
    assert os.listdir(env.dir) == []  # no zygote was started either


def test_installation_key_follows_version_and_python_environment(monkeypatch):
    key = zygote.installation_key()
    assert key == zygote.installation_key()
    monkeypatch.setattr(zygote, "__version__", "0.0.0-other")
    assert zygote.installation_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    assert zygote.installation_key() != key
    assert len(zygote.socket_path("/run/containerd/s")) < 108


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
    a, b = socket.socketpair()
    try:
        started = time.perf_counter()
        assert zygote.spawn_daemon(Flags(id="x"), a, "/", directory=env.dir) is None
        assert time.perf_counter() - started < 0.5  # it does not wait for the zygote
    finally:
        a.close()
        b.close()
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
        f.write(f"{time.time() - zygote.RESPAWN_DELAY - 1:.3f}\n")
    assert env.run_helper({"start_only": True}) == {"started": True}


@root_only
def test_daemon_from_the_zygote_is_a_start_forked_daemon(env):
    from shim.api.containerd.task import v2 as task
    from shim.api.google.protobuf import Empty
    from shim.framework.ttrpc import Client

    zygote_env = {**env.env, "ZYGOTE_ONLY": "1"}
    zpid = env.start_zygote(zygote_env)

    # the start command's cgroups differ from the zygote's: one v1 hierarchy and v2, if mounted
    cgroups = _test_cgroups()
    try:
        bundle = env.bundle()
        log_reader = os.open(os.path.join(bundle, "log"), os.O_RDONLY | os.O_NONBLOCK)
        task_id = f"z-{uuid.uuid4().hex[:8]}"
        address = os.path.join(env.dir, "shim.sock")
        start_env = {**env.env, "TTRPC_ADDRESS": os.path.join(env.dir, "nobody.ttrpc"), "START_MARK": task_id}
        started = time.perf_counter()
        got = env.run_helper({"id": task_id, "address": address, "bundle": bundle, "settings": True,
                              "cgroups": [procs for procs, _, _ in cgroups]}, start_env)
        took = time.perf_counter() - started
        pid = got["pid"]
        assert pid, got["error"]
        env.daemons.append(pid)
        assert took < 5

        async def connect() -> int:
            async with await Client.connect("unix://" + address) as client:
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
        with open(f"/proc/{pid}/status") as f:
            status = {k: v.strip() for k, v in (line.split(":", 1) for line in f.read().splitlines())}
        assert int(status["SigBlk"], 16) == 0
        assert status["Umask"] == "0027"
        assert int(stat[16]) == 3  # nice
        with open(f"/proc/{pid}/limits") as f:
            assert [line.split()[3] for line in f if line.startswith("Max open files")] == ["4321"]
        with open(f"/proc/{pid}/oom_score_adj") as f:
            assert f.read().strip() == "501"  # start's own adjustment is not undone

        async def shutdown() -> None:
            async with await Client.connect("unix://" + address) as client:
                await client.call("containerd.task.v2.Task", "Shutdown", task.ShutdownRequest(id=task_id), Empty,
                                  timeout=10)

        asyncio.run(shutdown())
        _wait(lambda: _gone(pid), 15, "the daemon to exit and be reaped")
        assert not os.path.exists(address)
        os.close(log_reader)
        assert env.zygote_pids() == [zpid]
        assert not [p for p in os.listdir("/proc") if p.isdigit() and (_stat(int(p)) or ["", "0"])[1] == str(zpid)]
    finally:
        _remove_cgroups(cgroups)


@root_only
def test_a_daemon_serves_only_after_go(env):
    env.start_zygote()
    bundle = env.bundle()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(env.dir, "shim.sock"))
    listener.listen(4)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(env.path)
    request = {"v": zygote.PROTOCOL, "flags": {"id": "nogo", "namespace": "unit"}, "bundle": bundle,
               "env": dict(os.environ)}
    conn.sendmsg([json.dumps(request).encode()],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, listener.fileno().to_bytes(4, sys.byteorder))])
    pid = json.loads(conn.recv(65536))["pid"]
    env.daemons.append(pid)
    conn.close()  # a start that gave up: no "go"
    _wait(lambda: _gone(pid), 15, "the daemon to give up")
    listener.close()


@root_only
def test_zygote_refuses_what_is_not_a_listening_socket(env):
    env.start_zygote()
    a, b = socket.socketpair()
    try:
        assert zygote.spawn_daemon(Flags(id="x"), a, "/", directory=env.dir) is None
        assert "not a listening unix socket" in zygote.last_error
    finally:
        a.close()
        b.close()


def test_stale_socket_file_falls_back_and_is_replaced(env):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(env.path)
    stale.close()  # a zygote killed with SIGKILL leaves this behind
    a, b = socket.socketpair()
    try:
        started = time.perf_counter()
        assert zygote.spawn_daemon(Flags(id="x"), a, "/", directory=env.dir) is None
        assert time.perf_counter() - started < 0.5
        assert "Connection refused" in zygote.last_error
    finally:
        a.close()
        b.close()
    _wait(env.connectable, 30, "a new zygote to replace the stale socket")


def test_unresponsive_zygote_falls_back(env, monkeypatch):
    monkeypatch.setattr(zygote, "CLIENT_TIMEOUT", 0.3)
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    hung.bind(env.path)
    hung.listen(4)  # accepts into the backlog, never answers
    a, b = socket.socketpair()
    try:
        started = time.perf_counter()
        assert zygote.spawn_daemon(Flags(id="x"), a, "/", directory=env.dir) is None
        assert time.perf_counter() - started < 2
        assert "timed out" in zygote.last_error
    finally:
        a.close()
        b.close()
        hung.close()
    assert env.zygote_pids() == []


def test_zygote_exits_when_idle(env):
    pid = env.start_zygote({**env.env, "PYSHIM_ZYGOTE_IDLE": "0.5"})
    _wait(lambda: (_stat(pid) or ["Z"])[0] == "Z", 10, "the idle zygote to exit")
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
    address = os.path.join(env.dir, "shim.sock")
    got = env.run_helper({"id": "survivor", "address": address, "bundle": bundle})
    pid = got["pid"]
    assert pid, got["error"]
    env.daemons.append(pid)
    os.kill(zpid, signal.SIGTERM)
    _wait(lambda: (_stat(zpid) or ["Z"])[0] == "Z", 10, "the zygote to exit")
    assert not os.path.exists(env.path)

    async def talk() -> int:
        async with await Client.connect("unix://" + address) as client:
            reply = await client.call("containerd.task.v3.Task", "Connect", task.ConnectRequest(id="survivor"),
                                      task.ConnectResponse, timeout=10)
            await client.call("containerd.task.v2.Task", "Shutdown", task.ShutdownRequest(id="survivor"), Empty,
                              timeout=10)
            return reply.shim_pid

    assert asyncio.run(talk()) == pid
    _wait(lambda: _gone(pid), 15, "the orphaned daemon to exit and be reaped")
    os.close(log_reader)
