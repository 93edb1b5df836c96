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


def test_after_the_daemons_delete_the_command_prints_its_answer_and_does_nothing_else(tmp_path):
    """shim/framework/delete_record.py: the daemon's DeleteResponse, byte for byte; nothing of
    the cleanup runs (a dead socket named in the bundle stays)."""
    from shim.framework import delete_record

    bundle = tmp_path / "c9"
    bundle.mkdir()
    answered = bytes(DeleteResponse(pid=77, exit_status=3))
    delete_record.write(str(bundle), answered)
    (bundle / "address").write_text("unix:///run/containerd/s/pyshim-unit-not-a-socket")
    env = {**os.environ, "PATH": "/nonexistent"}
    binary = os.path.join(os.path.dirname(sys.executable), "containerd-shim-pyshim-v2")
    for flags in (["-bundle", str(bundle)], [f"--bundle={bundle}"], []):  # [] : the directory says
        out = subprocess.run([binary, "-namespace", "pyshim-unit", "-id", "c9", *flags, "delete"],
                             cwd=bundle, env=env, capture_output=True, check=True, timeout=30)
        assert (out.stdout, out.stderr) == (answered, b"")
    assert sorted(p.name for p in bundle.iterdir()) == ["address", delete_record.FILE_NAME]


def test_the_record_is_only_for_delete_and_only_when_sound(tmp_path, capfd):
    from shim.framework.delete_record import FILE_NAME, _bundle_of, answer

    (tmp_path / FILE_NAME).write_bytes(b"\x08\x01")
    assert not answer(["-bundle", str(tmp_path), "start"])
    assert not answer([])
    assert answer(["-id", "x", "-bundle", str(tmp_path), "delete"])
    assert capfd.readouterr().out == "\x08\x01"
    (tmp_path / FILE_NAME).write_bytes(b"")  # an empty answer is no answer: clean up properly
    assert not answer(["-bundle", str(tmp_path), "delete"])
    (tmp_path / FILE_NAME).write_bytes(b"x" * 5000)
    assert not answer(["-bundle", str(tmp_path), "delete"])
    assert not answer(["-bundle", str(tmp_path / "gone"), "delete"])
    assert _bundle_of(["-namespace", "n", "-bundle"]) is None
    assert not answer(["-bundle", "delete"])
    assert _bundle_of(["-id", "x"]) == "."
