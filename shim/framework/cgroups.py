"""A container's cgroup: its metrics (the Stats RPC) and its OOM notifications.

One interface, two implementations chosen by the host, as containerd's runc shim does
(`containerd/cgroups` v3: cgroup1 / cgroup2):

* `CgroupV1` — hybrid or legacy hosts: one directory per controller, found from
  /proc/<pid>/cgroup and the cgroup mounts in /proc/self/mountinfo. Stats answer
  `io.containerd.cgroups.v1.Metrics`; OOM comes from an eventfd registered on
  memory.oom_control through cgroup.event_control.
* `CgroupV2` — unified-only hosts (/sys/fs/cgroup is a cgroup2 mount): one directory.
  Stats answer `io.containerd.cgroups.v2.Metrics` (with PSI from *.pressure and rdma);
  OOM is a rise of memory.events' `oom_kill` counter, watched with inotify.  Tested for
  real in a cgroup2-only VM (tests/v2, run by tests/e2e/test_cgroupv2_vm.py).

Files are read defensively, like Go's `Stat(IgnoreNotExist)`: a missing file or controller
leaves its fields at zero. Numbers follow containerd/cgroups: in v1, "max" (pids.max) is 0;
in v2, "max" is 2**64-1 (math.MaxUint64).

The parsing functions are pure (text in, values out) and unit-tested with sample files.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

log = logging.getLogger("shim.framework.cgroups")

CGROUP_ROOT = "/sys/fs/cgroup"
MAX_UINT64 = 2**64 - 1
MAX_UINT32 = 2**32 - 1
V1_METRICS_TYPE = "io.containerd.cgroups.v1.Metrics"
V2_METRICS_TYPE = "io.containerd.cgroups.v2.Metrics"
#: cpuacct.stat counts USER_HZ ticks; Go's cgroups hardcodes 100 as we do.
CLOCK_TICKS = 100
NANOSECONDS_PER_TICK = 1_000_000_000 // CLOCK_TICKS
#: A v1 memory.limit_in_bytes above this is "no limit": the kernel shows that as LONG_MAX
#: rounded down to its page size, and no machine has 4 EiB to limit anything to.
V1_NO_MEMORY_LIMIT = 2**62


# -- pure parsing --------------------------------------------------------------------------
def parse_uint(text: str, max_value: int = 0) -> int:
    """One number from a cgroup file; "max" is `max_value`; garbage or negatives are 0."""
    text = text.strip()
    if text == "max":
        return max_value
    try:
        value = int(text)
    except ValueError:
        return 0
    return value if 0 <= value <= MAX_UINT64 else 0


def parse_keyed(text: str) -> dict[str, int]:
    """"key value" lines (memory.stat, cpu.stat, memory.oom_control, memory.events ...)."""
    values = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            values[parts[0]] = parse_uint(parts[1])
    return values


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup: {controller: path}; the unified entry ("0::/x") is under ""."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
            continue
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def parse_v1_mounts(mountinfo: str) -> dict[str, tuple[str, str]]:
    """The cgroup v1 hierarchies in /proc/self/mountinfo: {controller: (root, mountpoint)}."""
    mounts = {}
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] != "cgroup":
            continue
        root, mountpoint = _unescape(fields[3]), _unescape(fields[4])
        for option in tail[2].split(","):
            # Super options are the controllers, plus rw/ro and key=value flags; name=systemd
            # stays whole, as /proc/<pid>/cgroup names that hierarchy.
            if option in ("rw", "ro") or ("=" in option and not option.startswith("name=")):
                continue
            mounts.setdefault(option, (root, mountpoint))
    return mounts


def _unescape(path: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape")


def v1_directory(mount: tuple[str, str], path: str) -> str:
    """A cgroup's directory under a v1 mount whose root may be a sub-cgroup (cgroup ns, bind)."""
    root, mountpoint = mount
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root):]
    return os.path.join(mountpoint, path.lstrip("/"))


