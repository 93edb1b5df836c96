"""Runc: argv construction, --log parsing, and the real runtimes (runc and crun) driven
through the Reaper without containerd.

The integration tests need root, the runtime binaries and /bin/busybox (busybox-static);
they use a private --root and bundle under tmp_path, and make this process a child
subreaper for their duration so the container processes are re-parented to it.
No subprocess here while a Reaper runs: it would fight the reaper over exit statuses.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import uuid

import pytest

from shim.framework.reaper import Reaper, set_child_subreaper
from shim.runc.runtime import (
    CriuOptions,
    LogEntry,
    Runc,
    RuncError,
    RuntimeVersion,
    command_failure,
    last_error,
    parse_log,
    read_pid_file,
)
from shim.runc.crun import Crun

# --- real samples, captured on Debian 12 (runc 1.1.5+ds1, crun 1.8.1) ---------------------------

RUNC_MISSING_EXECUTABLE = (
    b'{"level":"error","msg":"runc create failed: unable to start container process: exec: '
    b'\\"nosuch\\": executable file not found in $PATH","time":"2026-11-28T11:38:38Z"}\n'
)
RUNC_MISSING_EXECUTABLE_TEXT = (
    'runc create failed: unable to start container process: exec: "nosuch": '
    "executable file not found in $PATH"
)
# With --debug: runc init's debug lines first, and file/func on the fatal entry.
RUNC_DEBUG_CREATE = b"""\
{"level":"debug","msg":"nsexec[22733]: =\\u003e nsexec container setup","time":"2026-11-28T11:43:46Z"}
{"level":"debug","msg":"nsexec-0[22733]: ~\\u003e nsexec stage-0","time":"2026-11-28T11:43:46Z"}
{"level":"debug","msg":"nsexec-2[1]: booting up go runtime ...","time":"2026-11-28T11:43:46Z"}
{"level":"debug","msg":"child process in init()","time":"2026-11-28T11:43:46Z"}
{"file":"github.com/opencontainers/runc/utils.go:61","func":"main.fatalWithCode","level":"error","msg":"runc create failed: unable to start container process: exec: \\"nosuch\\": executable file not found in $PATH","time":"2026-11-28T11:43:46Z"}
"""
RUNC_NOT_EXIST = b'{"level":"error","msg":"container does not exist","time":"2026-11-28T11:38:57Z"}\n'
# crun puts msg first and has sub-second time.
CRUN_MISSING_EXECUTABLE = (
    b'{"msg":"executable file `nosuch` not found in $PATH: No such file or directory",'
    b'"level":"error","time":"2026-11-28T11:38:51.377813Z"}\n'
)
CRUN_MISSING_EXECUTABLE_TEXT = "executable file `nosuch` not found in $PATH: No such file or directory"
CRUN_HYBRID_CGROUPS = (
    b'{"msg":"cgroups in hybrid mode not supported, drop all controllers from cgroupv2",'
    b'"level":"error","time":"2026-11-28T11:38:38.292029Z"}\n'
)
CRUN_NOT_EXIST = (
    b'{"msg":"error opening file `root/nope/status`: No such file or directory",'
    b'"level":"error","time":"2026-11-28T11:38:57.289603Z"}\n'
)

RUNC_VERSION = """runc version 1.1.5+ds1
commit: 1.1.5+ds1-1+deb12u1
spec: 1.0.2-dev
go: go1.19.8
libseccomp: 2.5.4
"""
CRUN_VERSION = """crun version 1.8.1
commit: f8a096be060b22ccd3d5f3ebe44108517fbf6c30
rundir: /run/crun
spec: 1.0.0
+SYSTEMD +SELINUX +APPARMOR +CAP +SECCOMP +EBPF +YAJL
"""


# --- argv (pure) -----------------------------------------------------------------------------


def make_runc(**kwargs) -> Runc:
    kwargs.setdefault("log_path", "/b/log.json")
    return Runc(Reaper(), **kwargs)


def test_argv_prefix_defaults():
    runc = Runc(Reaper(), namespace="default", log_path="/b/log.json")
    assert runc.argv("start", "c1") == [
        "runc", "--root", "/run/containerd/runc/default",
        "--log", "/b/log.json", "--log-format", "json", "start", "c1",
    ]


def test_argv_prefix_options():
    # Options.binary_name, Options.root with the namespace appended, Options.systemd_cgroup.
    runc = Runc(Reaper(), binary="crun", root="/run/x", namespace="k8s.io", log_path="/b/log.json", systemd_cgroup=True)
    assert runc.argv("state", "c1") == [
        "crun", "--root", "/run/x/k8s.io", "--log", "/b/log.json", "--log-format", "json",
        "--systemd-cgroup", "state", "c1",
    ]
    # Empty strings (unset proto fields) mean the defaults; a root may already hold the ns.
    runc = Runc(Reaper(), binary="", root="", log_path=None)
    assert runc.argv("ps", "c") == ["runc", "--root", "/run/containerd/runc", "ps", "c"]


def test_create_args():
    assert make_runc().create_args("c1", "/b", pid_file="/b/init.pid") == [
        "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "c1",
    ]
    args = make_runc().create_args(
        "c1", "/b", pid_file="/b/init.pid", console_socket="/tmp/pty.sock", no_pivot=True, no_new_keyring=True
    )
    assert args == [
        "create", "--bundle", "/b", "--pid-file", "/b/init.pid", "--console-socket", "/tmp/pty.sock",
        "--no-pivot", "--no-new-keyring", "c1",
    ]


def test_pid_file_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    args = make_runc().create_args("c1", "/b", pid_file="init.pid")
    assert args[4] == str(tmp_path / "init.pid")


def test_exec_args():
    assert make_runc().exec_args("c1", "/tmp/p.json", pid_file="/b/e1.pid") == [
        "exec", "--process", "/tmp/p.json", "--detach", "--pid-file", "/b/e1.pid", "c1",
    ]
    assert make_runc().exec_args("c1", "/p", pid_file="/b/e.pid", detach=False, console_socket="/s") == [
        "exec", "--process", "/p", "--console-socket", "/s", "--pid-file", "/b/e.pid", "c1",
    ]


def test_checkpoint_args():
    # As the runc shim passes CheckpointOptions (exit=False => --leave-running).
    criu = CriuOptions(
        image_path="/img", work_path="/work/criu-work", tcp_established=True, ext_unix_sk=True,
        shell_job=True, file_locks=True, empty_ns=["network", "ipc"],
    )
    args = make_runc().checkpoint_args("c1", criu, leave_running=True)
    assert args == [
        "checkpoint", "--image-path", "/img", "--work-path", "/work/criu-work", "--tcp-established",
        "--ext-unix-sk", "--shell-job", "--file-locks", "--empty-ns", "network", "--empty-ns", "ipc",
        "--leave-running", "c1",
    ]
    assert make_runc().checkpoint_args("c1", CriuOptions("/img")) == ["checkpoint", "--image-path", "/img", "c1"]
    # No image path: left to the runtime's default, as go-runc does.
    assert make_runc().checkpoint_args("c1", CriuOptions("", work_path="/w")) == ["checkpoint", "--work-path", "/w", "c1"]


def test_restore_args():
    args = make_runc().restore_args(
        "c1", "/b", CriuOptions("/img", work_path="/w", parent_path="/parent"), pid_file="/b/init.pid",
        console_socket="/s", no_pivot=True,
    )
    assert args == [
        "restore", "--image-path", "/img", "--work-path", "/w", "--parent-path", "/parent", "--detach",
        "--pid-file", "/b/init.pid", "--console-socket", "/s", "--no-pivot", "--no-subreaper",
        "--bundle", "/b", "c1",
    ]


def test_env_drops_notify_socket(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("KEEP_ME", "1")
    env = make_runc()._env()
    assert "NOTIFY_SOCKET" not in env
    assert env["KEEP_ME"] == "1"


def test_version_parse():
    v = RuntimeVersion.parse(RUNC_VERSION)
    assert (v.name, v.version, v.commit, v.spec) == ("runc", "1.1.5+ds1", "1.1.5+ds1-1+deb12u1", "1.0.2-dev")
    assert v.extra == {"go": "go1.19.8", "libseccomp": "2.5.4"}
    v = RuntimeVersion.parse(CRUN_VERSION)
    assert (v.name, v.version, v.commit, v.spec) == ("crun", "1.8.1", "f8a096be060b22ccd3d5f3ebe44108517fbf6c30", "1.0.0")
    assert v.extra == {"rundir": "/run/crun"}
    with pytest.raises(ValueError):
        RuntimeVersion.parse("")


def test_read_pid_file(tmp_path):
    (tmp_path / "init.pid").write_text("1234")
    assert read_pid_file(str(tmp_path / "init.pid")) == 1234
    (tmp_path / "crun.pid").write_text("42\n")
    assert read_pid_file(str(tmp_path / "crun.pid")) == 42


# --- log parsing (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample, text",
    [
        (RUNC_MISSING_EXECUTABLE, RUNC_MISSING_EXECUTABLE_TEXT),
        (RUNC_DEBUG_CREATE, RUNC_MISSING_EXECUTABLE_TEXT),
        (RUNC_NOT_EXIST, "container does not exist"),
        (CRUN_MISSING_EXECUTABLE, CRUN_MISSING_EXECUTABLE_TEXT),
        (CRUN_HYBRID_CGROUPS, "cgroups in hybrid mode not supported, drop all controllers from cgroupv2"),
        (CRUN_NOT_EXIST, "error opening file `root/nope/status`: No such file or directory"),
    ],
)
def test_last_error_of_real_samples(sample, text):
    assert last_error(parse_log(sample)) == text


def test_parse_log_fields():
    (entry,) = [e for e in parse_log(RUNC_DEBUG_CREATE) if e.level == "error"]
    assert entry.time == "2026-11-28T11:43:46Z"
    assert entry.extra == {"file": "github.com/opencontainers/runc/utils.go:61", "func": "main.fatalWithCode"}
    assert parse_log(RUNC_DEBUG_CREATE)[0].msg == "nsexec[22733]: => nsexec container setup"


def test_parse_log_is_defensive():
    data = (
        b"\n"
        b"not json at all\n"
        b"[1, 2]\n"
        b'{"level":"error"}\n'  # no msg
        b'{"msg":"no level"}\n'
        b'{"level":"warning","msg":"a warning","time":"t"}\n'
        b'{"level":"error","msg":"first"}{"level":"error","msg":"  second  "}\n'  # two on a line
        b'{"level":"info","msg":"\xff invalid utf-8"}\n'
        b'{"level":"ERROR","msg":"upper-case level", "time": 5}\n'
        b'{"level":"error","msg":"truncated'  # a writer died mid-line
    )
    entries = parse_log(data)
    assert [(e.level, e.msg) for e in entries] == [
        ("warning", "a warning"),
        ("error", "first"),
        ("error", "  second  "),
        ("info", "\ufffd invalid utf-8"),
        ("error", "upper-case level"),
    ]
    assert entries[-1].time == "5"
    assert last_error(entries) == "upper-case level"
    assert last_error(entries[:3]) == "second"  # stripped, as containerd does


def test_last_error_none_without_errors():
    assert last_error([]) is None
    assert last_error(parse_log(b'{"level":"warning","msg":"w"}\n{"level":"error","msg":"  "}\n')) is None


def test_last_error_prefers_the_one_our_stderr_repeats():
    entries = [LogEntry("error", "mine"), LogEntry("error", "someone else's")]
    assert last_error(entries) == "someone else's"
    assert last_error(entries, stderr="mine\n") == "mine"
    assert last_error(entries, stderr="unrelated") == "someone else's"


async def test_error_message_sources(tmp_path):
    """Log entry written by this call, else stderr, else 'exit status N'; old entries ignored."""
    log_path = tmp_path / "log.json"
    log_path.write_bytes(RUNC_NOT_EXIST)  # stale: from an earlier command
    script = tmp_path / "fake-runtime"

    async with Reaper() as reaper:
        runc = Runc(reaper, binary=str(script), root=str(tmp_path / "root"), log_path=str(log_path))

        script.write_text(
            "#!/bin/sh\n"
            "echo '{\"level\":\"warning\",\"msg\":\"w\"}' >> \"$4\"\n"
            "echo '{\"level\":\"error\",\"msg\":\"boom from log\"}' >> \"$4\"\n"
            "echo 'boom from stderr' >&2; exit 1\n"
        )
        script.chmod(0o755)
        with pytest.raises(RuncError) as info:
            await runc.start("c1")
        err = info.value
        assert str(err) == "boom from log"
        assert (err.command, err.returncode, err.stderr) == ("start", 1, "boom from stderr")
        assert err.argv[-2:] == ["start", "c1"]

        script.write_text("#!/bin/sh\necho 'only on stderr' >&2; exit 2\n")
        with pytest.raises(RuncError, match="^only on stderr$"):
            await runc.kill("c1", signal.SIGTERM)

        script.write_text("#!/bin/sh\nexit 3\n")
        with pytest.raises(RuncError, match="^exit status 3$"):
            await runc.delete("c1")

        # A log that was truncated since the call began is read from its start.
        script.write_text("#!/bin/sh\necho '{\"level\":\"error\",\"msg\":\"fresh\"}' > \"$4\"; exit 1\n")
        with pytest.raises(RuncError, match="^fresh$"):
            await runc.pause("c1")


async def test_update_failure_in_go_runcs_words(tmp_path):
    """runc-v2 returns an update's failure as go-runc words it, the output as printed."""
    script = tmp_path / "fake-runtime"
    script.write_text(
        "#!/bin/sh\n"
        "echo '{\"level\":\"error\",\"msg\":\"from the log\"}' >> \"$4\"\n"
        "echo 'failed to write \"10\": invalid argument' >&2; exit 1\n"
    )
    script.chmod(0o755)
    async with Reaper() as reaper:
        for runtime in (Runc, Crun):
            backend = runtime(reaper, binary=str(script), root=str(tmp_path / "root"),
                              log_path=str(tmp_path / "log.json"))
            with pytest.raises(RuncError) as info:
                await backend.update("c1", {"cpu": {"period": 10}})
            assert str(info.value) == (f'{script} did not terminate successfully: exit status 1: '
                                       'failed to write "10": invalid argument\n')
            assert info.value.command == "update"


