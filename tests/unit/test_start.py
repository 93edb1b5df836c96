"""The `start` path: flags, group id, socket address, binding, and a daemon it forks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from shim.framework.flags import Flags, UsageError, parse_flags
from shim.framework.start import _bootstrap_params, bind_or_find, group_id, socket_address


def test_go_flag_syntax():
    flags = parse_flags(["-namespace", "k8s.io", "-address", "/run/c.sock", "-publish-binary", "/usr/bin/containerd",
                         "--id=abc", "-debug", "start"])
    assert (flags.namespace, flags.address, flags.publish_binary, flags.id, flags.debug, flags.action) == (
        "k8s.io", "/run/c.sock", "/usr/bin/containerd", "abc", True, "start")
    assert parse_flags(["-v"]).version
    assert parse_flags(["-debug=false", "delete"]) == Flags(debug=False, action="delete")
    assert parse_flags([]).action == ""


@pytest.mark.parametrize("argv, message", [(["-nope"], "not defined: -nope"), (["-id"], "needs an argument"),
                                           (["start", "extra"], "unexpected arguments")])
def test_bad_flags(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_flags(argv)


def test_socket_address_is_the_go_shims():
    expected = hashlib.sha256(b"/run/containerd/containerd.sock/k8s.io/sandbox1").hexdigest()
    assert socket_address("/run/containerd/containerd.sock", "k8s.io", "sandbox1") == f"unix:///run/containerd/s/{expected}"
    # filepath.Join cleans the path, so a trailing slash makes no difference
    assert socket_address("/run/containerd/containerd.sock/", "k8s.io", "sandbox1").endswith(expected)


def test_group_id_from_annotations(tmp_path):
    assert group_id(str(tmp_path), "task") == "task"  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {"io.kubernetes.cri.sandbox-id": "sb"}}))
    assert group_id(str(tmp_path), "task") == "sb"
    (tmp_path / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.sandbox-id": "sb", "io.containerd.runc.v2.group": "g", "io.containerd.pyshim.v2.group": "p"}}))
    assert group_id(str(tmp_path), "task") == "p"


def test_bootstrap_params_told_from_runtime_options():
    from shim.api.containerd.runc.v1 import Options
    from shim.api.containerd.runtime.bootstrap.v1 import BootstrapParams
    from shim.api.google.protobuf import Any

    params = bytes(BootstrapParams(instance_id="c1", namespace="default", containerd_ttrpc_address="/x"))
    assert _bootstrap_params(params, "c1", "default")
    assert not _bootstrap_params(params, "c2", "default")
    options = bytes(Any(type_url="containerd.runc.v1.Options", value=bytes(Options(binary_name="crun"))))
    assert not _bootstrap_params(options, "c1", "default")
    assert not _bootstrap_params(b"", "c1", "default")
    assert not _bootstrap_params(b"\xff\xff", "c1", "default")


def test_bind_or_find(tmp_path, monkeypatch):
    path = tmp_path / "s" / "sock"
    address = f"unix://{path}"
    listener = bind_or_find(address)
    assert listener is not None and oct(path.stat().st_mode & 0o777) == "0o600"
    assert bind_or_find(address) is None  # a live listener answers: reuse it
    listener.close()
    stale = bind_or_find(address)  # the file of a dead socket is replaced
    assert stale is not None
    stale.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="start binds under /run/containerd/s, which needs root")
def test_start_forks_a_daemon_that_answers_and_shuts_down(tmp_path):
    from shim.api.containerd.runtime.bootstrap.v1 import BootstrapParams, BootstrapResult
    from shim.api.containerd.task import v2 as task
    from shim.api.google.protobuf import Empty
    from shim.framework.ttrpc import Client

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    os.mkfifo(bundle / "log")
    log_reader = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "shim.cli", "-namespace", "unit", "-address", str(tmp_path / "containerd.sock"),
            "-publish-binary", "containerd", "-id", task_id, "start"]
    # PYSHIM_ZYGOTE=0: this test is about the fork path; tests/unit/test_zygote.py covers the other.
    env = {**os.environ, "TTRPC_ADDRESS": str(tmp_path / "nobody.ttrpc"), "PYSHIM_ZYGOTE": "0"}
    params = bytes(BootstrapParams(instance_id=task_id, namespace="unit"))
    done = subprocess.run(argv, cwd=bundle, input=params, capture_output=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    result = BootstrapResult.parse(done.stdout)
    assert (result.version, result.protocol) == (3, "ttrpc")
    assert result.address == socket_address(str(tmp_path / "containerd.sock"), "unit", task_id)
    assert (bundle / "address").read_text() == result.address

    # A second start for the same group finds the running daemon.
    again = subprocess.run(argv, cwd=bundle, capture_output=True, timeout=30, env=env)
    assert (again.returncode, again.stdout.decode()) == (0, result.address)

    async def talk() -> int:
        async with await Client.connect(result.address) as client:
            reply = await client.call("containerd.task.v3.Task", "Connect", task.ConnectRequest(id=task_id),
                                      task.ConnectResponse, timeout=10)
            await client.call("containerd.task.v2.Task", "Shutdown", task.ShutdownRequest(id=task_id), Empty, timeout=10)
            return reply.shim_pid

    shim_pid = asyncio.run(talk())
    assert shim_pid > 0
    for _ in range(100):
        if not os.path.exists(result.address.removeprefix("unix://")):
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not os.path.exists(result.address.removeprefix("unix://")), "the daemon left its socket behind"
    os.close(log_reader)
    probe = socket.socket(socket.AF_UNIX)
    with pytest.raises(OSError):
        probe.connect(result.address.removeprefix("unix://"))
    probe.close()