def parse_blkio(text: str, device_name: Callable[[int, int], str] = lambda major, minor: "") -> list:
    """A blkio.* file ("<major>:<minor> <op> <value>" or "<major>:<minor> <value>") as
    BlkIoEntry list; the "Total" line is left out as Go does."""
    from shim.api.io.containerd.cgroups.v1 import BlkIoEntry

    entries = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or ":" not in parts[0]:
            continue
        major_s, _, minor_s = parts[0].partition(":")
        try:
            major, minor = int(major_s), int(minor_s)
        except ValueError:
            continue
        op = parts[1] if len(parts) == 3 else ""
        value = parse_uint(parts[-1])
        entries.append(BlkIoEntry(op=op, device=device_name(major, minor), major=major, minor=minor, value=value))
    return entries


def parse_io_stat(text: str) -> list:
    """cgroup v2 io.stat ("8:0 rbytes=1 wbytes=2 rios=3 wios=4 ...") as IoEntry list."""
    from shim.api.io.containerd.cgroups.v2 import IoEntry

    entries = []
    for line in text.splitlines():
        parts = line.split()
        if not parts or ":" not in parts[0]:
            continue
        major_s, _, minor_s = parts[0].partition(":")
        try:
            entry = IoEntry(major=int(major_s), minor=int(minor_s))
        except ValueError:
            continue
        for item in parts[1:]:
            key, _, value = item.partition("=")
            if key in ("rbytes", "wbytes", "rios", "wios"):
                setattr(entry, key, parse_uint(value))
        entries.append(entry)
    return entries


def parse_psi(text: str):
    """A *.pressure file ("some avg10=0.00 avg60=0.00 avg300=0.00 total=0" and a "full" line)
    as PSIStats.  (A kernel without PSI has no such files: the Metrics then carry no psi.)"""
    from shim.api.io.containerd.cgroups.v2 import PsiData, PsiStats

    psi = PsiStats()
    for line in text.splitlines():
        kind, *items = line.split() or [""]
        if kind not in ("some", "full"):
            continue
        data = PsiData()
        for item in items:
            key, _, value = item.partition("=")
            try:
                if key in ("avg10", "avg60", "avg300"):
                    setattr(data, key, float(value))
                elif key == "total":
                    data.total = parse_uint(value)
            except ValueError:
                pass
        setattr(psi, kind, data)
    return psi


def parse_rdma(text: str) -> list:
    """rdma.current / rdma.max ("mlx4_0 hca_handle=2 hca_object=2000") as RdmaEntry list;
    "max" is math.MaxUint32, as Go reads it."""
    from shim.api.io.containerd.cgroups.v2 import RdmaEntry

    entries = []
    for line in text.splitlines():
        device, *items = line.split() or [""]
        if not device:
            continue
        entry = RdmaEntry(device=device)
        for item in items:
            key, _, value = item.partition("=")
            number = parse_uint(value, MAX_UINT32) & MAX_UINT32
            if key == "hca_handle":
                entry.hca_handles = number
            elif key == "hca_object":
                entry.hca_objects = number
        entries.append(entry)
    return entries


def parse_percpu(text: str) -> list[int]:
    return [parse_uint(v) for v in text.split()]


#: memory.stat key -> v1 MemoryStat field, where they differ (others are equal).
_V1_MEMORY_RENAMES = {
    "pgpgin": "pg_pg_in", "pgpgout": "pg_pg_out", "pgfault": "pg_fault", "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
    "total_pgpgin": "total_pg_pg_in", "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault", "total_pgmajfault": "total_pg_maj_fault",
}


def v1_memory_stat(stat: dict[str, int]):
    from shim.api.io.containerd.cgroups.v1 import MemoryStat

    memory = MemoryStat()
    fields = set(MemoryStat.__dataclass_fields__)
    for key, value in stat.items():
        name = _V1_MEMORY_RENAMES.get(key, key)
        if name in fields and name not in ("usage", "swap", "kernel", "kernel_tcp"):
            setattr(memory, name, value)
    return memory


