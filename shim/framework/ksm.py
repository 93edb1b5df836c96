"""Offer the zygote's memory to the kernel's same-page merging (KSM), for its daemons' sake.

What a daemon forked from the zygote copies is mostly pages it wrote only to bump and then
drop reference counts (README "Figures": code objects, interned strings, functions, types):
once the start-up burst is over, many of those copies hold the same bytes again as the
zygote's page and as the other daemons' copies. CPython 3.11 cannot avoid the writes; KSM can
give the copies back. When the node runs ksmd (``/sys/kernel/mm/ksm/run`` = 1, a host's
choice, off by default), it merges identical pages of memory marked MADV_MERGEABLE.

The zygote marks its own private writable mappings (the Python heap and arenas, the
interpreter's and libraries' data) once it has imported everything; its forks (the spare,
every daemon) inherit the marks with the mappings. Nothing else is marked: the mark is per
mapping, not per process (PR_SET_MEMORY_MERGE would be, and since Linux 6.7 it survives
execve, so runc and the containers would be merged too), and an exec'd process starts with
fresh mappings. Without ksmd the marks cost nothing but a small record in the kernel.

A daemon that started without a zygote (the first start, or ``PYSHIM_ZYGOTE=0``) marks its
own memory a moment after it began serving, so its copies can be merged with its peers'.

``PYSHIM_KSM=0`` in the shim's environment (containerd's) turns this off.
"""

from __future__ import annotations

import os

#: madvise(2) advice: "these pages may be merged with identical ones" (linux/mman.h).
MADV_MERGEABLE = 12
#: Seconds after a daemon without a zygote began serving until it marks its memory: off the
#: path of its first Create.
LATE_OFFER_DELAY = 2.0

#: This process's mappings were marked (by itself, or by the zygote it was forked from).
offered = False


def mergeable_ranges(maps_text: str) -> list[tuple[int, int]]:
    """(start, length) of the private writable mappings in a /proc/<pid>/maps text: anonymous
    memory, [heap], [stack] and the data of mapped files; the kernel's own ([vvar], ...) and
    shared mappings are never offered."""
    ranges = []
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        perms = fields[1]
        if len(perms) < 4 or perms[1] != "w" or perms[3] != "p":
            continue
        name = fields[5].strip() if len(fields) > 5 else ""
        if name.startswith("[") and name not in ("[heap]", "[stack]"):
            continue
        start_text, _, end_text = fields[0].partition("-")
        try:
            start, end = int(start_text, 16), int(end_text, 16)
        except ValueError:
            continue
        if end > start:
            ranges.append((start, end - start))
    return ranges


def offer_to_ksm() -> int:
    """Mark this process's private writable mappings MADV_MERGEABLE; the bytes marked (0 when
    turned off, or the kernel has no KSM)."""
    global offered
    if os.environ.get("PYSHIM_KSM", "1") == "0":
        return 0
    offered = True
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            ranges = mergeable_ranges(f.read())
    except OSError:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    marked = 0
    for start, length in ranges:
        # EINVAL: no KSM in this kernel, or a mapping it will not merge; ENOMEM: it is gone.
        if libc.madvise(start, length, MADV_MERGEABLE) == 0:
            marked += length
    return marked
