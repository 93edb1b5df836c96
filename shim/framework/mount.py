"""Rootfs mounts: turn `containerd.types.Mount`s into mount(2) calls, and tear them down.

containerd hands the shim the container's rootfs as a list of mounts (typically one
`overlay` with `lowerdir=...,upperdir=...,workdir=...`, or a `bind` with `rbind`), to be
mounted in order on `<bundle>/rootfs`; the shim unmounts that directory on Delete and in
`delete` (shim-protocol.md §13). We follow containerd's Linux mount code
(`core/mount/mount_linux.go`, `mount_unix.go`) in behaviour:

- Option words that are mount flags (`ro`, `nosuid`, `bind`, `rbind`, `relatime`, ...) become
  MS_* flags; every other option is passed to the filesystem in the data string.
- Propagation words (`private`, `rslave`, `shared`, ...) are applied by a second mount call:
  the kernel rejects them combined with other flags. (containerd's table lacks them, so it
  would pass them to the filesystem as data; we apply them, as runc does for its mounts.)
- A bind mount ignores MS_RDONLY on creation, so `bind`/`rbind` + `ro` is followed by a
  read-only remount of the bind. As in containerd this makes only the top mount of an
  `rbind` read-only. Inside a user namespace the remount keeps the flags the kernel locked
  on the source (nosuid, nodev, ...) or it fails with EPERM.
- `remount` without data only changes flags: no new mount is created.
- Overlay option strings near a page long are shortened by rewriting `lowerdir` relative to
  the lower dirs' common parent and mounting with that parent as the working directory.
  The kernel copies at most one page of mount data, and a rootfs with many long snapshot
  paths (`/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/<id>/fs`,
  dozens of layers) exceeds it. See `_mount_in_directory` for how the chdir is contained.

Not supported (a clear MountError instead): `loop` mounts, idmapped mounts
(`uidmap=`/`gidmap=`), FUSE types that need a `mount.fuse` helper binary.

These functions are synchronous and make blocking syscalls (an overlay unmount can take a
while to sync); a caller on the event loop may want `await asyncio.to_thread(...)`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shim.api.containerd.types import Mount

__all__ = ["MountError", "mount_all", "unmount_all"]

log = logging.getLogger("shim.framework.mount")

# <linux/mount.h>, <sched.h>
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CLONE_FS = 0x200

# option word -> (clears the flag instead of setting it, flag)
_FLAG_OPTIONS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "lazytime": (False, MS_LAZYTIME),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nolazytime": (True, MS_LAZYTIME),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "nosymfollow": (False, MS_NOSYMFOLLOW),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
}

_PROPAGATION_OPTIONS: dict[str, int] = {
    "private": MS_PRIVATE,
    "rprivate": MS_PRIVATE | MS_REC,
    "shared": MS_SHARED,
    "rshared": MS_SHARED | MS_REC,
    "slave": MS_SLAVE,
    "rslave": MS_SLAVE | MS_REC,
    "unbindable": MS_UNBINDABLE,
    "runbindable": MS_UNBINDABLE | MS_REC,
}

# Flags the kernel locks on mounts that a less privileged user namespace inherited: a
# remount inside such a namespace must keep them. statvfs' ST_* bits equal the MS_* bits.
_LOCKED_FLAGS = MS_RDONLY | MS_NODEV | MS_NOEXEC | MS_NOSUID | MS_NOATIME | MS_RELATIME | MS_NODIRATIME

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# containerd's threshold for shortening overlay options: a page minus 512 bytes of slack.
_COMPACT_OVERLAY_AT = PAGE_SIZE - 512


class MountError(OSError):
    """A mount or unmount failed. `errno` is set when a syscall failed (0 for bad options).

    Attributes: operation ("mount", "remount read-only", "unmount", ...), target, fstype, source.
    """

    def __init__(
        self,
        operation: str,
        target: str,
        fstype: str = "",
        source: str = "",
        error: int = 0,
        detail: str = "",
    ) -> None:
        reasons = []
        if error:
            reasons.append(f"{os.strerror(error)} ({errno.errorcode.get(error, error)})")
            if error == errno.ENODEV and operation == "mount":
                reasons.append(f"is filesystem type {fstype!r} supported by this kernel?")
        if detail:
            reasons.append(detail)
        what = f"{operation} {fstype} {source!r} on {target}" if fstype else f"{operation} {target}"
        self.message = f"{what}: {'; '.join(reasons) or 'failed'}"
        super().__init__(error, self.message)
        self.operation = operation
        self.target = target
        self.fstype = fstype
        self.source = source

    def __str__(self) -> str:
        return self.message


# -- syscalls ----------------------------------------------------------------------------
_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    # dlopen(NULL): the C library Python already links. (ctypes.util.find_library would
    # spawn ldconfig, and a shim routes every child through its reaper.)
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
        lib.mount.restype = ctypes.c_int
        lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        lib.umount2.restype = ctypes.c_int
        lib.unshare.argtypes = [ctypes.c_int]
        lib.unshare.restype = ctypes.c_int
        _libc = lib
    return _libc


def _encode(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def _check(result: int) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _sys_mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(_lib().mount(_encode(source), _encode(target), _encode(fstype), flags, _encode(data)))


def _sys_umount(target: str, flags: int) -> None:
    _check(_lib().umount2(_encode(target), flags))


# -- option parsing ----------------------------------------------------------------------
@dataclass(slots=True)
class _Options:
    flags: int = 0
    propagation: int = 0
    data: list[str] = field(default_factory=list)


def _parse_options(options: Sequence[str]) -> _Options:
    parsed = _Options()
    for option in options:
        if option in _FLAG_OPTIONS:
            clear, flag = _FLAG_OPTIONS[option]
            parsed.flags = parsed.flags & ~flag if clear else parsed.flags | flag
        elif option in _PROPAGATION_OPTIONS:
            parsed.propagation |= _PROPAGATION_OPTIONS[option]
        elif option == "defaults":
            pass  # mount(8)'s "no options"; no filesystem wants it in its data
        else:
            parsed.data.append(option)
    return parsed


def _unsupported(fstype: str, options: Sequence[str]) -> str | None:
    """Why we cannot do this mount in-process, or None."""
    if fstype.startswith(("fuse.", "fuse3.")):
        return f"type {fstype} needs a mount.fuse helper binary, which pyshim does not run"
    for option in options:
        if option == "loop":
            return "loop mounts (option 'loop') are not supported by pyshim"
        if option.startswith(("uidmap=", "gidmap=")):
            return f"idmapped mounts (option {option.split('=')[0]!r}) are not supported by pyshim"
        if option.startswith("X-containerd."):
            return f"internal option {option!r} should have been handled by containerd's mount manager"
    return None


_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def _compact_lowerdirs(options: Sequence[str]) -> tuple[str | None, list[str]]:
    """Rewrite `lowerdir=` relative to the lower dirs' common parent.

    Returns (that parent, new options), or (None, options unchanged) when there is nothing to
    gain: a single lower dir, relative paths, or no common parent below `/`.
    """
    options = list(options)
    index = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), None)
    if index is None:
        return None, options
    lowers = _UNESCAPED_COLON.split(options[index][len("lowerdir=") :])
    if len(lowers) < 2 or not all(lower.startswith("/") for lower in lowers):
        return None, options
    # Cut the common string prefix back to a whole directory: snapshot ids are numbers, so
    # ".../snapshots/12/fs" and ".../snapshots/13/fs" share ".../snapshots/1".
    parent = os.path.dirname(os.path.commonprefix(lowers))
    if parent in ("", "/"):
        return None, options
    prefix = parent + "/"
    if not all(lower.startswith(prefix) and len(lower) > len(prefix) for lower in lowers):
        return None, options
    options[index] = "lowerdir=" + ":".join(lower[len(prefix) :] for lower in lowers)
    return parent, options


# -- mounting ----------------------------------------------------------------------------
def _mount_in_directory(directory: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) with `directory` as the working directory, so relative lowerdirs resolve there.

    chdir changes the working directory of the whole process, which other threads (the
    asyncio default executor, the logging of relative paths...) would see. So the chdir is
    made in a fresh thread that first unshares its filesystem attributes (unshare(CLONE_FS)
    affects only the calling thread): its cwd is then private, and it dies with the thread.
    A fresh threading.Thread, not an executor, because an executor would reuse the thread
    with its changed cwd. We chose this over fork(): forking a threaded Python process to
    run ctypes code in the child is unsafe (locks held by other threads at fork time).
    """
    failure: list[BaseException] = []

    def mount_there() -> None:
        try:
            _check(_lib().unshare(CLONE_FS))
            os.chdir(directory)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=mount_there, name="shim-mount-chdir", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() != ["0", "0", "4294967295"]
    except OSError:
        return False


