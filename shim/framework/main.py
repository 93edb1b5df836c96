"""The shim binary's entry point, for any application on the framework (Go's shim.Run).

    from shim.framework.app import RuntimeIdentity
    from shim.framework.main import run

    IDENTITY = RuntimeIdentity("io.containerd.pyshim.v2", app="shim.runc.app:RuncApp")
    def main() -> int:
        return run(IDENTITY)

containerd runs the binary as `[flags] start`, `[flags] delete`, `-info` (2.x) and, through
our own `start`, the daemon runs in-process after a fork. Kept import-light on purpose:
containerd runs this for every container start, so each action imports what it needs.
"""

from __future__ import annotations

import sys

from shim.framework.app import RuntimeIdentity, install
from shim.framework.flags import UsageError, parse_flags


def print_version(identity: RuntimeIdentity) -> None:
    from shim import __version__

    print(f"{identity.binary_name}:")
    print(f"  Version:  {__version__}")
    print(f"  Runtime:  {identity.runtime_type}")
    print(f"  Python:   {sys.version.split()[0]}")


def run(identity: RuntimeIdentity, argv: list[str] | None = None, *, warm=None) -> int:
    """Parse the command line and do what containerd asked; the process's exit code.

    `start` is handed to the installation's warm zygote when one is listening
    (shim.framework.zygote_client.run_warm): its fork runs this same function with `warm` set, with
    everything imported. Here that is all the command costs: this interpreter's start-up.
    """
    install(identity)
    words = sys.argv[1:] if argv is None else argv
    action = words[-1] if words else ""
    code = None
    if warm is None and action == "start":  # zygote_client.WARM_ACTIONS
        from shim.framework.zygote_client import run_warm

        code = run_warm([sys.argv[0], *words])
    elif action == "delete":
        from shim.framework.delete_record import answer

        if answer(words):  # the daemon has done all of it (the binary's script checks first)
            code = 0
    if code is None:
        code = _run(identity, words, warm)
    if argv is None and action in ("start", "delete"):
        # The binary itself, run by containerd, which waits for its exit: skip the teardown.
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(identity: RuntimeIdentity, words: list[str], warm) -> int:
    try:
        flags = parse_flags(words)
    except UsageError as exc:
        print(f"{identity.binary_name}: {exc}", file=sys.stderr)
        return 2
    if flags.version:
        print_version(identity)
        return 0
    if flags.info:
        from shim.framework.info import main as print_info

        return print_info()
    if flags.action == "start":
        from shim.framework.start import start

        return start(flags, warm=warm)
    if flags.action == "delete":
        from shim.framework.delete import delete

        return delete(flags)
    if flags.action == "":
        # Serve mode as the Go shim's daemon is started: on an inherited listening fd 3.
        from shim.framework.daemon import serve_inherited

        return serve_inherited(flags)
    print(f"{identity.binary_name}: unknown action {flags.action!r}", file=sys.stderr)
    return 2
