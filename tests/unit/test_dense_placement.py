"""Dense mode without containerd: seat choice from a namespace's bundle directory (dense.placed),
a daemon's decision to exit (dense.may_exit), start's use of the lock (start._dense_seat), and
ContainersPerDaemon in the runtime options (placement.start_options_of).

A namespace directory is a tmp_path dir of bundle dirs, each with the `address` file start
writes: the plain address (ttrpc) or the gRPC reply, JSON with the address inside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading

import pytest

from shim.api.containerd.runc.v1 import Options
from shim.api.google.protobuf import Any
from shim.api.runtimeoptions.v1 import Options as ConfigOptions
from shim.framework import start as start_module
from shim.framework.dense import DENSE_ENV, bundle_identity, may_exit, placed
from shim.framework.flags import Flags
from shim.framework.placement import PlacementError, start_options_of


def seat_address(k: int) -> str:
    return f"unix:///tmp/seat{k}"


def bundle(namespace_dir, cid: str, address: str | None = None):
    path = namespace_dir / cid
    path.mkdir()
    if address is not None:
        (path / "address").write_text(address)
    return path


def grpc_reply(path: str) -> str:
    return json.dumps({"version": 2, "protocol": "grpc", "address": path})


@pytest.fixture
def ns(tmp_path):
    directory = tmp_path / "k8s.io"
    directory.mkdir()
    return directory


def choose(ns, cid: str, group: str | None = None, capacity: int = 2) -> str:
    own = ns / cid
    if not own.exists():
        own.mkdir()
    with placed(str(own), cid, group or cid, capacity, seat_address) as address:
        return address


def locked(directory) -> bool:
    """Whether someone holds the flock of directory (a second open file description cannot
    take it, even in this process)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        assert exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        return True
    finally:
        os.close(fd)
    return False


# -- placed ------------------------------------------------------------------------------


def test_an_empty_namespace_starts_at_seat_0(ns):
    assert choose(ns, "a") == seat_address(0)


def test_the_lowest_seat_with_room_wins(ns):
    bundle(ns, "a", seat_address(0))
    bundle(ns, "b", "/tmp/seat0")  # counted whether or not it carries unix://
    bundle(ns, "c", seat_address(1))
    bundle(ns, "d", seat_address(3))
    assert choose(ns, "new") == seat_address(1)
    bundle(ns, "e", grpc_reply("/tmp/seat1"))  # a gRPC reply counts by the address inside it
    assert choose(ns, "new2") == seat_address(2)


def test_a_freed_seat_is_taken_again(ns):
    for cid, seat in (("a", 0), ("b", 0), ("c", 1), ("d", 1)):
        bundle(ns, cid, seat_address(seat))
    assert choose(ns, "new") == seat_address(2)
    (ns / "a" / "address").unlink()
    (ns / "a").rmdir()
    assert choose(ns, "new") == seat_address(0)


def test_bundles_without_a_readable_address_are_not_counted(ns):
    bundle(ns, "starting")  # containerd made the bundle; its start has not chosen yet
    bundle(ns, "garbled", "{not json")
    bundle(ns, "empty", "")
    (ns / "stray-file").write_text(seat_address(0))  # not a bundle
    bundle(ns, "a", seat_address(0))
    assert choose(ns, "new") == seat_address(0)


def test_the_own_bundle_is_not_counted(ns):
    bundle(ns, "a", seat_address(0))
    bundle(ns, "me", seat_address(0))  # e.g. start run again for the same bundle
    assert choose(ns, "me") == seat_address(0)
    assert choose(ns, "other") == seat_address(1)


def test_capacity_is_per_daemon(ns):
    for n in range(5):
        bundle(ns, f"c{n}", seat_address(0))
    assert choose(ns, "new", capacity=6) == seat_address(0)
    assert choose(ns, "new", capacity=5) == seat_address(1)


@pytest.mark.parametrize("written", [seat_address(0), grpc_reply("/tmp/seat0")])
def test_a_pod_member_follows_its_leader_even_into_a_full_seat(ns, written):
    bundle(ns, "sandbox", written)
    bundle(ns, "other", seat_address(0))  # seat 0 is full (capacity 2)
    assert choose(ns, "member", group="sandbox") == (
        seat_address(0) if written.startswith("unix") else "/tmp/seat0")  # the leader's address as recorded
    assert choose(ns, "loner") == seat_address(1)


