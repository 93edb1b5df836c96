"""`ctr run -t` and `ctr task exec -t` through pyshim, with a real pseudo-terminal on ctr's side.

ctr gets the slave of a pty we open as its stdin/stdout/stderr and controlling terminal (as in an
interactive shell); the test types into the master and reads what the container's pty echoes.
Setting the window size on that pty makes ctr (SIGWINCH) send ResizePty. Every test runs once
per containerd version (1.6, 1.7, 2.1) and OCI runtime (runc 1.1, runc 1.3, crun, by BinaryName;
see runtimes.py).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import select
import tempfile
import termios
import time
from pathlib import Path

import pytest

from runtimes import missing_executable
from shim.framework.console import resize
from test_lifecycle import PYSHIM, RUNC, _wait_stopped, popen_ctr, pyshim_daemons
from waiting import wait_until

pytestmark = pytest.mark.usefixtures("oci_runtime")


class ClientTty:
    """ctr running on the slave side of a fresh pty; the test holds the master."""

    def __init__(self, e2e, *args: str, rows: int = 30, cols: int = 100) -> None:
        self.master, slave = os.openpty()
        resize(slave, width=cols, height=rows)
        self.output = ""
        try:
            self.proc = popen_ctr(
                e2e, *args, stdin=slave, stdout=slave, stderr=slave,
                start_new_session=True,
                # The slave becomes ctr's controlling terminal: ctr gets SIGWINCH on resize.
                preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            )
        finally:
            os.close(slave)

    def read_until(self, pattern: str, timeout: float = 20) -> re.Match:
        """Read until the (regex) pattern appears in what was read since the last match."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output)
            if found:
                self.output = self.output[found.end():]
                return found
            left = deadline - time.monotonic()
            assert left > 0 and self._read(left), f"{pattern!r} not seen; got {self.output!r}"

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], max(timeout, 0))
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError as exc:
            if exc.errno == errno.EIO:  # ctr exited: no slave left
                return False
            raise
        self.output += chunk.decode(errors="replace")
        return bool(chunk)

    def write(self, text: str) -> None:
        os.write(self.master, text.encode())

    def resize(self, rows: int, cols: int) -> None:
        resize(self.master, width=cols, height=rows)

    def wait(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.05)  # keep draining so ctr never blocks writing to its terminal
        return self.proc.wait(max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)

    def __enter__(self) -> ClientTty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_tty(e2e, *cmd: str, runtime: str = PYSHIM, rows: int = 30, cols: int = 100) -> ClientTty:
    return ClientTty(e2e, "run", "-t", "--rm", *e2e.runtime(runtime), e2e.image, e2e.new_id(), *cmd,
                     rows=rows, cols=cols)


# ctr sends the first ResizePty only after Start (with either shim): a command that asks for the
# size at once may see 0x0 (busybox stty then prints an error, and exits 0), so it asks until
# the size arrived.
SIZE_TTY_EXIT = ("sh", "-c", 'for i in $(seq 100); do s=$(stty size 2>/dev/null); [ -n "$s" ] && break; sleep 0.1; done;'
                 ' echo "$s"; tty; exit 3')
# ctr leaves its own terminal in cooked mode: the pty's \r\n may come as \r\r\n.
NL = r"\r*\n"
SIZE_AND_TTY = rf"(\d+) (\d+){NL}(/dev/pts/\d+){NL}"


def size_tty_exit(e2e, runtime: str) -> tuple[str, str, int]:
    with run_tty(e2e, *SIZE_TTY_EXIT, runtime=runtime) as client:
        found = client.read_until(SIZE_AND_TTY)
        code = client.wait()
    return found.group(1), found.group(2), code


def test_run_t_prints_size_and_pts_and_exits_like_runc(e2e):
    ours = size_tty_exit(e2e, PYSHIM)
    theirs = size_tty_exit(e2e, RUNC)
    assert ours == theirs == ("30", "100", 3)


