"""`containerd-shim-pyshim-v2`: the runc application (shim.runc) on the framework."""

from __future__ import annotations

import sys

from shim.framework.app import RuntimeIdentity

#: containerd's name for this runtime (runtime_type in its config, `ctr --runtime`).
RUNTIME_TYPE = "io.containerd.pyshim.v2"
IDENTITY = RuntimeIdentity(RUNTIME_TYPE, app="shim.runc.app:RuncApp")


def main(argv: list[str] | None = None) -> int:
    from shim.framework.main import run

    return run(IDENTITY, argv)


if __name__ == "__main__":
    sys.exit(main())
