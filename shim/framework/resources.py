"""Update's resources checked the way runc-v2 decodes them: Go's encoding/json into the OCI
`specs.LinuxResources` struct, refusing with Go's own words before any runtime runs.

containerd passes UpdateTaskRequest.resources through as the JSON a client marshalled. The
Go shim unmarshals it into the typed struct first, so a string where a number belongs fails in
the shim ("json: cannot unmarshal string into Go struct field LinuxCPU.cpu.shares of type
uint64") whichever OCI runtime is configured; passing the JSON on unchecked would leave the
check to the runtime (runc words it alike, crun 1.8 silently ignores the value). Unknown
keys and nulls are accepted, as Go does; only the first error is reported, as Go does.

The struct named in the message is the innermost one (Go up to 1.26: runc, and containerd
1.6/1.7's shims); Go 1.27 (Debian's containerd 2.1.9 shim) names the outermost,
"LinuxResources.cpu.shares".
"""

from __future__ import annotations

import json
import re

# Go types: "int64", "uint64", ..., "string", "bool"; a struct as a dict of JSON name ->
# type, with its Go name under "": a slice as ("[]", elem), a map as ("map", elem).
_DEVICE = {"": "LinuxDeviceCgroup", "allow": "bool", "type": "string", "major": "int64", "minor": "int64",
           "access": "string"}
_MEMORY = {"": "LinuxMemory", "limit": "int64", "reservation": "int64", "swap": "int64", "kernel": "int64",
           "kernelTCP": "int64", "swappiness": "uint64", "disableOOMKiller": "bool", "useHierarchy": "bool",
           "checkBeforeUpdate": "bool"}
_CPU = {"": "LinuxCPU", "shares": "uint64", "quota": "int64", "burst": "uint64", "period": "uint64",
        "realtimeRuntime": "int64", "realtimePeriod": "uint64", "cpus": "string", "mems": "string", "idle": "int64"}
_PIDS = {"": "LinuxPids", "limit": "int64"}
_WEIGHT_DEVICE = {"": "LinuxWeightDevice", "major": "int64", "minor": "int64", "weight": "uint16",
                  "leafWeight": "uint16"}
_THROTTLE_DEVICE = {"": "LinuxThrottleDevice", "major": "int64", "minor": "int64", "rate": "uint64"}
_BLOCK_IO = {"": "LinuxBlockIO", "weight": "uint16", "leafWeight": "uint16",
             "weightDevice": ("[]", _WEIGHT_DEVICE),
             "throttleReadBpsDevice": ("[]", _THROTTLE_DEVICE), "throttleWriteBpsDevice": ("[]", _THROTTLE_DEVICE),
             "throttleReadIOPSDevice": ("[]", _THROTTLE_DEVICE), "throttleWriteIOPSDevice": ("[]", _THROTTLE_DEVICE)}
_HUGEPAGE = {"": "LinuxHugepageLimit", "pageSize": "string", "limit": "uint64"}
_PRIORITY = {"": "LinuxInterfacePriority", "name": "string", "priority": "uint32"}
_NETWORK = {"": "LinuxNetwork", "classID": "uint32", "priorities": ("[]", _PRIORITY)}
_RDMA = {"": "LinuxRdma", "hcaHandles": "uint32", "hcaObjects": "uint32"}
LINUX_RESOURCES = {
    "": "LinuxResources",
    "devices": ("[]", _DEVICE), "memory": _MEMORY, "cpu": _CPU, "pids": _PIDS, "blockIO": _BLOCK_IO,
    "hugepageLimits": ("[]", _HUGEPAGE), "network": _NETWORK, "rdma": ("map", _RDMA),
    "unified": ("map", "string"),
}

_INT_RANGES = {
    "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1), "uint32": (0, 2**32 - 1), "uint16": (0, 2**16 - 1),
}
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")


class _Number(str):
    """A JSON number as its literal (Go reports a literal that does not fit: "number 1.5")."""


def _go_type(t) -> str:
    if isinstance(t, dict):
        return f"specs.{t['']}"
    if isinstance(t, tuple):
        kind, elem = t
        return ("[]" if kind == "[]" else "map[string]") + _go_type(elem)
    return t


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, _Number):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


class _Mismatch(Exception):
    def __init__(self, value: str, go_type: str, struct: str, path: tuple[str, ...]) -> None:
        self.value, self.go_type, self.struct, self.path = value, go_type, struct, path

    def __str__(self) -> str:
        if not self.path:
            return f"json: cannot unmarshal {self.value} into Go value of type {self.go_type}"
        return (f"json: cannot unmarshal {self.value} into Go struct field "
                f"{self.struct}.{'.'.join(self.path)} of type {self.go_type}")


def _check(value, t, struct: str, path: tuple[str, ...]) -> None:
    if value is None:
        return  # null: Go leaves the field as it is
    if isinstance(t, dict):
        if not isinstance(value, dict):
            raise _Mismatch(_json_kind(value), _go_type(t), struct, path)
        fields = {name: name for name in t if name}
        folded = {name.lower(): name for name in fields}
        for key, item in value.items():
            # an exact name first, else any case (Go's encoding/json); unknown keys are skipped
            name = fields.get(key) or folded.get(key.lower())
            if name is not None:
                _check(item, t[name], t[""], (*path, name))
        return
    if isinstance(t, tuple):
        kind, elem = t
        if not isinstance(value, list if kind == "[]" else dict):
            raise _Mismatch(_json_kind(value), _go_type(t), struct, path)
        for item in (value if kind == "[]" else value.values()):
            _check(item, elem, struct, path)
        return
    kind = _json_kind(value)
    if t in _INT_RANGES:
        if kind != "number":
            raise _Mismatch(kind, t, struct, path)
        low, high = _INT_RANGES[t]
        if not _INTEGER.fullmatch(value) or not low <= int(value) <= high:
            raise _Mismatch(f"number {value}", t, struct, path)
    elif t != kind:
        raise _Mismatch(kind, t, struct, path)


def linux_resources_error(data: bytes | str) -> str | None:
    """What Go's json.Unmarshal into specs.LinuxResources says about `data` (its first error),
    or None when the Go shim would take it. Text that is not JSON at all is left to the caller."""
    try:
        value = json.loads(data, parse_int=_Number, parse_float=_Number, parse_constant=_Number)
    except ValueError:
        return None
    try:
        _check(value, LINUX_RESOURCES, "LinuxResources", ())
    except _Mismatch as exc:
        return str(exc)
    return None
