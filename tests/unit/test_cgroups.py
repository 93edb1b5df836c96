"""shim.framework.cgroups: the pure parsers with sample files, stats of fake cgroup trees, OOM watches."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from shim.framework import cgroups
from shim.api.io.containerd.cgroups import v1, v2

MEMORY_STAT_V1 = """\
cache 1216512
rss 405504
rss_huge 0
shmem 0
mapped_file 0
dirty 0
writeback 0
pgpgin 693
pgpgout 298
pgfault 1221
pgmajfault 0
inactive_anon 405504
active_anon 0
inactive_file 1216512
active_file 0
unevictable 0
hierarchical_memory_limit 33554432
hierarchical_memsw_limit 9223372036854771712
total_cache 1216512
total_rss 405504
total_pgpgin 693
total_pgmajfault 7
total_unevictable 0
"""

MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /outer /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""


def test_parse_uint_max_and_garbage():
    assert cgroups.parse_uint("42\n") == 42
    assert cgroups.parse_uint("max") == 0
    assert cgroups.parse_uint("max", cgroups.MAX_UINT64) == 2**64 - 1
    assert cgroups.parse_uint("-1") == 0
    assert cgroups.parse_uint("") == 0


def test_parse_proc_cgroup_hybrid():
    paths = cgroups.parse_proc_cgroup("12:cpu,cpuacct:/ns/c1\n4:memory:/ns/c1\n1:name=systemd:/x\n0::/\n")
    assert paths == {"cpu": "/ns/c1", "cpuacct": "/ns/c1", "memory": "/ns/c1", "name=systemd": "/x", "": "/"}


def test_parse_v1_mounts_and_directories():
    mounts = cgroups.parse_v1_mounts(MOUNTINFO)
    assert mounts["cpu"] == ("/", "/sys/fs/cgroup/cpu,cpuacct")
    assert mounts["cpuacct"] == ("/", "/sys/fs/cgroup/cpu,cpuacct")
    assert mounts["name=systemd"] == ("/", "/sys/fs/cgroup/systemd")
    assert "" not in mounts and "rw" not in mounts
    assert cgroups.v1_directory(mounts["cpu"], "/ns/c1") == "/sys/fs/cgroup/cpu,cpuacct/ns/c1"
    # a mount whose root is a sub-cgroup (inside a cgroup namespace or a bind mount)
    assert cgroups.v1_directory(mounts["memory"], "/outer/ns/c1") == "/sys/fs/cgroup/memory/ns/c1"


def test_v1_memory_stat_renames():
    m = cgroups.v1_memory_stat(cgroups.parse_keyed(MEMORY_STAT_V1))
    assert (m.cache, m.rss, m.pg_pg_in, m.pg_pg_out, m.pg_fault) == (1216512, 405504, 693, 298, 1221)
    assert m.hierarchical_memory_limit == 33554432
    assert m.hierarchical_swap_limit == 9223372036854771712
    assert (m.total_pg_pg_in, m.total_pg_maj_fault) == (693, 7)


def test_parse_blkio_throttle_file():
    text = "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Total 12288\nTotal 12288\n"
    entries = cgroups.parse_blkio(text, lambda major, minor: f"/dev/d{major}-{minor}")
    assert [(e.op, e.major, e.minor, e.value, e.device) for e in entries][:2] == [
        ("Read", 8, 0, 4096, "/dev/d8-0"), ("Write", 8, 0, 8192, "/dev/d8-0")]
    assert len(entries) == 5  # the last, device-less Total line is not an entry
    assert cgroups.parse_blkio("8:16 77\n")[0].value == 77  # two-column files (blkio.sectors)


def test_parse_io_stat():
    entries = cgroups.parse_io_stat("8:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n259:0 rbytes=5\n")
    assert [(e.major, e.minor, e.rbytes, e.wbytes, e.rios, e.wios) for e in entries] == [
        (8, 0, 10, 20, 1, 2), (259, 0, 5, 0, 0, 0)]


def write_tree(root, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_v1_stats_from_files(tmp_path):
    write_tree(tmp_path, {
        "cpuacct/cpuacct.usage": "3000000\n",
        "cpuacct/cpuacct.usage_percpu": "1000000 2000000 \n",
        "cpuacct/cpuacct.stat": "user 2\nsystem 1\n",
        "cpu/cpu.stat": "nr_periods 5\nnr_throttled 2\nthrottled_time 900\n",
        "memory/memory.stat": MEMORY_STAT_V1,
        "memory/memory.usage_in_bytes": "1622016\n",
        "memory/memory.max_usage_in_bytes": "2000000\n",
        "memory/memory.limit_in_bytes": "33554432\n",
        "memory/memory.failcnt": "3\n",
        "memory/memory.kmem.usage_in_bytes": "4096\n",
        "memory/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        "pids/pids.current": "2\n",
        "pids/pids.max": "max\n",
        "blkio/blkio.throttle.io_service_bytes_recursive": "8:0 Read 4096\nTotal 4096\n",
    })
    cg = cgroups.CgroupV1({c: str(tmp_path / c) for c in ("cpu", "cpuacct", "memory", "pids", "blkio")})
    m = cg.stats()
    assert cg.metrics_type == "io.containerd.cgroups.v1.Metrics"
    assert (m.cpu.usage.total, m.cpu.usage.per_cpu) == (3000000, [1000000, 2000000])
    assert (m.cpu.usage.user, m.cpu.usage.kernel) == (20_000_000, 10_000_000)
    assert (m.cpu.throttling.periods, m.cpu.throttling.throttled_periods, m.cpu.throttling.throttled_time) == (5, 2, 900)
    assert (m.memory.usage.usage, m.memory.usage.max, m.memory.usage.limit, m.memory.usage.failcnt) == (
        1622016, 2000000, 33554432, 3)
    assert m.memory.kernel.usage == 4096 and m.memory.swap.usage == 0  # memsw absent: zeros
    assert m.memory.rss == 405504
    assert m.memory_oom_control.oom_kill == 1
    assert (m.pids.current, m.pids.limit) == (2, 0)  # v1: "max" is 0, as containerd/cgroups
    assert [(e.op, e.value) for e in m.blkio.io_service_bytes_recursive] == [("Read", 4096)]
    assert v1.Metrics.parse(bytes(m)).memory.usage.usage == 1622016


def test_v1_stats_missing_everything(tmp_path):
    m = cgroups.CgroupV1({"memory": str(tmp_path / "gone")}).stats()
    assert m.memory.usage.usage == 0 and m.pids is None


def test_v2_stats_from_files(tmp_path):
    write_tree(tmp_path, {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n",
        "memory.stat": "anon 4096\nfile 8192\npgfault 12\nworkingset_refault_anon 0\n",
        "memory.current": "12288\n",
        "memory.max": "max\n",
        "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        "pids.current": "1\n",
        "pids.max": "100\n",
        "io.stat": "8:0 rbytes=10 wbytes=20 rios=1 wios=2\n",
    })
    cg = cgroups.CgroupV2(str(tmp_path))
    m = cg.stats()
    assert cg.metrics_type == "io.containerd.cgroups.v2.Metrics"
    assert (m.cpu.usage_usec, m.cpu.user_usec, m.cpu.system_usec) == (1500, 1000, 500)
    assert (m.memory.anon, m.memory.file, m.memory.pgfault, m.memory.usage) == (4096, 8192, 12, 12288)
    assert m.memory.usage_limit == 2**64 - 1  # v2: "max" is math.MaxUint64
    assert m.memory.swap_limit == 0  # file absent
    assert (m.memory_events.max, m.memory_events.oom_kill) == (3, 1)
    assert (m.pids.current, m.pids.limit) == (1, 100)
    assert m.io.usage[0].wbytes == 20
    assert v2.Metrics.parse(bytes(m)).memory.usage == 12288


def reads(monkeypatch) -> list[str]:
    """The cgroup files read from now on, by name."""
    names = []
    read = cgroups._read

    def recording(directory, name):
        names.append(name)
        return read(directory, name)

    monkeypatch.setattr(cgroups, "_read", recording)
    return names


def test_v1_describe_reads_only_what_it_shows(tmp_path, monkeypatch):
    write_tree(tmp_path, {
        "cpuacct/cpuacct.usage": "3000000\n",
        "memory/memory.usage_in_bytes": "1622016\n",
        "memory/memory.limit_in_bytes": "33554432\n",
        "memory/memory.stat": MEMORY_STAT_V1,
        "pids/pids.current": "2\n",
    })
    directories = {c: str(tmp_path / c) for c in ("cpu", "cpuacct", "memory", "pids")}
    names = reads(monkeypatch)
    assert cgroups.CgroupV1(directories, path="/default/web").describe() == {
        "version": 1, "path": "/default/web", "directories": directories, "memory_bytes": 1622016,
        "memory_limit_bytes": 33554432, "pids": 2, "cpu_usage_ns": 3000000,
    }
    assert sorted(names) == ["cpuacct.usage", "memory.limit_in_bytes", "memory.usage_in_bytes", "pids.current"]


def test_v1_describe_unlimited_and_missing_controllers(tmp_path):
    # The kernel's "no limit" is LONG_MAX rounded down to a page (4 KiB and 64 KiB pages).
    for unlimited in ("9223372036854771712\n", "9223372036854710272\n"):
        write_tree(tmp_path, {"memory/memory.limit_in_bytes": unlimited})
        described = cgroups.CgroupV1({"memory": str(tmp_path / "memory")}).describe()
        assert described["memory_limit_bytes"] is None
    described = cgroups.CgroupV1({"memory": str(tmp_path / "gone")}).describe()
    assert described == {"version": 1, "path": None, "directories": {"memory": str(tmp_path / "gone")},
                         "memory_bytes": None, "memory_limit_bytes": None, "pids": None, "cpu_usage_ns": None}


def test_v2_describe_reads_only_what_it_shows(tmp_path, monkeypatch):
    write_tree(tmp_path, {
        "cpu.stat": "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        "memory.current": "12288\n",
        "memory.max": "1048576\n",
        "memory.stat": "anon 4096\n",
        "pids.current": "1\n",
    })
    names = reads(monkeypatch)
    assert cgroups.CgroupV2(str(tmp_path), path="/default/web").describe() == {
        "version": 2, "path": "/default/web", "directory": str(tmp_path), "memory_bytes": 12288,
        "memory_limit_bytes": 1048576, "pids": 1, "cpu_usage_ns": 1_500_000,
    }
    assert sorted(names) == ["cpu.stat", "memory.current", "memory.max", "pids.current"]


def test_v2_describe_unlimited_and_missing_files(tmp_path):
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "cpu.stat").write_text("nr_periods 0\n")  # no usage_usec: unknown, not 0
    assert cgroups.CgroupV2(str(tmp_path)).describe() == {
        "version": 2, "path": None, "directory": str(tmp_path), "memory_bytes": None,
        "memory_limit_bytes": None, "pids": None, "cpu_usage_ns": None,
    }


def test_load_knows_the_cgroup_path():
    cgroup = cgroups.load(os.getpid())
    with open("/proc/self/cgroup") as f:
        paths = cgroups.parse_proc_cgroup(f.read())
    assert cgroup.path == (paths[""] if isinstance(cgroup, cgroups.CgroupV2) else paths.get("memory", cgroup.path))
    assert cgroup.path in paths.values()
    assert cgroup.describe()["path"] == cgroup.path


def test_parse_psi():
    psi = cgroups.parse_psi("some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n"
                            "full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n")
    assert (psi.some.avg10, psi.some.avg60, psi.some.total) == (1.5, 0.25, 12345)
    assert psi.full.total == 7
    assert cgroups.parse_psi("some avg10=x total=3\nbogus\n\n").some.total == 3  # garbage is 0
    assert cgroups.parse_psi("").some is None


def test_parse_rdma():
    entries = cgroups.parse_rdma("mlx4_0 hca_handle=2 hca_object=2000\nocrdma1 hca_handle=max hca_object=max\n\n")
    assert [(e.device, e.hca_handles, e.hca_objects) for e in entries] == [
        ("mlx4_0", 2, 2000), ("ocrdma1", 2**32 - 1, 2**32 - 1)]


def test_v2_stats_pressure_bursts_group_kills_and_rdma(tmp_path):
    pressure = "some avg10=0.00 avg60=0.00 avg300=0.00 total=11\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=5\n"
    write_tree(tmp_path, {
        "cpu.stat": "usage_usec 1\nnr_bursts 4\nburst_usec 900\n",
        "cpu.pressure": pressure,
        "memory.pressure": pressure,
        "io.pressure": pressure,
        "memory.events": "low 0\nhigh 0\nmax 0\noom 2\noom_kill 2\noom_group_kill 1\n",
        "rdma.current": "mlx4_0 hca_handle=1 hca_object=3\n",
        "rdma.max": "mlx4_0 hca_handle=max hca_object=10\n",
    })
    m = cgroups.CgroupV2(str(tmp_path)).stats()
    assert (m.cpu.nr_bursts, m.cpu.burst_usec) == (4, 900)
    assert (m.cpu.psi.some.total, m.memory.psi.full.total, m.io.psi.some.total) == (11, 5, 11)
    assert m.memory_events.oom_group_kill == 1
    assert (m.rdma.current[0].hca_objects, m.rdma.limit[0].hca_handles) == (3, 2**32 - 1)
    assert v2.Metrics.parse(bytes(m)).cpu.psi.some.total == 11


def test_v2_stats_without_pressure_files_has_no_psi(tmp_path):
    m = cgroups.CgroupV2(str(tmp_path)).stats()
    assert m.cpu.psi is None and m.memory.psi is None and m.io.psi is None


def test_load_gone_process():
    assert cgroups.load(2**22 + 12345) is None


async def test_v2_oom_watch_counts_oom_kill_rises(tmp_path):
    events = tmp_path / "memory.events"
    events.write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 2\n")
    seen = []
    watch = cgroups.CgroupV2(str(tmp_path)).watch_oom(lambda: seen.append(1))
    try:
        events.write_text("low 0\nhigh 0\nmax 1\noom 0\noom_kill 2\n")  # no new kill
        await asyncio.sleep(0.05)
        assert seen == []
        events.write_text("low 0\nhigh 0\nmax 1\noom 1\noom_kill 3\n")
        watch.poll()  # drained synchronously (what the exit path does) ...
        assert seen == [1]
        await asyncio.sleep(0.05)
        assert seen == [1]  # ... and not reported twice by the loop
    finally:
        watch.close()
        watch.close()


async def test_v1_oom_watch_registration_failure_leaks_no_fd(tmp_path):
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError):
        cgroups.EventfdOomWatch(str(tmp_path), lambda: None)  # no memory.oom_control here
    assert len(os.listdir("/proc/self/fd")) == before


def eventfds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass
    return count


@pytest.fixture
def memory_cgroup():
    """A fresh cgroup v1 memory cgroup with a 16 MiB limit (root, v1 memory controller only)."""
    mounts = cgroups.parse_v1_mounts(open("/proc/self/mountinfo").read())
    if os.geteuid() != 0 or "memory" not in mounts:
        pytest.skip("needs root and a cgroup v1 memory controller")
    directory = os.path.join(mounts["memory"][1], f"pyshim-unit-{os.getpid()}")
    os.mkdir(directory)
    with open(os.path.join(directory, "memory.limit_in_bytes"), "w") as f:
        f.write(str(16 << 20))
    yield directory
    for _ in range(50):  # the killed process may take a moment to leave it
        try:
            os.rmdir(directory)
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.1)


async def test_v1_oom_watch_sees_a_real_oom_kill_and_closes(memory_cgroup):
    before = eventfds()
    seen = []
    watch = cgroups.CgroupV1({"memory": memory_cgroup}).watch_oom(lambda: seen.append(1))
    assert eventfds() == before + 1
    try:
        hog = await asyncio.create_subprocess_exec(
            "sh", "-c", f'echo $$ > {memory_cgroup}/cgroup.procs && exec python3 -c "x = b\'a\' * (64 << 20)"')
        assert await hog.wait() == -9
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert seen == [1]
        stats = cgroups.CgroupV1({"memory": memory_cgroup}).stats()
        assert stats.memory_oom_control.oom_kill >= 1 and stats.memory.usage.failcnt > 0
        assert stats.memory.usage.limit == 16 << 20
    finally:
        watch.close()
    assert eventfds() == before


async def test_v1_oom_watch_closes_itself_when_the_cgroup_goes(memory_cgroup):
    before = eventfds()
    seen = []
    cgroups.CgroupV1({"memory": memory_cgroup}).watch_oom(lambda: seen.append(1))
    os.rmdir(memory_cgroup)  # the kernel signals the eventfd on removal
    for _ in range(50):
        if eventfds() == before:
            break
        await asyncio.sleep(0.05)
    assert eventfds() == before and seen == []


def test_load_container_refuses_our_own_cgroup():
    assert cgroups.load(os.getpid()) is not None
    assert cgroups.load_container(os.getpid()) is None


# -- the service's Stats, Update and OOM ordering (rule 6), with a fake runtime and cgroup ----
class RecordingPublisher:
    def __init__(self) -> None:
        self.topics: list[str] = []

    def publish(self, topic, event) -> None:
        self.topics.append(topic)


class UpdateRuntime:
    def __init__(self, error: str | None = None) -> None:
        self.updates: list = []
        self.error = error

    async def update(self, id, resources) -> None:
        from shim.runc.runtime import RuncError

        if self.error:
            raise RuncError(self.error, command="update")
        self.updates.append((id, resources))


class PendingOom(cgroups.OomWatch):
    """An OOM the kernel signalled that the loop has not delivered yet."""

    def __init__(self, on_oom) -> None:
        self.on_oom, self.pending, self.closed = on_oom, True, False

    def poll(self, killed: bool = False) -> None:
        if self.pending:
            self.pending = False
            self.on_oom()

    def close(self) -> None:
        self.closed = True


def make_service(tmp_path, runtime=None):
    from shim.framework.container import Container
    from shim.runc.options import RuntimeOptions
    from shim.framework.process import InitProcess, Stdio
    from shim.framework.service import TaskService

    svc = TaskService("ns", RecordingPublisher(), reaper=None, on_shutdown=lambda: None)
    init = InitProcess("c1", str(tmp_path), Stdio())
    init.pid = 4242
    svc.containers.add(Container("c1", str(tmp_path), "ns", RuntimeOptions(), runtime or UpdateRuntime(), init))
    return svc, svc.containers["c1"]


async def test_stats_without_cgroup_is_not_found_and_with_one_is_metrics(tmp_path):
    from shim.api.containerd.task import v2 as task
    from shim.framework.ttrpc.status import Code, TtrpcError

    svc, container = make_service(tmp_path)
    with pytest.raises(TtrpcError) as err:
        await svc.stats(task.StatsRequest(id="c1"), None)
    assert err.value.code == Code.NOT_FOUND
    (tmp_path / "pids.current").write_text("3\n")
    container.cgroup = cgroups.CgroupV1({"pids": str(tmp_path)})
    reply = await svc.stats(task.StatsRequest(id="c1"), None)
    assert reply.stats.type_url == "io.containerd.cgroups.v1.Metrics"
    assert v1.Metrics.parse(reply.stats.value).pids.current == 3


async def test_update_passes_json_resources_to_the_runtime(tmp_path):
    from shim.api.containerd.task import v2 as task
    from shim.api.google.protobuf import Any
    from shim.framework.ttrpc.status import Code, TtrpcError

    runtime = UpdateRuntime()
    svc, _ = make_service(tmp_path, runtime)
    resources = Any(type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                    value=b'{"memory": {"limit": 67108864}}')
    await svc.update(task.UpdateTaskRequest(id="c1", resources=resources), None)
    assert runtime.updates == [("c1", {"memory": {"limit": 67108864}})]
    for bad in (None, Any(type_url="x", value=b"{nope")):
        with pytest.raises(TtrpcError) as err:
            await svc.update(task.UpdateTaskRequest(id="c1", resources=bad), None)
        assert err.value.code == Code.INVALID_ARGUMENT
    # what Go's json.Unmarshal into specs.LinuxResources refuses, runc-v2 refuses in its words
    for value, words in ((b"[1]", "json: cannot unmarshal array into Go value of type specs.LinuxResources"),
                         (b'{"cpu": {"shares": "many"}}',
                          "json: cannot unmarshal string into Go struct field LinuxCPU.cpu.shares of type uint64")):
        with pytest.raises(TtrpcError) as err:
            await svc.update(task.UpdateTaskRequest(id="c1", resources=Any(type_url="x", value=value)), None)
        assert (err.value.code, err.value.message) == (Code.UNKNOWN, words)
    assert len(runtime.updates) == 1
    await svc.update(task.UpdateTaskRequest(id="c1", resources=Any(type_url="x", value=b"null")), None)
    assert runtime.updates[-1] == ("c1", {})


async def test_update_runtime_error_is_reported_with_its_text(tmp_path):
    from shim.api.containerd.task import v2 as task
    from shim.api.google.protobuf import Any
    from shim.framework.ttrpc.status import TtrpcError

    svc, _ = make_service(tmp_path, UpdateRuntime(error="cannot set memory limit: device or resource busy"))
    # runc-v2 puts nothing in front of an update's failure (the backend words it whole)
    with pytest.raises(TtrpcError) as err:
        await svc.update(task.UpdateTaskRequest(id="c1", resources=Any(type_url="x", value=b"{}")), None)
    assert err.value.message == "cannot set memory limit: device or resource busy"


async def test_pending_oom_is_published_before_init_exit(tmp_path):
    from shim.framework.reaper import Exit

    svc, container = make_service(tmp_path)
    container.oom_watch = PendingOom(lambda: svc._publish_oom("c1"))
    await svc._process_exit(container.init, Exit(pid=4242, status=137, timestamp=time.time_ns()))
    assert svc.publisher.topics == ["/tasks/oom", "/tasks/exit"]


def _gone(*_args):
    raise OSError(19, "No such device")  # what reading an open file of a removed cgroup gives


@pytest.mark.parametrize(("killed", "parent_rose", "reported"), [
    (True, True, [1]),    # SIGKILLed, cgroup removed by systemd, the pod's count rose: our OOM
    (False, True, []),    # a normal exit: a sibling's OOM is not ours
    (True, False, []),    # SIGKILLed by someone, no OOM anywhere below the parent
])
async def test_v2_oom_watch_falls_back_to_the_parent_when_the_cgroup_is_gone(
        tmp_path, monkeypatch, killed, parent_rose, reported):
    child = tmp_path / "cri-containerd-x.scope"
    child.mkdir()
    (tmp_path / "memory.events").write_text("oom 0\noom_kill 4\n")
    (child / "memory.events").write_text("oom 0\noom_kill 0\n")
    seen = []
    watch = cgroups.CgroupV2(str(child)).watch_oom(lambda: seen.append(1))
    try:
        watch.poll()  # a wake before the kill: both counts taken
        if parent_rose:
            (tmp_path / "memory.events").write_text("oom 1\noom_kill 5\n")
        monkeypatch.setattr(watch, "_oom_kills", _gone)
        watch.poll()  # the loop's wake for the removal: nothing to tell yet
        assert seen == []
        watch.poll(killed=killed)  # the init's exit
        assert seen == reported
        watch.poll(killed=killed)  # nothing twice
        assert seen == reported
    finally:
        watch.close()


async def test_v2_oom_watch_does_not_count_a_seen_kill_again_from_the_parent(tmp_path, monkeypatch):
    child = tmp_path / "c"
    child.mkdir()
    (tmp_path / "memory.events").write_text("oom_kill 0\n")
    (child / "memory.events").write_text("oom_kill 0\n")
    seen = []
    watch = cgroups.CgroupV2(str(child)).watch_oom(lambda: seen.append(1))
    try:
        (tmp_path / "memory.events").write_text("oom_kill 1\n")
        (child / "memory.events").write_text("oom_kill 1\n")
        watch.poll()
        assert seen == [1]
        monkeypatch.setattr(watch, "_oom_kills", _gone)
        watch.poll(killed=True)
        assert seen == [1]
    finally:
        watch.close()


async def test_v2_oom_watch_asks_the_grandparent_when_the_parent_went_too(tmp_path, monkeypatch):
    """crun's process cgroup is <scope>/container: systemd removes both with the scope."""
    scope = tmp_path / "cri-containerd-x.scope"
    (scope / "container").mkdir(parents=True)
    for d in (tmp_path, scope, scope / "container"):
        (d / "memory.events").write_text("oom_kill 0\n")
    seen = []
    watch = cgroups.CgroupV2(str(scope / "container")).watch_oom(lambda: seen.append(1))
    try:
        (tmp_path / "memory.events").write_text("oom_kill 1\n")
        (scope / "memory.events").write_text("")  # how a removed cgroup's open file reads here
        monkeypatch.setattr(watch, "_oom_kills", _gone)
        watch.poll(killed=True)
        assert seen == [1]
    finally:
        watch.close()
