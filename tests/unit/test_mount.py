"""shim.framework.mount: real mount(2)/umount2 calls on temp dirs (root only), plus the pure helpers.

Every test that mounts checks, on teardown, that nothing is left mounted under its temp dir.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile

import pytest

import shim.framework.mount
from shim.api.containerd.types import Mount
from shim.framework.mount import (
    MS_BIND,
    MS_NODEV,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SHARED,
    MountError,
    _compact_lowerdirs,
    _mount_points,
    _parse_options,
    _scoped_join,
    _sys_mount,
    mount_all,
    unmount_all,
)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mount(2) needs root (CAP_SYS_ADMIN); run the mount tests as root"
)


def mounted_under(base: str) -> list[str]:
    return [p for p in _mount_points() if p == base or p.startswith(base + "/")]


def mount_info(target: str) -> tuple[str, set[str]]:
    """(fs type, per-mount options) of the top mount at target."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                sep = fields.index("-")
                found = (fields[sep + 1], set(fields[5].split(",")))
    assert found is not None, f"{target} is not mounted"
    return found


@pytest.fixture
def base():
    path = os.path.realpath(tempfile.mkdtemp(prefix="pyshim-mount-"))
    yield path
    leftovers = mounted_under(path)
    if leftovers:
        unmount_all(path)  # clean up even when the test failed, before judging it
    shutil.rmtree(path, ignore_errors=True)
    assert leftovers == [], f"left mounted: {leftovers}"


def make_dirs(base: str, *names: str) -> list[str]:
    paths = [os.path.join(base, n) for n in names]
    for p in paths:
        os.makedirs(p)
    return paths


# -- pure helpers (no root needed) ---------------------------------------------------------
def test_parse_options_flags_and_data():
    parsed = _parse_options(["rbind", "ro", "nosuid", "nodev", "rprivate", "defaults", "size=1m", "mode=755"])
    assert parsed.flags == MS_BIND | MS_REC | MS_RDONLY | MS_NOSUID | MS_NODEV
    assert parsed.propagation == MS_PRIVATE | MS_REC
    assert parsed.data == ["size=1m", "mode=755"]
    # Later words win, like mount(8): "rw" clears an earlier "ro".
    assert _parse_options(["ro", "rw"]).flags == 0
    assert _parse_options(["index=off", "lowerdir=/a:/b"]).data == ["index=off", "lowerdir=/a:/b"]


def test_compact_lowerdirs():
    snaps = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"
    options = [f"lowerdir={snaps}/12/fs:{snaps}/13/fs:{snaps}/2/fs", f"upperdir={snaps}/14/fs", "index=off"]
    parent, compacted = _compact_lowerdirs(options)
    # "12", "13" and "2" share no whole directory below snapshots/: cut back to it.
    assert parent == snaps
    assert compacted == ["lowerdir=12/fs:13/fs:2/fs", f"upperdir={snaps}/14/fs", "index=off"]
    assert options[0].startswith(f"lowerdir={snaps}")  # the caller's list is not modified

    assert _compact_lowerdirs(["lowerdir=/a/b/c"]) == (None, ["lowerdir=/a/b/c"])  # one lower
    assert _compact_lowerdirs(["lowerdir=/a/x:/b/y"]) == (None, ["lowerdir=/a/x:/b/y"])  # parent is /
    assert _compact_lowerdirs(["lowerdir=a/x:a/y"]) == (None, ["lowerdir=a/x:a/y"])  # relative
    assert _compact_lowerdirs(["upperdir=/u"]) == (None, ["upperdir=/u"])
    # An escaped colon is part of a path, not a separator.
    assert _compact_lowerdirs([r"lowerdir=/s/d/a\:1:/s/d/b"]) == ("/s/d", [r"lowerdir=a\:1:b"])


def test_scoped_join_cannot_escape_root(base):
    root = os.path.join(base, "root")
    os.makedirs(os.path.join(root, "etc"))
    os.symlink("../../../..", os.path.join(root, "up"))
    os.symlink("/etc", os.path.join(root, "abs"))
    assert _scoped_join(root, "etc") == f"{root}/etc"
    assert _scoped_join(root, "/up/x") == f"{root}/x"
    assert _scoped_join(root, "abs/passwd") == f"{root}/etc/passwd"
    assert _scoped_join(root, "../../a") == f"{root}/a"