def _interactive(client: ClientTty, code: int) -> None:
    client.read_until(r"# ")  # busybox sh's prompt: the shell is reading its terminal
    # The line editor may redraw what we typed (it asks the terminal for the cursor position
    # and nobody answers), so look for the command's output only: the echo shows h''i.
    client.write("echo h''i\r")
    client.read_until(rf"\nhi{NL}")
    client.write(f"exit {code}\r")
    assert client.wait() == code


def test_run_t_interactive_shell(e2e):
    with run_tty(e2e, "sh") as client:
        _interactive(client, 4)


def _resized(client: ClientTty) -> None:
    client.read_until(r"# ")
    client.write("stty size\r")
    client.read_until(rf"\b30 100{NL}")
    client.resize(40, 120)
    # ctr gets SIGWINCH and sends ResizePty; ask until the shell sees the new size. ctr 2.1's
    # `task exec -t` sometimes misses a SIGWINCH that comes early (with runc-v2 as well):
    # after a while, change the size again (a TIOCSWINSZ to the same size sends no signal).
    deadline = time.monotonic() + 15
    for attempt in itertools.count(1):
        client.write("stty size\r")
        found = client.read_until(rf"\b(\d+) (\d+){NL}")
        if found.groups() == ("40", "120"):
            break
        assert time.monotonic() < deadline, f"size still {found.groups()}"
        time.sleep(0.2)
        if attempt % 5 == 0:
            client.resize(39, 119)
            client.resize(40, 120)
    client.write("exit\r")
    assert client.wait() == 0


def test_run_t_resize(e2e):
    with run_tty(e2e, "sh") as client:
        _resized(client)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_exec_t(e2e):
    cid = e2e.new_id()
    e2e.ctr("run", "-d", *e2e.runtime(PYSHIM), e2e.image, cid, "sleep", "600", check=True)
    bundle = e2e.bundle_dir(cid)
    (daemon,) = [pid for pid in pyshim_daemons(e2e) if os.readlink(f"/proc/{pid}/cwd") == str(bundle)]

    def exec_tty(exec_id: str, *cmd: str) -> ClientTty:
        return ClientTty(e2e, "task", "exec", "-t", "--exec-id", exec_id, cid, *cmd)

    with exec_tty("size", *SIZE_TTY_EXIT) as client:
        found = client.read_until(SIZE_AND_TTY)
        assert client.wait() == 3
    assert found.group(1, 2) == ("30", "100")
    fds = _fds(daemon)
    for n in range(3):
        with exec_tty(f"i{n}", "sh") as client:
            _interactive(client, 4)
    with exec_tty("resize", "sh") as client:
        _resized(client)
    with exec_tty("missing", "/nonexistent") as client:
        assert client.wait() != 0
        client.read_until(re.escape(missing_executable(e2e.oci_kind, "/nonexistent")))
    # Each exec's master, FIFOs and console socket are gone once the exec was deleted.
    def open_fds() -> list[str]:
        found = []
        for fd in os.listdir(f"/proc/{daemon}/fd"):
            try:
                found.append(os.readlink(f"/proc/{daemon}/fd/{fd}"))
            except OSError:
                pass  # closed meanwhile
        return sorted(found)

    wait_until(open_fds, 20, f"the daemon back to at most {fds} fds", until=lambda found: len(found) <= fds)
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
    _wait_stopped(e2e, cid)
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)


def test_run_t_missing_executable_fails_like_runc(e2e):
    def attempt(runtime: str) -> int:
        with run_tty(e2e, "/no/such/binary", runtime=runtime) as client:
            code = client.wait()
            client.read_until(re.escape(missing_executable(e2e.oci_kind, "/no/such/binary")))
            return code

    assert attempt(PYSHIM) == attempt(RUNC) != 0


def test_run_t_leaves_no_console_socket_dir(e2e):
    # The shim inherits containerd's environment, which is ours.
    parent = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    before = set(parent.glob("pyshim-pty*"))
    with run_tty(e2e, "true") as client:
        assert client.wait() == 0
    assert set(parent.glob("pyshim-pty*")) - before == set()
