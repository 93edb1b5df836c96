"""Reaper: spawning, output capture, exit routing (watchers vs subscribers), no leaked fds.

Nothing here may use subprocess while a Reaper is started: its waitpid(-1) would steal the
exit status (that is the point of having one reaper).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest

from shim.framework.reaper import CommandTimeout, Exit, Reaper, exit_code, set_child_subreaper


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
async def reaper():
    before = open_fds()
    r = Reaper()
    r.start()
    try:
        yield r
    finally:
        r.stop()
    # Every pipe, /dev/null and dup run() or spawn() made is closed again. (The loop's own
    # fds belong to pytest-asyncio's loop, which outlives this fixture.)
    assert open_fds() == before


@pytest.fixture
def subreaper():
    """Make this (pytest) process a child subreaper for one test, so orphans come to us.

    Unset afterwards; a descendant orphaned meanwhile stays our child, and every test that
    orphans one waits until the reaper has collected it.
    """
    set_child_subreaper(True)
    try:
        yield
    finally:
        set_child_subreaper(False)


def test_exit_code_of_wait_statuses():
    assert exit_code(0) == 0
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
    assert exit_code(signal.SIGTERM) == 143


@pytest.mark.parametrize(
    "argv, status",
    [(["true"], 0), (["false"], 1), (["sh", "-c", "exit 42"], 42), (["sh", "-c", "kill -9 $$"], 137)],
)
async def test_run_status(reaper, argv, status):
    before = time.time_ns()
    result = await reaper.run(argv)
    assert result.returncode == status
    assert before <= result.exited_at <= time.time_ns()
    assert result.pid > 0


async def test_run_captures_stdout_and_stderr_separately(reaper):
    result = await reaper.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")


async def test_run_large_output_and_input(reaper):
    data = os.urandom(1 << 20)
    result = await reaper.run(["cat"], input=data)
    assert result.returncode == 0
    assert result.stdout == data
    # Large output on both streams at once must not deadlock either pipe.
    script = "head -c 1048576 /dev/zero; head -c 1048576 /dev/zero >&2"
    result = await reaper.run(["sh", "-c", script])
    assert (len(result.stdout), len(result.stderr)) == (1 << 20, 1 << 20)


async def test_run_input_not_read_is_not_an_error(reaper):
    # The child exits without reading its stdin: EPIPE on our side is ignored.
    result = await reaper.run(["true"], input=os.urandom(1 << 20))
    assert result.returncode == 0


async def test_run_without_capture(reaper, tmp_path):
    path = tmp_path / "out"
    with open(path, "wb") as f:
        result = await reaper.run(["sh", "-c", "echo to-file; echo gone >&2"], stdout=f.fileno(), stderr=None)
    assert (result.stdout, result.stderr) == (b"", b"")
    assert path.read_bytes() == b"to-file\n"


async def test_run_env_and_extra_fds(reaper):
    r, w = os.pipe()
    try:
        result = await reaper.run(
            ["sh", "-c", 'echo "$GREETING" >&5; test -e /proc/self/fd/4 && echo leaked'],
            env={"GREETING": "hello", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            extra_fds={5: w},
        )
        os.close(w)
        w = -1
        assert result.returncode == 1  # `test` failed: fd 4 was not passed
        assert result.stdout == b""
        assert os.read(r, 100) == b"hello\n"
    finally:
        os.close(r)
        if w != -1:
            os.close(w)


async def test_spawn_fd_permutation(reaper):
    # Swap two fds: each target number is also the other mapping's source, so a naive
    # dup2 sequence would clobber one before using it.
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    try:
        # Child fd b_w gets our a_w (pipe a) and child fd a_w gets our b_w (pipe b).
        code = f"import os; os.write({b_w}, b'A'); os.write({a_w}, b'B')"
        result = await reaper.run([sys.executable, "-c", code], extra_fds={b_w: a_w, a_w: b_w})
        assert result.returncode == 0, result.stderr
        os.close(a_w)
        os.close(b_w)
        assert os.read(a_r, 10) == b"A"
        assert os.read(b_r, 10) == b"B"
    finally:
        for fd in (a_r, a_w, b_r, b_w):
            try:
                os.close(fd)
            except OSError:
                pass


async def test_child_inherits_only_mapped_fds(reaper):
    stray = os.open(os.devnull, os.O_RDONLY)  # an inheritable fd, as the daemon may have
    os.set_inheritable(stray, True)
    try:
        result = await reaper.run(["ls", "/proc/self/fd"])
    finally:
        os.close(stray)
    # 0, 1, 2 and the fd ls itself opened for the directory.
    assert len(result.stdout.split()) == 4, result.stdout


async def test_child_signal_dispositions(reaper):
    # Python ignores SIGPIPE and SIGXFSZ; a child must start with the default for them.
    result = await reaper.run(["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"])
    fields = dict(line.split(":\t") for line in result.stdout.decode().splitlines())
    ignored = int(fields["SigIgn"], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1))
    assert not ignored & (1 << (signal.SIGXFSZ - 1))
    assert int(fields["SigBlk"], 16) == 0


async def test_missing_executable(reaper):
    with pytest.raises(FileNotFoundError):
        await reaper.run(["no-such-binary-for-pyshim"])
    with pytest.raises(FileNotFoundError):
        reaper.spawn(["/nonexistent/binary"])


async def test_timeout_kills_and_reaps(reaper):
    with reaper.subscribe() as sub:
        started = time.monotonic()
        with pytest.raises(CommandTimeout) as info:
            await reaper.run(["sh", "-c", "echo partial; exec sleep 30"], timeout=0.3)
        assert time.monotonic() - started < 5
        assert isinstance(info.value, TimeoutError)
        assert info.value.stdout == b"partial\n"
        # The killed process was reaped by us and not handed to subscribers.
        assert not reaper._watchers
        assert sub.get_nowait() is None


async def test_cancelled_run_kills_the_child(reaper):
    task = asyncio.create_task(reaper.run(["sleep", "30"]))
    for _ in range(1000):  # spawned (it may take more than a moment on a busy machine)
        if reaper._watchers:
            break
        await asyncio.sleep(0.02)
    (pid,) = reaper._watchers
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Killed, and its exit is still collected (by the reaper, for nobody).
    for _ in range(1000):
        if pid not in reaper._watchers:
            break
        await asyncio.sleep(0.02)
    assert pid not in reaper._watchers
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_grandchild_output_holder_does_not_block_run(reaper, subreaper):
    # sh exits at once while its background child keeps the stdout pipe open.
    with reaper.subscribe() as sub:
        result = await asyncio.wait_for(
            reaper.run(["sh", "-c", "echo mine; sleep 0.5 & exit 0"]), timeout=5
        )
        assert (result.returncode, result.stdout) == (0, b"mine\n")
        orphan = await asyncio.wait_for(sub.get(), timeout=5)
        assert orphan.status == 0


async def test_many_concurrent_runs(reaper):
    results = await asyncio.gather(
        *(reaper.run(["sh", "-c", f"echo {i}; exit {i % 7}"]) for i in range(100))
    )
    for i, result in enumerate(results):
        assert (result.returncode, result.stdout) == (i % 7, f"{i}\n".encode())
    assert not reaper._watchers


async def test_watch_spawned_process(reaper):
    pid = reaper.spawn(["sh", "-c", "exit 5"])
    fut = reaper.watch(pid)
    assert reaper.watch(pid) is fut  # spawn already registered it
    exit = await asyncio.wait_for(fut, timeout=5)
    assert exit == Exit(pid, 5, exit.timestamp)


async def test_orphan_is_delivered_to_subscribers(reaper, subreaper):
    """A grandchild re-parented to us (as a container init is) reaches every subscriber."""
    with reaper.subscribe() as first, reaper.subscribe() as second:
        # The middle process prints the grandchild's pid and exits; the grandchild is
        # orphaned, re-parented to this process and kills itself a bit later.
        result = await reaper.run(
            ["sh", "-c", "sh -c 'sleep 0.2; kill -TERM $$' >/dev/null & echo $!"]
        )
        assert result.returncode == 0
        grandchild = int(result.stdout)
        exit1 = await asyncio.wait_for(first.get(), timeout=5)
        exit2 = await asyncio.wait_for(second.get(), timeout=5)
        assert exit1 == exit2
        assert (exit1.pid, exit1.status) == (grandchild, 128 + signal.SIGTERM)
        # The watched middle process's exit went to its watcher only.
        assert first.get_nowait() is None


async def test_subscription_iteration_ends_on_close(reaper, subreaper):
    sub = reaper.subscribe()
    await reaper.run(["sh", "-c", "sleep 0.1 & exit 0"])
    got = []

    async def consume():
        async for exit in sub:
            got.append(exit)

    task = asyncio.create_task(consume())
    for _ in range(250):
        if got:
            break
        await asyncio.sleep(0.02)
    sub.close()
    await asyncio.wait_for(task, timeout=5)
    assert len(got) == 1 and got[0].status == 0


async def test_exits_before_start_are_collected(subreaper):
    # A child that exited while no reaper was running is collected as soon as one starts.
    first = Reaper()
    first.start()
    pid = first.spawn(["true"])
    first.stop()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                break
        await asyncio.sleep(0.01)
    second = Reaper()
    second.start()
    try:
        assert not os.path.exists(f"/proc/{pid}")
    finally:
        second.stop()


async def test_stop_ends_subscriptions_and_rejects_use():
    r = Reaper()
    with pytest.raises(RuntimeError):
        r.subscribe()
    r.start()
    sub = r.subscribe()
    r.stop()
    with pytest.raises(EOFError):
        await sub.get()
    with pytest.raises(RuntimeError):
        r.spawn(["true"])
