"""The installed `containerd-shim-pyshim-v2` script under `python -S` (its shebang, as
hack/lib.sh installs it): no site module, yet the shim and its dependencies are found."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "shim" / "scripts" / "containerd-shim-pyshim-v2"
INSTALLED = pathlib.Path(sys.executable).parent / "containerd-shim-pyshim-v2"


def path_finder() -> str:
    """The script's own code up to where it would run the command."""
    source = SCRIPT.read_text()
    head, sep, _ = source.partition("\nif sys.flags.no_site:")
    assert sep, "the script no longer decides on sys.flags.no_site"
    return head


def run_python(python: str, code: str, **kwargs) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([python, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=60, **kwargs)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_the_installed_command_runs_without_site():
    if not INSTALLED.exists():
        pytest.skip("not run from pyshim's virtual environment")
    assert INSTALLED.read_text().splitlines()[0].endswith(" -S")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run([str(INSTALLED), "-v"], env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "io.containerd.pyshim.v2" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines()}
    assert "shim.cli" in imported and "site" not in imported


def test_without_site_the_daemons_dependencies_are_found():
    if not INSTALLED.exists():
        pytest.skip("not run from pyshim's virtual environment")
    code = path_finder() + (
        "\n_find_shim_package()\nimport betterproto2, grpclib, psutil, shim.framework.daemon\n"
        "print('site' in sys.modules)"
    )
    # run as the venv's interpreter, as the shebang does (sys.executable names the env)
    assert run_python(sys.executable, code, cwd="/") == "False"


def test_an_unknown_layout_falls_back_to_site(tmp_path):
    # an environment whose site-packages names the shim through a .pth file that is not
    # pip's editable one: only site reads it
    env = tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    os.symlink(os.path.realpath(sys.executable), env / "bin" / "python")
    (env / "pyvenv.cfg").write_text(f"home = {os.path.dirname(os.path.realpath(sys.executable))}\n"
                                    "include-system-site-packages = false\n")
    packages = env / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    packages.mkdir(parents=True)
    (packages / "elsewhere.pth").write_text(f"{REPO}\n")
    code = path_finder() + "\n_find_shim_package()\nimport shim.cli\nprint('site' in sys.modules)"
    assert run_python(str(env / "bin" / "python"), code, cwd="/") == "True"
