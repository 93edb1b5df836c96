"""ProcessIO.describe (what `pyshim inspect` shows of a process's stdio): byte counts and
blocked state of real pipe pumps, and the description of each kind of source and target."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time

import pytest

from shim.framework import stdio
from shim.framework.reaper import Exit
from shim.framework.stdio import open_process_io
from test_stdio import Client, run, wait_child


def pipe_pump(loop, *, use_splice: bool, target_size: int | None = None):
    """A stdout pump between two plain pipes: (pump, container's write end, client's read end)."""
    src_r, src_w = os.pipe()
    dst_r, dst_w = os.pipe()
    if target_size:
        fcntl.fcntl(dst_w, fcntl.F_SETPIPE_SZ, target_size)
    os.set_blocking(src_r, False)
    os.set_blocking(dst_w, False)
    pump = stdio._Pump(loop, "stdout", src_r)
    pump.connect(dst_w, pollable=True, splice=use_splice)
    return pump, src_w, dst_r


async def until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "readwrite"])
async def test_bytes_are_counted_through_a_pipe_pump(use_splice):
    loop = asyncio.get_running_loop()
    pump, src_w, dst_r = pipe_pump(loop, use_splice=use_splice)
    assert pump.describe(time.time())["state"] == "not started"
    pump.start()
    reader = Client(fd=dst_r)
    for chunk in (b"a" * 1000, b"b" * 20000):
        os.write(src_w, chunk)
        assert len(await reader.read_until(lambda d, n=len(chunk): len(d) >= n)) == len(chunk)
    described = pump.describe(time.time())
    assert described["bytes"] == 21000 and described["dropped_bytes"] == 0
    assert described["mode"] == ("splice" if use_splice else "readwrite")
    assert (described["state"], described["queued_bytes"], described["blocked_since"]) == ("waiting for data", 0, None)
    os.close(src_w)
    assert await asyncio.wait_for(pump.done, 5) is True
    described = pump.describe(time.time())
    assert (described["state"], described["bytes"], described["queued_bytes"]) == ("done", 21000, None)
    reader.close()


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "readwrite"])
async def test_a_full_target_shows_as_blocked_until_it_is_read(use_splice):
    loop = asyncio.get_running_loop()
    page = os.sysconf("SC_PAGE_SIZE")
    pump, src_w, dst_r = pipe_pump(loop, use_splice=use_splice, target_size=page)
    total = 8 * page  # the source pipe (64 KiB) holds it all; the target takes one page
    before = time.time()
    os.write(src_w, b"x" * total)
    pump.start()
    await until(lambda: pump.describe(time.time())["state"] == "blocked on writer")
    blocked = pump.describe(time.time())
    assert before <= blocked["blocked_since"] <= time.time()
    assert blocked["blocked_for_s"] >= 0
    assert blocked["bytes"] == page  # exactly what the target holds
    if use_splice:  # read/write mode holds a chunk in its buffer, the rest is in the pipe
        assert blocked["queued_bytes"] == total - page

    # The reader takes one page: the pump moves it, blocks again, and the wait starts over.
    await asyncio.sleep(0.02)
    assert len(os.read(dst_r, page)) == page
    await until(lambda: pump.copied == 2 * page and pump._waiting == "dst")
    again = pump.describe(time.time())
    assert again["state"] == "blocked on writer" and again["blocked_since"] > blocked["blocked_since"]

    reader = Client(fd=dst_r)
    assert len(await reader.read_until(lambda d: len(d) >= total - page)) == total - page
    await until(lambda: pump.describe(time.time())["state"] == "waiting for data")
    drained = pump.describe(time.time())
    assert (drained["bytes"], drained["blocked_since"], drained["blocked_for_s"]) == (total, None, None)
    pump.stop()
    os.close(src_w)
    reader.close()
    assert pump.describe(time.time())["state"] == "stopped"


async def test_process_io_names_its_fifos_and_pipes(tmp_path):
    out_path, in_path = str(tmp_path / "out"), str(tmp_path / "in")
    os.mkfifo(out_path)
    os.mkfifo(in_path)
    out = Client(out_path)
    io = await open_process_io(in_path, out_path, "")
    assert [(d["stream"], d["source"], d["target"], d["state"]) for d in io.describe()] == [
        ("stdout", "container pipe", f"fifo {out_path}", "not started"),
        ("stdin", f"fifo {in_path}", "container pipe", "not started"),
    ]
    io.close_stdin()  # the container reads EOF: `cat` ends
    pid = run(io, ["cat"])
    writer = os.open(in_path, os.O_WRONLY)
    os.write(writer, b"hello\n")
    os.close(writer)
    assert await wait_child(pid) == 0
    assert await io.wait_output_flushed(5)
    assert await out.read_until(lambda d: d == b"hello\n") == b"hello\n"
    stdout, stdin = io.describe()
    assert (stdout["state"], stdout["bytes"]) == ("done", 6)
    assert stdin["bytes"] == 6
    io.close()
    out.close()


async def test_a_failed_target_is_named_and_its_bytes_dropped():
    io = await open_process_io("", "/dev/full", "")  # every write: ENOSPC
    pid = run(io, ["head", "-c", "100000", "/dev/zero"])
    assert await wait_child(pid) == 0
    assert await io.wait_output_flushed(5)
    (stdout,) = io.describe()
    assert stdout["target"] == "/dev/null (writing to device /dev/full failed: No space left on device)"
    assert stdout["bytes"] == 0 and stdout["dropped_bytes"] == 100000 and stdout["state"] == "done"
    io.close()


async def test_terminal_streams_before_and_after_the_console_arrives(tmp_path):
    out_path = str(tmp_path / "out")
    os.mkfifo(out_path)
    out = Client(out_path)
    io = await open_process_io("", out_path, "", terminal=True)
    assert [(d["stream"], d["source"], d["target"], d["state"]) for d in io.describe()] == [
        ("stdout", "pty", f"fifo {out_path}", "waiting for the console"),
    ]
    master, slave = os.openpty()
    io.attach_console(master)
    io.start_copying()
    io.close_child_ends()
    os.write(slave, b"hi\n")
    os.close(slave)
    assert await io.wait_output_flushed(5)
    (stdout,) = io.describe()
    assert (stdout["source"], stdout["target"], stdout["bytes"], stdout["state"]) == (
        "pty", f"fifo {out_path}", 4, "done")  # the line discipline made "\n" "\r\n"
    io.close()
    out.close()


async def test_a_binary_logger_is_described_by_pid_argv_and_whether_it_runs():
    logger = stdio._Logger(("/usr/bin/my-logger", "k", "v"), reaper=None)
    assert logger.describe()["state"] == "not started"
    logger.pid = 4242
    logger.exited = asyncio.get_running_loop().create_future()
    described = logger.describe()
    assert (described["stream"], described["target"], described["state"]) == (
        "logger", "binary logger /usr/bin/my-logger", "running")
    assert (described["pid"], described["argv"]) == (4242, ["/usr/bin/my-logger", "k", "v"])
    logger.exited.set_result(Exit(4242, 3, time.time_ns()))
    assert logger.describe()["state"] == "exited with status 3"
