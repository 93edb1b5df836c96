"""The shim command line as containerd gives it: Go `flag` syntax, single-dash flags
(`-id x`, `-id=x`, `--id x`) before the action word (start, delete, or none for serve mode).

Stdlib only and no dataclasses: every container start parses it.
"""

from __future__ import annotations

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
