"""`containerd-shim-pyshim-v2 delete`: clean up a task without the daemon.

containerd runs it after every task teardown (the daemon already did the work; this must
then be a quick no-op) and when a shim died (the daemon is gone; this is the only cleanup).
It must be idempotent, finish well within containerd's 5 s, leave a shared daemon and the
other containers of its group alone, and print nothing but the DeleteResponse bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

#: containerd waits 5 s for the whole command; leave room for unmounting and replying.
RUNTIME_DELETE_TIMEOUT = 3.0


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def delete(flags) -> int:
    from shim.options import RuntimeOptions

    bundle = flags.bundle or os.getcwd()
    options = RuntimeOptions.read(bundle)
    binary = _read(os.path.join(bundle, "runtime")) or options.runtime_binary
    argv = [
        binary,
        "--root", options.runtime_root(flags.namespace),
        "--log", os.path.join(bundle, "log.json"),
        "--log-format", "json",
    ]
    if options.systemd_cgroup:
        argv.append("--systemd-cgroup")
    argv += ["delete", "--force", flags.id]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    try:
        result = subprocess.run(argv, env=env, capture_output=True, timeout=RUNTIME_DELETE_TIMEOUT, check=False)
        if result.returncode != 0 and b"does not exist" not in result.stderr:
            # stderr is logged by containerd as a warning; the cleanup goes on.
            sys.stderr.write(f"{binary} delete --force {flags.id}: {result.stderr.decode(errors='replace').strip()}\n")
    except (OSError, subprocess.TimeoutExpired) as exc:
        sys.stderr.write(f"{binary} delete --force {flags.id}: {exc}\n")

    from shim.mount import unmount_all

    try:
        unmount_all(os.path.join(bundle, "rootfs"))
    except Exception as exc:
        sys.stderr.write(f"unmount {bundle}/rootfs: {exc}\n")

    pid_text = _read(os.path.join(bundle, "init.pid"))
    pid = int(pid_text) if pid_text.isdigit() else 0
    sys.stdout.buffer.write(_delete_response(pid, 128 + 9, time.time_ns()))
    sys.stdout.flush()
    return 0


def _delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    import datetime

    from shim.api.containerd.task.v2 import DeleteResponse

    exited_at = datetime.datetime.fromtimestamp(exited_at_ns / 1e9, tz=datetime.timezone.utc)
    return bytes(DeleteResponse(pid=pid, exit_status=exit_status, exited_at=exited_at))