def _mount_one(mount: Mount, target: str) -> bool:
    """Do one mount; returns whether it added a mount at target (a flags-only remount does not)."""
    fstype, source = mount.type, mount.source
    options = list(mount.options)
    why_not = _unsupported(fstype, options)
    if why_not:
        raise MountError("mount", target, fstype, source, detail=why_not)

    directory = None
    if fstype == "overlay" and len(",".join(options)) >= _COMPACT_OVERLAY_AT:
        directory, options = _compact_lowerdirs(options)
    parsed = _parse_options(options)
    data = ",".join(parsed.data)
    if len(data) >= PAGE_SIZE:
        raise MountError(
            "mount", target, fstype, source,
            detail=f"mount options are {len(data)} bytes, over the kernel's limit of one page ({PAGE_SIZE})",
        )

    flags = parsed.flags
    created = False
    step = "mount"
    try:
        # A remount with new data needs this call too; a flags-only remount does not.
        if not flags & MS_REMOUNT or data:
            if directory is not None:
                _mount_in_directory(directory, source, target, fstype, flags, data)
            else:
                _sys_mount(source, target, fstype, flags, data)
            created = not flags & MS_REMOUNT
        if parsed.propagation:
            step = "set propagation of"
            _sys_mount(None, target, None, parsed.propagation | MS_SILENT, None)
        if flags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
            step = "remount read-only"
            if _in_user_namespace():
                flags |= os.statvfs(target).f_flag & _LOCKED_FLAGS
            _sys_mount(None, target, None, flags | MS_REMOUNT, None)
    except OSError as exc:
        if created:
            _undo(target)
        shown = ",".join(options)
        shown = shown if len(shown) <= 300 else shown[:300] + "..."
        detail = f"options {shown!r}" if shown else ""
        raise MountError(step, target, fstype, source, exc.errno or 0, detail) from None
    return created


