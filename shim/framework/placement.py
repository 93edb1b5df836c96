"""Where the daemon runs: the cgroup named by the runtime options' shim_cgroup, and how many
containers share it (ContainersPerDaemon, shim.framework.dense).

containerd passes the runtime options to `start` on stdin (a google.protobuf.Any: runc
Options, or CRI's runtimeoptions.v1 TOML). Like the Go shim, `start` moves the new daemon
into `shim_cgroup` before it reports the address, and fails the start if it cannot: a shim
outside the cgroup the operator asked for would escape its accounting silently.

Read with shim.framework.ttrpc.wire's field peeking, not the protobuf runtime: this is on the path of
every `start`.
"""

from __future__ import annotations

import os

CGROUP_ROOT = "/sys/fs/cgroup"


class PlacementError(Exception):
    pass


class StartOptions:
    """What `start` itself acts on in the runtime options."""

    __slots__ = ("shim_cgroup", "containers_per_daemon")

    def __init__(self, shim_cgroup: str = "", containers_per_daemon: int = 1) -> None:
        self.shim_cgroup = shim_cgroup
        #: How many containers (of one namespace) one daemon may serve: 1 is a daemon per
        #: container or pod; more is the dense mode (shim.framework.dense).
        self.containers_per_daemon = containers_per_daemon


def start_options_of(options: bytes) -> StartOptions:
    """ShimCgroup and ContainersPerDaemon from the runtime options `start` read from stdin.

    Options that cannot be read are ignored here, as containerd 1.7+'s runc shim does (Create
    reports them to the user), except a ContainersPerDaemon that is not a positive integer:
    PlacementError, since guessing would put containers where the operator did not ask.
    """
    if not options:
        return StartOptions()
    from shim.framework.ttrpc.wire import MalformedMessage, string_fields

    try:
        any_fields = string_fields(options)
        type_url = any_fields.get(1, b"").decode().rpartition("/")[2]
        value = any_fields.get(2, b"")
        if type_url == "containerd.runc.v1.Options":
            return StartOptions(string_fields(value).get(3, b"").decode())  # field 3: shim_cgroup
        if type_url == "runtimeoptions.v1.Options":
            config = string_fields(value)  # 2: config_path, 3: config_body
            path = config.get(2, b"").decode()
            if path:
                with open(path, "rb") as f:
                    return _start_options_in_toml(f.read())
            return _start_options_in_toml(config.get(3, b""))
    except (MalformedMessage, UnicodeDecodeError, OSError, ValueError):
        return StartOptions()
    return StartOptions()


def shim_cgroup_of(options: bytes) -> str:
    """The shim_cgroup asked for by the runtime options ('' if none)."""
    return start_options_of(options).shim_cgroup


def _start_options_in_toml(data: bytes) -> StartOptions:
    """The ShimCgroup and ContainersPerDaemon keys of a runtime options TOML table (any
    spelling of their case and underscores, as the options are read)."""
    import tomllib

    table = tomllib.loads(data.decode())
    found = StartOptions()
    for key, value in table.items():
        name = key.lower().replace("_", "")
        if name == "shimcgroup":
            if not isinstance(value, str):
                raise ValueError(f"ShimCgroup must be a str, not {value!r}")
            found.shim_cgroup = value
        elif name == "containersperdaemon":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlacementError(f"ContainersPerDaemon must be a positive integer, not {value!r}")
            found.containers_per_daemon = value
    return found


def join_cgroup(pid: int, cgroup: str, *, root: str = CGROUP_ROOT, mountinfo: str | None = None) -> list[str]:
    """Move `pid` into `cgroup` (a path from the hierarchy's root) and return the
    cgroup.procs files written. cgroup v2: the one unified file. cgroup v1: every mounted
    hierarchy where that cgroup exists (as containerd's cgroup1 package does); none is an
    error. Raises PlacementError with the path that failed."""
    relative = cgroup.strip("/")
    if not relative or ".." in relative.split("/"):
        raise PlacementError(f"invalid shim cgroup {cgroup!r}")
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        hierarchies = [root]
    else:
        hierarchies = _v1_hierarchies(mountinfo)
    targets = [os.path.join(h, relative, "cgroup.procs") for h in hierarchies]
    targets = [t for t in targets if os.path.isdir(os.path.dirname(t))]
    if not targets:
        raise PlacementError(f"failed to load cgroup {cgroup}: cgroup deleted")
    for target in targets:
        try:
            with open(target, "w") as f:
                f.write(str(pid))
        except OSError as exc:
            raise PlacementError(f"failed to join cgroup {cgroup}: {target}: {exc.strerror}") from None
    return targets


def _v1_hierarchies(mountinfo: str | None) -> list[str]:
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    found = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup":  # v1 only: a hybrid's cgroup2 is not one of them
            found.append(left.split(" ")[4])
    return found
