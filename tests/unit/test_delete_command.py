"""The `delete` command run without a daemon: what it answers containerd."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from shim.framework import exit_record
from shim.api.containerd.task.v2 import DeleteResponse


def run_delete(bundle) -> DeleteResponse:
    env = {**os.environ, "PATH": "/nonexistent"}  # no runc is needed: no runc state exists
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "containerd-shim-pyshim-v2"), "-namespace", "pyshim-unit", "-id", bundle.name, "-address",
         "/nonexistent.sock", "-bundle", str(bundle), "delete"],
        cwd=bundle, env=env, capture_output=True, check=True, timeout=30,
    )
    return DeleteResponse.parse(out.stdout)


def test_delete_answers_the_recorded_exit(tmp_path):
    bundle = tmp_path / "c1"
    bundle.mkdir()
    (bundle / "init.pid").write_text("4242")
    exit_record.write(str(bundle), 4242, 3, 1_700_000_000_500_000_000)
    resp = run_delete(bundle)
    assert (resp.pid, resp.exit_status) == (4242, 3)
    assert resp.exited_at.timestamp() == 1_700_000_000.5


def test_delete_without_a_record_says_killed_now(tmp_path):
    bundle = tmp_path / "c2"
    bundle.mkdir()
    (bundle / "init.pid").write_text("4243")
    before = time.time()
    resp = run_delete(bundle)
    assert (resp.pid, resp.exit_status) == (4243, 137)
    assert before - 1 <= resp.exited_at.timestamp() <= time.time() + 1


def test_delete_removes_a_dead_shims_socket_only(tmp_path):
    import socket

    from shim.framework import delete

    os.makedirs(delete.SOCKET_DIR, exist_ok=True)
    name = f"pyshim-unit-{os.getpid()}"
    dead_path, live_path = delete.SOCKET_DIR + name + "-dead", delete.SOCKET_DIR + name + "-live"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(dead_path)
    dead.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    live = socket.socket(socket.AF_UNIX)
    live.bind(live_path)
    live.listen(1)
    try:
        for path in (dead_path, live_path):
            bundle = tmp_path / os.path.basename(path)
            bundle.mkdir()
            (bundle / "address").write_text("unix://" + path)
            run_delete(bundle)
        assert not os.path.exists(dead_path)
        assert os.path.exists(live_path)
    finally:
        live.close()
        for path in (dead_path, live_path):
            if os.path.exists(path):
                os.unlink(path)
