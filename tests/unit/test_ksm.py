"""The zygote offers its memory to KSM: which mappings, and that an exec'd process is not marked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shim.framework.ksm import mergeable_ranges

MAPS = """\
55d4c0a00000-55d4c0a6b000 r--p 00000000 fe:01 1234  /usr/bin/python3.11
55d4c0f00000-55d4c0f4a000 rw-p 00500000 fe:01 1234  /usr/bin/python3.11
55d4c0f4a000-55d4c0f9b000 rw-p 00000000 00:00 0
55d4c2000000-55d4c2400000 rw-p 00000000 00:00 0     [heap]
7f0000000000-7f0000100000 rw-s 00000000 00:01 99    /dev/shm/shared
7f0000200000-7f0000300000 rw-p 00000000 00:00 0
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0     [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0     [vvar]
7ffd00104000-7ffd00106000 r-xp 00000000 00:00 0     [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0  [vsyscall]
garbage
"""


def test_private_writable_mappings_are_offered_shared_and_kernel_ones_not():
    assert mergeable_ranges(MAPS) == [
        (0x55D4C0F00000, 0x4A000),  # the interpreter's data
        (0x55D4C0F4A000, 0x51000),  # its bss
        (0x55D4C2000000, 0x400000),  # [heap]
        (0x7F0000200000, 0x100000),  # arenas
        (0x7FFD00000000, 0x21000),  # [stack]
    ]


PROBE = """
import os, sys
from shim.framework.ksm import offer_to_ksm
marked = offer_to_ksm()
def heap_flags(smaps):
    lines = smaps.splitlines()
    at = next(i for i, l in enumerate(lines) if l.endswith("[heap]"))
    return next(l for l in lines[at:] if l.startswith("VmFlags:")).split()[1:]
with open("/proc/self/smaps") as f:
    print(marked, "mg" in heap_flags(f.read()), flush=True)
os.execv(sys.executable, [sys.executable, "-c", "print(any(l.startswith('VmFlags:') and ' mg' in l "
                                                 "for l in open('/proc/self/smaps')))"])
"""


@pytest.mark.skipif(not os.path.isdir("/sys/kernel/mm/ksm"), reason="this kernel has no KSM")
def test_a_marked_process_is_mergeable_and_what_it_execs_is_not():
    env = {k: v for k, v in os.environ.items() if k != "PYSHIM_KSM"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    (marked, heap_marked), (exec_marked,) = (line.split() for line in out.splitlines())
    assert int(marked) > 1 << 20 and heap_marked == "True"
    assert exec_marked == "False"  # runc and the containers start with nothing marked


def test_turned_off_by_the_environment():
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, "PYSHIM_KSM": "0"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[:3] == ["0", "False", "False"]
