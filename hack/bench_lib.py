#!/usr/bin/env python3
"""pyshim side by side with containerd-shim-runc-v2: lifecycle latency, idle memory, start cost.

Run it through hack/bench (which installs what is needed, as hack/test does), as root:

    hack/bench                          containerd 2.1, 30 pairs, 5 idle containers a runtime
    hack/bench --containerd 1.6 --pairs 50 --idle 10
    hack/bench --json-only              only the final JSON line on stdout
    hack/bench --scale 50 --dense 100 --dense-containers 200
    hack/bench --pods 10 --churn 600    pod lifecycles through the CRI; 600 containers, 16 at once

One private containerd (tests/e2e/containerd.py) with the locally built busybox image in a
fresh namespace, then:

1. lifecycle: `ctr run --rm IMAGE <id> true`, alternately through io.containerd.pyshim.v2 and
   io.containerd.runc.v2 (warm-up pairs first; the order inside a pair alternates), wall time
   of each ctr; medians, p10/p90 and the median of the per-pair ratios pyshim/runc. The same
   runs are cut into phases with the timestamps in containerd's debug log.
2. idle memory: K detached `sleep 3600` containers per runtime; each shim daemon (the parent
   of the container's init, checked by its cmdline) is measured from /proc/<pid>/smaps_rollup:
   Pss and private (Private_Clean + Private_Dirty).
2b. exec (--no-exec to skip): one detached `sleep 3600` container per runtime, then pairs of
   `ctr task exec --exec-id e<i> <cid> true` alternating between them (median per-pair ratio),
   and 3 rounds of 50 execs started at once (wall until all finished, median ratio).
2c. stdio (--no-stdio to skip): `ctr run --rm IMAGE <id> sh -c 'head -c 20MiB /dev/zero'` with
   ctr's stdout on /dev/null, each next to the same run writing 0 bytes; MiB/s over the
   difference (the copy path without the lifecycle cost) and over the whole wall.
2d. memory at scale (--scale K, 0 to skip): K detached `sleep 3600` containers per runtime
   in a namespace of their own, started 8 at a time; once all are RUNNING and settled, the
   smaps_rollup of every shim process of each runtime is summed and divided by K: every
   containerd-shim-runc-v2 of that namespace; every pyshim daemon plus the zygote they were
   forked from (counted once: its pages are what the daemons share). With --ksm, the node's
   KSM is on (ksmd at the kernel's scan rate) while 2d and 2e run, and they are measured once
   ksmd has merged what it will (shim/framework/ksm.py: pyshim offers its daemons' memory;
   the Go shim offers none); the setting is put back afterwards.
2e. dense mode (--dense N, 0 to skip): --dense-containers M pyshim containers with the
   runtime options `ContainersPerDaemon = N` (so ceil(M/N) daemons), next to M through
   runc-v2 (2d's figures when M = K); the same sums per container, against the target of
   issue 13 (<= 1.0 MB Pss per container).
2f. pods through the CRI (--pods N, 0 to skip): a second private containerd with the CRI
   plugin, a `pyshim` and a `runc` runtime handler, the static pause image of the e2e tests;
   N pairs of pod lifecycles, one per handler, the order alternating (after the warm-up
   pairs): RunPodSandbox, --pod-containers K busybox `sleep 1000` containers created,
   started and RUNNING, each stopped and removed, StopPodSandbox, RemovePodSandbox. Wall of
   the whole lifecycle and of its parts; median of the per-pair ratios pyshim/runc-v2.
2g. churn (--churn N, 0 to skip): N `ctr run --rm IMAGE <id> true` per runtime,
   --churn-concurrency C at a time, one runtime after the other (order alternating over
   --churn-rounds), while one long-lived container of that runtime gets `ctr task exec ...
   true` in a loop: wall per runtime, their ratio, execs that got through meanwhile. Issue's
   target: 600 at concurrency 16 no slower than runc-v2.
3. start cost: `containerd-shim-pyshim-v2 -v`, the bare interpreter, and `python -X
   importtime` of what the start command, the daemon and the delete command import.
4. profile (--profile N runs, 0 to skip): pyshim through a traced entry point
   (hack/bench_trace.py, runtime io.containerd.pyshimtrace.v2) that timestamps the start
   command, the daemon's start-up, every Task API call, every runc call and the delete
   command; shown as one timeline next to containerd's own log.

A benchmark, not a test: it measures and reports, it asserts nothing about timings. It cleans
up what it started (containers, tasks, shims, containerd, its temp dirs) on success, error,
Ctrl-C or SIGTERM, and touches no process it did not start.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import calendar
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
HACK = REPO / "hack"
sys.path.insert(0, str(REPO / "tests" / "e2e"))
# the CRI messages of the pods step (shim.api.runtime) from this checkout, not from wherever
# the venv's editable install points
sys.path.insert(1, str(REPO))

import containerd as e2e  # noqa: E402  (tests/e2e/containerd.py, after the sys.path tweak)

PYSHIM = e2e.PYSHIM_RUNTIME
RUNC = e2e.RUNC_RUNTIME
TRACED = "io.containerd.pyshimtrace.v2"
SHIM_BINARY = {PYSHIM: "containerd-shim-pyshim-v2", RUNC: "containerd-shim-runc-v2"}
SHORT = {PYSHIM: "pyshim", RUNC: "runc-v2"}

DAEMON_IMPORTS = ("shim.framework.daemon, shim.framework.service, shim.runc.runtime, shim.framework.stdio, shim.framework.events, shim.framework.reaper, "
                  "shim.framework.ttrpc.server, shim.api.services")
START_IMPORTS = "shim.cli, shim.framework.start"
DELETE_IMPORTS = ("shim.framework.delete, shim.runc.options, shim.framework.mount, subprocess, datetime, "
                  "shim.api.containerd.task.v2")

TARGET_RATIO = 1.5
TARGET_PRIVATE_MIB = 20.0
TARGET_EXEC_RATIO = 1.5
TARGET_STDIO_RATIO = 0.8
#: Issue 13: a dense pyshim costs at most 1.0 MB (10^6 bytes) of Pss per container.
TARGET_DENSE_PSS_MB = 1.0
#: The issue's churn target: 600 containers at concurrency 16 no slower than runc-v2.
TARGET_CHURN_RATIO = 1.0

#: `ctr run -d` and cleanup calls at once in the memory-at-scale steps: enough to keep two cores
#: busy without making each start wait on containerd's and the shims' CPU.
SCALE_WORKERS = 8
#: Limit for one `ctr run -d` there (a loaded machine makes a start take seconds).
SCALE_START_TIMEOUT = 120.0

_quiet = False

T = TypeVar("T")
R = TypeVar("R")


class BenchError(Exception):
    pass


def progress(msg: str) -> None:
    if not _quiet:
        print(f"bench: {msg}", file=sys.stderr, flush=True)


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def median(values: Iterable[float]) -> float:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else float("nan")


def r2(x: float, nd: int = 2) -> float | None:
    return None if x != x else round(x, nd)  # NaN -> null in the JSON


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None or x != x else f"{x:.{nd}f}"


def table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> str:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    out = []
    for n, r in enumerate([headers, *rows]):
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append(indent + "  ".join(cells).rstrip())
        if n == 0:
            out.append(indent + "  ".join("-" * w for w in widths))
    return "\n".join(out)


# -- containerd's debug log ---------------------------------------------------------------------

_LOG_LINE = re.compile(r'^time="([^"]+)" level=(\w+) msg="((?:[^"\\]|\\.)*)"(.*)$')
_ATTR = re.compile(r'(?:^|\s)([\w.]+)=("(?:[^"\\]|\\.)*"|\S+)')


def _log_time(stamp: str) -> float | None:
    """containerd's own lines carry nanoseconds; lines copied from a shim's log may not."""
    if not stamp.endswith("Z") or "." not in stamp:
        return None
    whole, frac = stamp[:-1].split(".", 1)
    try:
        return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + float("0." + frac)
    except ValueError:
        return None


def containerd_marks(log_path: Path, ids: set[str]) -> dict[str, dict[str, float]]:
    """Per task id, when containerd logged each step of `ctr run --rm` (unix time):

    snap        the last "get snapshot mounts" of the container (then it runs `shim start`)
    connect     "connecting to shim" (containerd 1.7 and 2.x; 1.6 does not log it)
    disconnect  "shim disconnected" (after Shutdown)
    rmsnap      "remove snapshot" (the dead-shim cleanup, `shim delete`, is over)
    """
    marks: dict[str, dict[str, float]] = {i: {} for i in ids}
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return marks
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if not m:
            continue
        t = _log_time(m.group(1))
        if t is None:
            continue
        msg = m.group(3)
        attrs = {k: v.strip('"') for k, v in _ATTR.findall(m.group(4))}
        key, tid = attrs.get("key"), attrs.get("id")
        if msg == "get snapshot mounts" and key in marks:
            marks[key]["snap"] = t
        elif msg == "remove snapshot" and key in marks:
            marks[key].setdefault("rmsnap", t)
        elif msg.startswith("connecting to shim "):
            name = msg.removeprefix("connecting to shim ").strip()
            if name in marks:
                marks[name].setdefault("connect", t)
        elif msg == "shim disconnected" and tid in marks:
            marks[tid].setdefault("disconnect", t)
    return marks


CD_PHASES = [
    # (JSON key, label, from mark, to mark)
    ("setup", "ctr + containerd: container, snapshot", "launch", "snap"),
    ("shim_start", "`shim start` command (until containerd connects)", "snap", "connect"),
    ("ttrpc", "Create..Shutdown over ttrpc (incl. daemon start-up)", "connect", "disconnect"),
    ("start_and_ttrpc", "`shim start` + Create..Shutdown (1.6 logs no connect)", "snap", "disconnect"),
    ("shim_delete", "dead-shim cleanup (`shim delete` command)", "disconnect", "rmsnap"),
    ("teardown", "container delete, ctr exits", "rmsnap", "exit"),
]


def cd_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median ms of each CD_PHASES phase (by JSON key) over the runs that logged both marks."""
    out = {}
    for key, _label, a, b in CD_PHASES:
        vals = [(r[b] - r[a]) * 1000 for r in runs if a in r and b in r]
        if vals and len(vals) >= len(runs) // 2:
            out[key] = median(vals)
    return out


# -- /proc --------------------------------------------------------------------------------------


