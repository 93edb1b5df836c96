"""The e2e runtime matrix's pure parts (tests/e2e/runtimes.py): which (containerd, runtime)
pairs run, the ctr flags choosing a runtime by BinaryName, the crun wrapper."""

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import runtimes  # noqa: E402
from runtimes import (  # noqa: E402
    OCI_RUNTIMES,
    PYSHIM_RUNTIME,
    RUNC_RUNTIME,
    OciRuntime,
    RuntimeChoice,
    in_matrix,
    matrix_pairs,
    missing_executable,
    runtime_flags,
    selected_runtimes,
)


def test_default_matrix_runs_runc_1_1_everywhere_and_the_others_once():
    pairs = matrix_pairs(["1.6", "1.7", "2.1"], ["runc1.1", "runc1.3", "crun"])
    assert pairs == [("1.6", "runc1.1"), ("1.6", "crun"), ("1.7", "runc1.1"), ("2.1", "runc1.1"),
                     ("2.1", "runc1.3")]


def test_full_matrix_runs_every_pair():
    assert len(matrix_pairs(["1.6", "1.7", "2.1"], list(OCI_RUNTIMES), "full")) == 9
    assert in_matrix("1.7", "crun", " full ")
    assert not in_matrix("1.7", "crun", "")


def test_a_runtime_outside_the_table_runs_everywhere():
    assert in_matrix("1.7", "youki")


def test_selected_runtimes():
    assert selected_runtimes(None) == ["runc1.1", "runc1.3", "crun"]
    assert selected_runtimes("") == ["runc1.1", "runc1.3", "crun"]
    assert selected_runtimes(" crun, runc1.1 ") == ["crun", "runc1.1"]
    with pytest.raises(ValueError, match="unknown runtime.*runc9"):
        selected_runtimes("runc1.1,runc9")


def test_flags_choose_the_binary_the_way_each_shim_takes_it():
    assert runtime_flags(PYSHIM_RUNTIME) == ("--runtime", PYSHIM_RUNTIME)
    assert runtime_flags(RUNC_RUNTIME, "/usr/bin/crun", "/x/crun.toml") == (
        "--runtime", RUNC_RUNTIME, "--runc-binary", "/usr/bin/crun")
    assert runtime_flags(PYSHIM_RUNTIME, "/usr/bin/crun", "/x/crun.toml") == (
        "--runtime", PYSHIM_RUNTIME, "--runtime-config-path", "/x/crun.toml")
    with pytest.raises(ValueError):
        runtime_flags(PYSHIM_RUNTIME, "/usr/bin/crun")


def test_prepare_writes_the_options_file(tmp_path):
    choice = RuntimeChoice.prepare(OCI_RUNTIMES["runc1.3"], tmp_path / "r")
    assert choice.binary_name == OCI_RUNTIMES["runc1.3"].binary
    assert choice.config.read_text() == f'BinaryName = "{choice.binary_name}"\n'
    assert choice.flags() == ("--runtime", PYSHIM_RUNTIME, "--runtime-config-path", str(choice.config))
    assert (choice.id, choice.kind) == ("runc1.3", "runc")


def test_prepare_wraps_crun_on_a_hybrid_host(tmp_path):
    crun = OciRuntime("crun", Path("/usr/bin/crun"), "test")
    plain = RuntimeChoice.prepare(crun, tmp_path / "plain", wrap_crun=False)
    assert plain.binary_name == Path("/usr/bin/crun")
    wrapped = RuntimeChoice.prepare(crun, tmp_path / "wrapped", wrap_crun=True)
    assert wrapped.binary_name == tmp_path / "wrapped" / "crun"
    assert wrapped.kind == "crun"
    assert str(wrapped.binary_name) in wrapped.config.read_text()
    assert wrapped.binary_name.stat().st_mode & 0o111


def test_crun_wrapper_passes_every_argument_on(tmp_path):
    # `echo` in place of crun, and a path that is not mounted: the arguments arrive intact
    script = runtimes.crun_wrapper_script("/bin/echo", unified=tmp_path / "none").replace(
        "exec unshare --mount --propagation private ", "exec ")
    wrapper = tmp_path / "w"
    wrapper.write_text(script)
    wrapper.chmod(0o755)
    out = subprocess.run([str(wrapper), "--root", "/run/x y", "state", "id"], capture_output=True, text=True)
    assert out.stdout == "--root /run/x y state id\n"


def test_hybrid_detection(tmp_path):
    assert not runtimes.hybrid_with_v2_controllers(tmp_path / "absent")
    (tmp_path / "cgroup.controllers").write_text("\n")
    assert not runtimes.hybrid_with_v2_controllers(tmp_path)
    (tmp_path / "cgroup.controllers").write_text("hugetlb\n")
    assert runtimes.hybrid_with_v2_controllers(tmp_path)


def test_missing_executable_words():
    assert missing_executable("runc", "/x") == 'exec: "/x": stat /x: no such file or directory'
    assert missing_executable("crun", "/x") == "executable file `/x` not found in $PATH: No such file or directory"
