"""Entry point of the `containerd-shim-pyshim-v2` binary.

Kept import-light on purpose: containerd runs this binary for every container start, so
anything imported here is paid on the critical path.
"""

from __future__ import annotations

import sys

RUNTIME_TYPE = "io.containerd.pyshim.v2"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-v"], ["--version"], ["-version"]):
        from shim import __version__

        print(f"{sys.argv[0].rsplit('/', 1)[-1] or 'containerd-shim-pyshim-v2'}:")
        print(f"  Version:  {__version__}")
        print(f"  Runtime:  {RUNTIME_TYPE}")
        print(f"  Python:   {sys.version.split()[0]}")
        return 0
    print("containerd-shim-pyshim-v2: only -v is implemented so far", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
