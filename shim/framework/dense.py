"""The dense mode: one daemon serves up to N containers of a namespace (ContainersPerDaemon = N).

Without it a daemon serves one container, or one group (a pod: the containers that share a
sandbox id or a group annotation). With it, groups are packed into numbered seats' daemons:
daemon k of a namespace listens at the socket address of group `dense/<k>` (a name no
container id can take: ids have no "/"), and a new group goes to the lowest k whose daemon
serves fewer than N containers. A pod's later containers follow its first one (its bundle's
`address`), so a pod is never split, even when that takes its daemon past N.

Who is in which daemon is read from the bundles themselves: every container's bundle has the
`address` file `start` writes. Starts of one namespace choose under an flock on the
namespace's bundle directory, and each writes its own `address` before the lock goes, so two
concurrent starts never both take the last seat. A bundle stays until containerd has deleted
its task, so a seat is free again only once its container is really gone.

The price is the blast radius: if that daemon dies, every container in it is reported as
containerd reports a dead shim (each one's `delete` answers its recorded exit status, or 137),
which N bounds. See README "Dense mode".
"""

from __future__ import annotations

# Plain modules only: this runs in `start`, where collections, contextlib and json would
# cost more than the placement itself.
import fcntl
import os

#: Set in the environment of a dense daemon (by start): its namespace's bundle directory.
DENSE_ENV = "PYSHIM_DENSE_NAMESPACE_DIR"
#: The group name of seat k (the socket address is hashed from it as from any group id).
SEAT_GROUP = "dense/{}"


def _address_of(bundle: str) -> str:
    """The socket address a bundle's container was given ("" when none is recorded): the
    plain address, or the one inside a gRPC reply; for a container containerd 2.x attached to
    its sandbox's shim without `start`, the one in the bootstrap.json it wrote."""
    text = ""
    for name in ("address", "bootstrap.json"):
        try:
            with open(os.path.join(bundle, name)) as f:
                text = f.read().strip()
            break
        except OSError:
            continue
    if not text:
        return ""
    if text.startswith("{"):
        from shim.framework.lightjson import loads

        try:
            return str(loads(text).get("address", ""))
        except (ValueError, AttributeError):
            return ""
    return text


def _normal(address: str) -> str:
    return address.removeprefix("unix://")


class placed:
    """`with placed(...) as address`: the address of the daemon this container goes to; the
    namespace's lock is held until the with block ends, in which `start` must write it to the
    bundle's `address` (so that the next start counts it) and bind or join that daemon (before
    a leaving one can decide it has no newcomer: may_exit).

    seat_address(k) is the socket address of seat k's daemon (in the protocol start chose).
    `bundle` is the container's own; its siblings are the namespace's other containers.
    """

    def __init__(self, bundle: str, task_id: str, group: str, capacity: int, seat_address) -> None:
        self._args = (bundle, task_id, group, capacity, seat_address)
        self._lock = -1

    def __enter__(self) -> str:
        bundle, task_id, group, capacity, seat_address = self._args
        namespace_dir = os.path.dirname(bundle)
        self._lock = os.open(namespace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            leader = _address_of(os.path.join(namespace_dir, group)) if group != task_id else ""
            if leader:  # a pod member: its sandbox (the group's first container) is placed already
                return leader
            served: dict[str, int] = {}
            own = os.path.basename(bundle)
            with os.scandir(namespace_dir) as entries:
                for entry in entries:
                    if entry.name != own and entry.is_dir(follow_symlinks=False):
                        found = _normal(_address_of(entry.path))
                        if found:
                            served[found] = served.get(found, 0) + 1
            seat = 0
            while served.get(_normal(seat_address(seat)), 0) >= capacity:
                seat += 1
            return seat_address(seat)
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self._lock >= 0:
            os.close(self._lock)  # releases the flock
            self._lock = -1


def bundle_identity(bundle: str) -> int:
    """What tells a bundle directory from a later one of the same container id (containerd
    lets an id be reused once the old bundle is removed): its inode, 0 when it cannot be read.

    On the tmpfs of /run, where containerd keeps bundles, inode numbers are not reused; on a
    disk filesystem a new directory can get a freed one, which narrows the race below
    without closing it.
    """
    try:
        return os.lstat(bundle).st_ino
    except OSError:
        return 0


def may_exit(namespace_dir: str, socket_path: str, served: dict[str, int]) -> bool:
    """Whether a dense daemon with no containers left may exit: not while a start has given
    some container its address (a bundle that names it and was not one of its own), which
    that container's Create will reach shortly.

    `served` maps the id of every container this daemon created to its bundle_identity: a
    deleted container's bundle lingers until containerd removes it, and is not a newcomer;
    a new bundle of a reused id is (matching the id alone would let the daemon exit under
    a newcomer whose Create is on the way).

    Decided under the namespace's lock and, when yes, the socket is unlinked before the lock
    goes: a start that comes later binds a new daemon at the same address instead of joining
    one that is leaving.
    """
    lock = os.open(namespace_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        own = set()
        with os.scandir(namespace_dir) as entries:
            for entry in entries:
                if not entry.is_dir(follow_symlinks=False):
                    continue
                # lstat, not the entry's d_ino: overlayfs may report another number there
                if entry.name in served and served[entry.name] == bundle_identity(entry.path):
                    own.add(entry.name)
                elif _normal(_address_of(entry.path)) == socket_path:
                    return False
        for cid in served.keys() - own:
            del served[cid]  # bundles containerd has removed are not asked about again
        try:
            os.unlink(socket_path)
        except OSError:
            pass
        return True
    finally:
        os.close(lock)
