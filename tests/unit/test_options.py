"""Runtime options as containerd sends them: runc Options, runtimeoptions.v1 TOML, nothing."""

import pytest

from shim.api.containerd.runc.v1 import Options
from shim.api.google.protobuf import Any
from shim.api.runtimeoptions.v1 import Options as ConfigOptions
from shim.runc.options import RuntimeOptions


def test_no_options_are_defaults():
    assert RuntimeOptions.from_any(None) == RuntimeOptions()
    assert RuntimeOptions.from_any(Any()) == RuntimeOptions()
    assert RuntimeOptions().runtime_binary == "runc"
    assert RuntimeOptions().runtime_root("k8s.io") == "/run/containerd/runc/k8s.io"


def test_runc_options():
    value = bytes(Options(binary_name="crun", root="/run/x", systemd_cgroup=True, io_uid=7))
    for url in ("containerd.runc.v1.Options", "type.googleapis.com/containerd.runc.v1.Options"):
        options = RuntimeOptions.from_any(Any(type_url=url, value=value))
        assert (options.binary_name, options.root, options.systemd_cgroup, options.io_uid) == ("crun", "/run/x", True, 7)
        assert options.runtime_root("ns") == "/run/x/ns"


def test_runtimeoptions_inline_toml():
    body = b'BinaryName = "crun"\nSystemdCgroup = false\nNoPivotRoot = true\nCriuPath = "/x"\n'
    options = RuntimeOptions.from_any(Any(type_url="runtimeoptions.v1.Options", value=bytes(ConfigOptions(config_body=body))))
    assert (options.binary_name, options.no_pivot_root) == ("crun", True)


def test_runtimeoptions_file(tmp_path):
    path = tmp_path / "runtime.toml"
    path.write_text('BinaryName = "crun"\nRoot = "/run/crun-root"\n')
    options = RuntimeOptions.from_any(Any(type_url="runtimeoptions.v1.Options", value=bytes(ConfigOptions(config_path=str(path)))))
    assert (options.binary_name, options.root) == ("crun", "/run/crun-root")


@pytest.mark.parametrize(
    "config, message",
    [
        (ConfigOptions(config_path="/no/such/file.toml"), "/no/such/file.toml"),
        (ConfigOptions(config_body=b"BinaryName = "), "not valid TOML"),
        (ConfigOptions(config_body=b"IoUid = true"), "IoUid must be a int"),
    ],
)
def test_bad_runtimeoptions_are_clear_errors(config, message):
    with pytest.raises(ValueError, match=message):
        RuntimeOptions.from_any(Any(type_url="runtimeoptions.v1.Options", value=bytes(config)))


def test_unknown_option_type_is_not_an_error():
    assert RuntimeOptions.from_any(Any(type_url="example.com/Other", value=b"\x0a\x01x")) == RuntimeOptions()


def test_written_and_read_back(tmp_path):
    options = RuntimeOptions(binary_name="crun", root="/r", systemd_cgroup=True)
    options.write(str(tmp_path))
    assert RuntimeOptions.read(str(tmp_path)) == options
    assert (tmp_path / "runtime").read_text() == "crun"
    assert RuntimeOptions.read(str(tmp_path / "missing")) == RuntimeOptions()