def test_mount_error_is_an_oserror():
    error = MountError("mount", "/t", "tmpfs", "none", errno.EPERM)
    assert isinstance(error, OSError) and error.errno == errno.EPERM
    assert str(error) == "mount tmpfs 'none' on /t: Operation not permitted (EPERM)"


def test_unsupported_options_fail_clearly(base):
    with pytest.raises(MountError, match="loop mounts"):
        mount_all([Mount(type="ext4", source="/img", options=["loop"])], base)
    with pytest.raises(MountError, match="idmapped"):
        mount_all([Mount(type="bind", source="/x", options=["rbind", "uidmap=0:1000:1"])], base)
    with pytest.raises(MountError, match="mount.fuse"):
        mount_all([Mount(type="fuse3.sshfs", source="h:/", options=[])], base)


# -- real mounts ---------------------------------------------------------------------------
@needs_root
def test_tmpfs_mount_and_unmount(base):
    (target,) = make_dirs(base, "rootfs")
    mount_all([Mount(type="tmpfs", source="tmpfs", options=["nosuid", "nodev", "size=1m", "mode=755"])], target)
    fstype, options = mount_info(target)
    assert fstype == "tmpfs" and {"nosuid", "nodev"} <= options
    with open(f"{target}/file", "w") as f:
        f.write("x")
    unmount_all(target)
    assert mounted_under(base) == []
    assert os.listdir(target) == []


@needs_root
def test_bind_read_only(base):
    source, target = make_dirs(base, "src", "rootfs")
    with open(f"{source}/hello", "w") as f:
        f.write("hi")
    mount_all([Mount(type="bind", source=source, options=["rbind", "ro"])], target)
    with open(f"{target}/hello") as f:
        assert f.read() == "hi"
    with pytest.raises(OSError) as caught:
        open(f"{target}/new", "w")
    assert caught.value.errno == errno.EROFS
    assert "ro" in mount_info(target)[1]
    with open(f"{source}/still-writable", "w"):
        pass  # read-only applies to the bind, not to its source
    unmount_all(target)


@needs_root
def test_bind_with_propagation(base):
    source, plain, private = make_dirs(base, "src", "plain", "private")
    mount_all([Mount(type="tmpfs", source="tmpfs", options=["size=1m"])], source)
    _sys_mount(None, source, None, MS_SHARED, None)

    def optional_fields(target: str) -> str:
        with open("/proc/self/mountinfo") as f:
            fields = next(line.split() for line in f if line.split()[4] == target)
        return " ".join(fields[6 : fields.index("-")])

    mount_all([Mount(type="bind", source=source, options=["rbind"])], plain)
    assert "shared:" in optional_fields(plain)  # a bind of a shared mount joins its peer group
    mount_all([Mount(type="bind", source=source, options=["rbind", "rprivate"])], private)
    assert optional_fields(private) == ""  # made private by the separate propagation call
    unmount_all(base)


def overlay_mount(lowers: list[str], upper: str, work: str) -> Mount:
    return Mount(
        type="overlay",
        source="overlay",
        options=["index=off", f"workdir={work}", f"upperdir={upper}", "lowerdir=" + ":".join(lowers)],
    )


@needs_root
def test_overlay_two_lowers(base):
    top, bottom, upper, work, target = make_dirs(base, "l1", "l2", "upper", "work", "rootfs")
    for layer, files in ((top, {"a": "top"}), (bottom, {"a": "bottom", "b": "bottom"})):
        for name, text in files.items():
            with open(f"{layer}/{name}", "w") as f:
                f.write(text)
    mount_all([overlay_mount([top, bottom], upper, work)], target)
    assert mount_info(target)[0] == "overlay"
    assert sorted(os.listdir(target)) == ["a", "b"]
    with open(f"{target}/a") as f:
        assert f.read() == "top"  # the first lowerdir is the top layer
    with open(f"{target}/c", "w") as f:
        f.write("new")
    assert os.listdir(upper) == ["c"]
    unmount_all(target)
    assert os.listdir(target) == []


