"""Terminals on a cgroup v2 node: `ctr run -t` and `ctr task exec -t` through pyshim and
through runc-v2, per node (containerd version and OCI runtime, see conftest.py), with a real
pty on ctr's side (tests/e2e/test_terminal.py's ClientTty)."""

from __future__ import annotations

from test_lifecycle import PYSHIM, RUNC, task_status
from waiting import wait_until
from test_terminal import NL, SIZE_AND_TTY, SIZE_TTY_EXIT, ClientTty


def run_t(e2e, runtime: str) -> tuple[str, str, int]:
    with ClientTty(e2e, "run", "-t", "--rm", "--runtime", runtime, e2e.image, e2e.new_id("tty"),
                   *SIZE_TTY_EXIT, rows=30, cols=100) as client:
        found = client.read_until(SIZE_AND_TTY, timeout=120)
        return found.group(1), found.group(2), client.wait(timeout=120)


def exec_t(e2e, runtime: str) -> int:
    cid = e2e.new_id("exec-tty")
    e2e.ctr("run", "-d", "--runtime", runtime, e2e.image, cid, "sleep", "600", check=True)
    try:
        with ClientTty(e2e, "task", "exec", "-t", "--exec-id", "sh", cid, "sh", rows=24, cols=80) as client:
            client.read_until(r"# ", timeout=120)  # busybox sh's prompt
            client.write("echo h''i\r")
            client.read_until(rf"\nhi{NL}", timeout=120)
            client.write("exit 5\r")
            return client.wait(timeout=120)
    finally:
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
        wait_until(lambda: task_status(e2e, cid), 120, f"task {cid} to stop", until=lambda s: s == "STOPPED")
        e2e.ctr("rm", cid)


def test_run_t_and_exec_t_like_runc(e2e):
    assert run_t(e2e, PYSHIM) == run_t(e2e, RUNC) == ("30", "100", 3)
    assert exec_t(e2e, PYSHIM) == exec_t(e2e, RUNC) == 5
