"""examples/policy: the rules on specs shaped as containerd's CRI plugin writes them (see
the dumps described in examples/policy/README.md), without containerd."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "policy"))

from pyshim_policy import Policy, PolicySettings, violations  # noqa: E402

from shim.handler import ContainerInfo, Refused  # noqa: E402

ROOT = "/var/lib/containerd"
STATE = "/run/containerd"
SANDBOX = "5a" * 32
CID = "c0" * 32
UID = "35d789470abb4ae989e686d96460b54a"
BUNDLE = f"{STATE}/io.containerd.runtime.v2.task/k8s.io/{CID}"
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_BIND_SERVICE", "CAP_SETUID"]


def bind(destination: str, source: str, *options: str) -> dict:
    return {"destination": destination, "source": source, "type": "bind",
            "options": ["rbind", "rprivate", *(options or ("rw",))]}


def cri_container(*, caps=DEFAULT_CAPS, mounts=(), namespaces=None, kind="container") -> dict:
    """A container's spec as CRI writes it: it joins its pod's namespaces by path."""
    sandbox_dir = f"{ROOT}/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}"
    if namespaces is None:
        namespaces = [{"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                      {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"},
                      {"type": "network", "path": "/proc/42/ns/net"}]
    return {
        "process": {"capabilities": {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)}},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["ro"]},
            *mounts,
            bind("/etc/hostname", f"{sandbox_dir}/hostname"),
            bind("/etc/hosts", f"{sandbox_dir}/hosts"),
            bind("/etc/resolv.conf", f"{sandbox_dir}/resolv.conf"),
            bind("/dev/shm", f"{STATE}/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/shm"),
        ],
        "linux": {"namespaces": namespaces},
        "annotations": {"io.kubernetes.cri.container-type": kind, "io.kubernetes.cri.sandbox-id": SANDBOX,
                        "io.kubernetes.cri.sandbox-uid": UID},
    }


def check(spec: dict, *, host_paths=(), **options) -> list[str]:
    settings = PolicySettings.from_options(options)
    return violations(spec, container_id=CID, bundle=BUNDLE, settings=settings,
                      host_namespace=lambda kind, path: path in host_paths, resolve=lambda p: p)


def test_a_plain_cri_container_complies():
    assert check(cri_container()) == []


def test_privileged_means_cap_sys_admin_and_can_be_switched_off():
    privileged = cri_container(caps=[*DEFAULT_CAPS, "CAP_SYS_ADMIN", "CAP_SYS_MODULE"])
    assert check(privileged) == ["privileged containers are not allowed (CAP_SYS_ADMIN in its capabilities)"]
    assert check(privileged, deny_privileged=False) == []
    # more capabilities can be made to count, written with or without CAP_
    assert check(cri_container(caps=[*DEFAULT_CAPS, "CAP_SYS_MODULE"]),
                 privileged_capabilities=["sys_admin", "SYS_MODULE"]) != []


def test_host_namespaces_absent_or_joined_by_path():
    # The sandbox of a hostPID/hostIPC/hostNetwork pod: the entries are absent.
    sandbox = cri_container(namespaces=[{"type": "mount"}], kind="sandbox")
    assert check(sandbox, host_paths={}) == [
        "host pid namespace is not in allowed_host_namespaces",
        "host ipc namespace is not in allowed_host_namespaces",
        "host network namespace is not in allowed_host_namespaces",
        "host uts namespace is not in allowed_host_namespaces",
    ]
    # hostNetwork brings the host's UTS namespace along in CRI: allow both
    pod_on_host_network = cri_container(namespaces=[{"type": "pid"}, {"type": "ipc"}, {"type": "mount"}], kind="sandbox")
    assert check(pod_on_host_network, allowed_host_namespaces=["network", "uts"]) == []
    # a container joins the pause container's namespaces by path: the host's when the pod's are
    container = cri_container()
    assert check(container, host_paths={"/proc/42/ns/net", "/proc/42/ns/uts"}) == [
        "host network namespace is not in allowed_host_namespaces",
        "host uts namespace is not in allowed_host_namespaces",
    ]
    assert check(sandbox, deny_host_namespaces=False) == []


def test_host_paths_outside_the_allow_list():
    mounts = [bind("/data", "/data/app", "ro"), bind("/host-etc", "/etc", "ro")]
    assert check(cri_container(mounts=mounts), allowed_host_paths=["/data"]) == [
        "host path /etc is not in allowed_host_paths"]
    # a prefix is a directory, not a string prefix
    assert check(cri_container(mounts=[bind("/x", "/data2/x")]), allowed_host_paths=["/data"]) == [
        "host path /data2/x is not in allowed_host_paths"]
    assert check(cri_container(mounts=mounts), deny_host_paths=False) == []
    # non-bind mounts have no host source
    assert check(cri_container(mounts=[{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}])) == []


def test_cri_own_mounts_are_recognised_exactly():
    other_sandbox = f"{ROOT}/io.containerd.grpc.v1.cri/sandboxes/{'ff' * 32}/hosts"
    assert check(cri_container(mounts=[bind("/etc/hosts", other_sandbox)])) == [
        f"host path {other_sandbox} is not in allowed_host_paths"]
    own_hosts = f"{ROOT}/io.containerd.grpc.v1.cri/sandboxes/{SANDBOX}/hosts"
    assert check(cri_container(mounts=[bind("/somewhere", own_hosts)])) == [
        f"host path {own_hosts} is not in allowed_host_paths"]
    volume = f"{ROOT}/io.containerd.grpc.v1.cri/containers/{CID}/volumes/abc"
    assert check(cri_container(mounts=[bind("/var/lib/app", volume)])) == []
    # the kubelet's files of this pod (volumes, /etc/hosts, termination log), not another pod's
    own = f"/var/lib/kubelet/pods/{UID}/volumes/kubernetes.io~secret/token"
    other = "/var/lib/kubelet/pods/0000/volumes/kubernetes.io~secret/token"
    assert check(cri_container(mounts=[bind("/t", own)])) == []
    assert check(cri_container(mounts=[bind("/t", other)])) == [f"host path {other} is not in allowed_host_paths"]
    # the host's /dev/shm comes with the host's IPC namespace, and only with it
    host_shm = [bind("/dev/shm", "/dev/shm")]
    assert check(cri_container(mounts=host_shm, namespaces=[{"type": "mount"}]),
                 deny_host_namespaces=False) == []
    assert check(cri_container(mounts=host_shm)) == ["host path /dev/shm is not in allowed_host_paths"]


def test_symlinks_are_followed(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "escape").symlink_to("/etc")
    settings = PolicySettings.from_options({"allowed_host_paths": [str(tmp_path / "data")]})
    spec = cri_container(mounts=[bind("/x", str(tmp_path / "data" / "escape"))])
    found = violations(spec, container_id=CID, bundle=BUNDLE, settings=settings, host_namespace=lambda k, p: False)
    assert found == [f"host path {tmp_path}/data/escape (-> /etc) is not in allowed_host_paths"]


def test_bad_options_say_which_key():
    with pytest.raises(ValueError, match="unknown HandlerOptions allowed_paths"):
        PolicySettings.from_options({"allowed_paths": ["/data"]})
    with pytest.raises(ValueError, match="allowed_host_paths must be a list of strings"):
        PolicySettings.from_options({"allowed_host_paths": "/data"})
    with pytest.raises(ValueError, match="unknown net"):
        PolicySettings.from_options({"allowed_host_namespaces": ["net"]})
    with pytest.raises(ValueError, match="must be absolute"):
        PolicySettings.from_options({"allowed_host_paths": ["data"]})
    with pytest.raises(ValueError, match="deny_privileged must be a bool"):
        PolicySettings.from_options({"deny_privileged": "yes"})


def test_the_handler_refuses_with_every_reason():
    spec = cri_container(caps=["CAP_SYS_ADMIN"], mounts=[bind("/h", "/etc")], namespaces=[{"type": "mount"}])
    info = ContainerInfo(id="c1", namespace="k8s.io", bundle=BUNDLE, spec=spec)
    policy = Policy({"allowed_host_namespaces": ["pid", "ipc", "network", "uts"],
                     "containerd_root": ROOT})
    with pytest.raises(Refused) as refused:
        asyncio.run(policy.create(info))
    assert refused.value.message == (
        "pyshim policy: container c1: privileged containers are not allowed (CAP_SYS_ADMIN in its "
        "capabilities); host path /etc is not in allowed_host_paths")
    asyncio.run(Policy({"deny_privileged": False, "deny_host_paths": False,
                        "deny_host_namespaces": False}).create(info))
