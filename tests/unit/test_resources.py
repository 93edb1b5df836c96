"""shim.framework.resources: Update's resources refused as Go's json.Unmarshal into
specs.LinuxResources refuses them (runc-v2 decodes them so before running the runtime)."""

import pytest

from shim.framework.resources import linux_resources_error

GO = "json: cannot unmarshal"


@pytest.mark.parametrize("data", [
    b"{}", b"null", b'{"memory": {"limit": 67108864}, "cpu": {"quota": -1, "period": 100000, "cpus": "0-1"}}',
    b'{"pids": {"limit": -1}}', b'{"cpu": null, "memory": {"limit": null}}', b'{"unknown": [1, {"x": "y"}]}',
    b'{"CPU": {"Shares": 1024}}',  # Go matches names in any case
    b'{"devices": [{"allow": false, "access": "rwm"}], "unified": {"memory.high": "max"}}',
    b'{"blockIO": {"weight": 65535, "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}]}}',
    b'{"hugepageLimits": [{"pageSize": "2MB", "limit": 0}], "network": {"classID": 1, "priorities": []}}',
    b'{"rdma": {"mlx5_0": {"hcaHandles": 3}}, "memory": {"swappiness": 18446744073709551615}}',
    b"{nope",  # not JSON at all: left to the caller
])
def test_what_go_takes(data):
    assert linux_resources_error(data) is None


@pytest.mark.parametrize("data, words", [
    (b'{"cpu": {"shares": "many"}}', "string into Go struct field LinuxCPU.cpu.shares of type uint64"),
    (b'{"pids": {"limit": "x"}}', "string into Go struct field LinuxPids.pids.limit of type int64"),
    (b'{"cpu": {"quota": 1.5}}', "number 1.5 into Go struct field LinuxCPU.cpu.quota of type int64"),
    (b'{"cpu": {"period": -5}}', "number -5 into Go struct field LinuxCPU.cpu.period of type uint64"),
    (b'{"cpu": {"period": 1e3}}', "number 1e3 into Go struct field LinuxCPU.cpu.period of type uint64"),
    (b'{"memory": {"limit": 9223372036854775808}}',
     "number 9223372036854775808 into Go struct field LinuxMemory.memory.limit of type int64"),
    (b'{"blockIO": {"weight": 65536}}', "number 65536 into Go struct field LinuxBlockIO.blockIO.weight of type uint16"),
    (b'{"cpu": {"cpus": 3}}', "number into Go struct field LinuxCPU.cpu.cpus of type string"),
    (b'{"memory": {"disableOOMKiller": 1}}',
     "number into Go struct field LinuxMemory.memory.disableOOMKiller of type bool"),
    (b'{"cpu": 5}', "number into Go struct field LinuxResources.cpu of type specs.LinuxCPU"),
    (b'{"devices": {}}', "object into Go struct field LinuxResources.devices of type []specs.LinuxDeviceCgroup"),
    (b'{"devices": [{"allow": "yes"}]}', "string into Go struct field LinuxDeviceCgroup.devices.allow of type bool"),
    (b'{"unified": {"memory.high": 5}}', "number into Go struct field LinuxResources.unified of type string"),
    (b'{"unified": []}', "array into Go struct field LinuxResources.unified of type map[string]string"),
    (b'{"blockIO": {"throttleReadBpsDevice": [{"major": "8"}]}}',
     "string into Go struct field LinuxThrottleDevice.blockIO.throttleReadBpsDevice.major of type int64"),
    (b"[1]", "array into Go value of type specs.LinuxResources"),
    (b'"x"', "string into Go value of type specs.LinuxResources"),
    # the first error in the document is the one reported
    (b'{"memory": {"limit": "a"}, "cpu": {"shares": "b"}}',
     "string into Go struct field LinuxMemory.memory.limit of type int64"),
])
def test_what_go_refuses_in_its_words(data, words):
    assert linux_resources_error(data) == f"{GO} {words}"