def test_command_failure_keeps_what_the_error_knew():
    err = RuncError("x", command="update", argv=["/bin/crun", "update"], returncode=2, stderr="e", output="o\ne\n")
    worded = command_failure(err)
    assert str(worded) == "/bin/crun did not terminate successfully: exit status 2: o\ne\n"
    assert (worded.command, worded.returncode, worded.stderr, worded.output) == ("update", 2, "e", "o\ne\n")


async def test_commands_and_stdin_with_a_fake_runtime(tmp_path):
    """What each method passes and how it reads the answer, against a recording script."""
    record = tmp_path / "argv"
    script = tmp_path / "fake-runtime"
    script.write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > {record}\n"
        'case "$7" in\n'
        "  state) echo '{\"id\":\"c1\",\"pid\":12,\"status\":\"running\"}' ;;\n"
        "  ps) echo '[12,13]' ;;\n"
        f"  update) cat > {tmp_path}/stdin ;;\n"
        f"  exec) cat \"$9\" > {tmp_path}/process ;;\n"
        "esac\n"
    )
    script.chmod(0o755)

    def argv() -> list[str]:
        return record.read_text().splitlines()[6:]

    async with Reaper() as reaper:
        runc = Runc(reaper, binary=str(script), root="/r", log_path=str(tmp_path / "log.json"))
        assert await runc.state("c1") == {"id": "c1", "pid": 12, "status": "running"}
        assert await runc.ps("c1") == [12, 13]
        await runc.kill("c1", signal.SIGKILL, all=True)
        assert argv() == ["kill", "--all", "c1", "9"]
        await runc.delete("c1", force=True)
        assert argv() == ["delete", "--force", "c1"]
        await runc.update("c1", {"pids": {"limit": 10}})
        assert argv() == ["update", "--resources", "-", "c1"]
        assert json.loads((tmp_path / "stdin").read_text()) == {"pids": {"limit": 10}}
        spec = {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}
        await runc.exec("c1", spec, pid_file=str(tmp_path / "e.pid"))
        assert json.loads((tmp_path / "process").read_text()) == spec
        process_file = argv()[2]
        assert not os.path.exists(process_file)  # removed afterwards
        await runc.pause("c1")
        assert argv() == ["pause", "c1"]
        await runc.resume("c1")
        assert argv() == ["resume", "c1"]