def test_a_pod_member_whose_leader_is_gone_is_packed(ns):
    bundle(ns, "a", seat_address(0))
    bundle(ns, "b", seat_address(0))
    assert choose(ns, "member", group="gone-sandbox") == seat_address(1)
    bundle(ns, "unplaced-sandbox")  # its leader has no address yet
    assert choose(ns, "member2", group="unplaced-sandbox") == seat_address(1)


def test_a_leader_is_packed_like_any_container(ns):
    bundle(ns, "a", seat_address(0))
    bundle(ns, "b", seat_address(0))
    assert choose(ns, "sandbox", group="sandbox") == seat_address(1)


def test_the_namespace_is_locked_inside_the_block_only(ns):
    own = bundle(ns, "me")
    assert not locked(ns)
    with placed(str(own), "me", "me", 2, seat_address):
        assert locked(ns)
    assert not locked(ns)
    with contextlib.suppress(RuntimeError):
        with placed(str(own), "me", "me", 2, seat_address):
            raise RuntimeError("start failed to bind")
    assert not locked(ns)


def test_start_writes_its_choice_under_the_lock_before_binding(ns, monkeypatch):
    """The next start counts this container as soon as the lock goes, and a leaving daemon
    (may_exit, under the same lock) sees the newcomer before it decides."""
    bundle(ns, "a", seat_address(0))
    own = bundle(ns, "me")
    monkeypatch.setattr(start_module, "socket_address",
                        lambda address, namespace, group, grpc=False: f"unix:///tmp/{namespace}/{group}")
    monkeypatch.delenv(DENSE_ENV, raising=False)
    seen = []

    def bind_or_find(address):
        seen.append(((own / "address").read_text(), locked(ns)))
        return None  # a live daemon serves it

    monkeypatch.setattr(start_module, "bind_or_find", bind_or_find)
    flags = Flags(namespace="k8s.io", id="me", address="/run/containerd/containerd.sock")
    assert start_module._dense_seat(flags, str(own), "me", 3, grpc=False) == ("unix:///tmp/k8s.io/dense/0", None)
    assert seen == [("unix:///tmp/k8s.io/dense/0", True)]
    assert os.environ[DENSE_ENV] == str(ns)  # the daemon start may fork knows it is dense
    assert not locked(ns)


# -- may_exit ----------------------------------------------------------------------------


@pytest.fixture
def sock(tmp_path):
    path = tmp_path / "seat0.sock"
    path.write_text("")  # stands for the listening socket's file
    return path


def served_by(ns, *cids: str) -> dict[str, int]:
    """The daemon's record of the containers it created (service.served_bundles)."""
    return {cid: bundle_identity(str(ns / cid)) for cid in cids}


def test_a_newcomer_naming_the_socket_keeps_the_daemon(ns, sock):
    bundle(ns, "mine", f"unix://{sock}")  # deleted already, containerd not done with the bundle
    bundle(ns, "newcomer", f"unix://{sock}")
    served = served_by(ns, "mine")
    assert may_exit(str(ns), str(sock), served) is False
    assert sock.exists() and served == served_by(ns, "mine")
    (ns / "newcomer" / "address").write_text(grpc_reply(str(sock)))
    assert may_exit(str(ns), str(sock), served) is False


def test_with_no_newcomer_the_daemon_exits_and_unlinks_its_socket(ns, sock):
    bundle(ns, "mine", f"unix://{sock}")
    bundle(ns, "elsewhere", "unix:///tmp/seat1")
    bundle(ns, "starting")
    served = {**served_by(ns, "mine"), "removed-by-containerd": 12345}
    assert may_exit(str(ns), str(sock), served) is True
    assert not sock.exists()
    assert served == served_by(ns, "mine")  # only bundles that still exist
    assert not locked(ns)