def v2_memory_stat(stat: dict[str, int]):
    from shim.api.io.containerd.cgroups.v2 import MemoryStat

    memory = MemoryStat()
    fields = set(MemoryStat.__dataclass_fields__)
    for key, value in stat.items():
        if key in fields and key not in ("usage", "usage_limit", "swap_usage", "swap_limit", "max_usage", "swap_max_usage", "psi"):
            setattr(memory, key, value)
    return memory


# -- file access ---------------------------------------------------------------------------
def _read(directory: str | None, name: str) -> str | None:
    if directory is None:
        return None
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read()
    except OSError:  # missing file or controller, or a cgroup removed meanwhile
        return None


def _read_uint(directory: str | None, name: str, max_value: int = 0) -> int:
    text = _read(directory, name)
    return 0 if text is None else parse_uint(text, max_value)


def _read_number(directory: str | None, name: str) -> int | None:
    """One number for `describe()`: None when the file is missing or unreadable, or holds no
    number ("max", garbage), so a reader sees "unknown" or "unlimited", never a false 0."""
    text = _read(directory, name)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _device_name(major: int, minor: int) -> str:
    text = _read(f"/sys/dev/block/{major}:{minor}", "uevent")
    for line in (text or "").splitlines():
        if line.startswith("DEVNAME="):
            return "/dev/" + line[len("DEVNAME="):]
    return ""


def _hugepage_sizes() -> list[str]:
    """"2MB", "1GB" ...: the names cgroup files use, from /sys/kernel/mm/hugepages."""
    try:
        names = os.listdir("/sys/kernel/mm/hugepages")
    except OSError:
        return []
    sizes = []
    for name in sorted(names):  # hugepages-2048kB
        kb = name.removeprefix("hugepages-").removesuffix("kB")
        if not kb.isdigit():
            continue
        size, unit = int(kb), "KB"
        for bigger in ("MB", "GB"):
            if size >= 1024 and size % 1024 == 0:
                size, unit = size // 1024, bigger
        sizes.append(f"{size}{unit}")
    return sizes


def is_unified() -> bool:
    """True when /sys/fs/cgroup is the cgroup2 mount itself (no v1 hierarchies)."""
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


def load_container(pid: int) -> Cgroup | None:
    """The cgroup of a container's init, or None when it is gone, or shares this process's
    cgroup (the runtime put none around it, or a test runtime): reporting the shim's own
    usage as the container's, or the shim's OOM kills as its, would be wrong."""
    cgroup = load(pid)
    if cgroup is not None and cgroup == load(os.getpid()):
        return None
    return cgroup


def load(pid: int) -> Cgroup | None:
    """The cgroup of `pid`, or None when it is gone or has none."""
    text = _read(f"/proc/{pid}", "cgroup")
    if text is None:
        return None
    paths = parse_proc_cgroup(text)
    if is_unified():
        if "" not in paths:
            return None
        return CgroupV2(os.path.join(CGROUP_ROOT, paths[""].lstrip("/")), path=paths[""])
    mountinfo = _read("/proc/self", "mountinfo") or ""
    mounts = parse_v1_mounts(mountinfo)
    directories = {c: v1_directory(mounts[c], p) for c, p in paths.items() if c and c in mounts}
    if not directories:
        return None
    # runc puts a container at the same path in every hierarchy; where they differ (a host
    # process, a hand-made setup), memory's is shown, as its limit and OOMs are what one looks for.
    return CgroupV1(directories, path=paths.get("memory") or paths[next(iter(directories))])


