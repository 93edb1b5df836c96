"""`containerd-shim-pyshim-v2 delete`: clean up a task without the daemon.

containerd runs it after every task teardown (the daemon already did the work; this must
then be a quick no-op) and when a shim died (the daemon is gone; this is the only cleanup).
It must be idempotent, finish well within containerd's 5 s, leave a shared daemon and the
other containers of its group alone, and print nothing but the DeleteResponse bytes.
"""

from __future__ import annotations

import os
import sys
import time

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def delete(flags) -> int:
    from shim.framework.app import current

    bundle = flags.bundle or os.getcwd()
    # After a normal teardown the daemon has already deleted the container and unmounted
    # the rootfs: then there is nothing to do, and containerd waits for us to exit before
    # it removes the snapshot, so every millisecond here is on the container's path.
    current().cleanup(flags.namespace, flags.id, bundle)
    rootfs = os.path.join(bundle, "rootfs")
    if _mounted_under(rootfs):
        from shim.framework.mount import unmount_all

        try:
            unmount_all(rootfs)
        except Exception as exc:
            sys.stderr.write(f"unmount {rootfs}: {exc}\n")

    _remove_dead_socket(bundle)
    from shim.framework import exit_record

    recorded = exit_record.read(bundle)
    if recorded is not None:
        # init had exited before the daemon went away: its real status, not "killed".
        pid, status, exited_at_ns = recorded
    else:
        pid_text = _read(os.path.join(bundle, "init.pid"))
        pid, status, exited_at_ns = (int(pid_text) if pid_text.isdigit() else 0), 128 + 9, time.time_ns()
    sys.stdout.buffer.write(delete_response(pid, status, exited_at_ns))
    sys.stdout.flush()
    sys.stderr.flush()
    return 0


#: Where shim sockets live (shim-protocol.md §2.4); nothing elsewhere is ever removed.
SOCKET_DIR = "/run/containerd/s/"


def _remove_dead_socket(bundle: str) -> None:
    """A SIGKILLed daemon leaves its socket files behind (Task API and debug): remove them,
    but only when nobody listens any more (a group's daemon may still serve other containers)."""
    address = _read(os.path.join(bundle, "address"))
    path = address.removeprefix("unix://")
    if not path.startswith(SOCKET_DIR) or "/.." in path or not os.path.exists(path):
        return
    import _socket  # the C module: `socket` would import selectors and more for nothing

    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(0.2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # a socket file without a listener
        from shim.framework.debug import debug_socket_path

        for dead in (path, debug_socket_path(path)):
            try:
                os.unlink(dead)
            except OSError:
                pass
    except OSError:
        pass  # busy or unreadable: assume alive
    finally:
        probe.close()


def _mounted_under(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    except OSError:
        return True  # cannot tell: try to unmount
    prefix = path.rstrip("/")
    return any(
        (point := line.split(" ", 5)[4]) == prefix or point.startswith(prefix + "/")
        for line in mountinfo.splitlines()
        if line.count(" ") >= 5
    )


def delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse, encoded by hand: importing the protobuf runtime
    for three fields would cost this short-lived command more than all its real work."""
    from shim.framework.ttrpc.wire import encode_bytes_field, encode_timestamp, encode_varint_field

    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    return (
        encode_varint_field(1, pid)
        + encode_varint_field(2, exit_status)
        + encode_bytes_field(3, encode_timestamp(seconds, nanos))
    )
