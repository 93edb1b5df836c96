"""Entry point of the `containerd-shim-pyshim-v2` binary.

containerd runs it as `[flags] start`, `[flags] delete`, `-info` (2.x) and, through our own
`start`, the daemon runs in-process after a fork. Go `flag` syntax: single-dash flags
(`-id x`, `-id=x`, `--id x`) before the action word.

Kept import-light on purpose: containerd runs this binary for every container start, so
anything imported here is paid on the critical path; each action imports what it needs.
"""

from __future__ import annotations

import sys

RUNTIME_TYPE = "io.containerd.pyshim.v2"

_STRING_FLAGS = ("namespace", "id", "address", "publish-binary", "bundle", "socket", "debug-socket")
_BOOL_FLAGS = ("debug", "v", "version", "info")


class UsageError(Exception):
    pass


class Flags:
    """The command line. A plain class: importing dataclasses costs this path ~4 ms."""

    __slots__ = ("namespace", "id", "address", "publish_binary", "bundle", "socket", "debug_socket",
                 "debug", "version", "info", "action")

    def __init__(self, **values: object) -> None:
        for name in self.__slots__:
            default = False if name in ("debug", "version", "info") else ""
            setattr(self, name, values.pop(name, default))
        if values:
            raise TypeError(f"unknown flags: {', '.join(values)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flags) and all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        return "Flags(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__) + ")"


def parse_flags(argv: list[str]) -> Flags:
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            if arg == "--":
                i += 1
            rest = argv[i:]
            if len(rest) > 1:
                raise UsageError(f"unexpected arguments after {rest[0]!r}: {' '.join(rest[1:])}")
            flags.action = rest[0] if rest else ""
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if name in _BOOL_FLAGS:
            truthy = value.lower() in ("", "1", "t", "true")
            if name in ("v", "version"):
                flags.version = truthy
            else:
                setattr(flags, name, truthy)
        elif name in _STRING_FLAGS:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                value = argv[i]
            setattr(flags, name.replace("-", "_"), value)
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    return flags


def print_version() -> None:
    from shim import __version__

    print("containerd-shim-pyshim-v2:")
    print(f"  Version:  {__version__}")
    print(f"  Runtime:  {RUNTIME_TYPE}")
    print(f"  Python:   {sys.version.split()[0]}")


def main(argv: list[str] | None = None) -> int:
    try:
        flags = parse_flags(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"containerd-shim-pyshim-v2: {exc}", file=sys.stderr)
        return 2
    if flags.version:
        print_version()
        return 0
    if flags.info:
        from shim.framework.info import main as print_info

        return print_info()
    if flags.action == "start":
        from shim.framework.start import start

        return start(flags)
    if flags.action == "delete":
        from shim.framework.delete import delete

        return delete(flags)
    if flags.action == "":
        # Serve mode as the Go shim's daemon is started: on an inherited listening fd 3.
        from shim.framework.daemon import serve_inherited

        return serve_inherited(flags)
    print(f"containerd-shim-pyshim-v2: unknown action {flags.action!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