@needs_root
def test_overlay_with_options_longer_than_a_page(base):
    # The layout of containerd's overlay snapshotter, under a long root: 30 layers whose
    # paths share a long parent, like /var/lib/containerd/.../snapshots/<id>/fs.
    snapshots = os.path.join(base, "x" * 200, "y" * 200, "snapshots")
    lowers = []
    for n in range(1, 31):
        layer = os.path.join(snapshots, str(n), "fs")
        os.makedirs(layer)
        with open(f"{layer}/layer-{n}", "w") as f:
            f.write(str(n))
        lowers.append(layer)
    upper, work, target = make_dirs(base, "upper", "work", "rootfs")
    mount = overlay_mount(lowers, upper, work)
    assert len(",".join(mount.options)) > 4096 + 8000  # far over one page
    # mount(2) copies one page of data: the full option string cannot work as it is.
    with pytest.raises(OSError):
        _sys_mount("overlay", target, "overlay", 0, ",".join(mount.options))
    cwd = os.getcwd()
    mount_all([mount], target)
    assert os.getcwd() == cwd  # the chdir stayed in the helper thread
    assert sorted(os.listdir(target)) == sorted(f"layer-{n}" for n in range(1, 31))
    with open(f"{target}/layer-17") as f:
        assert f.read() == "17"
    unmount_all(target)


@needs_root
def test_bad_type_raises_and_leaves_nothing_mounted(base):
    (target,) = make_dirs(base, "rootfs")
    with pytest.raises(MountError) as caught:
        mount_all([Mount(type="nosuchfs-pyshim", source="none", options=["size=1m"])], target)
    error = caught.value
    assert error.errno == errno.ENODEV
    message = str(error)
    assert target in message and "nosuchfs-pyshim" in message and "No such device" in message
    assert mounted_under(base) == []


@needs_root
def test_failure_unmounts_earlier_mounts(base):
    (target,) = make_dirs(base, "rootfs")
    good = Mount(type="tmpfs", source="tmpfs", options=["size=1m"])
    bad = Mount(type="overlay", source="overlay", options=[f"lowerdir={base}/missing", "upperdir=/nope"])
    with pytest.raises(MountError) as caught:
        mount_all([good, good, bad], target)
    assert "overlay" in str(caught.value) and target in str(caught.value)
    assert mounted_under(base) == []


@needs_root
def test_failed_read_only_remount_undoes_the_bind(base, monkeypatch):
    source, target = make_dirs(base, "src", "rootfs")
    real_mount = shim.framework.mount._sys_mount

    def refuse_remount(src, tgt, fstype, flags, data):
        if flags & MS_REMOUNT:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        real_mount(src, tgt, fstype, flags, data)

    monkeypatch.setattr(shim.framework.mount, "_sys_mount", refuse_remount)
    with pytest.raises(MountError) as caught:
        mount_all([Mount(type="bind", source=source, options=["rbind", "ro"])], target)
    assert str(caught.value).startswith(f"remount read-only bind {source!r} on {target}: Operation not permitted")
    assert mounted_under(base) == []


@needs_root
def test_mount_into_subdirectory_of_target(base):
    (target,) = make_dirs(base, "rootfs")
    mount_all([Mount(type="tmpfs", source="tmpfs", options=["size=1m"])], target)
    os.mkdir(f"{target}/proc-like")
    mount_all([Mount(type="tmpfs", source="tmpfs", target="/proc-like", options=["size=1m"])], target)
    assert mounted_under(base) == [target, f"{target}/proc-like"]
    unmount_all(target)  # nested: the deeper one first


@needs_root
def test_unmount_all_is_idempotent(base):
    (target,) = make_dirs(base, "rootfs")
    unmount_all(target)  # nothing mounted
    unmount_all(f"{base}/missing")  # no such dir
    unmount_all("")
    tmpfs = Mount(type="tmpfs", source="tmpfs", options=["size=1m"])
    mount_all([tmpfs, tmpfs, tmpfs], target)  # a stack of three on one mount point
    assert mounted_under(base) == [target] * 3
    unmount_all(target)
    unmount_all(target)
    assert mounted_under(base) == []


@needs_root
def test_unmount_busy_mount_detaches(base):
    (target,) = make_dirs(base, "rootfs")
    mount_all([Mount(type="tmpfs", source="tmpfs", options=["size=1m"])], target)
    busy = open(f"{target}/open-file", "w")  # an open file keeps the mount busy (EBUSY)
    try:
        unmount_all(target)
        assert mounted_under(base) == []
    finally:
        busy.close()


def test_unmount_all_refuses_root():
    with pytest.raises(ValueError):
        unmount_all("/")