def _scoped_join(root: str, path: str) -> str:
    """`root/path` with symlinks in path resolved as if root were `/`, so it cannot escape root."""
    pending = [p for p in path.split("/") if p]
    resolved: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        try:
            is_link = stat.S_ISLNK(os.lstat(candidate).st_mode)
        except FileNotFoundError:
            is_link = False
        if not is_link:
            resolved.append(part)
            continue
        links += 1
        if links > 40:
            raise MountError("mount", candidate, error=errno.ELOOP)
        link = os.readlink(candidate)
        if link.startswith("/"):
            resolved = []
        pending[:0] = [p for p in link.split("/") if p]
    return os.path.join(root, *resolved)


def mount_all(mounts: Sequence[Mount], target: str) -> None:
    """Mount each of `mounts` in order onto `target` (or onto `target/<mount.target>`).

    On failure the mounts already made are unmounted again (newest first) and MountError is
    raised, naming the target, the type, and the errno text.
    """
    root = os.path.realpath(target)
    made: list[str] = []
    try:
        for mount in mounts:
            where = _scoped_join(root, mount.target) if mount.target else root
            if _mount_one(mount, where):
                made.append(where)
    except BaseException:
        for where in reversed(made):
            _undo(where)
        raise


def _undo(target: str) -> None:
    """Best-effort unmount while handling another error, which must not be masked."""
    try:
        _unmount_once(target)
    except OSError as exc:
        log.error("cleaning up after a failed mount: %s", exc)


# -- unmounting --------------------------------------------------------------------------
def _unmount_once(target: str) -> bool:
    """Remove the top mount at target, lazily if it is busy; False when nothing was mounted."""
    # NOFOLLOW: mount points below a rootfs live in the container's filesystem, where a
    # symlink could point an unmount at a host path.
    try:
        _sys_umount(target, UMOUNT_NOFOLLOW)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        if exc.errno != errno.EBUSY:
            raise MountError("unmount", target, error=exc.errno or 0) from None
    # Still in use (a process has its cwd there, an open fd): detach it now; the kernel
    # finishes the unmount when the last user goes.
    log.warning("unmount %s: busy, detaching it lazily", target)
    try:
        _sys_umount(target, UMOUNT_NOFOLLOW | MNT_DETACH)
        return True
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise MountError("unmount", target, error=exc.errno or 0) from None


def _unescape_mountinfo(field_: bytes) -> str:
    # The kernel escapes space, tab, newline and backslash in mountinfo as \ooo.
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field_))


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            return [_unescape_mountinfo(line.split(b" ")[4]) for line in f if line.strip()]
    except OSError:
        return []


def unmount_all(target: str) -> None:
    """Unmount everything mounted at or below `target`, deepest first, each stack completely.

    Idempotent: nothing mounted, or `target` missing, is not an error. A busy mount is
    detached (MNT_DETACH). Raises MountError for other failures (e.g. EPERM).
    """
    if not target or not os.path.lexists(target):
        return
    root = os.path.realpath(target)
    if root == "/":
        raise ValueError("unmount_all: refusing to unmount everything under /")
    below = root + "/"
    points = {p for p in _mount_points() if p == root or p.startswith(below)}
    points.add(root)  # even if mountinfo could not be read
    for point in sorted(points, key=len, reverse=True):
        # A mount point can hold a stack of mounts: remove until the kernel says
        # "not a mount point" (EINVAL). Bounded, in case that never comes.
        for _ in range(1000):
            if not _unmount_once(point):
                break
        else:
            raise MountError("unmount", point, detail="still mounted after 1000 unmounts")
