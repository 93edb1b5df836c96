"""`-info`: RuntimeInfo on stdout for the options on stdin, as containerd 2.x asks for it."""

import json
import shutil
import subprocess
import sys

import pytest

from shim import __version__
from shim.api.containerd.runc.v1 import Options
from shim.api.containerd.types import RuntimeInfo
from shim.api.google.protobuf import Any
from shim.api.runtimeoptions.v1 import Options as ConfigOptions
from shim.framework.info import FEATURES_TYPE_URL

FEATURES = {
    "ociVersionMin": "1.0.0",
    "ociVersionMax": "1.2.0",
    "linux": {"mountExtensions": {"idmap": {"enabled": True}}},
}


def run_info(stdin: bytes, path: str | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": path} if path else None
    return subprocess.run([sys.executable, "-m", "shim.cli", "-info"], input=stdin, capture_output=True, env=env)


def fake_runtime(tmp_path, script: str) -> str:
    binary = tmp_path / "fake-runtime"
    binary.write_text("#!/bin/sh\n" + script)
    binary.chmod(0o755)
    return str(binary)


def test_no_options_name_and_version_and_no_features_without_runc(tmp_path):
    proc = run_info(b"", path=str(tmp_path))  # no runc on PATH
    assert proc.returncode == 0, proc.stderr
    info = RuntimeInfo.parse(proc.stdout)
    assert info.name == "io.containerd.pyshim.v2"
    assert info.version.version == __version__
    assert info.options is None and info.features is None


def test_runc_options_are_echoed_and_their_binary_asked_for_features(tmp_path):
    binary = fake_runtime(tmp_path, f"[ \"$1\" = features ] && echo '{json.dumps(FEATURES)}'\n")
    options = Any(type_url="containerd.runc.v1.Options", value=bytes(Options(binary_name=binary, systemd_cgroup=True)))
    proc = run_info(bytes(options))
    assert proc.returncode == 0, proc.stderr
    info = RuntimeInfo.parse(proc.stdout)
    assert info.options == options
    assert info.features.type_url == FEATURES_TYPE_URL
    assert json.loads(info.features.value) == FEATURES


def test_cri_toml_options_name_the_binary(tmp_path):
    binary = fake_runtime(tmp_path, f"echo '{json.dumps(FEATURES)}'\n")
    config = ConfigOptions(type_url="io.containerd.pyshim.v2", config_body=f'BinaryName = "{binary}"\n'.encode())
    options = Any(type_url="runtimeoptions.v1.Options", value=bytes(config))
    info = RuntimeInfo.parse(run_info(bytes(options)).stdout)
    assert info.options == options
    assert json.loads(info.features.value) == FEATURES


@pytest.mark.parametrize("script", ["echo 'unknown command features' >&2; exit 1\n", "echo not json\n", "echo '[1]'\n"])
def test_a_runtime_without_features_gives_none(tmp_path, script):
    binary = fake_runtime(tmp_path, script)
    options = Any(type_url="containerd.runc.v1.Options", value=bytes(Options(binary_name=binary)))
    proc = run_info(bytes(options))
    assert proc.returncode == 0, proc.stderr
    assert RuntimeInfo.parse(proc.stdout).features is None


def test_unreadable_options_are_an_error_with_a_message():
    config = ConfigOptions(config_body=b"BinaryName = = 1\n")
    proc = run_info(bytes(Any(type_url="runtimeoptions.v1.Options", value=bytes(config))))
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert b"not valid TOML" in proc.stderr


@pytest.mark.skipif(shutil.which("runc") is None, reason="runc not installed")
def test_real_runc_features():
    info = RuntimeInfo.parse(run_info(b"").stdout)
    features = json.loads(info.features.value)
    assert features["ociVersionMin"].startswith("1.")
    assert "hooks" in features
