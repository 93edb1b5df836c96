"""Which protocol the daemon serves, and how `start` tells containerd (its "bootstrap" reply).

ttrpc is the default and works with every containerd. gRPC is chosen with
``PYSHIM_PROTOCOL=grpc`` in the environment containerd gives the shim (containerd's own
environment, or on 2.x ``env = ["PYSHIM_PROTOCOL=grpc"]`` under
``[plugins."io.containerd.shim.v1.manager"]``). The reply then has to be JSON whose `version`
depends on the containerd release (protocol reference §2.1, §2.3):

=================  =================================================================
containerd 1.6     no gRPC shims, no JSON: serve ttrpc, print the plain address
containerd 1.7     ``{"version":2,"address":"<path>","protocol":"grpc"}`` (3 is refused)
containerd 2.0+    ``{"version":3,...}`` (2 means the ttrpc v2 Task API to it)
containerd 2.3+    a BootstrapResult message (it sent BootstrapParams on stdin), version 3
=================  =================================================================

containerd 2.x parses the gRPC reply but drops the shim right after connecting (see
CONTAINERD2_DROPS_GRPC_SHIMS), so there ttrpc is served unless PYSHIM_GRPC_ON_CONTAINERD2=1
(for trying a containerd that fixed it). Every fallback is logged by the daemon, and so is
the caveat of 1.7 (CONTAINERD17_DROPS_IDLE_GRPC_SHIMS).

Telling 1.7 from 2.x at `start` time: their environments are the same (MAX_SHIM_VERSION is
still the literal 2 in 2.x), and so are the command line and stdin. What differs for sure is
containerd's Go module path, which semantic import versioning puts in every 2.x binary:
``github.com/containerd/containerd/v2``. The Go toolchain records it in the executable's
build info (the ``.go.buildinfo`` ELF section: a 32-byte header and two length-prefixed
strings), which we read from `-publish-binary` (containerd's own executable) in well under a
millisecond, without running it. Distribution builds keep it (Debian's 1.7 and 2.1 do), as do
binaries that embed containerd as a dependency (k3s). When it cannot be read we serve ttrpc,
which every containerd understands, and the daemon logs why.

The gRPC address is a plain path (containerd dials it as given) and its socket differs from
the ttrpc one of the same group, so that a shim still serving ttrpc for a group is never
mistaken for a gRPC one after the setting changed.
"""

from __future__ import annotations

import os

#: The setting (``ttrpc`` or ``grpc``); `start` sets it to what the daemon must serve.
PROTOCOL_ENV = "PYSHIM_PROTOCOL"
#: What the daemon must log about the choice: why ttrpc is served although gRPC was asked
#: for, or the caveat of the gRPC it serves.
NOTE_ENV = "PYSHIM_PROTOCOL_NOTE"
#: "1": serve gRPC to containerd 2.x as well, despite CONTAINERD2_DROPS_GRPC_SHIMS.
GRPC_ON_CONTAINERD2_ENV = "PYSHIM_GRPC_ON_CONTAINERD2"
#: The newest Task API version containerd knows (2.x's CurrentShimVersion).
NEWEST_SHIM_VERSION = 3
#: Seen with 2.1.9, and the same code is in 2.0.0 .. 2.4.0-beta.0 (core/runtime/v2/shim.go,
#: grpcDialContext): the client is made with grpc.NewClient, which starts IDLE, and the
#: goroutine that watches it for a closed connection takes IDLE for closed -- at once, before
#: the first call. containerd then runs its dead-shim cleanup (`delete`, bundle removed) while
#: Create is on its way, and every container fails. 1.7 dials with grpc.DialContext (connecting
#: at once) and works.
#: Seen with 1.7.24 (Debian's, grpc-go 1.64) after 30 minutes without a call to a detached
#: container's shim: grpc-go >= 1.59 puts a channel without calls IDLE after 30 minutes
#: (grpc-go#6585), containerd's watcher takes that for a dead shim, runs `delete` (the
#: container is killed) and forgets the task. Nothing a server can do keeps a client's channel
#: busy; a client that holds a Wait open (CRI does for every container; `ctr run` attached)
#: or calls at least every 30 minutes keeps it.
CONTAINERD17_DROPS_IDLE_GRPC_SHIMS = (
    "containerd 1.7 takes a gRPC shim for dead after 30 minutes without a call (grpc-go channel "
    "idleness) and deletes its container; safe only while a client keeps a Wait open (CRI does)")
CONTAINERD2_DROPS_GRPC_SHIMS = ("containerd 2.x drops a gRPC shim as soon as it connects (its connection "
                                "watcher takes the new client's IDLE state for closed)")

