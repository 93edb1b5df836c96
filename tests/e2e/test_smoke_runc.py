"""Proves the e2e fixtures with the stock runc shim: if these fail, pyshim is not to blame."""

from __future__ import annotations

import shutil

import pytest

from containerd import RUNC_RUNTIME

pytestmark = pytest.mark.e2e

def test_versions_and_path(e2e):
    c = e2e.containerd
    info = c.target.package_info()
    if info:
        # runs the build hack/lib.sh unpacked (which reports a fallback if Debian dropped the
        # wanted version); e.g. "1.7.24~ds1" from package version "1.7.24~ds1-6+deb13u1"
        assert info["version"].startswith(c.version.split("+")[0]), (info, c.version)
    else:
        assert c.version.startswith(e2e.version + "."), c.version
    path = c.path_env
    # containerd and its shims find these first on their PATH
    assert shutil.which("runc", path=path) == str(c.bin_dir / "runc")
    assert shutil.which("containerd-shim-runc-v2", path=path) == str(
        c.bin_dir / "containerd-shim-runc-v2"
    )
    assert shutil.which("containerd-shim-pyshim-v2", path=path), path
    v = e2e.ctr("version", check=True).stdout
    assert c.version.split("+")[0].split("~")[0] in v, v


def test_smoke_runc_run_exit_code(e2e):
    cid = e2e.new_id("smoke")
    r = e2e.ctr("run", "--rm", "--runtime", RUNC_RUNTIME, e2e.image, cid,
                "sh", "-c", "echo hi; exit 3")
    assert r.returncode == 3, r
    assert r.stdout.splitlines() == ["hi"], r
    # --rm removed the container, the task, its bundle and its shim
    assert cid not in e2e.ctr("containers", "ls", "-q", check=True).stdout.split()
    assert cid not in e2e.ctr("tasks", "ls", "-q", check=True).stdout.split()
    assert not e2e.bundle_dir(cid).exists()