def test_a_reused_id_is_a_newcomer(ns, sock, tmp_path):
    """containerd lets an id be used again once its bundle is removed: a daemon that served
    the old container must not take the new one's bundle for the old one's and exit while
    the new one's Create is on the way."""
    old = bundle(ns, "reused", f"unix://{sock}")
    served = served_by(ns, "reused")
    old.rename(tmp_path / "removed")  # keeps the old inode busy: the new bundle cannot get it
    bundle(ns, "reused", f"unix://{sock}")
    assert may_exit(str(ns), str(sock), served) is False
    assert sock.exists()


def test_an_unreadable_identity_errs_on_waiting(ns, sock):
    bundle(ns, "mine", f"unix://{sock}")
    assert may_exit(str(ns), str(sock), {"mine": bundle_identity(str(ns / "nope"))}) is False


def test_may_exit_waits_for_the_lock(ns, sock):
    """Decided under the lock starts take: a start choosing this seat right now is seen."""
    fd = os.open(ns, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = []
        worker = threading.Thread(target=lambda: result.append(may_exit(str(ns), str(sock), {})))
        worker.start()
        worker.join(0.2)
        assert worker.is_alive() and result == []
        bundle(ns, "newcomer", f"unix://{sock}")  # written by the start holding the lock
    finally:
        os.close(fd)
    worker.join(5)
    assert result == [False] and sock.exists()


def test_a_socket_already_gone_is_no_error(ns, tmp_path):
    assert may_exit(str(ns), str(tmp_path / "never-bound"), {}) is True


# -- ContainersPerDaemon in the runtime options ------------------------------------------


def toml_options(body: str, type_url: str = "runtimeoptions.v1.Options") -> bytes:
    return bytes(Any(type_url=type_url, value=bytes(ConfigOptions(type_url="x", config_body=body.encode()))))


def path_options(path) -> bytes:
    return bytes(Any(type_url="runtimeoptions.v1.Options", value=bytes(ConfigOptions(config_path=str(path)))))


@pytest.mark.parametrize("key", ["ContainersPerDaemon", "containers_per_daemon", "CONTAINERS_PER_DAEMON",
                                 "containersPerDaemon", "Containers_Per_Daemon"])
def test_containers_per_daemon_in_any_spelling(key):
    assert start_options_of(toml_options(f"{key} = 3\n")).containers_per_daemon == 3


def test_containers_per_daemon_beside_shim_cgroup(tmp_path):
    body = 'BinaryName = "crun"\nShimCgroup = "/pods/dense"\nContainersPerDaemon = 50\n[HandlerOptions]\nx = 1\n'
    for options in (toml_options(body), toml_options(body, "type.googleapis.com/runtimeoptions.v1.Options")):
        found = start_options_of(options)
        assert (found.shim_cgroup, found.containers_per_daemon) == ("/pods/dense", 50)
    path = tmp_path / "dense.toml"  # containerd 1.6's CRI passes the table as a file
    path.write_text("containers_per_daemon = 7\nshim_cgroup = '/from/file'\n")
    found = start_options_of(path_options(path))
    assert (found.shim_cgroup, found.containers_per_daemon) == ("/from/file", 7)


@pytest.mark.parametrize("options", [
    b"",
    toml_options('ShimCgroup = "/only/cgroup"\n'),
    toml_options(""),
    bytes(Any(type_url="containerd.runc.v1.Options", value=bytes(Options(shim_cgroup="/runc")))),
    b"\xff\xff",
    toml_options("ContainersPerDaemon = \n"),  # not TOML: ignored like any unreadable options
])
def test_one_container_per_daemon_by_default(options):
    assert start_options_of(options).containers_per_daemon == 1


@pytest.mark.parametrize("value, shown", [("0", "0"), ("-1", "-1"), ('"3"', "'3'"), ("true", "True"),
                                          ("2.5", "2.5"), ("[3]", "[3]")])
def test_a_bad_containers_per_daemon_is_refused(value, shown, tmp_path):
    message = re.escape(f"ContainersPerDaemon must be a positive integer, not {shown}")
    with pytest.raises(PlacementError, match=f"^{message}$"):
        start_options_of(toml_options(f'ShimCgroup = "/x"\nContainersPerDaemon = {value}\n'))
    path = tmp_path / "bad.toml"
    path.write_text(f"containers_per_daemon = {value}\n")
    with pytest.raises(PlacementError, match=f"^{message}$"):
        start_options_of(path_options(path))