async def test_unparsable_output_is_a_runc_error(tmp_path):
    script = tmp_path / "fake-runtime"
    script.write_text("#!/bin/sh\necho 'not json'\n")
    script.chmod(0o755)
    async with Reaper() as reaper:
        runc = Runc(reaper, binary=str(script), root="/r", log_path=str(tmp_path / "log.json"))
        with pytest.raises(RuncError, match="^state: cannot parse"):
            await runc.state("c1")
        script.write_text("#!/bin/sh\n")  # crun prints nothing for no processes
        assert await runc.ps("c1") == []


# --- real runtimes ---------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
BUSYBOX = "/bin/busybox"


def _crun_binary(tmp_path) -> str:
    """crun, or a wrapper that lets it run on a host whose cgroup v2 has controllers.

    crun 1.8 refuses every command on a hybrid host when the unified hierarchy has
    controllers ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2");
    this machine's does (hugetlb). Outside of containerd's own runtime choice, the test runs
    crun in a private mount namespace where /sys/fs/cgroup/unified is not mounted, which
    makes it a plain cgroup v1 host for crun. Nothing on the host changes.
    """
    crun = shutil.which("crun")
    if crun is None:
        pytest.skip("crun not installed")
    try:
        with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
            hybrid_with_controllers = bool(f.read().split())
    except OSError:
        hybrid_with_controllers = False
    if not hybrid_with_controllers:
        return crun
    if shutil.which("unshare") is None:
        pytest.skip("crun refuses this hybrid cgroup host and unshare is missing")
    wrapper = tmp_path / "crun-v1"
    wrapper.write_text(
        "#!/bin/sh\n"
        "exec unshare --mount --propagation private sh -c "
        f"'umount /sys/fs/cgroup/unified 2>/dev/null; exec {crun} \"$@\"' crun \"$@\"\n"
    )
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(params=["runc", "crun"])
def runtime_binary(request, tmp_path):
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static not installed")
    if request.param == "runc":
        path = shutil.which("runc")
        if path is None:
            pytest.skip("runc not installed")
        return path
    return _crun_binary(tmp_path)


