"""The zygote's hole filling (shim/framework/forkheap.py): the table it reads and what it leaves."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from shim.framework.forkheap import pymalloc_free_blocks

TABLE = """\
Small block threshold = 512, in 32 size classes.

class   size   num pools   blocks in use  avail blocks
-----   ----   ---------   -------------  ------------
    0     16           1             236           785
    1     32           6            2740           320
    2     48          45           12241          3059
   31    512           5             130            25

# arenas allocated total           =                   10
# bytes in allocated blocks        =            9,173,392
"""


def test_reads_free_blocks_per_size_class_and_nothing_else():
    assert pymalloc_free_blocks(TABLE) == {16: 785, 32: 320, 48: 3059, 512: 25}


def test_unknown_text_gives_nothing_to_fill():
    assert pymalloc_free_blocks("") == {}
    assert pymalloc_free_blocks("class size\n1 2 3\nnot a table at all") == {}


def test_filling_takes_the_holes_and_daemons_allocate_elsewhere():
    # In a fresh interpreter that has imported a fair amount: after fill_holes, the used
    # pools have no free blocks left beyond a fresh pool's tail, and glibc's freed chunks
    # are (almost) all taken.
    script = textwrap.dedent("""
        import asyncio, json, logging, gc
        from shim.framework import forkheap
        import shim.framework.daemon, shim.framework.service
        gc.collect()
        before = forkheap.pymalloc_free_blocks(forkheap._debugmallocstats())
        filled = forkheap.fill_holes()
        after = forkheap.pymalloc_free_blocks(forkheap._debugmallocstats())
        print(sum(before.values()), sum(after.values()), len(filled.objects), len(filled.chunks))
        print(filled)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after, objects, chunks = map(int, out.splitlines()[0].split())
    assert objects > 0 and chunks > 0
    # it took (nearly) every hole; what is left is mostly the tails of the pools the filling
    # itself opened, one per size class (which can be more than a small heap had in holes)
    assert objects >= 0.7 * before
    assert "pymalloc holes" in out.splitlines()[1]
