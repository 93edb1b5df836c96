"""shim.framework.ttrpc.encode gives the very bytes betterproto2 gives, for every message of
shim.api, with fields set at random (defaults, negatives, unicode, nesting, maps, repeats)."""

from __future__ import annotations

import datetime
import importlib
import pkgutil
import random

import betterproto2
import pytest

import shim.api
from shim.api.containerd import events
from shim.api.containerd.task import v2 as task
from shim.api.containerd.v1.types import Status
from shim.api.google.protobuf import Any
from shim.api.google.rpc import Status as RpcStatus
from shim.api.ttrpc import Request, Response
from shim.framework.ttrpc import encode as encode_module
from shim.framework.ttrpc.encode import encode, varint


def message_classes() -> list[type]:
    found = {}
    for info in pkgutil.walk_packages(shim.api.__path__, "shim.api."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, betterproto2.Message) and value is not betterproto2.Message:
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


INTS = {
    betterproto2.TYPE_INT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_INT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_UINT32: (0, 2**32 - 1),
    betterproto2.TYPE_UINT64: (0, 2**64 - 1),
    betterproto2.TYPE_SINT32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SINT64: (-(2**63), 2**63 - 1),
    betterproto2.TYPE_FIXED32: (0, 2**32 - 1),
    betterproto2.TYPE_FIXED64: (0, 2**64 - 1),
    betterproto2.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    betterproto2.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
}


def scalar(rng: random.Random, proto_type: str, py_type, unwrap, depth: int):
    if unwrap is not None:  # a well-known type the message holds as a Python value
        wrapper = unwrap()
        if wrapper.__name__ == "Timestamp":
            return datetime.datetime(2026, 12, 6, tzinfo=datetime.timezone.utc) + datetime.timedelta(
                seconds=rng.randint(-10**9, 10**9), microseconds=rng.randint(0, 999_999))
        if wrapper.__name__ == "Duration":
            return datetime.timedelta(seconds=rng.randint(-10**6, 10**6), microseconds=rng.randint(0, 999_999))
        return make(rng, wrapper, depth + 1).to_wrapped()
    if rng.random() < 0.25 and proto_type != betterproto2.TYPE_MESSAGE:  # the zero value, set explicitly
        if proto_type == betterproto2.TYPE_ENUM:
            return py_type(0)
        return {betterproto2.TYPE_STRING: "", betterproto2.TYPE_BYTES: b"", betterproto2.TYPE_BOOL: False,
                betterproto2.TYPE_FLOAT: 0.0, betterproto2.TYPE_DOUBLE: 0.0}.get(proto_type, 0)
    if proto_type == betterproto2.TYPE_STRING:
        return rng.choice(["", "x", "containerd.task.v2.Task", "ü€😀" * rng.randint(1, 3), "a" * rng.randint(100, 300)])
    if proto_type == betterproto2.TYPE_BYTES:
        return bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 200])))
    if proto_type == betterproto2.TYPE_BOOL:
        return rng.random() < 0.5
    if proto_type == betterproto2.TYPE_ENUM:
        return rng.choice(list(py_type))
    if proto_type in INTS:
        lo, hi = INTS[proto_type]
        return rng.choice([0, 1, 127, 128, 300, lo, hi, rng.randint(lo, hi)])
    if proto_type in (betterproto2.TYPE_FLOAT, betterproto2.TYPE_DOUBLE):
        return rng.choice([0.0, 1.5, -2.25])
    if proto_type == betterproto2.TYPE_MESSAGE:
        return make(rng, py_type, depth + 1)
    raise AssertionError(proto_type)


def make(rng: random.Random, cls: type, depth: int = 0):
    metadata = cls._betterproto
    values = {}
    for name, meta in metadata.meta_by_field_name.items():
        if rng.random() < 0.3 or (depth > 3 and meta.proto_type == betterproto2.TYPE_MESSAGE):
            continue  # left at its default
        py_type = metadata.cls_by_field.get(name)
        if meta.map_meta:
            key_meta, value_meta = meta.map_meta
            values[name] = {
                scalar(rng, key_meta.proto_type, metadata.cls_by_field.get(f"{name}.key"), None, depth):
                scalar(rng, value_meta.proto_type, metadata.cls_by_field.get(f"{name}.value"), value_meta.unwrap, depth)
                for _ in range(rng.randint(0, 3))
            }
        elif meta.repeated:
            values[name] = [scalar(rng, meta.proto_type, py_type, meta.unwrap, depth) for _ in range(rng.randint(0, 3))]
        else:
            values[name] = scalar(rng, meta.proto_type, py_type, meta.unwrap, depth)
    return cls(**values)


@pytest.mark.parametrize("cls", message_classes(), ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_the_same_bytes_as_betterproto2(cls):
    rng = random.Random(cls.__qualname__)
    for _ in range(40):
        message = make(rng, cls)
        assert encode(message) == bytes(message)
    assert encode(cls()) == bytes(cls())


def test_the_hot_messages_are_compiled_not_delegated():
    for cls in (task.StateResponse, task.StartResponse, task.WaitResponse, task.DeleteResponse,
                task.CreateTaskResponse, Response, Request, RpcStatus, Any, events.TaskExit, events.TaskStart,
                events.TaskCreate, events.TaskExecAdded, events.TaskExecStarted, events.TaskDelete):
        encode(cls())
        assert encode_module._compiled[cls] is not None, cls


def test_unknown_fields_are_kept():
    message = task.StateResponse.parse(bytes(task.StateResponse(id="c", pid=7)) + b"\xf8\x07\x05")  # field 127
    assert encode(message) == bytes(message) and encode(message).endswith(b"\xf8\x07\x05")


def test_a_state_response_as_the_daemon_sends_it():
    message = task.StateResponse(
        id="c1", bundle="/run/b", pid=4242, status=Status.STOPPED, stdout="/f/1-stdout", terminal=True,
        exit_status=137, exited_at=datetime.datetime(2026, 12, 6, 4, 5, 6, 789000, tzinfo=datetime.timezone.utc),
        exec_id="e1",
    )
    assert encode(message) == bytes(message)
    assert task.StateResponse.parse(encode(message)) == message


def test_varint():
    for value in (0, 1, 127, 128, 300, 2**32, 2**63 - 1, 2**64 - 1, -1, -(2**63)):
        assert varint(value) == betterproto2.encode_varint(value)
