"""`containerd-shim-pyshim-v2 start`: find or create the group's socket, fork the daemon.

containerd runs this once per container and reads its combined stdout+stderr until EOF, so:
print only the address, and make sure the daemon holds none of our output fds. The socket is
bound and listening before we exit (containerd dials at once; the connection waits in the
backlog while the daemon finishes importing).

Usually this runs in a warm fork of the zygote (shim/framework/zygote.py), which has imported
everything: the command process only handed it its arguments, environment and stdio
(shim/framework/zygote_client.py), and the fork becomes the daemon itself once its output is
out (`warm`). Otherwise (the first start of an installation, or PYSHIM_ZYGOTE=0) this process
forks the daemon once the socket is bound; never exec'd as the Go shim does, so that no
container pays for a second interpreter.
"""

from __future__ import annotations

import errno
import os
import posixpath
import sys

# Not `socket` and `json`: their imports (enum, re, selectors, ...) would cost every container
# start ~7 ms. _socket is the C module under socket; lightjson reads JSON with json's C scanner.
import _socket

SOCKET_DIR = "/run/containerd/s"
#: The Go shim refuses longer unix socket paths (sun_path is 108 bytes with the NUL).
MAX_SOCKET_PATH = 106
#: OCI annotations that put containers into one shim, after the runtime's own
#: (`<runtime type>.group`, e.g. io.containerd.pyshim.v2.group); first match wins.
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")


def group_id(bundle: str, task_id: str) -> str:
    from shim.framework.app import identity

    try:
        with open(os.path.join(bundle, "config.json")) as f:
            from shim.framework.lightjson import loads

            annotations = loads(f.read()).get("annotations") or {}
    except (OSError, ValueError):
        annotations = {}
    for key in (identity().group_annotation, *GROUP_ANNOTATIONS):
        if annotations.get(key):
            return annotations[key]
    return task_id


def _sha256_hex(data: bytes) -> str:
    try:
        from _sha256 import sha256  # the built-in one: hashlib would load OpenSSL (~3 ms)
    except ImportError:
        from hashlib import sha256
    return sha256(data).hexdigest()


def socket_address(containerd_address: str, namespace: str, group: str, *, grpc: bool = False) -> str:
    """unix:///run/containerd/s/<sha256 of address/namespace/group>, as the Go shim computes it.

    A gRPC socket is hashed from .../group/grpc (so a ttrpc daemon of the same group is never
    taken for it) and its address is the plain path: containerd dials gRPC shims by path.
    """
    key = posixpath.normpath(posixpath.join(containerd_address, namespace, group))
    if grpc:
        key += "/grpc"
    path = f"{SOCKET_DIR}/{_sha256_hex(key.encode())}"
    if len(path) > MAX_SOCKET_PATH:
        raise ValueError(f"socket path {path!r} is longer than {MAX_SOCKET_PATH} bytes")
    return path if grpc else "unix://" + path


def _alive(path: str) -> bool:
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(0.1)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def bind_or_find(address: str) -> _socket.socket | None:
    """A listening socket at address, or None when a live shim already serves it."""
    path = address.removeprefix("unix://")
    os.makedirs(posixpath.dirname(path), mode=0o700, exist_ok=True)
    for attempt in (1, 2):
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or attempt == 2:
                raise
            if _alive(path):
                return None
            os.unlink(path)  # a dead shim's socket file
            continue
        os.chmod(path, 0o600)
        sock.listen(4096)
        return sock
    raise AssertionError("unreachable")


def write_address(bundle: str, address: str) -> None:
    """<bundle>/address: containerd 1.6/1.7 read it to reconnect after a restart.

    It holds what start printed: the plain address, or the JSON reply of a gRPC shim (1.7
    parses the file as it parses start's output).
    """
    tmp = os.path.join(bundle, ".address.tmp")
    with open(tmp, "w") as f:
        f.write(address)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(bundle, "address"))


def adjust_oom_score(pid: int, parent: int = 0) -> None:
    """Make the daemon a slightly better OOM victim than containerd (our `parent`), like the
    Go shim does.

    Raising the score needs no privilege; lowering it needs CAP_SYS_RESOURCE, which some
    hosts (and this project's CI) lack: failing here must not fail the container start.
    """
    try:
        with open(f"/proc/{parent or os.getppid()}/oom_score_adj") as f:
            score = int(f.read().strip())
        with open(f"/proc/{pid}/oom_score_adj", "w") as f:
            f.write(str(min(score + 1, 1000)))
    except (OSError, ValueError):
        pass


def _place(pid: int, cgroup: str, address: str) -> bool:
    """Move the new daemon into the options' shim_cgroup; on failure stop it again (unless it
    is this process) and say why (containerd shows start's output as the error)."""
    from shim.framework.placement import PlacementError, join_cgroup

    if not cgroup:
        return True
    try:
        join_cgroup(pid, cgroup)
        return True
    except (PlacementError, OSError) as exc:
        try:
            if pid != os.getpid():
                os.kill(pid, 9)
            os.unlink(address.removeprefix("unix://"))
        except OSError:
            pass
        print(f"pyshim start: {exc}", file=sys.stderr)
        return False