@pytest.fixture
async def env(runtime_binary, tmp_path):
    """(reaper, runc, subscription, bundle factory), with cleanup of every container made."""
    fds_before = set(os.listdir("/proc/self/fd"))
    set_child_subreaper(True)
    reaper = Reaper()
    reaper.start()
    sub = reaper.subscribe()
    created: list[tuple[Runc, str]] = []
    root = tmp_path / "state"

    async def bundle(*args: str, id_prefix: str = "pyshim-test") -> tuple[Runc, str, str]:
        cid = f"{id_prefix}-{uuid.uuid4().hex[:12]}"
        path = tmp_path / cid
        (path / "rootfs" / "bin").mkdir(parents=True)
        shutil.copy(BUSYBOX, path / "rootfs" / "bin" / "busybox")
        os.symlink("busybox", path / "rootfs" / "bin" / "sh")
        result = await reaper.run(["runc", "spec", "--bundle", str(path)])
        assert result.returncode == 0, result.stderr
        config = json.loads((path / "config.json").read_text())
        config["process"]["terminal"] = False
        config["process"]["args"] = list(args)
        (path / "config.json").write_text(json.dumps(config))
        runc = Runc(reaper, binary=runtime_binary, root=str(root), log_path=str(path / "log.json"))
        created.append((runc, cid))
        return runc, cid, str(path)

    try:
        yield reaper, sub, bundle
    finally:
        for runc, cid in created:
            try:
                await runc.delete(cid, force=True)
            except RuncError:
                pass
        sub.close()
        reaper.stop()
        set_child_subreaper(False)
    assert set(os.listdir("/proc/self/fd")) == fds_before  # no pipe or spec file fd leaked


