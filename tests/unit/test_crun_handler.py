"""examples/crun (pyshim_crun.UseCrun): its options, the backend it returns, and the
ociVersion it gives crun; the backend itself is tests/unit/test_crun.py's."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "crun"))

from pyshim_crun import UseCrun  # noqa: E402
from shim.framework.reaper import Reaper  # noqa: E402
from shim.handler import ContainerInfo  # noqa: E402
from shim.runc.crun import Crun  # noqa: E402
from shim.runc.runtime import Runc  # noqa: E402


def container(version: str = "1.2.1") -> ContainerInfo:
    return ContainerInfo(id="c1", namespace="k8s.io", bundle="/run/b/c1", spec={"ociVersion": version})


def test_runtime_is_crun_with_everything_the_default_had():
    runc = Runc(Reaper(), binary="runc", root="/run/r", namespace="k8s.io", log_path="/run/b/c1/log.json",
                systemd_cgroup=True, no_pivot=True, no_new_keyring=True)
    crun = UseCrun({"binary": "/opt/crun"}).runtime(container(), runc)
    assert isinstance(crun, Crun)
    assert (crun.binary, crun.root, crun.log_path, crun.systemd_cgroup, crun.no_pivot, crun.no_new_keyring) == (
        "/opt/crun", "/run/r/k8s.io", "/run/b/c1/log.json", True, True, True)
    assert crun.reaper is runc.reaper


def test_binary_defaults_to_crun_on_path():
    assert UseCrun({}).runtime(container(), Runc(Reaper())).binary == "crun"


@pytest.mark.parametrize("options", [{"binary": 3}, {"binary": ""}, {"oci_version": 1.1}])
def test_wrong_options_fail_at_create(options):
    with pytest.raises(ValueError):
        UseCrun(options)


def test_oci_version_rewritten_only_when_asked():
    untouched, rewritten = container(), container()
    asyncio.run(UseCrun({}).create(untouched))
    asyncio.run(UseCrun({"oci_version": "1.1.0"}).create(rewritten))
    assert (untouched.spec["ociVersion"], rewritten.spec["ociVersion"]) == ("1.2.1", "1.1.0")
