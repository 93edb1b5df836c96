"""shim_cgroup: read from start's stdin without protobuf, joined like containerd's cgroups."""

from __future__ import annotations


import pytest

from shim.api.containerd.runc.v1 import Options
from shim.api.google.protobuf import Any
from shim.api.runtimeoptions.v1 import Options as ConfigOptions
from shim.framework.placement import PlacementError, join_cgroup, shim_cgroup_of


def test_shim_cgroup_from_each_kind_of_options(tmp_path):
    runc = Any(type_url="containerd.runc.v1.Options", value=bytes(Options(shim_cgroup="/pods/p1", binary_name="crun")))
    assert shim_cgroup_of(bytes(runc)) == "/pods/p1"
    body = ConfigOptions(type_url="x", config_body=b'BinaryName = "crun"\nShimCgroup = "/from/body"\n')
    assert shim_cgroup_of(bytes(Any(type_url="runtimeoptions.v1.Options", value=bytes(body)))) == "/from/body"
    path = tmp_path / "opts.toml"
    path.write_text('ShimCgroup = "/from/file"\n')
    by_path = ConfigOptions(config_path=str(path))
    assert shim_cgroup_of(bytes(Any(type_url="runtimeoptions.v1.Options", value=bytes(by_path)))) == "/from/file"
    for nothing in (b"", b"\xff\xff", bytes(Any(type_url="other.Options", value=b"\x1a\x01x")),
                    bytes(Any(type_url="runtimeoptions.v1.Options", value=bytes(ConfigOptions(config_path="/nope"))))):
        assert shim_cgroup_of(nothing) == ""


def test_join_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "pods" / "p1").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    assert join_cgroup(123, "/pods/p1", root=str(v2)) == [str(v2 / "pods/p1/cgroup.procs")]
    assert (v2 / "pods/p1/cgroup.procs").read_text() == "123"

    v1 = tmp_path / "v1"
    for ctrl in ("memory", "cpu", "pids"):
        (v1 / ctrl).mkdir(parents=True)
    (v1 / "memory" / "s").mkdir()
    (v1 / "pids" / "s").mkdir()
    mountinfo = "\n".join([
        f"30 25 0:26 / {v1}/memory rw,nosuid - cgroup cgroup rw,memory",
        f"31 25 0:27 / {v1}/cpu rw,nosuid - cgroup cgroup rw,cpu",
        f"32 25 0:28 / {v1}/pids rw,nosuid - cgroup cgroup rw,pids",
        f"33 25 0:29 / {v1}/unified rw,nosuid - cgroup2 cgroup2 rw",
    ])
    written = join_cgroup(7, "s", root=str(v1), mountinfo=mountinfo)
    assert written == [str(v1 / "memory/s/cgroup.procs"), str(v1 / "pids/s/cgroup.procs")]
    with pytest.raises(PlacementError, match="failed to load cgroup /gone: cgroup deleted"):
        join_cgroup(7, "/gone", root=str(v1), mountinfo=mountinfo)
    with pytest.raises(PlacementError, match="invalid"):
        join_cgroup(7, "/../etc", root=str(v1), mountinfo=mountinfo)