async def next_exit(sub, pid: int, timeout: float = 10.0):
    """The subscription's exit for pid (others, e.g. of a runtime's helpers, are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            exit = await sub.get()
            if exit.pid == pid:
                return exit


@needs_root
async def test_lifecycle(env):
    reaper, sub, bundle = env
    runc, cid, path = await bundle("sh", "-c", "read line; echo \"got $line\"; exit 3")
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        await runc.create(cid, path, pid_file=f"{path}/init.pid", stdin=in_r, stdout=out_w, stderr=out_w)
        os.close(in_r)
        os.close(out_w)
        in_r = out_w = -1
        pid = read_pid_file(f"{path}/init.pid")
        state = await runc.state(cid)
        assert (state["id"], state["status"], state["pid"]) == (cid, "created", pid)
        assert await runc.ps(cid) == [pid]

        await runc.start(cid)
        os.write(in_w, b"hello\n")
        exit = await next_exit(sub, pid)
        assert exit.status == 3
        assert os.read(out_r, 100) == b"got hello\n"
        assert (await runc.state(cid))["status"] == "stopped"
        await runc.delete(cid)
        with pytest.raises(RuncError) as info:
            await runc.state(cid)
        assert info.value.command == "state"
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd != -1:
                os.close(fd)


@needs_root
async def test_exec_kill_pause(env, runtime_binary):
    reaper, sub, bundle = env
    runc, cid, path = await bundle("sh", "-c", "exec sleep 60")
    await runc.create(cid, path, pid_file=f"{path}/init.pid")
    init = read_pid_file(f"{path}/init.pid")
    await runc.start(cid)
    assert (await runc.state(cid))["status"] == "running"

    process = {"args": ["sh", "-c", "exit 7"], "cwd": "/", "user": {"uid": 0, "gid": 0}, "env": ["PATH=/bin"]}
    await runc.exec(cid, process, pid_file=f"{path}/exec.pid")
    exec_pid = read_pid_file(f"{path}/exec.pid")
    assert (await next_exit(sub, exec_pid)).status == 7

    await runc.pause(cid)
    assert (await runc.state(cid))["status"] == "paused"
    await runc.resume(cid)
    assert (await runc.state(cid))["status"] == "running"
    assert init in await runc.ps(cid)

    await runc.kill(cid, signal.SIGKILL)
    assert (await next_exit(sub, init)).status == 128 + signal.SIGKILL
    await runc.delete(cid)


@needs_root
async def test_missing_executable(env, runtime_binary):
    reaper, sub, bundle = env
    runc, cid, path = await bundle("nosuch")
    with pytest.raises(RuncError) as info:
        await runc.create(cid, path, pid_file=f"{path}/init.pid")
    expected = RUNC_MISSING_EXECUTABLE_TEXT if runtime_binary.endswith("runc") else CRUN_MISSING_EXECUTABLE_TEXT
    assert str(info.value) == expected
    assert info.value.command == "create"
    assert info.value.returncode == 1


@needs_root
async def test_version(env, runtime_binary):
    reaper, sub, bundle = env
    runc = Runc(reaper, binary=runtime_binary)
    version = await runc.version()
    assert version.name in ("runc", "crun")
    assert version.version and version.spec
