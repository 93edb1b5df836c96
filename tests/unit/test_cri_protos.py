"""The CRI subset in protos/cri: upstream field numbers on the wire, and never loaded by the shim."""

import subprocess
import sys

from shim.api.runtime import v1 as cri_v1


def test_field_numbers_are_upstreams():
    assert bytes(cri_v1.RunPodSandboxRequest(runtime_handler="pyshim")) == b"\x12\x06pyshim"
    # ContainerStatus.reason is field 10, exit_code 7 (varint)
    assert bytes(cri_v1.ContainerStatus(exit_code=137, reason="OOMKilled")) == b"\x38\x89\x01\x52\x09OOMKilled"
    # LinuxContainerResources.memory_swap_limit_in_bytes is field 10 (varint)
    assert bytes(cri_v1.LinuxContainerResources(memory_swap_limit_in_bytes=1)) == b"\x50\x01"
    # NamespaceOption: network 1, pid 2, ipc 3 (enums)
    option = cri_v1.NamespaceOption(network=cri_v1.NamespaceMode.NODE, pid=cri_v1.NamespaceMode.CONTAINER)
    assert bytes(option) == b"\x08\x02\x10\x01"


def test_unknown_upstream_fields_are_skipped():
    # A full upstream ContainerStatus carries fields we do not declare (mounts 14, resources 16).
    data = b"\x0a\x02id" + b"\x72\x00" + b"\x82\x01\x00" + b"\x52\x09OOMKilled"
    status = cri_v1.ContainerStatus.parse(data)
    assert (status.id, status.reason) == ("id", "OOMKilled")


def test_the_shim_never_imports_the_cri():
    from shim.api.services import SERVICES

    assert not [name for name in SERVICES if name.startswith("runtime.")]
    code = "import sys, shim.api.services; print(sorted(m for m in sys.modules if m.startswith('shim.api.runtime')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