# -- the interface -------------------------------------------------------------------------
class Cgroup:
    """What the service needs of a container's cgroup."""

    metrics_type: str = ""

    def stats(self):
        """The Metrics message (v1 or v2, matching `metrics_type`)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """For `pyshim inspect`, as JSON types: `version`, `path` (in the hierarchy, e.g.
        "/default/web"; None when not known), where its files are, `memory_bytes`,
        `memory_limit_bytes` (None: unlimited), `pids` and `cpu_usage_ns`. A few files are
        read (it runs on the daemon's loop); a value is None when its file is missing or
        unreadable, e.g. a controller that is not mounted or enabled."""
        raise NotImplementedError

    def watch_oom(self, on_oom: Callable[[], None]) -> OomWatch | None:
        """Call `on_oom` on each OOM kill in this cgroup, from the running event loop.
        None when the memory controller is not there to watch."""
        raise NotImplementedError


class OomWatch:
    """An armed OOM notification; `poll()` delivers one that is pending now (so an exit
    can be published after its OOM), `close()` releases the fd.  `poll(killed=True)` is the
    init's exit by SIGKILL: the watch may then conclude an OOM from what is left when the
    cgroup itself is already gone (see EventsFileOomWatch)."""

    def poll(self, killed: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class CgroupV1(Cgroup):
    metrics_type = V1_METRICS_TYPE

    def __init__(self, directories: dict[str, str], path: str | None = None) -> None:
        #: controller -> directory (e.g. "memory" -> /sys/fs/cgroup/memory/ns/id)
        self.directories = directories
        #: as /proc/<pid>/cgroup names it (e.g. "/ns/id"), None when not known
        self.path = path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CgroupV1) and other.directories == self.directories

    def __repr__(self) -> str:
        return f"CgroupV1({self.directories.get('memory') or next(iter(self.directories.values()), '')})"

    def stats(self):
        from shim.api.io.containerd.cgroups import v1

        d = self.directories
        metrics = v1.Metrics()
        if "pids" in d:
            metrics.pids = v1.PidsStat(current=_read_uint(d["pids"], "pids.current"), limit=_read_uint(d["pids"], "pids.max"))
        if "cpuacct" in d or "cpu" in d:
            metrics.cpu = self._cpu()
        if "memory" in d:
            metrics.memory, metrics.memory_oom_control = self._memory()
        if "blkio" in d:
            metrics.blkio = self._blkio()
        if "hugetlb" in d:
            metrics.hugetlb = [
                v1.HugetlbStat(
                    pagesize=size,
                    usage=_read_uint(d["hugetlb"], f"hugetlb.{size}.usage_in_bytes"),
                    max=_read_uint(d["hugetlb"], f"hugetlb.{size}.max_usage_in_bytes"),
                    failcnt=_read_uint(d["hugetlb"], f"hugetlb.{size}.failcnt"),
                )
                for size in _hugepage_sizes()
            ]
        return metrics

    def describe(self) -> dict:
        d = self.directories
        limit = _read_number(d.get("memory"), "memory.limit_in_bytes")
        return {
            "version": 1,
            "path": self.path,
            "directories": dict(d),
            "memory_bytes": _read_number(d.get("memory"), "memory.usage_in_bytes"),
            "memory_limit_bytes": None if limit is None or limit > V1_NO_MEMORY_LIMIT else limit,
            "pids": _read_number(d.get("pids"), "pids.current"),
            "cpu_usage_ns": _read_number(d.get("cpuacct"), "cpuacct.usage"),
        }

    def _cpu(self):
        from shim.api.io.containerd.cgroups import v1

        acct = self.directories.get("cpuacct")
        ticks = parse_keyed(_read(acct, "cpuacct.stat") or "")
        usage = v1.CpuUsage(
            total=_read_uint(acct, "cpuacct.usage"),
            per_cpu=parse_percpu(_read(acct, "cpuacct.usage_percpu") or ""),
            user=ticks.get("user", 0) * NANOSECONDS_PER_TICK,
            kernel=ticks.get("system", 0) * NANOSECONDS_PER_TICK,
        )
        stat = parse_keyed(_read(self.directories.get("cpu"), "cpu.stat") or "")
        throttling = v1.Throttle(
            periods=stat.get("nr_periods", 0),
            throttled_periods=stat.get("nr_throttled", 0),
            throttled_time=stat.get("throttled_time", 0),
        )
        return v1.CpuStat(usage=usage, throttling=throttling)

    def _memory(self):
        from shim.api.io.containerd.cgroups import v1

        d = self.directories["memory"]
        memory = v1_memory_stat(parse_keyed(_read(d, "memory.stat") or ""))
        for field, module in (("usage", ""), ("swap", "memsw."), ("kernel", "kmem."), ("kernel_tcp", "kmem.tcp.")):
            setattr(memory, field, v1.MemoryEntry(
                usage=_read_uint(d, f"memory.{module}usage_in_bytes"),
                max=_read_uint(d, f"memory.{module}max_usage_in_bytes"),
                failcnt=_read_uint(d, f"memory.{module}failcnt"),
                limit=_read_uint(d, f"memory.{module}limit_in_bytes"),
            ))
        oom = parse_keyed(_read(d, "memory.oom_control") or "")
        oom_control = v1.MemoryOomControl(
            oom_kill_disable=oom.get("oom_kill_disable", 0), under_oom=oom.get("under_oom", 0), oom_kill=oom.get("oom_kill", 0)
        )
        return memory, oom_control

    def _blkio(self):
        from shim.api.io.containerd.cgroups import v1

        d = self.directories["blkio"]
        # As Go: the CFQ files when the kernel has them, else the throttle policy's.
        if os.path.exists(os.path.join(d, "blkio.io_serviced_recursive")):
            files = {
                "io_service_bytes_recursive": "blkio.io_service_bytes_recursive",
                "io_serviced_recursive": "blkio.io_serviced_recursive",
                "io_queued_recursive": "blkio.io_queued_recursive",
                "io_service_time_recursive": "blkio.io_service_time_recursive",
                "io_wait_time_recursive": "blkio.io_wait_time_recursive",
                "io_merged_recursive": "blkio.io_merged_recursive",
                "io_time_recursive": "blkio.time_recursive",
                "sectors_recursive": "blkio.sectors_recursive",
            }
        else:
            files = {
                "io_service_bytes_recursive": "blkio.throttle.io_service_bytes_recursive",
                "io_serviced_recursive": "blkio.throttle.io_serviced_recursive",
            }
        blkio = v1.BlkIoStat()
        for field, name in files.items():
            setattr(blkio, field, parse_blkio(_read(d, name) or "", _device_name))
        return blkio

    def watch_oom(self, on_oom: Callable[[], None]) -> OomWatch | None:
        memory = self.directories.get("memory")
        if memory is None:
            return None
        return EventfdOomWatch(memory, on_oom)


class EventfdOomWatch(OomWatch):
    """cgroup v1: an eventfd the kernel signals on OOM in the memory cgroup (and on its
    removal), read from the event loop."""

    def __init__(self, directory: str, on_oom: Callable[[], None]) -> None:
        import asyncio

        self.directory = directory
        self._on_oom = on_oom
        self._loop = asyncio.get_running_loop()
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            control = os.open(os.path.join(directory, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(os.path.join(directory, "cgroup.event_control"), "w") as f:
                    f.write(f"{self._fd} {control}")
            finally:
                os.close(control)  # the kernel holds its own reference
        except BaseException:
            os.close(self._fd)
            raise
        self._loop.add_reader(self._fd, self.poll)

    def poll(self, killed: bool = False) -> None:
        if self._fd < 0:
            return
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            return
        if not os.path.isdir(self.directory):
            self.close()  # the kernel also signals when the cgroup is removed
            return
        self._on_oom()

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


class CgroupV2(Cgroup):
    metrics_type = V2_METRICS_TYPE

    def __init__(self, directory: str, path: str | None = None) -> None:
        self.directory = directory
        #: as /proc/<pid>/cgroup names it (e.g. "/default/web"), None when not known
        self.path = path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CgroupV2) and other.directory == self.directory

    def __repr__(self) -> str:
        return f"CgroupV2({self.directory})"

    def stats(self):
        from shim.api.io.containerd.cgroups import v2

        d = self.directory
        metrics = v2.Metrics(
            pids=v2.PidsStat(current=_read_uint(d, "pids.current"), limit=_read_uint(d, "pids.max", MAX_UINT64)),
        )
        cpu = parse_keyed(_read(d, "cpu.stat") or "")
        metrics.cpu = v2.CpuStat(**{k: cpu.get(k, 0) for k in (
            "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec",
            "nr_bursts", "burst_usec")}, psi=self._psi("cpu.pressure"))
        memory = v2_memory_stat(parse_keyed(_read(d, "memory.stat") or ""))
        memory.usage = _read_uint(d, "memory.current")
        memory.usage_limit = _read_uint(d, "memory.max", MAX_UINT64)
        memory.max_usage = _read_uint(d, "memory.peak")
        memory.swap_usage = _read_uint(d, "memory.swap.current")
        memory.swap_limit = _read_uint(d, "memory.swap.max", MAX_UINT64)
        memory.swap_max_usage = _read_uint(d, "memory.swap.peak")
        memory.psi = self._psi("memory.pressure")
        metrics.memory = memory
        events = parse_keyed(_read(d, "memory.events") or "")
        metrics.memory_events = v2.MemoryEvents(
            **{k: events.get(k, 0) for k in ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")})
        metrics.io = v2.IoStat(usage=parse_io_stat(_read(d, "io.stat") or ""), psi=self._psi("io.pressure"))
        metrics.rdma = v2.RdmaStat(current=parse_rdma(_read(d, "rdma.current") or ""),
                                   limit=parse_rdma(_read(d, "rdma.max") or ""))
        metrics.hugetlb = [
            v2.HugeTlbStat(
                pagesize=size,
                current=_read_uint(d, f"hugetlb.{size}.current"),
                max=_read_uint(d, f"hugetlb.{size}.max", MAX_UINT64),
            )
            for size in _hugepage_sizes()
            if os.path.exists(os.path.join(d, f"hugetlb.{size}.current"))
        ]
        return metrics

    def describe(self) -> dict:
        d = self.directory
        cpu_stat = _read(d, "cpu.stat")
        usage_usec = None if cpu_stat is None else parse_keyed(cpu_stat).get("usage_usec")
        return {
            "version": 2,
            "path": self.path,
            "directory": d,
            "memory_bytes": _read_number(d, "memory.current"),
            "memory_limit_bytes": _read_number(d, "memory.max"),  # "max" reads as None: unlimited
            "pids": _read_number(d, "pids.current"),
            "cpu_usage_ns": None if usage_usec is None else usage_usec * 1000,
        }

    def _psi(self, name: str):
        text = _read(self.directory, name)
        return None if text is None else parse_psi(text)

    def watch_oom(self, on_oom: Callable[[], None]) -> OomWatch | None:
        if not os.path.exists(os.path.join(self.directory, "memory.events")):
            return None
        return EventsFileOomWatch(self.directory, on_oom)


class EventsFileOomWatch(OomWatch):
    """cgroup v2: each rise of `oom_kill` in memory.events is one OOM (containerd 1.6.3+;
    1.6.0-1.6.2 compared `oom`).

    The file is held open and polled for EPOLLPRI, which the kernel raises when it changes
    (cgroup file notification), rather than watched with inotify, whose events the kernel
    delivers later from a work queue.  The difference matters under the systemd cgroup driver:
    when the OOM-killed process was the last in its .scope, systemd removes the scope's cgroup
    right after, and a watcher woken late finds memory.events gone and misses the OOM (runc-v2
    loses that race now and then; containerd's own CRI tests skip OOMKilled under systemd).

    For when even that is too late, the ancestors' memory.events are read beside the cgroup's
    own at every wake: the kernel counts a kill in every ancestor as well, and the pod's slice
    stays.  If the init then dies by SIGKILL with its cgroup gone, and the nearest ancestor
    left (the parent; under crun, whose process cgroup is <scope>/container, the grandparent)
    counted a kill since the last look at ours, that kill was ours.  The one way this
    errs is a sibling's OOM kill in that same short window while our init was SIGKILLed for
    another reason, reported as an OOM of ours too.
    """

    ANCESTORS = 2

    def __init__(self, directory: str, on_oom: Callable[[], None]) -> None:
        import asyncio
        import select

        self.directory = directory
        self._on_oom = on_oom
        self._loop = asyncio.get_running_loop()
        self._fd = os.open(os.path.join(directory, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)
        #: memory.events of the parent and the grandparent (crun puts the process in a
        #: "container" cgroup below the scope, which goes with the scope), nearest first
        self._ancestor_fds: list[int] = []
        ancestor = directory
        for _ in range(self.ANCESTORS):
            ancestor = os.path.dirname(ancestor)
            try:
                self._ancestor_fds.append(os.open(os.path.join(ancestor, "memory.events"), os.O_RDONLY | os.O_CLOEXEC))
            except OSError:  # the root cgroup has no memory.events
                break
        self._ancestors_last = self._ancestor_oom_kills()
        # asyncio waits for readability only, and a cgroup file is always readable: an epoll
        # set of its own, readable when the file has EPOLLPRI, goes into the loop instead
        self._epoll = select.epoll()
        try:
            self._last = self._oom_kills()
            self._epoll.register(self._fd, select.EPOLLPRI | select.EPOLLERR)
        except PermissionError:  # a plain file (unit tests' stand-in): polled at exits only
            self._epoll.close()
            self._epoll = None
        except BaseException:
            self._epoll.close()
            self.close()
            raise
        else:
            self._loop.add_reader(self._epoll.fileno(), self.poll)

    def _oom_kills(self) -> int:
        """The count, read through the open file (reading also clears its EPOLLPRI)."""
        text = os.pread(self._fd, 4096, 0)
        if not text:
            raise OSError(errno.ENODEV, "the cgroup is gone")
        return parse_keyed(text.decode()).get("oom_kill", 0)

    def _ancestor_oom_kills(self) -> list[int | None]:
        """Each ancestor's count, None for one that is gone."""
        counts: list[int | None] = []
        for fd in self._ancestor_fds:
            try:
                text = os.pread(fd, 4096, 0)
            except OSError:
                text = b""
            counts.append(parse_keyed(text.decode()).get("oom_kill", 0) if text else None)
        return counts

    def _ancestor_saw_a_kill(self) -> bool:
        """Whether the nearest ancestor still there counted a kill since our last look."""
        for before, now in zip(self._ancestors_last, self._ancestor_oom_kills()):
            if before is not None and now is not None:
                return now > before
        return False

    def poll(self, killed: bool = False) -> None:
        if self._fd < 0:
            return
        try:
            while True:  # ours and the parent's as of one moment: a kill between the reads repeats them
                count = self._oom_kills()
                ancestors = self._ancestor_oom_kills()
                if self._oom_kills() == count:
                    break
        except OSError:  # the cgroup is gone (ENODEV): nothing more will happen in it
            # The loop wakes us for the removal itself, before the init's exit is handled: stop
            # waking, but keep the parent's count for that exit's poll(killed=True).
            self._stop_waking()
            if killed and self._ancestor_saw_a_kill():
                self._ancestors_last = self._ancestor_oom_kills()
                self._on_oom()
            return
        self._ancestors_last = ancestors
        if count > self._last:
            self._last = count
            self._on_oom()

    def _stop_waking(self) -> None:
        if self._epoll is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    def close(self) -> None:
        if self._fd >= 0:
            self._stop_waking()
            for fd in self._ancestor_fds:
                os.close(fd)
            self._ancestor_fds = []
            os.close(self._fd)
            self._fd = -1
