"""shim.framework.console (the console socket, SCM_RIGHTS, resize) and shim.framework.stdio's terminal mode, with
local ptys and a fake runc that sends the master the way runc does (one message, one fd)."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import termios

import pytest

from shim.framework.console import ConsoleError, ConsoleSocket, attach_console, resize, window_size
from shim.framework.stdio import open_process_io


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def send_like_runc(path: str, fds: list[int], payload: bytes = b"/dev/pts/7") -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(path)  # a listening unix socket accepts into its backlog at once
        socket.send_fds(conn, [payload], fds)


@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    for fd in (master, slave):
        try:
            os.close(fd)
        except OSError:
            pass


def same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino, sa.st_rdev) == (sb.st_dev, sb.st_ino, sb.st_rdev)


async def test_receives_the_master_and_removes_the_temp_dir(tmp_path, pty_pair):
    master, _ = pty_pair
    before = open_fds()
    async with ConsoleSocket(parent=str(tmp_path)) as console:
        assert os.path.basename(console.path) == "pty.sock"
        assert os.path.dirname(os.path.dirname(console.path)) == str(tmp_path)
        send_like_runc(console.path, [master])
        received = await console.receive_master()
        assert received != master and same_file(received, master)
    assert list(tmp_path.iterdir()) == []
    os.close(received)
    assert open_fds() == before


async def test_accepting_starts_before_the_runtime_runs(tmp_path, pty_pair):
    # A fake runc in another process that sends and only then exits, as `runc create` does.
    master, _ = pty_pair
    async with ConsoleSocket(parent=str(tmp_path)) as console:
        code = (
            "import socket, sys, os\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.connect(sys.argv[1])\n"
            "socket.send_fds(s, [b'/dev/pts/9'], [int(sys.argv[2])])\n"
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, console.path, str(master),
                                                    pass_fds=[master])
        assert await proc.wait() == 0
        received = await console.receive_master(timeout=5)
        assert same_file(received, master)
        os.close(received)


async def test_errors_say_failed_to_retrieve_console_master(tmp_path):
    before = open_fds()
    async with ConsoleSocket(parent=str(tmp_path)) as console:
        with pytest.raises(ConsoleError, match=r"failed to retrieve console master: no pty master .*pty.sock"):
            await console.receive_master(timeout=0.1)
    async with ConsoleSocket(parent=str(tmp_path)) as console:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.connect(console.path)  # the runtime gives up without sending
        with pytest.raises(ConsoleError, match="failed to retrieve console master: .*without sending"):
            await console.receive_master(timeout=5)
    r, w = os.pipe()
    async with ConsoleSocket(parent=str(tmp_path)) as console:
        send_like_runc(console.path, [r, w])  # two fds: refused, both closed
        with pytest.raises(ConsoleError, match="failed to retrieve console master: expected one fd"):
            await console.receive_master(timeout=5)
    os.close(r), os.close(w)
    with pytest.raises(ConsoleError, match="failed to retrieve console master: creating console socket"):
        async with ConsoleSocket(parent=str(tmp_path / "missing")):
            pass
    assert list(tmp_path.iterdir()) == []
    assert open_fds() == before


async def test_a_master_nobody_took_is_closed(tmp_path, pty_pair):
    master, _ = pty_pair
    before = open_fds()
    async with ConsoleSocket(parent=str(tmp_path)) as console:
        send_like_runc(console.path, [master])
        await asyncio.sleep(0.1)  # received, but the runtime call failed: never asked for
    assert open_fds() == before


async def test_attach_console_without_terminal_is_a_no_op():
    class NoTerminal:
        terminal = False

    async with attach_console(NoTerminal()) as path:
        assert path is None


def test_resize_a_local_pty(pty_pair):
    master, slave = pty_pair
    resize(master, width=132, height=43)
    assert window_size(slave) == (132, 43)
    resize(slave, width=80, height=24)
    assert window_size(master) == (80, 24)


@pytest.fixture
def fifos(tmp_path):
    paths = []
    for name in ("in", "out"):
        path = str(tmp_path / name)
        os.mkfifo(path, 0o600)
        paths.append(path)
    return paths


async def read_until(fd: int, marker: bytes, timeout: float = 10) -> bytes:
    loop = asyncio.get_running_loop()
    seen = b""
    async with asyncio.timeout(timeout):
        while marker not in seen:
            ready = loop.create_future()
            loop.add_reader(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(fd)
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            seen += chunk
    return seen


async def test_terminal_mode_copies_both_ways_resizes_and_ends_on_eio(tmp_path, fifos):
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    before = open_fds()
    in_path, out_path = fifos
    client_out = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
    io = await open_process_io(in_path, out_path, "", terminal=True)
    assert io.terminal and not io.resize(width=1, height=1)  # no console yet
    # What runc does: a pty, the slave as the process's stdio, the master over the socket.
    master, slave = os.openpty()
    script = "stty size; read line; echo got $line; stty size"
    child = subprocess.Popen(["sh", "-c", script], stdin=slave, stdout=slave, stderr=slave,
                             start_new_session=True)
    os.close(slave)
    async with attach_console(io) as path:
        send_like_runc(path, [master])
    os.close(master)
    io.start_copying()
    io.close_child_ends()
    assert io.resize(width=100, height=30)
    client_in = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
    out = await read_until(client_out, b"\n")
    os.write(client_in, b"hello\r")
    out += await read_until(client_out, b"30 100")
    assert b"hello" in out and b"got hello" in out, out
    await asyncio.get_running_loop().run_in_executor(None, child.wait)
    assert await io.wait_output_flushed(5)  # EIO on the master is the output's EOF
    assert not io.resize(width=1, height=1)  # master closed once the output was flushed
    io.close_stdin()
    io.close()
    for fd in (client_in, client_out):
        os.close(fd)
    assert open_fds() == before
    signal.signal(signal.SIGPIPE, old)


def _controlling_tty_with_default_sighup() -> None:
    # The test runner may ignore SIGHUP (nohup), and an ignored disposition is inherited
    # across exec: the child must die of the hangup as a container process would.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def test_stdin_eof_hangs_up_the_console(fifos):
    """CloseIO and the client's writer closed: the process on the pty gets SIGHUP (Go shim)."""
    old = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    before = open_fds()
    in_path, out_path = fifos
    client_out = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
    io = await open_process_io(in_path, out_path, "", terminal=True)
    master, slave = os.openpty()
    # A session leader on the slave, as runc makes it: the hangup sends it SIGHUP.
    child = subprocess.Popen(["sh", "-c", "echo ready; exec sleep 60"], stdin=slave, stdout=slave,
                             stderr=slave, start_new_session=True,
                             preexec_fn=_controlling_tty_with_default_sighup)
    os.close(slave)
    async with attach_console(io) as path:
        send_like_runc(path, [master])
    os.close(master)
    io.start_copying()
    io.close_child_ends()
    client_in = os.open(in_path, os.O_WRONLY | os.O_NONBLOCK)
    assert b"ready" in await read_until(client_out, b"ready")
    io.close_stdin()
    os.close(client_in)  # stdin FIFO: EOF now
    code = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, child.wait), 10)
    assert code == -signal.SIGHUP
    assert not io.resize(width=1, height=1)
    io.close()
    os.close(client_out)
    assert open_fds() == before
    signal.signal(signal.SIGPIPE, old)


async def test_terminal_mode_closed_before_the_master_came(fifos):
    before = open_fds()
    in_path, out_path = fifos
    client_out = os.open(out_path, os.O_RDONLY | os.O_NONBLOCK)
    io = await open_process_io(in_path, out_path, "", terminal=True)
    assert io.child_fds()[0] == io.child_fds()[1]  # runc itself gets /dev/null
    io.close()
    os.close(client_out)
    assert open_fds() == before


def test_eio_is_what_a_master_reads_without_slave(pty_pair):
    master, slave = pty_pair
    os.close(slave)
    with pytest.raises(OSError) as caught:
        os.read(master, 10)
    assert caught.value.errno == errno.EIO