def smaps_rollup(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if len(fields) == 2 and fields[1] == "kB":
            out[name.strip()] = int(fields[0])
    return out


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+(?:\s+(.*))?$")


def private_by_mapping(pid: int) -> dict[str, int]:
    """Private (clean + dirty) kB per mapped file / [heap] / [anon]."""
    out: dict[str, int] = {}
    current = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = _MAPPING.match(line)
        if m:
            path = (m.group(1) or "").strip()
            current = os.path.basename(path) if path.startswith("/") else (path or "[anon]")
            continue
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            out[current] = out.get(current, 0) + int(line.split()[1])
    return out


_PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT, _EXCLUSIVE, _PFN = 1 << 63, 1 << 56, (1 << 55) - 1


def _pagemap(fd: int, start: int, end: int) -> array.array:
    """The /proc/<pid>/pagemap entries of [start, end)."""
    entries = array.array("Q")
    data = os.pread(fd, (end - start) // _PAGE * 8, start // _PAGE * 8)
    entries.frombytes(data[: len(data) // 8 * 8])
    return entries


def private_origin(child: int, parent: int) -> dict:
    """kB of a forked child's exclusively mapped pages (its private memory) by where they came
    from, told by /proc/<pid>/pagemap (root sees the frame numbers): `copied` where the parent
    has another page at the same address (one of them wrote to memory they shared since the
    fork, almost always the child: refcounts, the GC's links, the interpreter's static data,
    and new objects, which pymalloc and malloc put in the free space of inherited arenas),
    `new` where the parent has none (address ranges mapped after the fork). Per mapping, as
    private_by_mapping names them."""
    out: dict = {"copied": 0, "new": 0, "copied_by_mapping": {}, "new_by_mapping": {}}
    kb = _PAGE // 1024
    cfd = os.open(f"/proc/{child}/pagemap", os.O_RDONLY)
    pfd = os.open(f"/proc/{parent}/pagemap", os.O_RDONLY)
    try:
        for line in Path(f"/proc/{child}/maps").read_text().splitlines():
            m = _MAPPING.match(line)
            if not m:
                continue
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            path = (m.group(1) or "").strip()
            if path == "[vsyscall]":
                continue
            name = os.path.basename(path) if path.startswith("/") else (path or "[anon]")
            try:
                mine, theirs = _pagemap(cfd, lo, hi), _pagemap(pfd, lo, hi)
            except OSError:
                continue
            for i, e in enumerate(mine):
                if e & _PRESENT and e & _EXCLUSIVE:
                    t = theirs[i] if i < len(theirs) else 0
                    kind = "copied" if t & _PRESENT and t & _PFN != e & _PFN else "new"
                    out[kind] += kb
                    per = out[f"{kind}_by_mapping"]
                    per[name] = per.get(name, 0) + kb
    finally:
        os.close(cfd)
        os.close(pfd)
    return out


def ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def private_kb(roll: dict[str, int]) -> int:
    return roll.get("Private_Clean", 0) + roll.get("Private_Dirty", 0)


def in_pool(fn: Callable[[T], R], items: Iterable[T],
            on_abort: Callable[[], None] | None = None, workers: int = SCALE_WORKERS) -> list[R]:
    """fn over items, `workers` threads at a time; the results in the items' order.

    On an exception (fn's own, or Ctrl-C / SIGTERM, which reach the main thread waiting here)
    on_abort runs, the items not started yet are dropped, and the calls already running are
    waited for before it propagates: no thread of ours outlives the step that started it."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="bench")
    try:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]
    except BaseException:
        if on_abort is not None:
            on_abort()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class CtrProcesses:
    """ctr processes run from several threads at once, which one call can end: after stop()
    no new one starts and those running are killed (by pid: they are ours). A step's cleanup
    (cleanup_namespace, close()) then removes what they made."""

    def __init__(self, c: e2e.PrivateContainerd) -> None:
        self.c = c
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen] = set()

    def run(self, argv: list[str], timeout: float) -> tuple[int, str] | None:
        """(exit status, stderr) of argv (stdout to /dev/null); None when stop() came first.
        A timeout kills it and counts as a failure (status -9)."""
        if self.stopping.is_set():
            return None
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env=self.c.env(), cwd=self.c.dir)
        with self._lock:
            self._running.add(p)
            if self.stopping.is_set():  # stop() ran its kill loop before we got here
                p.kill()
        try:
            _out, err = p.communicate(timeout=timeout)
            text = err.decode(errors="replace").strip()
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            text = f"timed out after {timeout:g}s"
        finally:
            with self._lock:
                self._running.discard(p)
        return p.returncode, text

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            for p in self._running:
                p.kill()


# -- the bench ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, c: e2e.PrivateContainerd, ns: str, args: argparse.Namespace,
                 image: Path | None = None) -> None:
        self.c = c
        self.ns = ns
        self.args = args
        #: the image archive, for the namespaces the memory-at-scale steps make
        self.image = image
        self.python = str(REPO / ".venv" / "bin" / "python")
        self.shim = str(REPO / ".venv" / "bin" / "containerd-shim-pyshim-v2")
        #: --handler: pyshim's containers get a runtime options file naming that handler.
        self.handler_config = ""
        if getattr(args, "handler", ""):
            path = c.dir / "bench-handler.toml"
            path.write_text(f"Handler = {json.dumps(args.handler)}\n")
            self.handler_config = str(path)

    def with_handler(self, args: tuple[str, ...]) -> tuple[str, ...]:
        """`ctr run` of a pyshim container with --runtime-config-path when --handler is set
        (unless the run names an options file of its own, which then names the handler)."""
        if (self.handler_config and args and args[0] == "run" and PYSHIM in args
                and "--runtime-config-path" not in args):
            return ("run", "--runtime-config-path", self.handler_config, *args[1:])
        return args

    def ctr(self, *args: str, timeout: float = 60, check: bool = True,
            namespace: str | None = None) -> e2e.CtrResult:
        args = self.with_handler(args)
        r = self.c.ctr(*args, namespace=namespace or self.ns, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError(f"ctr {' '.join(args)} exited {r.returncode}\n{r}\n"
                             f"--- containerd log tail ---\n{self.c.log_tail(30)}")
        return r

    def note(self, cid: str, namespace: str | None = None) -> None:
        note_task = getattr(self.c, "note_task", None)  # lets close() find a half-started shim
        if note_task is not None:
            note_task(namespace or self.ns, cid)

    def run_rm(self, runtime: str, cid: str) -> dict[str, float]:
        """One `ctr run --rm ... true`; returns its launch/exit unix times and wall seconds."""
        self.note(cid)
        launch, t = time.time(), time.perf_counter()
        self.ctr("run", "--rm", "--runtime", runtime, e2e.IMAGE_REF, cid, "true")
        wall = time.perf_counter() - t
        return {"launch": launch, "exit": launch + wall, "wall": wall}

    # 1. lifecycle ------------------------------------------------------------------------------

    def lifecycle(self) -> dict:
        a = self.args
        runs: dict[str, list[dict]] = {PYSHIM: [], RUNC: []}
        ratios = []
        total = a.warmup + a.pairs
        progress(f"lifecycle: {a.warmup} warm-up + {a.pairs} measured pairs of "
                 "`ctr run --rm IMAGE <id> true`")
        for i in range(total):
            order = (PYSHIM, RUNC) if i % 2 == 0 else (RUNC, PYSHIM)
            pair = {}
            for rt in order:
                tag = "wu" if i < a.warmup else "lc"
                cid = f"{tag}-{i:03d}-{SHORT[rt].replace('-', '')}"
                r = self.run_rm(rt, cid)
                r["id"] = cid
                pair[rt] = r
            if i >= a.warmup:
                for rt in order:
                    runs[rt].append(pair[rt])
                ratios.append(pair[PYSHIM]["wall"] / pair[RUNC]["wall"])
                n = i - a.warmup + 1
                if n % 10 == 0 or n == a.pairs:
                    progress(f"  {n}/{a.pairs} pairs")
        marks = containerd_marks(self.c.log_path, {r["id"] for rs in runs.values() for r in rs})
        out: dict = {"ratios": ratios, "runtimes": {}}
        for rt, rs in runs.items():
            ms = [r["wall"] * 1000 for r in rs]
            merged = [{**marks.get(r["id"], {}), "launch": r["launch"], "exit": r["exit"]}
                      for r in rs]
            out["runtimes"][rt] = {
                "median": median(ms), "p10": percentile(ms, 10), "p90": percentile(ms, 90),
                "min": min(ms), "max": max(ms), "phases": cd_phases(merged),
            }
        out["ratio"] = median(ratios)
        out["ratio_p10"], out["ratio_p90"] = percentile(ratios, 10), percentile(ratios, 90)
        return out

    # 2. idle memory ----------------------------------------------------------------------------

    def task_pids(self) -> dict[str, int]:
        pids = {}
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            f = line.split()
            if len(f) >= 3 and f[1].isdigit():
                pids[f[0]] = int(f[1])
        return pids

    def find_shim(self, runtime: str, cid: str, init_pid: int) -> int:
        """The shim daemon of cid: the parent of its init (it is a subreaper), confirmed by its
        cmdline; else the one process whose cmdline names the shim binary, our namespace and
        cid."""
        binary = SHIM_BINARY[runtime]

        def is_shim(pid: int) -> bool:
            cmd = cmdline(pid)
            return (any(os.path.basename(a) == binary for a in cmd[:3])
                    and self.ns in cmd and cid in cmd)

        parent = ppid(init_pid)
        if is_shim(parent):
            return parent
        found = [p for p in e2e._all_pids() if is_shim(p)]
        if len(found) != 1:
            raise BenchError(f"cannot tell the {binary} process of {cid}: parent of init "
                             f"{init_pid} is {parent} ({cmdline(parent)}), candidates {found}")
        return found[0]

    def idle_memory(self) -> dict:
        k = self.args.idle
        progress(f"idle memory: {k} detached `sleep 3600` containers per runtime")
        ids = {rt: [f"idle-{SHORT[rt].replace('-', '')}-{i}" for i in range(k)]
               for rt in (PYSHIM, RUNC)}
        try:
            for i in range(k):
                for rt in (PYSHIM, RUNC):
                    cid = ids[rt][i]
                    self.note(cid)
                    self.ctr("run", "-d", "--runtime", rt, e2e.IMAGE_REF, cid, "sleep", "3600")
            time.sleep(self.args.settle)  # let every shim go idle (lazy work, GC, page faults)
            pids = self.task_pids()
            out: dict = {}
            for rt in (PYSHIM, RUNC):
                shims = []
                for cid in ids[rt]:
                    if cid not in pids:
                        raise BenchError(f"task {cid} is not running: {self.ctr('tasks', 'ls')}")
                    spid = self.find_shim(rt, cid, pids[cid])
                    roll = smaps_rollup(spid)
                    shims.append({"id": cid, "pid": spid, "pss": roll.get("Pss", 0),
                                  "private": private_kb(roll), "rss": roll.get("Rss", 0),
                                  "anon": roll.get("Anonymous", 0)})
                mid = sorted(shims, key=lambda s: s["private"])[len(shims) // 2]
                out[rt] = {
                    "shims": shims,
                    "pss": median(s["pss"] for s in shims),
                    "private": median(s["private"] for s in shims),
                    "rss": median(s["rss"] for s in shims),
                    "anon": median(s["anon"] for s in shims),
                    "by_mapping": private_by_mapping(mid["pid"]),
                }
            return out
        finally:
            progress("idle memory: killing and removing the idle containers")
            self.c.cleanup_namespace(self.ns, timeout=20)

    # exec and stdio ---------------------------------------------------------------------------

    def ctr_argv(self, *args: str, namespace: str | None = None) -> list[str]:
        return [str(self.c.bin_dir / "ctr"), "--address", self.c.address, "--namespace",
                namespace or self.ns, *self.with_handler(args)]

    def spawn_all(self, argvs: list[list[str]], timeout: float = 120) -> float:
        """Start every argv at once (stdout to /dev/null) and wait for all; wall seconds from
        the first spawn until the last exit. Kills whatever is still running on any error."""
        procs: list[subprocess.Popen] = []
        try:
            t = time.perf_counter()
            for argv in argvs:
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                              env=self.c.env(), cwd=self.c.dir))
            deadline = time.monotonic() + timeout
            errs = []
            for p in procs:
                _out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
                if p.returncode != 0:
                    errs.append(f"{' '.join(p.args)} exited {p.returncode}: "
                                f"{err.decode(errors='replace').strip()}")
            wall = time.perf_counter() - t
            if errs:
                raise BenchError(f"{len(errs)} of {len(procs)} failed, e.g. {errs[0]}\n"
                                 f"--- containerd log tail ---\n{self.c.log_tail(30)}")
            return wall
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"timed out after {timeout}s: {exc.cmd}") from None
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()

    def execs(self) -> dict:
        """exec latency (`ctr task exec ... true`, alternating pairs, one container per runtime)
        and 50 concurrent execs per round (3 rounds, the runtime order alternating)."""
        a = self.args
        cids = {rt: f"exec-{SHORT[rt].replace('-', '')}" for rt in (PYSHIM, RUNC)}
        progress(f"exec: {a.warmup} warm-up + {a.pairs} pairs of `ctr task exec <cid> true`, "
                 f"then {a.exec_rounds} rounds of {a.exec_concurrent} concurrent execs")
        try:
            for rt, cid in cids.items():
                self.note(cid)
                self.ctr("run", "-d", "--runtime", rt, e2e.IMAGE_REF, cid, "sleep", "3600")
            ms: dict[str, list[float]] = {PYSHIM: [], RUNC: []}
            ratios = []
            for i in range(a.warmup + a.pairs):
                order = (PYSHIM, RUNC) if i % 2 == 0 else (RUNC, PYSHIM)
                pair = {}
                for rt in order:
                    t = time.perf_counter()
                    self.ctr("task", "exec", "--exec-id", f"e{i}", cids[rt], "true")
                    pair[rt] = (time.perf_counter() - t) * 1000
                if i >= a.warmup:
                    for rt in order:
                        ms[rt].append(pair[rt])
                    ratios.append(pair[PYSHIM] / pair[RUNC])
            out: dict = {"runtimes": {rt: {"median": median(v), "p10": percentile(v, 10),
                                           "p90": percentile(v, 90)} for rt, v in ms.items()},
                         "ratio": median(ratios), "ratio_p10": percentile(ratios, 10),
                         "ratio_p90": percentile(ratios, 90)}
            n = a.exec_concurrent
            walls: dict[str, list[float]] = {PYSHIM: [], RUNC: []}
            cratios = []
            for r in range(a.exec_rounds):
                order = (PYSHIM, RUNC) if r % 2 == 0 else (RUNC, PYSHIM)
                pair = {}
                for rt in order:
                    argvs = [self.ctr_argv("task", "exec", "--exec-id", f"c{r}-{j}", cids[rt],
                                           "true") for j in range(n)]
                    pair[rt] = self.spawn_all(argvs) * 1000
                    walls[rt].append(pair[rt])
                cratios.append(pair[PYSHIM] / pair[RUNC])
            out["concurrent"] = {"n": n, "rounds": a.exec_rounds,
                                 "runtimes": {rt: median(v) for rt, v in walls.items()},
                                 "ratio": median(cratios), "ratios": cratios}
            return out
        finally:
            progress("exec: killing and removing the exec containers")
            self.c.cleanup_namespace(self.ns, timeout=20)

    def stdio(self) -> dict:
        """`ctr run --rm IMAGE <id> sh -c 'head -c N /dev/zero'` with ctr's stdout on /dev/null,
        each run next to a baseline run of the same runtime writing 0 bytes (same command, so
        the same create/start/sh/head/delete cost): the net throughput is N over the median of
        the per-round differences, i.e. the copy path alone (container -> shim -> FIFO -> ctr),
        without the lifecycle cost that the lifecycle figure already has and that would
        otherwise dominate a 20 MiB run. The gross figure (N over the whole wall) is kept too."""
        a = self.args
        size = a.stdio_mib * 1024 * 1024
        progress(f"stdio: 1 warm-up + {a.stdio_runs} rounds of {a.stdio_mib} MiB to ctr's "
                 "stdout and a 0-byte baseline, per runtime")
        walls: dict[str, list[float]] = {PYSHIM: [], RUNC: []}
        nets: dict[str, list[float]] = {PYSHIM: [], RUNC: []}
        bases: dict[str, list[float]] = {PYSHIM: [], RUNC: []}

        def run(rt: str, cid: str, nbytes: int) -> float:
            self.note(cid)
            return self.spawn_all([self.ctr_argv(
                "run", "--rm", "--runtime", rt, e2e.IMAGE_REF, cid,
                "sh", "-c", f"head -c {nbytes} /dev/zero")])

        for i in range(a.stdio_runs + 1):  # round 0 is a warm-up
            order = (PYSHIM, RUNC) if i % 2 == 0 else (RUNC, PYSHIM)
            for rt in order:
                short = SHORT[rt].replace("-", "")
                base = run(rt, f"sb-{i:02d}-{short}", 0)
                wall = run(rt, f"st-{i:02d}-{short}", size)
                if i:
                    walls[rt].append(wall)
                    bases[rt].append(base)
                    nets[rt].append(wall - base)
        out: dict = {"mib": a.stdio_mib, "runs": a.stdio_runs, "runtimes": {}}
        for rt in (PYSHIM, RUNC):
            w, net = median(walls[rt]), median(nets[rt])
            out["runtimes"][rt] = {
                "wall_ms": w * 1000, "base_ms": median(bases[rt]) * 1000, "net_ms": net * 1000,
                "gross_mib_s": a.stdio_mib / w,
                "mib_s": a.stdio_mib / net if net > 0 else float("nan"),
            }
        py, rc = out["runtimes"][PYSHIM], out["runtimes"][RUNC]
        out["ratio"] = py["mib_s"] / rc["mib_s"]
        out["gross_ratio"] = py["gross_mib_s"] / rc["gross_mib_s"]
        return out

    # 2d, 2e. memory at scale ------------------------------------------------------------------

    def start_sleepers(self, ns: str, runs: list[tuple[str, str, tuple[str, ...]]]) -> None:
        """`ctr run -d [flags] --runtime RT IMAGE <cid> sleep 3600` for every (runtime, cid,
        flags), SCALE_WORKERS at a time. After the first failure no more are started; on a
        failure, Ctrl-C or SIGTERM the ctr processes still running are killed (by pid: they
        are ours), and the caller's cleanup removes what they made."""
        procs = CtrProcesses(self.c)

        def start(run: tuple[str, str, tuple[str, ...]]) -> str:
            runtime, cid, flags = run
            if procs.stopping.is_set():
                return ""
            self.note(cid, ns)
            argv = self.ctr_argv("run", "-d", *flags, "--runtime", runtime, e2e.IMAGE_REF, cid,
                                 "sleep", "3600", namespace=ns)
            done = procs.run(argv, SCALE_START_TIMEOUT)
            if done is None or done[0] == 0 or procs.stopping.is_set():
                return ""
            procs.stopping.set()
            return f"ctr run -d --runtime {runtime} ... {cid} exited {done[0]}: {done[1]}"

        errors = [e for e in in_pool(start, runs, on_abort=procs.stop) if e]
        if errors:
            raise BenchError(f"{len(errors)} container start(s) failed: {errors[0]}\n"
                             f"--- containerd log tail ---\n{self.c.log_tail(30)}")

    def wait_running(self, ns: str, ids: list[str], timeout: float) -> None:
        """Until `ctr tasks ls` shows every one of ids RUNNING (`ctr run -d` returns after
        Start; this is the check that none died since)."""
        deadline = time.monotonic() + timeout
        while True:
            status = {}
            for line in self.ctr("tasks", "ls", namespace=ns).stdout.splitlines()[1:]:
                f = line.split()
                if len(f) >= 3:
                    status[f[0]] = f[2]
            waiting = [cid for cid in ids if status.get(cid) != "RUNNING"]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"{len(waiting)} of {len(ids)} tasks not RUNNING after "
                                 f"{timeout:g}s, e.g. " + ", ".join(
                                     f"{cid}: {status.get(cid, 'no task')}" for cid in waiting[:5]))
            time.sleep(0.5)

    def remove_sleepers(self, ns: str, ids: list[str]) -> None:
        """Kill and remove ids' tasks and containers, SCALE_WORKERS at a time, then whatever
        else the namespace holds (a start cut short)."""
        def remove(cid: str) -> None:
            for args in (("tasks", "delete", "-f", cid), ("containers", "delete", cid)):
                try:  # a failure is left to cleanup_namespace and close()
                    self.c.ctr(*args, namespace=ns, timeout=30)
                except e2e.CtrError:
                    pass

        in_pool(remove, ids)
        self.c.cleanup_namespace(ns, timeout=20)

    def shim_pids(self, runtime: str, ns: str) -> list[int]:
        """Every process of runtime's shim binary serving namespace ns of this containerd, by
        its command line (`-namespace`, `-address`): runc-v2's shims; pyshim's daemons, whose
        command line is that of the `start` that asked for them. Called once every task is
        RUNNING, so no `start` or `delete` command is among them."""
        binary = SHIM_BINARY[runtime]
        found = []
        for pid in e2e._all_pids():
            cmd = cmdline(pid)
            if (any(os.path.basename(a) == binary for a in cmd[:3])
                    and e2e._flag(cmd, "-namespace") == ns
                    and e2e._flag(cmd, "-address") == self.c.address):
                found.append(pid)
        return sorted(found)

    def zygote_pids(self, daemons: list[int]) -> list[int]:
        """pyshim's zygotes serving this containerd (and their spare workers, the next
        daemons-to-be): those whose socket is in its PYSHIM_ZYGOTE_DIR (PrivateContainerd gives
        each containerd its own), and the parent of any daemon that is a zygote. Each counts
        once, however many daemons share it."""
        def is_zygote(cmd: list[str]) -> bool:
            return bool(cmd) and cmd[0] in ("pyshim-zygote", "pyshim-spare")

        directory = self.c.env().get("PYSHIM_ZYGOTE_DIR", "").rstrip("/") + "/"
        found = set()
        for pid in e2e._all_pids():
            cmd = cmdline(pid)
            if is_zygote(cmd) and len(cmd) > 1 and cmd[1].startswith(directory):
                found.add(pid)
        for pid in daemons:
            try:
                parent = ppid(pid)
            except OSError:
                continue
            if is_zygote(cmdline(parent)):
                found.add(parent)
        return sorted(found)

    def shim_memory(self, runtime: str, ns: str, containers: int) -> dict:
        """smaps_rollup of every shim process of runtime in ns, summed: its daemons (and for
        pyshim the zygote(s) they were forked from, whose pages they share), and the median
        daemon on its own."""
        daemons = self.shim_pids(runtime, ns)
        zygotes = self.zygote_pids(daemons) if runtime == PYSHIM else []
        if not daemons:
            raise BenchError(f"no {SHIM_BINARY[runtime]} process found for namespace {ns}")
        rolls, parents = {}, {}
        for pid in daemons + zygotes:
            try:
                rolls[pid] = smaps_rollup(pid)
                parents[pid] = ppid(pid)
            except OSError as exc:
                raise BenchError(f"shim process {pid} ({' '.join(cmdline(pid))}) went away "
                                 f"while measured: {exc}") from None

        def total(pids: list[int], key: str) -> int:
            return sum(private_kb(rolls[p]) if key == "private" else rolls[p].get(key, 0)
                       for p in pids)

        everything = daemons + zygotes
        mid = sorted(daemons, key=lambda p: private_kb(rolls[p]))[len(daemons) // 2]
        try:
            origin = private_origin(mid, parents[mid]) if parents[mid] in zygotes else None
        except OSError:
            origin = None
        return {
            "containers": containers,
            "daemons": len(daemons),
            "zygotes": len(zygotes),
            "from_zygote": sum(1 for p in daemons if parents[p] in zygotes),
            "pss": total(everything, "Pss"),
            "private": total(everything, "private"),
            "rss": total(everything, "Rss"),
            "daemons_pss": total(daemons, "Pss"),
            "daemons_private": total(daemons, "private"),
            "zygotes_pss": total(zygotes, "Pss"),
            "zygotes_private": total(zygotes, "private"),
            "zygotes_rss": total(zygotes, "Rss"),
            "median_daemon": {"pss": rolls[mid].get("Pss", 0), "private": private_kb(rolls[mid]),
                              "rss": rolls[mid].get("Rss", 0),
                              "private_dirty": rolls[mid].get("Private_Dirty", 0),
                              "anon": rolls[mid].get("Anonymous", 0)},
            "by_mapping": private_by_mapping(mid),
            "origin": origin,
        }

    def scale_namespace(self, prefix: str) -> str:
        if self.image is None:
            raise BenchError("memory at scale needs the image archive (Bench(image=...))")
        progress(f"{prefix}: a namespace of its own, importing the image")
        return self.c.new_namespace(prefix, image=self.image)

    def sleepers_memory(self, step: str, runs: list[tuple[str, str, tuple[str, ...]]]) -> dict:
        """Start runs in a fresh namespace, wait until all are RUNNING, let them settle, and
        measure each runtime's shims; removes them all again (also on error and Ctrl-C)."""
        ns = self.scale_namespace(step)
        ids = [cid for _rt, cid, _flags in runs]
        ksm = KsmSwitch() if self.args.ksm else None
        try:
            if ksm is not None:
                ksm.turn_on()
            t = time.perf_counter()
            self.start_sleepers(ns, runs)
            self.wait_running(ns, ids, timeout=60 + len(ids))
            progress(f"{step}: {len(ids)} containers RUNNING after "
                     f"{time.perf_counter() - t:.1f} s; settling {self.args.settle:g} s")
            time.sleep(self.args.settle)  # let every shim go idle (lazy work, GC, page faults)
            merged = None
            if ksm is not None:
                progress(f"{step}: waiting for ksmd to merge what it will")
                merged = ksm.wait_merged()
            self.wait_running(ns, ids, timeout=10)  # none died while settling
            counts: dict[str, int] = {}
            for rt, _cid, _flags in runs:
                counts[rt] = counts.get(rt, 0) + 1
            out = {rt: self.shim_memory(rt, ns, n) for rt, n in counts.items()}
            if PYSHIM in out:
                out[PYSHIM]["per_daemon"] = self.containers_per_daemon(
                    ns, [cid for rt, cid, _f in runs if rt == PYSHIM])
            if merged is not None:
                out["ksm"] = merged
            return out
        finally:
            progress(f"{step}: killing and removing the {len(ids)} containers")
            self.remove_sleepers(ns, ids)
            if ksm is not None:
                ksm.restore()

    def containers_per_daemon(self, ns: str, ids: list[str]) -> list[int]:
        """How many of ids each pyshim daemon serves (by the address in their bundles: dense
        mode puts a seat's containers at one address), largest first."""
        served: dict[str, int] = {}
        for cid in ids:
            try:
                text = (self.c.bundle_dir(ns, cid) / "address").read_text().strip()
            except OSError:
                text = f"? {cid}"
            if text.startswith("{"):  # a gRPC daemon's reply
                text = str(json.loads(text).get("address", text))
            served[text] = served.get(text, 0) + 1
        return sorted(served.values(), reverse=True)

    def scale_memory(self) -> dict:
        """2d. --scale K `sleep 3600` containers per runtime, one shim (daemon) each, all
        alive at once: the summed memory of every shim process per container, so pyshim's
        zygote is counted once and the pages its daemons share with it are not counted twice."""
        k = self.args.scale
        progress(f"memory at scale: {k} `sleep 3600` containers per runtime, "
                 f"{SCALE_WORKERS} started at a time")
        runs = [(rt, f"sc-{SHORT[rt].replace('-', '')}-{i:03d}", ())
                for i in range(k) for rt in (PYSHIM, RUNC)]
        return self.sleepers_memory("scale", runs)

    def dense_memory(self, scale: dict | None) -> dict:
        """2e. --dense-containers M pyshim containers with ContainersPerDaemon = --dense N (so
        ceil(M/N) daemons), next to M through runc-v2 (2d's figures when it ran M)."""
        a = self.args
        m, n = a.dense_containers, a.dense
        config = self.c.dir / "bench-dense.toml"
        lines = [f"ContainersPerDaemon = {n}"]
        if a.handler:  # one options file per run: it must name the handler too
            lines.append(f"Handler = {json.dumps(a.handler)}")
        config.write_text("\n".join(lines) + "\n")
        reuse = scale is not None and a.scale == m
        progress(f"dense mode: {m} `sleep 3600` pyshim containers, ContainersPerDaemon = {n}"
                 + ("" if reuse else f", and {m} through runc-v2"))
        flags = ("--runtime-config-path", str(config))
        runs = [(PYSHIM, f"dn-pyshim-{i:03d}", flags) for i in range(m)]
        if not reuse:
            runs = [r for pair in zip(runs, [(RUNC, f"dn-runcv2-{i:03d}", ()) for i in range(m)],
                                      strict=True) for r in pair]
        out = self.sleepers_memory("dense", runs)
        if reuse:
            assert scale is not None
            out[RUNC] = {**scale[RUNC], "reused": True}
        out["containers"], out["per_daemon"] = m, n
        out["expected_daemons"] = -(-m // n)
        return out

    # 2g. churn ---------------------------------------------------------------------------------

    def churn(self) -> dict:
        """--churn N `ctr run --rm IMAGE <id> true` per runtime, --churn-concurrency C at a time,
        one runtime after the other (the order alternating over --churn-rounds), while a
        long-lived container of the same runtime gets `ctr task exec ... true` in a loop: the
        wall time of the N runs, and how many execs got through meanwhile (a shim that
        starves its execs under churn, or the reverse, shows here)."""
        a = self.args
        targets = {rt: f"chx-{SHORT[rt].replace('-', '')}" for rt in (PYSHIM, RUNC)}
        progress(f"churn: {a.churn_rounds} round(s) of {a.churn} `ctr run --rm IMAGE <id> true` "
                 f"per runtime, {a.churn_concurrency} at a time, with `ctr task exec` in a loop "
                 "beside")
        try:
            for rt, cid in targets.items():
                self.note(cid)
                self.ctr("run", "-d", "--runtime", rt, e2e.IMAGE_REF, cid, "sleep", "3600")
            rounds: dict[str, list[dict]] = {PYSHIM: [], RUNC: []}
            ratios = []
            for r in range(a.churn_rounds):
                order = (PYSHIM, RUNC) if r % 2 == 0 else (RUNC, PYSHIM)
                for rt in order:
                    res = self.churn_round(rt, r, targets[rt])
                    progress(f"  round {r + 1}, {SHORT[rt]}: {a.churn} runs in {res['wall']:.1f} s,"
                             f" {res['execs']} execs beside")
                    rounds[rt].append(res)
                ratios.append(rounds[PYSHIM][-1]["wall"] / rounds[RUNC][-1]["wall"])
        finally:
            progress("churn: killing and removing the churn's containers")
            self.c.cleanup_namespace(self.ns, timeout=20)
        out: dict = {"n": a.churn, "concurrency": a.churn_concurrency, "rounds": a.churn_rounds,
                     "ratio": median(ratios), "ratios": ratios, "runtimes": {}}
        for rt, rs in rounds.items():
            execs = [r["execs"] for r in rs]
            out["runtimes"][rt] = {
                "wall": median(r["wall"] for r in rs),
                "per_s": median(a.churn / r["wall"] for r in rs),
                "execs": median(execs), "exec_counts": execs,
                "exec_ms": median(ms for r in rs for ms in r["exec_ms"]),
                "exec_p90_ms": percentile([ms for r in rs for ms in r["exec_ms"]], 90),
            }
        return out

    def churn_round(self, runtime: str, rnd: int, target: str) -> dict:
        """One runtime's churn: the runs through in_pool, the exec loop on a thread of its own;
        both end (their ctr processes killed) on the first failure, Ctrl-C or SIGTERM."""
        a = self.args
        short = SHORT[runtime].replace("-", "")
        procs = CtrProcesses(self.c)
        finished = threading.Event()
        exec_ms: list[float] = []
        exec_errors: list[str] = []

        def exec_loop() -> None:
            i = 0
            while not finished.is_set():
                t = time.perf_counter()
                done = procs.run(self.ctr_argv("task", "exec", "--exec-id", f"cx{rnd}-{i}",
                                               target, "true"), timeout=60)
                if done is None or procs.stopping.is_set():
                    return
                if done[0] != 0:
                    exec_errors.append(f"ctr task exec --exec-id cx{rnd}-{i} {target} true "
                                       f"exited {done[0]}: {done[1]}")
                    return
                exec_ms.append((time.perf_counter() - t) * 1000)
                i += 1

        def run(cid: str) -> str:
            if procs.stopping.is_set():
                return ""
            self.note(cid)
            done = procs.run(self.ctr_argv("run", "--rm", "--runtime", runtime, e2e.IMAGE_REF,
                                           cid, "true"), SCALE_START_TIMEOUT)
            if done is None or done[0] == 0 or procs.stopping.is_set():
                return ""
            procs.stop()  # the others' figures would be of a different load: end the round
            return f"ctr run --rm --runtime {runtime} ... {cid} exited {done[0]}: {done[1]}"

        ids = [f"ch{rnd}-{short}-{i:04d}" for i in range(a.churn)]
        execs = threading.Thread(target=exec_loop, name="bench-churn-exec")
        t = time.perf_counter()
        execs.start()
        try:
            errors = [e for e in in_pool(run, ids, on_abort=procs.stop,
                                         workers=a.churn_concurrency) if e]
            wall = time.perf_counter() - t
        finally:
            finished.set()
            execs.join()
        if errors or exec_errors:
            raise BenchError(f"churn of {SHORT[runtime]}: {len(errors)} run(s) failed"
                             f"{', e.g. ' + errors[0] if errors else ''}; "
                             f"{exec_errors[0] if exec_errors else 'no exec failed'}\n"
                             f"--- containerd log tail ---\n{self.c.log_tail(30)}")
        return {"wall": wall, "execs": len(exec_ms), "exec_ms": exec_ms}

    def import_memory(self) -> list[tuple[str, dict[str, int]]]:
        """Private memory of a bare interpreter and after importing what the daemon imports
        (each a fresh process of ours, measured while it waits on stdin, then ended)."""
        steps = [
            ("python, nothing imported", ""),
            ("+ asyncio, logging", "import asyncio, logging"),
            ("+ betterproto2, shim.api (Task, events)",
             "import asyncio, logging, shim.api.containerd.task.v2, shim.api.containerd.events"),
            ("+ everything the daemon imports", f"import asyncio, logging, {DAEMON_IMPORTS}"),
        ]
        out = []
        for label, imports in steps:
            code = f"{imports}\nimport sys\nprint('ready', flush=True)\nsys.stdin.read()\n"
            p = subprocess.Popen([self.python, "-c", code], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, cwd=REPO)
            try:
                if p.stdout is None or p.stdout.readline().strip() != b"ready":
                    raise BenchError(f"python -c {code!r} did not start")
                out.append((label, smaps_rollup(p.pid)))
            finally:
                if p.stdin:
                    p.stdin.close()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        return out

    # 3. start cost -----------------------------------------------------------------------------

    def wall_ms(self, argv: list[str], n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           check=True, cwd=REPO)
            times.append((time.perf_counter() - t) * 1000)
        return median(times)

    def importtime(self, imports: str, n: int) -> dict:
        """`python -X importtime -c 'import ...'`, n runs: the medians of the total (what the
        statement costs after the interpreter is up), per module and per package."""
        totals, per_module, per_package, startup = [], {}, {}, []
        for _ in range(n):
            r = subprocess.run([self.python, "-X", "importtime", "-c", f"import {imports}"],
                               capture_output=True, text=True, cwd=REPO, check=True)
            entries = parse_importtime(r.stderr)
            site = max((i for i, e in enumerate(entries) if e[2] == 0 and e[3] == "site"),
                       default=-1)
            startup.append(sum(e[1] for e in entries[:site + 1] if e[2] == 0) / 1000)
            ours = entries[site + 1:]
            totals.append(sum(e[1] for e in ours if e[2] == 0) / 1000)
            packages: dict[str, float] = {}
            for self_us, _cum, _level, name in ours:
                per_module.setdefault(name, []).append(self_us / 1000)
                pkg = package_of(name)
                packages[pkg] = packages.get(pkg, 0.0) + self_us / 1000
            for pkg, ms in packages.items():
                per_package.setdefault(pkg, []).append(ms)
        return {
            "total": median(totals),
            "startup_imports": median(startup),
            "modules": sorted(((median(v), k) for k, v in per_module.items()), reverse=True),
            "packages": sorted(((median(v), k) for k, v in per_package.items()), reverse=True),
        }

    def delete_command_ms(self, n: int) -> float:
        """`containerd-shim-pyshim-v2 ... delete` as containerd runs it after every Shutdown,
        here for a task that is already gone (the usual case): an empty bundle of ours and our
        namespace (the runc root it names is removed with the namespace at cleanup)."""
        bundle = self.c.dir / "delete-probe"
        bundle.mkdir(exist_ok=True)
        argv = [self.shim, "-namespace", self.ns, "-address", self.c.address,
                "-id", "delete-probe", "-bundle", str(bundle), "delete"]
        return self.wall_ms(argv, n)

    def start_cost(self) -> dict:
        n = self.args.repeat
        progress(f"start cost: interpreter and -X importtime ({n} runs each)")
        site = parse_importtime(subprocess.run(
            [self.python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True,
            cwd=REPO, check=True).stderr)
        teardown = {}
        for key, imports in (("start", START_IMPORTS), ("delete", DELETE_IMPORTS)):
            normal = self.wall_ms([self.python, "-c", f"import {imports}"], n)
            skipped = self.wall_ms([self.python, "-c", f"import {imports}; import os; os._exit(0)"], n)
            teardown[key] = (normal, normal - skipped)
        return {
            "delete_cmd": self.delete_command_ms(n),
            "teardown": teardown,
            "shim_v": self.wall_ms([self.shim, "-v"], n),
            "python": self.wall_ms([self.python, "-c", "pass"], n),
            "python_S": self.wall_ms([self.python, "-S", "-c", "pass"], n),
            "python_start_imports": self.wall_ms([self.python, "-c", f"import {START_IMPORTS}"],
                                                 n),
            "site_entries": [(cum / 1000, name) for _s, cum, level, name in site
                             if level <= 1 and cum >= 500],
            "daemon": self.importtime(DAEMON_IMPORTS, n),
            "start": self.importtime(START_IMPORTS, n),
            "delete": self.importtime(DELETE_IMPORTS, n),
        }

    # 4. profile --------------------------------------------------------------------------------

    def profile(self) -> dict:
        n = self.args.profile
        progress(f"profile: {n} traced pyshim runs (hack/bench_trace.py)")
        trace = self.c.dir / "trace.tsv"
        wrapper = self.c.bin_dir / "containerd-shim-pyshimtrace-v2"
        wrapper.write_text(
            f"#!{self.python}\n"
            "import os, time\n"
            "import time\n"
            "_t0, _cpu = time.time(), time.process_time()\n"
            "import sys\n"
            f"sys.path.insert(0, {str(HACK)!r})\n"
            "import bench_trace\n"
            f"sys.exit(bench_trace.main({str(trace)!r}, _t0, _cpu))\n"
        )
        wrapper.chmod(0o755)
        runs = []
        for i in range(n + 1):
            cid = f"tr-{i:03d}"
            r = self.run_rm(TRACED, cid)
            r["id"] = cid
            if i > 0:  # the first one warms the page cache for the wrapper
                runs.append(r)
        records = parse_trace(trace)
        marks = containerd_marks(self.c.log_path, {r["id"] for r in runs})
        return analyse_profile(runs, records, marks)


# -- 2f. pods through the CRI -------------------------------------------------------------------

CRI_NAMESPACE = "k8s.io"  # the CRI plugin's, always
#: The pods step's runtime handlers (RuntimeClasses), one per runtime.
POD_HANDLER = {PYSHIM: "pyshim", RUNC: "runc"}
#: What a pod's containers run: still RUNNING when looked at, and ended by StopContainer's
#: SIGTERM (they share the pod's pid namespace, whose init is pause: sleep is no init there,
#: which would ignore it and cost the whole grace period).
POD_COMMAND = ("sleep", "1000")
#: StopContainer's grace period (s): only reached if SIGTERM did not end a container.
POD_STOP_TIMEOUT = 10
#: Parts of one pod's lifecycle: (key, label).
POD_PHASES = [
    ("sandbox", "RunPodSandbox (pause container)"),
    ("start", "CreateContainer + StartContainer, until all RUNNING"),
    ("stop", "StopContainer + RemoveContainer"),
    ("teardown", "StopPodSandbox + RemovePodSandbox"),
]


def cri_containerd(version: str, base: Path) -> e2e.PrivateContainerd:
    """A PrivateContainerd (not started) with the CRI plugin and a handler per runtime, as
    tests/e2e/test_cri.py's has: the pods' cgroup parent is named after the instance, so that
    close() kills and removes their cgroups."""
    from pause_image import PAUSE_IMAGE_REF

    c = e2e.PrivateContainerd(version, base_dir=base, cri=e2e.CriConfig(
        sandbox_image=PAUSE_IMAGE_REF, handler=POD_HANDLER[PYSHIM],
        runc_handler=POD_HANDLER[RUNC]))
    c.cgroup_parent = f"pyshim-{c.token}-bench-pods"  # type: ignore[attr-defined]
    c.namespaces.append(c.cgroup_parent)  # type: ignore[attr-defined]
    return c


class PodBench:
    """2f. --pods N pairs of pod lifecycles through the CRI, pyshim's handler against runc-v2's,
    as the kubelet drives them: RunPodSandbox, --pod-containers K containers created, started
    and RUNNING, each stopped and removed, StopPodSandbox, RemovePodSandbox. On containerd 2.x
    both shims announce Task API version 3, so a pod's containers join its sandbox's shim with
    no `shim start` each; 1.x runs `start` per container (and pyshim's finds the pod's daemon)."""

    def __init__(self, c: e2e.PrivateContainerd, args: argparse.Namespace, image: Path) -> None:
        self.c = c
        self.args = args
        self.image = image

    def run(self) -> dict:
        """Start the containerd with both images known to the CRI, then measure."""
        from pause_image import PAUSE_IMAGE_REF, build_pause_image

        pause = build_pause_image(e2e.image_cache_dir())
        progress(f"pods: containerd {self.args.containerd} with the CRI plugin in {self.c.dir}")
        self.c.start()
        self.c.import_image(self.image, CRI_NAMESPACE)
        self.c.ctr("images", "import", "--no-unpack", str(pause), namespace=CRI_NAMESPACE,
                   timeout=120, check=True)
        return asyncio.run(self.measure([e2e.IMAGE_REF, PAUSE_IMAGE_REF]))

    async def measure(self, images: list[str]) -> dict:
        from cri_client import CriClient

        a = self.args
        progress(f"pods: {a.warmup} warm-up + {a.pods} measured pairs of pod lifecycles, "
                 f"{a.pod_containers} `{' '.join(POD_COMMAND)}` container(s) each")
        runs: dict[str, list[dict[str, float]]] = {PYSHIM: [], RUNC: []}
        ratios = []
        async with CriClient(self.c.address) as client:
            await self.wait_for_images(client, images)
            for i in range(a.warmup + a.pods):
                order = (PYSHIM, RUNC) if i % 2 == 0 else (RUNC, PYSHIM)
                pair = {}
                for rt in order:
                    tag = "wu" if i < a.warmup else "pod"
                    pair[rt] = await self.pod(client, rt, f"{tag}-{i:03d}-{POD_HANDLER[rt]}")
                if i >= a.warmup:
                    for rt in order:
                        runs[rt].append(pair[rt])
                    ratios.append(pair[PYSHIM]["total"] / pair[RUNC]["total"])
                    n = i - a.warmup + 1
                    if n % 10 == 0 or n == a.pods:
                        progress(f"  {n}/{a.pods} pairs")
        out: dict = {"pods": a.pods, "containers": a.pod_containers, "ratios": ratios,
                     "ratio": median(ratios), "ratio_p10": percentile(ratios, 10),
                     "ratio_p90": percentile(ratios, 90), "runtimes": {}}
        for rt, rs in runs.items():
            ms = [r["total"] for r in rs]
            out["runtimes"][rt] = {
                "median": median(ms), "p10": percentile(ms, 10), "p90": percentile(ms, 90),
                "phases": {key: median(r[key] for r in rs) for key, _label in POD_PHASES},
            }
        return out

    async def wait_for_images(self, client, refs: list[str], timeout: float = 20) -> None:
        """The CRI plugin learns of imported images from containerd's events."""
        from shim.api.runtime import v1 as cri_v1

        deadline = time.monotonic() + timeout
        for ref in refs:
            while True:
                try:
                    reply = await client.image("ImageStatus", cri_v1.ImageStatusRequest(
                        image=cri_v1.ImageSpec(image=ref)))
                except Exception as exc:  # grpclib's errors: main() reports BenchError
                    raise BenchError(f"ImageStatus {ref}: {exc}\n--- containerd log tail ---\n"
                                     f"{self.c.log_tail(30)}") from exc
                if reply.image is not None and reply.image.id:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"the CRI plugin does not know {ref} after {timeout:g}s")
                await asyncio.sleep(0.1)

    def pod_config(self, name: str):
        """Host network (no CNI plugin is installed), the pod's pid and ipc namespaces."""
        from shim.api.runtime import v1 as cri_v1

        uid = uuid.uuid4().hex
        logs = self.c.dir / "pods" / uid
        logs.mkdir(parents=True)
        namespaces = cri_v1.NamespaceOption(network=cri_v1.NamespaceMode.NODE,
                                            pid=cri_v1.NamespaceMode.POD,
                                            ipc=cri_v1.NamespaceMode.POD)
        return cri_v1.PodSandboxConfig(
            metadata=cri_v1.PodSandboxMetadata(name=name, uid=uid, namespace="bench"),
            log_directory=str(logs),
            linux=cri_v1.LinuxPodSandboxConfig(
                cgroup_parent=f"/{self.c.cgroup_parent}",  # type: ignore[attr-defined]
                security_context=cri_v1.LinuxSandboxSecurityContext(
                    namespace_options=namespaces)),
        )

    async def pod(self, client, runtime: str, name: str) -> dict[str, float]:
        """One pod's lifecycle: ms of each POD_PHASES part and the total. On a failure the
        pod is stopped and removed (best effort: close() removes what is left) and a
        BenchError says which call failed."""
        from shim.api.runtime import v1 as cri_v1

        config = self.pod_config(name)
        handler = POD_HANDLER[runtime]
        ms: dict[str, float] = {}
        pod = ""
        step = "RunPodSandbox"
        t0 = t = time.perf_counter()

        def lap(key: str) -> None:
            nonlocal t
            now = time.perf_counter()
            ms[key] = (now - t) * 1000
            t = now

        try:
            pod = (await client.runtime("RunPodSandbox", cri_v1.RunPodSandboxRequest(
                config=config, runtime_handler=handler))).pod_sandbox_id
            lap("sandbox")
            cids = []
            for k in range(self.args.pod_containers):
                step = f"CreateContainer c{k}"
                container = cri_v1.ContainerConfig(
                    metadata=cri_v1.ContainerMetadata(name=f"c{k}"),
                    image=cri_v1.ImageSpec(image=e2e.IMAGE_REF), command=list(POD_COMMAND),
                    log_path=f"c{k}.log")
                cid = (await client.runtime("CreateContainer", cri_v1.CreateContainerRequest(
                    pod_sandbox_id=pod, config=container, sandbox_config=config))).container_id
                cids.append(cid)
                step = f"StartContainer c{k}"
                await client.runtime("StartContainer",
                                     cri_v1.StartContainerRequest(container_id=cid))
            step = "ContainerStatus (until RUNNING)"
            await self.wait_running(client, cids)
            lap("start")
            for cid in cids:
                step = f"StopContainer {cid}"
                await client.runtime("StopContainer", cri_v1.StopContainerRequest(
                    container_id=cid, timeout=POD_STOP_TIMEOUT))
                step = f"RemoveContainer {cid}"
                await client.runtime("RemoveContainer",
                                     cri_v1.RemoveContainerRequest(container_id=cid))
            lap("stop")
            step = "StopPodSandbox"
            await client.runtime("StopPodSandbox", cri_v1.StopPodSandboxRequest(pod_sandbox_id=pod))
            step = "RemovePodSandbox"
            await client.runtime("RemovePodSandbox",
                                 cri_v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
            lap("teardown")
        except Exception as exc:
            if pod:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(30):
                        await client.runtime("StopPodSandbox",
                                             cri_v1.StopPodSandboxRequest(pod_sandbox_id=pod))
                        await client.runtime("RemovePodSandbox",
                                             cri_v1.RemovePodSandboxRequest(pod_sandbox_id=pod))
            raise BenchError(f"pod {name} (handler {handler}): {step} failed: {exc}\n"
                             f"--- containerd log tail ---\n{self.c.log_tail(40)}") from exc
        ms["total"] = (time.perf_counter() - t0) * 1000
        return ms

    async def wait_running(self, client, cids: list[str], timeout: float = 30) -> None:
        """StartContainer returns once the task started: this checks that none died since."""
        from shim.api.runtime import v1 as cri_v1

        deadline = time.monotonic() + timeout
        for cid in cids:
            while True:
                status = (await client.runtime("ContainerStatus", cri_v1.ContainerStatusRequest(
                    container_id=cid))).status
                if status.state == cri_v1.ContainerState.CONTAINER_RUNNING:
                    break
                if status.state == cri_v1.ContainerState.CONTAINER_EXITED:
                    raise BenchError(f"{cid} exited {status.exit_code} ({status.reason}) "
                                     "instead of running")
                if time.monotonic() > deadline:
                    raise BenchError(f"{cid} not RUNNING after {timeout:g}s: {status.state}")
                await asyncio.sleep(0.01)


# -- importtime and trace parsing ---------------------------------------------------------------


def parse_importtime(stderr: str) -> list[tuple[int, int, int, str]]:
    """(self us, cumulative us, nesting level, module) per `-X importtime` line."""
    out = []
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        parts = line.removeprefix("import time:").split("|")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            continue  # the header line
        name = parts[2][1:]
        level = (len(name) - len(name.lstrip(" "))) // 2
        out.append((int(parts[0]), int(parts[1]), level, name.strip()))
    return out


def package_of(name: str) -> str:
    for prefix in ("shim.api", "shim.framework.ttrpc"):
        if name.startswith(prefix):
            return prefix
    return name if name.startswith("shim.") else name.split(".", 1)[0]


def parse_trace(path: Path) -> list[dict]:
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        f = line.split("\t")
        if len(f) != 7:
            continue
        out.append({"pid": int(f[0]), "t": float(f[1]), "id": f[2], "role": f[3],
                    "event": f[4], "ms": float(f[5]) if f[5] else None, "detail": f[6]})
    return out


DURATION_ORDER = ["start.", "daemon.", "call.Create", "rpc.Create", "stdio.", "mount.", "runc.create",
                  "call.Start", "rpc.Start", "runc.start", "call.Wait", "rpc.Wait", "call.Delete",
                  "rpc.Delete", "runc.delete", "umount.", "call.", "rpc.", "runc.", "delete."]
DURATION_LABELS = {
    "start.interpreter_cpu": "start command: interpreter start-up (CPU before shim code)",
    "start.imports": "start command: imports",
    "daemon.imports_before_serving": "daemon: imports before it serves (blocks Create)",
    "daemon.imports_in_handlers": "daemon: imports inside handlers (first call of each)",
    "stdio.open": "  stdio: open_process_io",
    "mount.all": "  rootfs mount_all",
    "umount.all": "  rootfs unmount_all",
    "delete.interpreter_cpu": "delete command: interpreter start-up (CPU before shim code)",
    "delete.imports": "delete command: imports",
    "delete.runtime": "delete command: `runc delete --force`",
    "delete.response": "delete command: DeleteResponse (imports protobuf)",
}


def duration_label(key: str) -> str:
    kind, _, name = key.partition(".")
    if key in DURATION_LABELS:
        return DURATION_LABELS[key]
    if kind == "call":
        return f"ttrpc {name}: decode + handler + encode"
    if kind == "rpc":
        return f"  {name} handler"
    if kind == "runc":
        return f"    runc {name}"
    return key


def duration_sort_key(key: str) -> tuple[int, str]:
    rank = next((i for i, p in enumerate(DURATION_ORDER) if key.startswith(p)), len(DURATION_ORDER))
    return rank, key


TIMELINE_LABELS = {
    "ctr:launch": "ctr run starts",
    "cd:snap": "containerd: rootfs ready, runs `shim start`",
    "start:exec": "start: Python up, shim code begins",
    "start:fork": "start: forks the daemon (socket bound)",
    "start:exit": "start: exits (address printed)",
    "cd:connect": "containerd: connecting to shim",
    "daemon:forked": "daemon: forked",
    "daemon:serve": "daemon: in serve() (shim.framework.daemon imported)",
    "daemon:accept": "daemon: accepted containerd's connection",
    "daemon:listening": "daemon: serving (Task API imported)",
    "cd:disconnect": "containerd: shim disconnected",
    "delete:exec": "delete: Python up, shim code begins",
    "delete:exit": "delete: exits",
    "daemon:exit": "daemon: exits",
    "cd:rmsnap": "containerd: remove snapshot",
    "ctr:exit": "ctr run exits",
}


def analyse_profile(runs: list[dict], records: list[dict],
                    marks: dict[str, dict[str, float]]) -> dict:
    by_id: dict[str, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    offsets: dict[str, list[float]] = {}
    durations: dict[str, list[float]] = {}
    daemon_pkgs: dict[str, list[float]] = {}

    def add(d: dict[str, list[float]], k: str, v: float) -> None:
        d.setdefault(k, []).append(v)

    for run in runs:
        recs = by_id.get(run["id"], [])
        if not recs:
            continue
        t0 = run["launch"]
        events = {"ctr:launch": t0, "ctr:exit": run["exit"]}
        for k, v in marks.get(run["id"], {}).items():
            events[f"cd:{k}"] = v
        sums: dict[str, float] = {}
        listening = next((r["t"] for r in recs if r["event"] == "listening"), None)
        for r in recs:
            ev, role = r["event"], r["role"]
            if ev in ("exec", "fork", "forked", "exit", "serve", "listening", "accept") or \
                    ev.startswith("rpc"):
                events.setdefault(f"{role}:{ev}", r["t"])
            if ev == "exec":
                m = re.search(r"cpu_ms=([\d.]+)", r["detail"])
                if m:
                    sums[f"{role}.interpreter_cpu"] = float(m[1])
            if r["ms"] is None:
                continue
            if ev == "import":
                key = f"{role}.imports"
                if role == "daemon":
                    before = listening is None or r["t"] <= listening
                    key = "daemon.imports_before_serving" if before else "daemon.imports_in_handlers"
            else:
                key = ev.replace("<", ".", 1)  # rpc<Create -> rpc.Create, runc<create -> ...
            sums[key] = sums.get(key, 0.0) + r["ms"]
        for k, v in sums.items():
            add(durations, k, v)
        for k, v in events.items():
            add(offsets, k, (v - t0) * 1000)
        dumps = [r for r in recs if r["role"] == "daemon" and r["event"] == "imports"]
        if dumps:
            for pkg, ms in json.loads(dumps[-1]["detail"]).items():
                add(daemon_pkgs, pkg, ms)
    n = len(runs)
    timeline = sorted(((median(v), k) for k, v in offsets.items() if len(v) >= n // 2))
    return {
        "runs": n,
        "timeline": timeline,
        "durations": {k: median(v) for k, v in durations.items()},
        "daemon_import_packages": sorted(((median(v), k) for k, v in daemon_pkgs.items()),
                                         reverse=True),
    }


# -- report -------------------------------------------------------------------------------------


def mib(kb: float) -> float:
    return kb / 1024


def per_container_mib(m: dict, key: str) -> float:
    return mib(m[key]) / m["containers"]


def dense_mb(m: dict) -> float:
    """Pss per container in MB (10^6 bytes), the unit of issue 13's target."""
    return m["pss"] * 1024 / 1e6 / m["containers"]


class KsmSwitch:
    """The node's kernel same-page merging, on for a measurement and back as it was."""

    DIR = Path("/sys/kernel/mm/ksm")

    def __init__(self) -> None:
        if not (self.DIR / "run").exists():
            raise BenchError("--ksm: this kernel has no KSM (/sys/kernel/mm/ksm)")
        self.was = ""

    def read(self, name: str) -> int:
        return int((self.DIR / name).read_text())

    def turn_on(self) -> None:
        self.was = (self.DIR / "run").read_text().strip()
        if self.was != "1":
            (self.DIR / "run").write_text("1")

    def restore(self) -> None:
        if self.was and self.was != "1":
            (self.DIR / "run").write_text(self.was)

    def wait_merged(self, timeout: float = 300.0) -> dict:
        """Until pages_sharing moved by under 1% over a whole scan (at least 3 scans after
        now: a page is merged on the scan after the one that saw it unchanged)."""
        t0 = time.monotonic()
        first = self.read("full_scans")
        last_scan, last_sharing, settled = first, self.read("pages_sharing"), False
        while time.monotonic() - t0 < timeout:
            time.sleep(1.0)
            scans, sharing = self.read("full_scans"), self.read("pages_sharing")
            if scans == last_scan:
                continue
            if scans - first >= 3 and abs(sharing - last_sharing) <= max(16, last_sharing // 100):
                settled = True
                break
            last_scan, last_sharing = scans, sharing
        return {"waited_s": time.monotonic() - t0, "full_scans": self.read("full_scans") - first,
                "pages_sharing": self.read("pages_sharing"), "settled": settled,
                "pages_to_scan": self.read("pages_to_scan"), "sleep_ms": self.read("sleep_millisecs")}


def scale_report(res: dict, settle: float) -> list[str]:
    """The table and notes of 2d or 2e (res: runtime -> shim_memory())."""
    out = []
    w = out.append
    rows = []
    for rt in (PYSHIM, RUNC):
        m = res[rt]
        rows.append([SHORT[rt], str(m["containers"]), str(m["daemons"]),
                     str(m["zygotes"]) if rt == PYSHIM else "-",
                     fmt(mib(m["pss"])), fmt(mib(m["private"])), fmt(mib(m["rss"])),
                     fmt(per_container_mib(m, "pss"), 2), fmt(per_container_mib(m, "private"), 2)])
    w(table(["runtime", "containers", "daemons", "zygotes", "Pss", "private", "Rss",
             "Pss/ctr", "private/ctr"], rows))
    p, r = res[PYSHIM], res[RUNC]
    w(f"  per container pyshim/runc-v2: Pss "
      f"{per_container_mib(p, 'pss') / per_container_mib(r, 'pss'):.2f}, private "
      f"{per_container_mib(p, 'private') / per_container_mib(r, 'private'):.2f}"
      + ("  (runc-v2: the figures of 2d)" if r.get("reused") else ""))
    w(f"  pyshim: zygote(s) Pss {mib(p['zygotes_pss']):.1f} MiB, private "
      f"{mib(p['zygotes_private']):.1f} (Rss {mib(p['zygotes_rss']):.1f}); {p['daemons']} "
      f"daemon(s) ({p['from_zygote']} forked by a zygote) Pss {mib(p['daemons_pss']):.1f}, "
      f"private {mib(p['daemons_private']):.1f}")
    for rt in (PYSHIM, RUNC):
        d = res[rt]["median_daemon"]
        w(f"  {SHORT[rt]} median daemon: Pss {mib(d['pss']):.2f}, private {mib(d['private']):.2f} "
          f"(dirty {mib(d['private_dirty']):.2f}), Rss {mib(d['rss']):.2f}, anonymous "
          f"{mib(d['anon']):.2f}; private by mapping: " + ", ".join(
              f"{name} {mib(kb):.2f}"
              for name, kb in sorted(res[rt]["by_mapping"].items(), key=lambda kv: -kv[1])[:5]))
    origin = p.get("origin")
    if origin:
        def top(by: dict[str, int]) -> str:
            return ", ".join(f"{name} {mib(kb):.2f}"
                             for name, kb in sorted(by.items(), key=lambda kv: -kv[1])[:4])

        w(f"  pyshim median daemon's private, by origin (pagemap against its zygote): "
          f"{mib(origin['copied']):.2f} in pages it shared with the zygote and wrote since "
          f"the fork ({top(origin['copied_by_mapping'])}), {mib(origin['new']):.2f} in "
          f"memory mapped since ({top(origin['new_by_mapping'])})")
    k = res.get("ksm")
    if k:
        w(f"  KSM on (ksmd: {k['pages_to_scan']} pages every {k['sleep_ms']} ms): measured "
          f"{k['waited_s']:.0f} s later still, after {k['full_scans']} full scans; "
          f"{mib(k['pages_sharing'] * 4):.1f} MiB merged away node-wide"
          + ("" if k["settled"] else " (not settled: the wait timed out)"))
    w(f"  (measured {settle:g} s after all were RUNNING; Pss shares each page among every "
      "process mapping it, also those outside the sum: libc, another Python's libpython)")
    return out


def report(info: dict, lc: dict, mem: dict, imem: list, sc: dict, prof: dict | None,
           ex: dict | None = None, st: dict | None = None, scale: dict | None = None,
           dense: dict | None = None, pods: dict | None = None,
           churn: dict | None = None) -> str:
    out = []
    w = out.append
    w(f"pyshim vs containerd-shim-runc-v2 on containerd {info['containerd']} "
      f"(runc {info['runc']}, snapshotter {info['snapshotter']}); {info['machine']}")
    w(f"Python bytecode: {info['bytecode']}")
    w("")
    py, rc = lc["runtimes"][PYSHIM], lc["runtimes"][RUNC]
    w(f"1. Lifecycle: `ctr run --rm IMAGE <id> true`, {info['pairs']} pairs after "
      f"{info['warmup']} warm-up pairs (ms, wall time of ctr)")
    w(table(["runtime", "median", "p10", "p90", "min", "max"], [
        [SHORT[rt], fmt(s["median"]), fmt(s["p10"]), fmt(s["p90"]), fmt(s["min"]), fmt(s["max"])]
        for rt, s in ((PYSHIM, py), (RUNC, rc))
    ]))
    w(f"  median of per-pair ratios pyshim/runc-v2: {lc['ratio']:.2f} "
      f"(p10 {lc['ratio_p10']:.2f}, p90 {lc['ratio_p90']:.2f}; target <= {TARGET_RATIO})")
    w("")
    w("   Where the time goes, from containerd's debug log (median ms per run)")
    rows = []
    for key, label, _a, _b in CD_PHASES:
        a, b = py["phases"].get(key), rc["phases"].get(key)
        if a is None and b is None:
            continue
        diff = (a - b) if a is not None and b is not None else None
        rows.append([label, fmt(a), fmt(b), fmt(diff)])
    w(table(["phase", "pyshim", "runc-v2", "extra"], rows))
    w("")
    k = info["idle"]
    w(f"2. Idle memory: one shim per `sleep 3600` container, {k} per runtime "
      "(/proc/<pid>/smaps_rollup, median, MiB)")
    p, r = mem[PYSHIM], mem[RUNC]
    w(table(["runtime", "Pss", "private", "Rss", "anonymous"], [
        [SHORT[rt], fmt(mib(m["pss"]), 2), fmt(mib(m["private"]), 2), fmt(mib(m["rss"]), 2),
         fmt(mib(m["anon"]), 2)] for rt, m in ((PYSHIM, p), (RUNC, r))
    ]))
    w(f"  ratios pyshim/runc-v2: Pss {p['pss'] / r['pss']:.2f}, private "
      f"{p['private'] / r['private']:.2f} (target: pyshim private <= {TARGET_PRIVATE_MIB:g} MiB)")
    for rt in (PYSHIM, RUNC):
        top = sorted(mem[rt]["by_mapping"].items(), key=lambda kv: -kv[1])[:6]
        w(f"  {SHORT[rt]} private by mapping (median shim): "
          + ", ".join(f"{name} {mib(kb):.2f}" for name, kb in top))
    base = imem[0][1]
    w("  Python's share (fresh interpreters of the venv, private MiB / Pss MiB):")
    w(table(["what is imported", "private", "Pss", "+private"], [
        [label, fmt(mib(private_kb(roll)), 2), fmt(mib(roll.get("Pss", 0)), 2),
         fmt(mib(private_kb(roll) - private_kb(base)), 2)] for label, roll in imem
    ], indent="    "))
    if ex:
        w("")
        w(f"2b. Exec: `ctr task exec --exec-id e<i> <cid> true` into one `sleep 3600` container "
          f"per runtime, {info['pairs']} pairs after {info['warmup']} warm-up pairs (ms)")
        w(table(["runtime", "median", "p10", "p90"], [
            [SHORT[rt], fmt(s["median"]), fmt(s["p10"]), fmt(s["p90"])]
            for rt, s in ex["runtimes"].items()
        ]))
        w(f"  median of per-pair ratios pyshim/runc-v2: {ex['ratio']:.2f} "
          f"(p10 {ex['ratio_p10']:.2f}, p90 {ex['ratio_p90']:.2f}; target <= {TARGET_EXEC_RATIO})")
        cc = ex["concurrent"]
        w(f"  {cc['n']} concurrent execs, wall until all finished (median of {cc['rounds']} "
          "rounds, ms): " + ", ".join(f"{SHORT[rt]} {fmt(v)}" for rt, v in cc["runtimes"].items())
          + f"; ratio {cc['ratio']:.2f} (rounds: "
          + ", ".join(f"{x:.2f}" for x in cc["ratios"]) + ")")
    if st:
        w("")
        w(f"2c. Stdio: `ctr run --rm IMAGE <id> sh -c 'head -c {st['mib']}MiB /dev/zero'`, "
          f"ctr's stdout on /dev/null, median of {st['runs']} rounds; net = {st['mib']} MiB / "
          "(wall - wall of the same run writing 0 bytes, per round)")
        w(table(["runtime", "wall ms", "0-byte ms", "net ms", "net MiB/s", "gross MiB/s"], [
            [SHORT[rt], fmt(s["wall_ms"]), fmt(s["base_ms"]), fmt(s["net_ms"]), fmt(s["mib_s"]),
             fmt(s["gross_mib_s"])] for rt, s in st["runtimes"].items()
        ]))
        w(f"  throughput ratio pyshim/runc-v2: net {fmt(st['ratio'], 2)} (gross "
          f"{fmt(st['gross_ratio'], 2)}; target >= {TARGET_STDIO_RATIO})")
    if scale:
        w("")
        w(f"2d. Memory at scale: {scale[PYSHIM]['containers']} `sleep 3600` containers per "
          f"runtime alive at once, one shim each; every shim process summed (pyshim: daemons + "
          "zygote), MiB")
        out.extend(scale_report(scale, info["settle"]))
    if dense:
        p = dense[PYSHIM]
        w("")
        w(f"2e. Dense mode: {dense['containers']} pyshim containers with ContainersPerDaemon = "
          f"{dense['per_daemon']}, {dense[RUNC]['containers']} through runc-v2; every shim "
          "process summed, MiB")
        out.extend(scale_report(dense, info["settle"]))
        w(f"  pyshim daemons: {p['daemons']} (expected {dense['expected_daemons']}), containers "
          "per daemon: " + ", ".join(map(str, p["per_daemon"])))
        mb = dense_mb(p)
        w(f"  target <= {TARGET_DENSE_PSS_MB:g} MB (10^6 bytes) Pss per container: pyshim "
          f"{mb:.2f} MB ({per_container_mib(p, 'pss'):.2f} MiB): "
          + ("met" if mb <= TARGET_DENSE_PSS_MB else "NOT met"))
    if pods:
        w("")
        w(f"2f. Pods through the CRI: RunPodSandbox, {pods['containers']} busybox "
          f"`{' '.join(POD_COMMAND)}` container(s) created, started, RUNNING, stopped and "
          f"removed, StopPodSandbox, RemovePodSandbox; {pods['pods']} pairs after "
          f"{info['warmup']} warm-up pairs (ms, wall of the lifecycle)")
        rts = pods["runtimes"]
        w(table(["runtime", "median", "p10", "p90"], [
            [SHORT[rt], fmt(s["median"]), fmt(s["p10"]), fmt(s["p90"])] for rt, s in rts.items()
        ]))
        w(f"  median of per-pair ratios pyshim/runc-v2: {pods['ratio']:.2f} "
          f"(p10 {pods['ratio_p10']:.2f}, p90 {pods['ratio_p90']:.2f})")
        w(table(["part (median ms)", "pyshim", "runc-v2", "extra"], [
            [label, fmt(rts[PYSHIM]["phases"][key]), fmt(rts[RUNC]["phases"][key]),
             fmt(rts[PYSHIM]["phases"][key] - rts[RUNC]["phases"][key])]
            for key, label in POD_PHASES
        ]))
    if churn:
        w("")
        w(f"2g. Churn: {churn['n']} `ctr run --rm IMAGE <id> true` per runtime, "
          f"{churn['concurrency']} at a time, `ctr task exec <cid> true` in a loop into a "
          f"container of the same runtime meanwhile; median of {churn['rounds']} round(s)")
        rts = churn["runtimes"]
        w(table(["runtime", "wall s", "runs/s", "execs", "exec ms", "exec p90 ms"], [
            [SHORT[rt], fmt(s["wall"], 2), fmt(s["per_s"]), fmt(s["execs"], 0),
             fmt(s["exec_ms"]), fmt(s["exec_p90_ms"])] for rt, s in rts.items()
        ]))
        w(f"  wall ratio pyshim/runc-v2: {churn['ratio']:.2f} (rounds: "
          + ", ".join(f"{x:.2f}" for x in churn["ratios"]) + f"; target <= {TARGET_CHURN_RATIO:g})")
    w("")
    w(f"3. Start cost (median of {info['repeat']} runs, ms)")
    w(table(["command", "wall"], [
        ["containerd-shim-pyshim-v2 -v", fmt(sc["shim_v"])],
        ["python -c pass (venv interpreter, site)", fmt(sc["python"])],
        ["python -S -c pass (no site)", fmt(sc["python_S"])],
        [f"python -c 'import {START_IMPORTS}'", fmt(sc["python_start_imports"])],
        ["containerd-shim-pyshim-v2 ... delete (task already gone)", fmt(sc["delete_cmd"])],
    ]))
    w("  interpreter teardown at exit (wall of `python -c 'import X'` minus the same ending in "
      "os._exit(0)): " + ", ".join(f"{k} imports {v[1]:.1f} of {v[0]:.1f} ms"
                                    for k, v in sc["teardown"].items()))
    w("  interpreter start-up imports over 0.5 ms (-X importtime, cumulative ms): "
      + ", ".join(f"{name} {ms:.1f}" for ms, name in sc["site_entries"]))
    for key, what in (("start", START_IMPORTS), ("daemon", DAEMON_IMPORTS),
                      ("delete", DELETE_IMPORTS)):
        it = sc[key]
        w(f"  -X importtime `import {what}`: {it['total']:.1f} ms "
          f"(after {it['startup_imports']:.1f} ms of start-up imports)")
        top = 12 if key == "daemon" else 5
        w("    by package (self ms): " + ", ".join(f"{k} {v:.1f}" for v, k in it["packages"][:top]))
        if key == "daemon":
            w("    top modules (self ms): "
              + ", ".join(f"{k} {v:.1f}" for v, k in it["modules"][:top]))
    if prof:
        w("")
        w(f"4. Profile: {prof['runs']} traced pyshim runs (hack/bench_trace.py; the tracing "
          "adds a little), median ms")
        rows, prev = [], None
        for off, key in prof["timeline"]:
            label = TIMELINE_LABELS.get(key)
            if label is None:
                role, ev = key.split(":", 1)
                label = f"{role}: {ev.replace('rpc>', '').replace('rpc<', '')} " + \
                    ("in" if ev.startswith("rpc>") else "out")
            rows.append([label, fmt(off), fmt(off - prev) if prev is not None else ""])
            prev = off
        w(table(["event (since ctr run starts)", "at", "+"], rows))
        w("  durations (median ms per run, summed over calls):")
        rows = [[duration_label(k), fmt(v)]
                for k, v in sorted(prof["durations"].items(), key=lambda kv: duration_sort_key(kv[0]))]
        w(table(["what", "ms"], rows, indent="    "))
        if prof["daemon_import_packages"]:
            w("  daemon's imports by package (self ms, whole life): " + ", ".join(
                f"{k} {v:.1f}" for v, k in prof["daemon_import_packages"][:12]))
    return "\n".join(out)


# -- main ---------------------------------------------------------------------------------------


def setup_bytecode(where: Path, inherit: bool) -> str:
    """Give every Python process the bench starts (containerd's shims inherit its environment)
    a bytecode cache of ours under `where`, primed with everything the shim imports: an
    installed pyshim has its .pyc files (pip compiles them), a checkout run with
    PYTHONDONTWRITEBYTECODE=1 recompiles shim/ at every start. Returns what was chosen."""
    dont = os.environ.get("PYTHONDONTWRITEBYTECODE")
    if inherit:
        cached = (REPO / "shim" / "__pycache__").is_dir()
        return (f"inherited (PYTHONDONTWRITEBYTECODE={dont or 'unset'}, "
                f"PYTHONPYCACHEPREFIX={os.environ.get('PYTHONPYCACHEPREFIX', 'unset')}, "
                f"shim/__pycache__ {'present' if cached else 'absent'})")
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(where / "pycache")
    python = str(REPO / ".venv" / "bin" / "python")
    everything = ", ".join((START_IMPORTS, DAEMON_IMPORTS, DELETE_IMPORTS))
    subprocess.run([python, "-c", f"import {everything}"], check=True, cwd=REPO)
    return "private bytecode cache, primed (as an installed pyshim)"


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="hack/bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--containerd", default="2.1", choices=sorted(e2e.TARGETS),
                    help="containerd version to run (default 2.1)")
    ap.add_argument("--pairs", type=int, default=30, help="measured lifecycle pairs (30)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up pairs, not measured (3)")
    ap.add_argument("--idle", type=int, default=5, help="idle containers per runtime (5)")
    ap.add_argument("--no-exec", action="store_true",
                    help="skip the exec latency and concurrent exec measurements")
    ap.add_argument("--exec-concurrent", type=int, default=50, metavar="N",
                    help="execs started at once per round (50)")
    ap.add_argument("--exec-rounds", type=int, default=3,
                    help="rounds of concurrent execs, runtime order alternating (3)")
    ap.add_argument("--no-stdio", action="store_true", help="skip the stdio throughput runs")
    ap.add_argument("--stdio-mib", type=int, default=20,
                    help="MiB the container writes to its stdout (20)")
    ap.add_argument("--stdio-runs", type=int, default=5,
                    help="measured stdio runs per runtime, after one warm-up (5)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds the idle shims get before they are measured (2)")
    ap.add_argument("--scale", type=int, default=20, metavar="K",
                    help="memory at scale: containers per runtime alive at once, 0 to skip (20)")
    ap.add_argument("--ksm", action="store_true",
                    help="memory at scale and dense mode with the node's KSM on (ksmd at the "
                         "kernel's scan rate), measured once it has merged; restored after")
    ap.add_argument("--dense", type=int, default=0, metavar="N",
                    help="dense mode: ContainersPerDaemon for pyshim, 0 to skip (0)")
    ap.add_argument("--dense-containers", type=int, default=100, metavar="M",
                    help="dense mode: containers per runtime alive at once (100)")
    ap.add_argument("--pods", type=int, default=0, metavar="N",
                    help="pod lifecycles through the CRI: measured pairs, 0 to skip (0)")
    ap.add_argument("--pod-containers", type=int, default=2, metavar="K",
                    help="containers per pod besides the sandbox (2)")
    ap.add_argument("--churn", type=int, default=0, metavar="N",
                    help="churn: `ctr run --rm` containers per runtime and round, 0 to skip (0)")
    ap.add_argument("--churn-concurrency", type=int, default=16, metavar="C",
                    help="churn: runs at once (16)")
    ap.add_argument("--churn-rounds", type=int, default=1, metavar="R",
                    help="churn: rounds, the runtime order alternating (1)")
    ap.add_argument("--repeat", type=int, default=10,
                    help="runs of each start-cost command (10)")
    ap.add_argument("--profile", type=int, default=10, metavar="N",
                    help="traced pyshim runs for the profile, 0 to skip (10)")
    ap.add_argument("--inherit-pyc-env", action="store_true",
                    help="run the shims with this environment's bytecode settings (e.g. "
                         "PYTHONDONTWRITEBYTECODE=1: shim/ is compiled on every start) instead "
                         "of a private, primed bytecode cache like an installed pyshim has")
    ap.add_argument("--save-log", metavar="FILE",
                    help="copy containerd's debug log (with the shims' logs) to FILE at the end")
    ap.add_argument("--handler", default="", metavar="MODULE:CLASS",
                    help="run pyshim's containers with this shim.handler.Handler (e.g. the no-op "
                         "base class shim.handler:Handler), to measure what a handler costs")
    ap.add_argument("--json-only", action="store_true",
                    help="print only the JSON line (no table, no progress)")
    a = ap.parse_args(argv)
    if a.pairs < 1 or a.idle < 1 or a.repeat < 1 or a.warmup < 0 or a.profile < 0:
        ap.error("--pairs, --idle and --repeat must be >= 1; --warmup, --profile >= 0")
    if a.exec_concurrent < 1 or a.exec_rounds < 1 or a.stdio_mib < 1 or a.stdio_runs < 1:
        ap.error("--exec-concurrent, --exec-rounds, --stdio-mib and --stdio-runs must be >= 1")
    if a.scale < 0 or a.dense < 0 or a.dense_containers < 1:
        ap.error("--scale and --dense must be >= 0, --dense-containers >= 1")
    if a.pods < 0 or a.pod_containers < 0 or a.churn < 0:
        ap.error("--pods, --pod-containers and --churn must be >= 0")
    if a.churn_concurrency < 1 or a.churn_rounds < 1:
        ap.error("--churn-concurrency and --churn-rounds must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    global _quiet
    args = parse_args(argv)
    _quiet = args.json_only
    if os.geteuid() != 0:
        print("bench: must run as root (runs containerd and containers)", file=sys.stderr)
        return 2
    # Ctrl-C even when started from a shell that ignores SIGINT for background jobs
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)

    base = Path(os.environ.get("PYSHIM_BENCH_TMP", tempfile.gettempdir())) / "pyshim-bench"
    c: e2e.PrivateContainerd | None = None
    #: the pods step's containerd, while it runs
    cri: e2e.PrivateContainerd | None = None
    leftovers: list[str] = []
    rc = 0
    try:
        image = e2e.build_busybox_image(e2e.image_cache_dir())
        c = e2e.PrivateContainerd(args.containerd, base_dir=base)
        bytecode = setup_bytecode(c.dir, args.inherit_pyc_env)
        progress(f"starting containerd {args.containerd} in {c.dir}")
        c.start()
        ns = c.new_namespace("bench", image=image)
        bench = Bench(c, ns, args, image=image)
        info = {
            "containerd": c.version, "runc": c.runc_version, "snapshotter": c.snapshotter,
            "pairs": args.pairs, "warmup": args.warmup, "idle": args.idle,
            "repeat": args.repeat, "bytecode": bytecode, "handler": args.handler or None,
            "settle": args.settle,
            "machine": f"{os.cpu_count()} CPUs, Linux {platform.release()}, "
                       f"Python {platform.python_version()}",
        }
        lc = bench.lifecycle()
        mem = bench.idle_memory()
        ex = None if args.no_exec else bench.execs()
        st = None if args.no_stdio else bench.stdio()
        scale = bench.scale_memory() if args.scale else None
        dense = bench.dense_memory(scale) if args.dense else None
        pods = None
        if args.pods:
            cri = cri_containerd(args.containerd, base)
            pods = PodBench(cri, args, image).run()
            progress("pods: cleaning up (pods, shims, containerd, temp dirs)")
            leftovers += cri.close()
            cri = None
        churn = bench.churn() if args.churn else None
        imem = bench.import_memory()
        sc = bench.start_cost()
        prof = bench.profile() if args.profile else None
        if not args.json_only:
            print(report(info, lc, mem, imem, sc, prof, ex, st, scale, dense, pods, churn))
            print()
        print(json.dumps(summary(info, lc, mem, sc, prof, ex, st, scale, dense, pods, churn)),
              flush=True)
    except KeyboardInterrupt:
        print("\nbench: interrupted; cleaning up", file=sys.stderr)
        rc = 130
    except (BenchError, e2e.CtrError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        rc = 1
    finally:
        # a second Ctrl-C must not cut the cleanup short (every step in close() has a timeout)
        for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        if c is not None and args.save_log:
            try:
                shutil.copyfile(c.log_path, args.save_log)
            except OSError as exc:
                print(f"bench: cannot save the log: {exc}", file=sys.stderr)
        if cri is not None:
            progress("pods: cleaning up (pods, shims, containerd, temp dirs)")
            leftovers += cri.close()
        if c is not None:
            progress("cleaning up (containers, shims, containerd, temp dirs)")
            leftovers += c.close()
        if leftovers:
            print("bench: leftovers after cleanup:\n  " + "\n  ".join(leftovers), file=sys.stderr)
            rc = rc or 1
        try:
            base.rmdir()  # only when no other bench is using it
        except OSError:
            pass
    return rc


def summary(info: dict, lc: dict, mem: dict, sc: dict, prof: dict | None,
            ex: dict | None = None, st: dict | None = None, scale: dict | None = None,
            dense: dict | None = None, pods: dict | None = None,
            churn: dict | None = None) -> dict:
    py, rc = lc["runtimes"][PYSHIM], lc["runtimes"][RUNC]
    p, r = mem[PYSHIM], mem[RUNC]
    out = {
        "lifecycle_ratio": r2(lc["ratio"], 3),
        "pyshim_ms": r2(py["median"]),
        "runc_ms": r2(rc["median"]),
        "pyshim_p10_ms": r2(py["p10"]), "pyshim_p90_ms": r2(py["p90"]),
        "runc_p10_ms": r2(rc["p10"]), "runc_p90_ms": r2(rc["p90"]),
        "pss_ratio": r2(p["pss"] / r["pss"], 3),
        "private_ratio": r2(p["private"] / r["private"], 3),
        "pyshim_pss_mib": r2(mib(p["pss"])), "runc_pss_mib": r2(mib(r["pss"])),
        "pyshim_private_mib": r2(mib(p["private"])), "runc_private_mib": r2(mib(r["private"])),
        "shim_v_ms": r2(sc["shim_v"]),
        "delete_cmd_ms": r2(sc["delete_cmd"]),
        "python_startup_ms": r2(sc["python"]),
        "start_import_ms": r2(sc["start"]["total"]),
        "daemon_import_ms": r2(sc["daemon"]["total"]),
        "delete_import_ms": r2(sc["delete"]["total"]),
        "phases_ms": {
            SHORT[rt]: {k: r2(v) for k, v in lc["runtimes"][rt]["phases"].items()}
            for rt in (PYSHIM, RUNC)
        },
        "containerd": info["containerd"], "runc": info["runc"],
        "pairs": info["pairs"], "idle": info["idle"], "bytecode": info["bytecode"], "handler": info["handler"],
        "meets_ratio_target": lc["ratio"] <= TARGET_RATIO,
        "meets_private_target": mib(p["private"]) <= TARGET_PRIVATE_MIB,
    }
    if ex:
        out["exec_ratio"] = r2(ex["ratio"], 3)
        out["exec_pyshim_ms"] = r2(ex["runtimes"][PYSHIM]["median"])
        out["exec_runc_ms"] = r2(ex["runtimes"][RUNC]["median"])
        out["exec50_ratio"] = r2(ex["concurrent"]["ratio"], 3)
        out["exec50_pyshim_ms"] = r2(ex["concurrent"]["runtimes"][PYSHIM])
        out["exec50_runc_ms"] = r2(ex["concurrent"]["runtimes"][RUNC])
        out["meets_exec_target"] = ex["ratio"] <= TARGET_EXEC_RATIO
    if st:
        out["stdio_mib_s_pyshim"] = r2(st["runtimes"][PYSHIM]["mib_s"], 1)
        out["stdio_mib_s_runc"] = r2(st["runtimes"][RUNC]["mib_s"], 1)
        out["stdio_ratio"] = r2(st["ratio"], 3)
        out["stdio_gross_ratio"] = r2(st["gross_ratio"], 3)
        out["meets_stdio_target"] = st["ratio"] >= TARGET_STDIO_RATIO
    for key, res in (("scale", scale), ("dense", dense)):
        if not res:
            continue
        p, r = res[PYSHIM], res[RUNC]
        for what in ("pss", "private"):
            py, rc = per_container_mib(p, what), per_container_mib(r, what)
            out[f"{key}_{what}_per_container_mib"] = {"pyshim": r2(py, 3), "runc": r2(rc, 3)}
            out[f"{key}_{what}_ratio"] = r2(py / rc, 3)
        out[f"{key}_daemons"] = {"pyshim": p["daemons"], "runc": r["daemons"]}
        out[f"{key}_zygotes"] = p["zygotes"]
        out[f"{key}_zygote_pss_mib"] = r2(mib(p["zygotes_pss"]))
    if scale:
        out["scale_containers"] = scale[PYSHIM]["containers"]
    out["ksm"] = bool((scale or {}).get("ksm") or (dense or {}).get("ksm"))
    if dense:
        out["dense_containers"] = dense["containers"]
        out["dense_per_daemon"] = dense["per_daemon"]
        out["dense_pss_per_container_mb"] = r2(dense_mb(dense[PYSHIM]), 3)
        out["meets_dense_target"] = dense_mb(dense[PYSHIM]) <= TARGET_DENSE_PSS_MB
    if pods:
        out["pod_ratio"] = r2(pods["ratio"], 3)
        out["pod_ratio_p10"], out["pod_ratio_p90"] = r2(pods["ratio_p10"], 3), r2(pods["ratio_p90"], 3)
        out["pod_pyshim_ms"] = r2(pods["runtimes"][PYSHIM]["median"])
        out["pod_runc_ms"] = r2(pods["runtimes"][RUNC]["median"])
        out["pods"], out["pod_containers"] = pods["pods"], pods["containers"]
        out["pod_phases_ms"] = {SHORT[rt]: {k: r2(v) for k, v in s["phases"].items()}
                                for rt, s in pods["runtimes"].items()}
    if churn:
        py, rc = churn["runtimes"][PYSHIM], churn["runtimes"][RUNC]
        out["churn_ratio"] = r2(churn["ratio"], 3)
        out["churn_pyshim_s"], out["churn_runc_s"] = r2(py["wall"], 3), r2(rc["wall"], 3)
        out["churn_n"], out["churn_concurrency"] = churn["n"], churn["concurrency"]
        out["churn_rounds"] = churn["rounds"]
        out["churn_execs_pyshim"], out["churn_execs_runc"] = py["execs"], rc["execs"]
        out["churn_exec_pyshim_ms"], out["churn_exec_runc_ms"] = r2(py["exec_ms"]), r2(rc["exec_ms"])
        out["meets_churn_target"] = churn["ratio"] <= TARGET_CHURN_RATIO
    if prof:
        out["profile_ms"] = {k: r2(v) for k, v in prof["durations"].items()}
        out["profile_timeline_ms"] = {k: r2(v) for v, k in prof["timeline"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