_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_CONTAINERD_MODULE = "github.com/containerd/containerd"


class Protocol:
    """What the daemon serves and what `start` prints for it."""

    __slots__ = ("name", "version", "note")

    def __init__(self, name: str, version: int = 2, note: str = "") -> None:
        self.name = name  # "ttrpc" or "grpc"
        self.version = version  # Task API version announced in a JSON/BootstrapResult reply
        self.note = note

    @property
    def grpc(self) -> bool:
        return self.name == "grpc"

    def __repr__(self) -> str:
        return f"Protocol({self.name!r}, {self.version!r}, {self.note!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Protocol) and (self.name, self.version, self.note) == (
            other.name, other.version, other.note)

    def reply(self, address: str) -> str:
        """The text `start` prints for the socket `address`."""
        if not self.grpc and self.version < NEWEST_SHIM_VERSION:
            return address  # plain unix:// address: every containerd reads it as ttrpc v2
        from shim.framework.lightjson import dumps  # `start` runs this: not json (~5 ms)

        return dumps({"version": self.version, "address": address, "protocol": self.name})

    def address_file(self, address: str) -> str:
        """What <bundle>/address holds: containerd 1.6/1.7 read it on restart as they read
        start's reply (1.7's gRPC JSON included); 2.x reads its own bootstrap.json and, without
        one, takes `address` for a plain ttrpc address."""
        return self.reply(address) if self.grpc else address

    def export(self, environ: os._Environ | dict) -> None:
        """Tell the daemon (forked by us or by the zygote, both take our environment)."""
        environ[PROTOCOL_ENV] = self.name
        if self.note:
            environ[NOTE_ENV] = self.note
        else:
            environ.pop(NOTE_ENV, None)


def requested(environ) -> str:
    value = environ.get(PROTOCOL_ENV, "").strip().lower()
    return value or "ttrpc"


def choose(environ, containerd_binary: str, bootstrap_params: bool) -> Protocol:
    """The protocol for this start: gRPC when asked for and containerd can take it, else ttrpc."""
    wanted = requested(environ)
    if wanted == "ttrpc":
        return Protocol("ttrpc", _ttrpc_version(environ, containerd_binary))
    if wanted != "grpc":
        return Protocol("ttrpc", note=f"{PROTOCOL_ENV}={wanted!r} is neither ttrpc nor grpc: serving ttrpc")
    max_version = environ.get("MAX_SHIM_VERSION", "")
    if bootstrap_params or (max_version.isdigit() and int(max_version) >= NEWEST_SHIM_VERSION):
        major = 2  # only containerd >= 2.3 sends BootstrapParams; a 2.x may say so itself one day
    elif not max_version:
        return Protocol("ttrpc", note="containerd 1.6 (no MAX_SHIM_VERSION) has no gRPC shims: serving ttrpc")
    else:
        major = containerd_major_version(containerd_binary)
        if major is None:
            return Protocol("ttrpc", note=f"cannot tell containerd 1.7 from 2.x by {containerd_binary!r}: "
                                              "serving ttrpc")
    if major == 1:
        return Protocol("grpc", 2, note=CONTAINERD17_DROPS_IDLE_GRPC_SHIMS)
    if environ.get(GRPC_ON_CONTAINERD2_ENV, "").strip() != "1":
        return Protocol("ttrpc", NEWEST_SHIM_VERSION,
                        note=CONTAINERD2_DROPS_GRPC_SHIMS + f" (set {GRPC_ON_CONTAINERD2_ENV}=1 to "
                             "serve gRPC anyway): serving ttrpc")
    return Protocol("grpc", NEWEST_SHIM_VERSION)


def _ttrpc_version(environ, containerd_binary: str) -> int:
    """The Task API version a ttrpc shim announces: 3 to containerd 2.x, as its own runc shim
    does (then 2.x attaches a pod's containers to the sandbox's shim without running `start`
    for each, protocol reference §2.10), else the plain address of version 2. 1.6 sets no
    MAX_SHIM_VERSION; 1.7 and 2.x both say 2 there, so 2.x is told by its build info."""
    if not environ.get("MAX_SHIM_VERSION", ""):
        return 2
    major = containerd_major_version(containerd_binary)
    return NEWEST_SHIM_VERSION if major is not None and major >= 2 else 2


def containerd_binary(publish_binary: str, parent: int = 0) -> str:
    """containerd's executable: its -publish-binary, else that of the process that ran start
    (`parent`, our parent by default)."""
    if publish_binary and os.path.isabs(publish_binary):
        return publish_binary
    return f"/proc/{parent or os.getppid()}/exe"


# -- Go build info ------------------------------------------------------------------------------


