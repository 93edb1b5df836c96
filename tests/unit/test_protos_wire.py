"""The generated messages put the right bytes on the wire.

The byte vectors below were worked out by hand from the field numbers and
types containerd uses (docs/shim-protocol.md §4.2, §5, §6, §7, §8, §13), not
produced by the code under test: tag = (field_number << 3) | wire_type, with
wire type 0 varint, 1 fixed64, 2 length-delimited.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import pkgutil

import betterproto2
import pytest

import shim.api
from shim.api.containerd import events
from shim.api.containerd.events import TaskExit
from shim.api.containerd.runc.v1 import CheckpointOptions, Options, ProcessDetails
from shim.api.containerd.runtime.bootstrap.v1 import BootstrapParams, LogLevel
from shim.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from shim.api.containerd.task import v2 as task
from shim.api.containerd.types import Mount, RuntimeInfo, RuntimeVersion
from shim.api.containerd.v1.types import ProcessInfo, Status as ProcessStatus
from shim.api.google.protobuf import Any, Empty
from shim.api.google.rpc import Status
from shim.api.io.containerd.cgroups import v1 as cg1, v2 as cg2
from shim.api.runtimeoptions import v1 as runtimeoptions
from shim.api.services import SERVICES
from shim.api.ttrpc import KeyValue, Request, Response

UTC = dt.timezone.utc


def h(*parts: str | bytes) -> bytes:
    """Concatenate hex strings (spaces ignored) and literal byte strings."""
    return b"".join(p if isinstance(p, bytes) else bytes.fromhex(p) for p in parts)


def check(msg: betterproto2.Message, wire: bytes) -> None:
    assert bytes(msg) == wire
    assert type(msg).parse(wire) == msg


# --- ttrpc -----------------------------------------------------------------


def test_ttrpc_request() -> None:
    msg = Request(
        service="containerd.task.v2.Task",
        method="Create",
        payload=h("0a 02", b"id"),
        timeout_nano=1_000_000_000,
        metadata=[KeyValue(key="containerd-namespace-ttrpc", value="k8s.io")],
    )
    check(
        msg,
        h(
            "0a 17", b"containerd.task.v2.Task",
            "12 06", b"Create",
            "1a 04 0a 02", b"id",
            "20 80 94 eb dc 03",  # 1e9 as a varint
            "2a 24 0a 1a", b"containerd-namespace-ttrpc", "12 06", b"k8s.io",
        ),
    )  # fmt: skip


def test_ttrpc_response_with_status() -> None:
    check(
        Response(status=Status(code=12, message="service x")),
        h("0a 0d 08 0c 12 09", b"service x"),
    )


def test_ttrpc_response_success_and_empty() -> None:
    check(Response(payload=h("08 2a")), h("12 02 08 2a"))
    empty = Response.parse(b"")
    assert empty.status is None and empty.payload == b""


def test_status_details() -> None:
    check(
        Status(code=5, details=[Any(type_url="x", value=b"\x01")]),
        h("08 05 1a 06 0a 01", b"x", "12 01 01"),
    )


# --- task API --------------------------------------------------------------


def test_delete_response_exited_at() -> None:
    msg = task.DeleteResponse(
        pid=42, exit_status=137, exited_at=dt.datetime(1970, 1, 1, 0, 0, 1, 500_000, tzinfo=UTC)
    )
    # exited_at = Timestamp{seconds: 1, nanos: 500000000}
    check(msg, h("08 2a 10 89 01 1a 08 08 01 10 80 ca b5 ee 01"))


def test_go_zero_time() -> None:
    # The Go shim's "not exited" timestamp is Go's zero time, seconds=-62135596800,
    # i.e. 0001-01-01T00:00:00Z: a negative int64, so a 10-byte varint.
    zero = dt.datetime(1, 1, 1, tzinfo=UTC)
    check(task.WaitResponse(exited_at=zero), h("12 0b 08 80 92 b8 c3 98 fe ff ff ff 01"))


def test_unset_and_empty_timestamp() -> None:
    assert task.WaitResponse().exited_at is None
    assert bytes(task.WaitResponse()) == b""
    # present but zero: the Unix epoch (what containerd 2.x reads for an omitted one too)
    assert task.WaitResponse.parse(h("12 00")).exited_at == dt.datetime(1970, 1, 1, tzinfo=UTC)


def test_naive_datetime_is_rejected() -> None:
    with pytest.raises(ValueError):
        bytes(task.WaitResponse(exited_at=dt.datetime(2024, 1, 1)))


def test_state_response_enum() -> None:
    msg = task.StateResponse(id="c1", pid=7, status=ProcessStatus.RUNNING)
    check(msg, h("0a 02", b"c1", "18 07 20 02"))


def test_update_task_annotations_map() -> None:
    msg = task.UpdateTaskRequest(id="c", annotations={"a": "b"})
    check(msg, h("0a 01", b"c", "1a 06 0a 01", b"a", "12 01", b"b"))


def test_pids_response_with_process_details() -> None:
    details = ProcessDetails(exec_id="e1")
    assert bytes(details) == h("0a 02", b"e1")
    msg = task.PidsResponse(
        processes=[
            ProcessInfo(pid=5, info=Any(type_url="containerd.runc.v1.ProcessDetails", value=bytes(details)))
        ]
    )
    check(
        msg,
        h("0a 2d 08 05 12 29 0a 21", b"containerd.runc.v1.ProcessDetails", "12 04 0a 02", b"e1"),
    )


def test_create_task_request_rootfs_and_options() -> None:
    msg = task.CreateTaskRequest(
        id="c",
        rootfs=[Mount(type="bind", source="/s", options=["rbind"])],
        terminal=True,
        options=Any(type_url="containerd.runc.v1.Options", value=h("48 01")),
    )
    mount = h("0a 04", b"bind", "12 02", b"/s", "22 05", b"rbind")
    any_ = h("0a 1a", b"containerd.runc.v1.Options", "12 02 48 01")
    check(msg, h("0a 01", b"c", "1a 11", mount, "20 01 52 20", any_))


def test_connect_and_kill() -> None:
    check(task.ConnectResponse(shim_pid=100, task_pid=0), h("08 64"))
    check(task.KillRequest(id="c", signal=9, all=True), h("0a 01", b"c", "18 09 20 01"))
    check(Empty(), b"")


# --- events ----------------------------------------------------------------


def test_forward_request_envelope() -> None:
    exit_ = TaskExit(container_id="c1", id="c1", pid=7, exit_status=137)
    exit_wire = h("0a 02", b"c1", "12 02", b"c1", "18 07 20 89 01")
    assert bytes(exit_) == exit_wire
    env = Envelope(
        timestamp=dt.datetime.fromtimestamp(1_700_000_000, UTC),
        namespace="k8s.io",
        topic="/tasks/exit",
        event=Any(type_url="containerd.events.TaskExit", value=exit_wire),
    )
    env_wire = h(
        "0a 06 08 80 e2 cf aa 06",  # timestamp{seconds: 1700000000}
        "12 06", b"k8s.io",
        "1a 0b", b"/tasks/exit",
        "22 2b 0a 1a", b"containerd.events.TaskExit", "12 0d", exit_wire,
    )  # fmt: skip
    check(env, env_wire)
    check(ForwardRequest(envelope=env), h("0a 4a", env_wire))


# --- options ---------------------------------------------------------------


def test_runc_options() -> None:
    msg = Options(
        no_pivot_root=True,
        io_uid=1000,
        binary_name="crun",
        root="/run/r",
        systemd_cgroup=True,
        task_api_version=3,
    )
    check(msg, h("08 01 20 e8 07 32 04", b"crun", "3a 06", b"/run/r", "48 01 68 03"))


def test_runc_options_skips_criu_path_from_containerd_1_6() -> None:
    # containerd 1.6 may still send field 8 (criu_path); it is reserved now.
    assert Options.parse(h("42 03", b"abc", "48 01")) == Options(systemd_cgroup=True)


def test_checkpoint_options() -> None:
    msg = CheckpointOptions(exit=True, empty_namespaces=["network", "ipc"], work_path="/w")
    check(msg, h("08 01 32 07", b"network", "32 03", b"ipc", "4a 02", b"/w"))


def test_runtime_info() -> None:
    msg = RuntimeInfo(name="io.containerd.pyshim.v2", version=RuntimeVersion(version="0.1.0", revision="abc"))
    check(msg, h("0a 17", b"io.containerd.pyshim.v2", "12 0c 0a 05", b"0.1.0", "12 03", b"abc"))


def test_bootstrap_params() -> None:
    msg = BootstrapParams(instance_id="c1", log_level=LogLevel.DEBUG, socket_dir="")
    # an enum of -4 is a 10-byte varint; socket_dir is proto3 optional, so "" is sent
    check(msg, h("0a 02", b"c1", "18 fc ff ff ff ff ff ff ff ff 01 4a 00"))


# --- cgroup metrics --------------------------------------------------------


def test_cgroup_v1_metrics() -> None:
    msg = cg1.Metrics(memory=cg1.MemoryStat(cache=1, usage=cg1.MemoryEntry(limit=2)))
    # MemoryStat.usage is field 33: tag (33 << 3) | 2 = 266 = varint 8a 02
    check(msg, h("22 07 08 01 8a 02 02 08 02"))


def test_cgroup_v2_metrics_psi() -> None:
    psi = cg2.PsiStats(some=cg2.PsiData(avg10=1.5, total=9))
    msg = cg2.Metrics(cpu=cg2.CpuStat(usage_usec=5, psi=psi))
    # avg10 is a double (wire type 1): 1.5 little-endian
    check(msg, h("12 11 08 05 3a 0d 0a 0b 09 00 00 00 00 00 00 f8 3f 20 09"))


# --- field numbers straight from the protocol reference -------------------


def numbers(cls: type[betterproto2.Message]) -> dict[str, int]:
    return {f.name: betterproto2.FieldMetadata.get(f).number for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Request, "service method payload timeout_nano metadata"),
        (Response, "status payload"),
        (Status, "code message details"),
        (task.CreateTaskRequest, "id bundle rootfs terminal stdin stdout stderr checkpoint parent_checkpoint options"),
        (task.ExecProcessRequest, "id exec_id terminal stdin stdout stderr spec"),
        (task.StateResponse, "id bundle pid status stdin stdout stderr terminal exit_status exited_at exec_id"),
        (task.ResizePtyRequest, "id exec_id width height"),
        (task.CloseIoRequest, "id exec_id stdin"),
        (task.CheckpointTaskRequest, "id path options"),
        (task.ConnectResponse, "shim_pid task_pid version"),
        (task.ShutdownRequest, "id now"),
        (events.TaskCreate, "container_id bundle rootfs io checkpoint pid"),
        (events.TaskDelete, "container_id pid exit_status exited_at id"),
        (events.TaskIo, "stdin stdout stderr terminal"),
        (TaskExit, "container_id id pid exit_status exited_at"),
        (Envelope, "timestamp namespace topic event"),
        (runtimeoptions.Options, "type_url config_path config_body"),
        (cg1.Metrics, "hugetlb pids cpu memory blkio rdma network cgroup_stats memory_oom_control"),
        (cg2.PsiData, "avg10 avg60 avg300 total"),
    ],
)
def test_field_numbers_in_order(cls: type[betterproto2.Message], expected: str) -> None:
    assert numbers(cls) == {name: i for i, name in enumerate(expected.split(), start=1)}


def test_sparse_field_numbers() -> None:
    assert numbers(Options)["systemd_cgroup"] == 9 and "criu_path" not in numbers(Options)
    assert numbers(Options)["task_api_version"] == 13
    assert numbers(cg2.Metrics) == {
        "pids": 1, "cpu": 2, "memory": 4, "rdma": 5, "io": 6, "hugetlb": 7, "memory_events": 8, "network": 9,
    }  # fmt: skip
    assert numbers(cg2.MemoryStat)["psi"] == 38
    assert numbers(cg2.CpuStat)["psi"] == 7
    assert numbers(cg2.IoStat)["psi"] == 2


# --- services table --------------------------------------------------------


TASK_METHODS = (
    "State Create Start Delete Pids Pause Resume Checkpoint Kill Exec ResizePty CloseIO Update Wait Stats "
    "Connect Shutdown"
).split()


def test_services_table() -> None:
    assert set(SERVICES) == {
        "containerd.task.v2.Task",
        "containerd.task.v3.Task",
        "containerd.services.events.ttrpc.v1.Events",
        "containerd.services.tasks.v1.Tasks",  # containerd's own API, for the Update e2e test
    }
    assert list(SERVICES["containerd.task.v2.Task"]) == TASK_METHODS
    # v3 is the same API under another service name, with the same classes
    assert SERVICES["containerd.task.v3.Task"] == SERVICES["containerd.task.v2.Task"]
    assert SERVICES["containerd.task.v2.Task"]["Create"] == (task.CreateTaskRequest, task.CreateTaskResponse)
    assert SERVICES["containerd.task.v2.Task"]["Kill"] == (task.KillRequest, Empty)
    assert SERVICES["containerd.services.events.ttrpc.v1.Events"] == {"Forward": (ForwardRequest, Empty)}


# --- every message round-trips --------------------------------------------


def all_message_classes() -> list[type[betterproto2.Message]]:
    classes = []
    for info in pkgutil.walk_packages(shim.api.__path__, "shim.api."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, betterproto2.Message)
                and obj.__module__ == module.__name__
            ):
                classes.append(obj)
    return sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")


SCALARS: dict[str, object] = {
    betterproto2.TYPE_BOOL: True,
    betterproto2.TYPE_INT32: -(2**31),
    betterproto2.TYPE_INT64: -(2**63),
    betterproto2.TYPE_UINT32: 2**32 - 1,
    betterproto2.TYPE_UINT64: 2**64 - 1,
    betterproto2.TYPE_DOUBLE: -0.25,
    betterproto2.TYPE_FLOAT: 0.5,
    betterproto2.TYPE_STRING: "ä/\x00x",
    betterproto2.TYPE_BYTES: b"\x00\xff",
}


def sample_value(owner: type[betterproto2.Message], name: str, meta: betterproto2.FieldMetadata, depth: int):
    if meta.unwrap is not None:  # google.protobuf.Timestamp appears as a datetime
        return dt.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=UTC)
    if meta.proto_type == betterproto2.TYPE_MESSAGE:
        return sample(owner._betterproto.cls_by_field[name], depth + 1)
    if meta.proto_type == betterproto2.TYPE_ENUM:
        return max(owner._betterproto.cls_by_field[name], key=abs)
    return SCALARS[meta.proto_type]


def sample(cls: type[betterproto2.Message], depth: int = 0) -> betterproto2.Message:
    """An instance with every field set to a non-default value."""
    assert depth < 5, f"unexpectedly deep nesting at {cls}"
    kwargs = {}
    for f in dataclasses.fields(cls):
        meta = betterproto2.FieldMetadata.get(f)
        if meta.proto_type == betterproto2.TYPE_MAP:
            key_meta, value_meta = meta.map_meta
            value = (
                sample(cls._betterproto.cls_by_field[f"{f.name}.value"], depth + 1)
                if value_meta.proto_type == betterproto2.TYPE_MESSAGE
                else SCALARS[value_meta.proto_type]
            )
            kwargs[f.name] = {SCALARS[key_meta.proto_type]: value}
        elif meta.repeated:
            kwargs[f.name] = [sample_value(cls, f.name, meta, depth)] * 2
        else:
            kwargs[f.name] = sample_value(cls, f.name, meta, depth)
    return cls(**kwargs)


MESSAGE_CLASSES = all_message_classes()


def test_all_expected_messages_were_generated() -> None:
    names = {f"{c.__module__}.{c.__qualname__}".removeprefix("shim.api.") for c in MESSAGE_CLASSES}
    for expected in [
        "ttrpc.Request", "ttrpc.Response", "ttrpc.KeyValue", "ttrpc.StringList", "google.rpc.Status",
        "containerd.task.v2.CreateTaskRequest", "containerd.task.v2.ExecProcessResponse",
        "containerd.events.TaskCheckpointed", "containerd.services.events.ttrpc.v1.Envelope",
        "containerd.runc.v1.ProcessDetails", "runtimeoptions.v1.Options", "containerd.types.RuntimeInfo",
        "io.containerd.cgroups.v1.CgroupStats", "io.containerd.cgroups.v2.MemoryEvents",
        "containerd.runtime.bootstrap.v1.BootstrapResult",
    ]:  # fmt: skip
        assert expected in names
    # v3 reuses the v2 messages instead of defining a second copy
    assert not any(n.startswith("containerd.task.v3.") for n in names)


@pytest.mark.parametrize("cls", MESSAGE_CLASSES, ids=lambda c: f"{c.__module__.removeprefix('shim.api.')}.{c.__name__}")
def test_round_trip(cls: type[betterproto2.Message]) -> None:
    assert bytes(cls()) == b""
    assert cls.parse(b"") == cls()
    msg = sample(cls)
    wire = bytes(msg)
    assert wire or not dataclasses.fields(cls)
    parsed = cls.parse(wire)
    assert parsed == msg
    assert bytes(parsed) == wire