def _bootstrap_params(data: bytes, task_id: str, namespace: str) -> bool:
    """Whether stdin holds containerd 2.3's BootstrapParams for this task (else runtime options).

    BootstrapParams starts with instance_id (1) and namespace (2); a google.protobuf.Any of
    runtime options has type_url (1) and value (2), which never match both flags.
    """
    if not data:
        return False
    from shim.framework.ttrpc.wire import MalformedMessage, string_fields

    try:
        fields = string_fields(data)
    except MalformedMessage:
        return False
    return fields.get(1) == task_id.encode() and fields.get(2) == namespace.encode()


def _dense_seat(flags, bundle: str, group: str, capacity: int, grpc: bool) -> tuple[str, _socket.socket | None]:
    """ContainersPerDaemon > 1: the seat's address, and its new listening socket unless a
    live daemon serves it (bound or joined under the namespace's lock)."""
    from shim.framework.dense import DENSE_ENV, SEAT_GROUP, placed

    def seat_address(seat: int) -> str:
        return socket_address(flags.address, flags.namespace, SEAT_GROUP.format(seat), grpc=grpc)

    os.environ[DENSE_ENV] = os.path.dirname(bundle)  # the daemon we may fork learns it is dense
    with placed(bundle, flags.id, group, capacity, seat_address) as address:
        write_address(bundle, address)  # counted by the next start (the reply replaces it later)
        return address, bind_or_find(address)


def start(flags, warm=None) -> int:
    """The start command. `warm` (shim.framework.zygote.Warm) when a zygote's worker runs it:
    that process becomes the daemon instead of forking one, and returns the exit code."""
    bundle = os.getcwd()
    try:
        stdin_data = sys.stdin.buffer.read() if sys.stdin is not None else b""
    except OSError:
        stdin_data = b""
    bootstrap = _bootstrap_params(stdin_data, flags.id, flags.namespace)
    from shim.framework.bootstrap import choose, containerd_binary

    parent = warm.parent_pid if warm is not None else 0  # containerd, which ran this command
    protocol = choose(os.environ, containerd_binary(flags.publish_binary, parent), bootstrap)
    protocol.export(os.environ)  # before the daemon is forked: it serves what we announce
    from shim.framework.placement import PlacementError, StartOptions, start_options_of

    try:
        options = StartOptions() if bootstrap else start_options_of(stdin_data)
        group = group_id(bundle, flags.id)
        if options.containers_per_daemon > 1:
            address, listener = _dense_seat(flags, bundle, group, options.containers_per_daemon, protocol.grpc)
        else:
            os.environ.pop("PYSHIM_DENSE_NAMESPACE_DIR", None)  # shim.framework.dense.DENSE_ENV
            address = socket_address(flags.address, flags.namespace, group, grpc=protocol.grpc)
            listener = bind_or_find(address)
    except (OSError, ValueError, PlacementError) as exc:
        print(f"pyshim start: {exc}", file=sys.stderr)
        return 1
    if listener is not None:
        if warm is not None:
            pid = os.getpid()  # a zygote's worker: the daemon is this process
        else:
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                become_daemon(flags, listener)  # never returns
            listener.close()
        if not _place(pid, options.shim_cgroup, address):
            return 1
        adjust_oom_score(pid, parent)
    reply = protocol.reply(address)
    write_address(bundle, protocol.address_file(address))
    if bootstrap:
        from shim.api.containerd.runtime.bootstrap.v1 import BootstrapResult

        sys.stdout.buffer.write(bytes(BootstrapResult(version=3, address=address, protocol=protocol.name)))
    else:
        sys.stdout.write(reply)
    sys.stdout.flush()
    if warm is not None:
        if listener is not None:
            warm.become_daemon(flags, listener, address)  # never returns
        return 0
    os._exit(0)  # skip interpreter teardown: containerd waits for this process to exit


def complete_sys_path() -> None:
    """The binary's script runs under `python -S` and puts only the environment's
    site-packages and pyshim's directory on sys.path; a daemon forked from it (no zygote)
    imports more than `start` does: apps and handlers that only a .pth file names (`pip
    install -e`). Let site add those, once, before the daemon imports anything of them."""
    if sys.flags.no_site and "site" not in sys.modules:
        import site

        site.main()


def become_daemon(flags, listener: _socket.socket) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # out of containerd's process group, as the Go shim does
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)  # containerd waits for EOF on our stdout/stderr pipe
        os.close(null)
        complete_sys_path()
        from shim.framework.daemon import serve

        code = serve(flags, listener)
    finally:
        os._exit(code)