def containerd_major_version(path: str) -> int | None:
    """1 or 2 (or more) for the containerd in this Go executable, None when it cannot tell."""
    try:
        modinfo = go_modinfo(path)
    except (OSError, ValueError):
        return None
    return major_from_modinfo(modinfo) if modinfo else None


def major_from_modinfo(modinfo: str) -> int | None:
    """containerd's major version from Go module info lines (``path``, ``mod``, ``dep``, ``=>``).

    The main module (``mod``) wins, then the main package (``path``: Debian's GOPATH builds have
    no ``mod`` line), then a dependency (a binary embedding containerd). Sibling modules such as
    ``github.com/containerd/containerd/api`` are not containerd.
    """
    found: dict[str, int] = {}
    for line in modinfo.splitlines():
        kind, _, rest = line.partition("\t")
        name = rest.split("\t", 1)[0]
        if kind in ("mod", "dep"):
            major = _module_major(name)
        elif kind == "path":
            major = _package_major(name)
        else:
            continue
        if major is not None:
            found.setdefault(kind, major)
    for kind in ("mod", "path", "dep"):
        if kind in found:
            return found[kind]
    return None


def _module_major(module: str) -> int | None:
    if module == _CONTAINERD_MODULE:
        return 1
    suffix = module.removeprefix(_CONTAINERD_MODULE + "/v")
    if suffix != module and suffix.isdigit() and int(suffix) >= 2:
        return int(suffix)
    return None


def _package_major(package: str) -> int | None:
    if package != _CONTAINERD_MODULE and not package.startswith(_CONTAINERD_MODULE + "/"):
        return None
    first = package[len(_CONTAINERD_MODULE) + 1:].split("/", 1)[0]
    if first.startswith("v") and first[1:].isdigit() and int(first[1:]) >= 2:
        return int(first[1:])
    return 1


def go_modinfo(path: str) -> str:
    """The module info string of a Go (>= 1.18) ELF executable's .go.buildinfo section."""
    with open(path, "rb") as f:
        section = _elf_section(f, b".go.buildinfo", limit=1 << 16)
    if section is None or not section.startswith(_BUILDINFO_MAGIC) or len(section) < 32:
        raise ValueError("no Go build info")
    if not section[15] & 2:
        raise ValueError("Go build info of a Go older than 1.18")
    pos = 32
    _version, pos = _length_prefixed(section, pos)
    modinfo, _ = _length_prefixed(section, pos)
    # The module info is framed by 16-byte sentinels.
    if len(modinfo) >= 33 and modinfo[-17] == 0x0A:
        modinfo = modinfo[16:-16]
    return modinfo.decode("utf-8", errors="replace")


def _length_prefixed(data: bytes, pos: int) -> tuple[bytes, int]:
    length = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated Go build info")
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
    if pos + length > len(data):
        raise ValueError("truncated Go build info")
    return data[pos:pos + length], pos + length


def _elf_section(f, name: bytes, limit: int) -> bytes | None:
    """The first `limit` bytes of ELF section `name`, None when absent."""
    header = f.read(64)
    if len(header) < 52 or header[:4] != b"\x7fELF":
        raise ValueError("not an ELF file")
    is64 = header[4] == 2
    order = "little" if header[5] == 1 else "big"

    def num(data: bytes, at: int, size: int) -> int:
        return int.from_bytes(data[at:at + size], order)

    if is64:
        shoff, shentsize, shnum, shstrndx = num(header, 0x28, 8), num(header, 0x3A, 2), num(header, 0x3C, 2), num(
            header, 0x3E, 2)
    else:
        shoff, shentsize, shnum, shstrndx = num(header, 0x20, 4), num(header, 0x2E, 2), num(header, 0x30, 2), num(
            header, 0x32, 2)
    if not shoff or not shnum or shstrndx >= shnum or shentsize < (64 if is64 else 40) or shnum > 4096:
        return None
    f.seek(shoff)
    table = f.read(shentsize * shnum)
    if len(table) < shentsize * shnum:
        raise ValueError("truncated ELF section headers")

    def section(index: int) -> tuple[int, int, int]:  # name offset, file offset, size
        at = index * shentsize
        if is64:
            return num(table, at, 4), num(table, at + 0x18, 8), num(table, at + 0x20, 8)
        return num(table, at, 4), num(table, at + 0x10, 4), num(table, at + 0x14, 4)

    _, names_offset, names_size = section(shstrndx)
    f.seek(names_offset)
    names = f.read(min(names_size, 1 << 16))
    for index in range(shnum):
        name_at, offset, size = section(index)
        if names[name_at:name_at + len(name) + 1] == name + b"\0":
            f.seek(offset)
            return f.read(min(size, limit))
    return None
