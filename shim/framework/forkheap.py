"""Keep the zygote's free memory out of its daemons' way, so that they copy fewer pages.

A forked daemon shares every page with the zygote until one of them writes it. The daemon's
own allocations are writes too, and both allocators hand out the *free* space first:
pymalloc fills the holes left in partly used pools, glibc's malloc reuses freed chunks (and
relinks its bins through neighbouring free chunks). The zygote's import leaves hundreds of
such holes scattered over its heap, so a daemon's first few thousand objects land one or two
to a page and each copies a whole 4 KiB page that is otherwise the zygote's.

`fill_holes()` runs in the zygote just before it starts forking and takes all of that free
space itself, with objects nobody ever touches again: the daemon's allocations then go to
fresh pools and to the top of the heap, packed together. The filled space was already
resident (or is shared once touched), so the zygote grows by at most what the holes held,
once, shared by all its daemons.

CPython and glibc specifics, both read at run time; where either is missing or says
something unexpected, nothing is filled (it is an optimisation, never a requirement).
"""

from __future__ import annotations

import os
import sys

#: Largest glibc request tried first when filling freed chunks; halved down to the smallest.
_MALLOC_START = 1 << 16
_MALLOC_SMALLEST = 24
#: Bounds on the work (the zygote's start-up, not on any container's path).
_MAX_MALLOCS = 50_000
#: pymalloc's object header for bytes: a bytes of n bytes takes a block of n + 33.
_BYTES_OVERHEAD = sys.getsizeof(b"")


class Filled:
    """What `fill_holes` took: kept alive for the zygote's life (and never touched)."""

    def __init__(self) -> None:
        self.objects: list[object] = []
        self.object_bytes = 0
        self.chunks: list[int] = []
        self.chunk_bytes = 0

    def __str__(self) -> str:
        return (f"{len(self.objects)} pymalloc holes ({self.object_bytes // 1024} KiB), "
                f"{len(self.chunks)} malloc holes ({self.chunk_bytes // 1024} KiB)")


def fill_holes() -> Filled:
    filled = Filled()
    try:
        _fill_pymalloc(filled)
    except Exception:  # noqa: BLE001 (an optimisation: a daemon works the same without it)
        pass
    try:
        _fill_malloc(filled)
    except Exception:  # noqa: BLE001
        pass
    return filled


def pymalloc_free_blocks(stats: str) -> dict[int, int]:
    """Block size -> free blocks in used pools, from `sys._debugmallocstats()`'s table."""
    free: dict[int, int] = {}
    for line in stats.splitlines():
        parts = line.split()
        if len(parts) == 5 and all(p.isdigit() for p in parts):
            free[int(parts[1])] = int(parts[4])
    return free


def _debugmallocstats() -> str:
    # It writes to the C stderr (fd 2): borrow that fd for a moment.
    import tempfile

    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        return out.read()


def _fill_pymalloc(filled: Filled) -> None:
    if not hasattr(sys, "_debugmallocstats"):
        return
    for size, count in pymalloc_free_blocks(_debugmallocstats()).items():
        if size >= _BYTES_OVERHEAD + 1:
            # bytes(n) is one block of n + header bytes, rounded up to the size class
            n = size - _BYTES_OVERHEAD
            filled.objects.extend(bytes(n) for _ in range(count))
        elif size > 16:
            # the 32-byte class: a float is 24 bytes
            filled.objects.extend(float(i) + 0.5 for i in range(count))
        else:
            continue
        filled.object_bytes += size * count


def _fill_malloc(filled: Filled) -> None:
    import ctypes

    libc = ctypes.CDLL(None)
    try:
        info = libc.mallinfo2
    except AttributeError:  # glibc < 2.33 (or not glibc)
        return

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
            "fordblks", "keepcost")]

    info.restype = MallInfo2
    malloc = libc.malloc
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    free = libc.free
    free.argtypes = [ctypes.c_void_p]
    # A request served by a freed chunk (or the thread cache) leaves the top chunk's size
    # ("keepcost") as it was; one the top had to serve shrinks it: that size is used up,
    # keep the probe (freeing it would put it back in a cache and fool the next test) and
    # try the next smaller size.
    probes = []
    size = _MALLOC_START
    tries = 0
    while size >= _MALLOC_SMALLEST and tries < _MAX_MALLOCS:
        top = info().keepcost
        pointer = malloc(size)
        tries += 1
        if not pointer:
            break
        if info().keepcost == top:
            filled.chunks.append(pointer)
            filled.chunk_bytes += size
        else:
            probes.append(pointer)
            size //= 2
    for pointer in reversed(probes):  # at the top: freed, they merge back into it
        free(pointer)
