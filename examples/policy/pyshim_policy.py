"""A node-level admission policy for pyshim: refuse privileged containers, host namespaces
and host bind mounts outside an allow list, before runc ever sees the container.

Configured per runtime handler (RuntimeClass) in the runtime options table::

    Handler = "pyshim_policy:Policy"
    [HandlerOptions]
    allowed_host_paths = ["/data"]
    allowed_host_namespaces = ["network", "uts"]

A refusal fails the shim's Create with PERMISSION_DENIED and a message naming the container
and every rule it breaks, e.g. ``pyshim policy: container 4f2a...: host path /etc is not in
allowed_host_paths``; CRI passes it on (StartContainer for a container, RunPodSandbox for a
pod's sandbox), so `kubectl describe pod` shows it.

The rules read the OCI spec containerd's CRI plugin generated, so they hold for any client
of the node's containerd (kubelet, crictl, ctr), not only for what the API server admitted.
See README.md for what CRI writes into the spec and why the rules look where they do.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shim.handler import ContainerInfo, Handler, Refused

__all__ = ["Policy", "PolicySettings", "violations"]

#: Namespaces a container can share with the host (an OCI namespace entry that is absent, or
#: whose path is the host's). mount is always the container's own; CRI never asks for a
#: cgroup or user namespace on cgroup v1, so their absence says nothing.
HOST_NAMESPACES = ("pid", "ipc", "network", "uts")

#: CRI's own bind mounts of a pod's files: destination -> file name in the sandbox's directory
#: (hostname, hosts and resolv.conf under containerd's root, the shm mount under its state).
CRI_SANDBOX_FILES = {"/etc/hostname": "hostname", "/etc/hosts": "hosts", "/etc/resolv.conf": "resolv.conf"}
CRI_PLUGIN_DIR = "io.containerd.grpc.v1.cri"  # the same directory name in containerd 1.6 to 2.x


@dataclass(frozen=True)
class PolicySettings:
    """The HandlerOptions of Policy, checked and with their defaults (every rule on)."""

    deny_privileged: bool = True
    #: Capabilities that make a container privileged for this policy. `privileged: true`
    #: grants every capability; CAP_SYS_ADMIN alone already lets a process mount, unshare and
    #: reach most of the kernel's admin interfaces, so `capabilities.add: [SYS_ADMIN]` counts.
    privileged_capabilities: tuple[str, ...] = ("CAP_SYS_ADMIN",)
    deny_host_namespaces: bool = True
    allowed_host_namespaces: tuple[str, ...] = ()
    deny_host_paths: bool = True
    allowed_host_paths: tuple[str, ...] = ()
    #: containerd's root dir (config `root`): CRI keeps a pod's hosts, hostname and
    #: resolv.conf and the containers' image volumes there. Its state dir is read from the
    #: bundle's path.
    containerd_root: str = "/var/lib/containerd"
    #: The kubelet's pods dir: a pod's volumes, its /etc/hosts and termination log are under
    #: <dir>/<pod uid>/; the pod's own directory is allowed, other pods' are not. "" turns
    #: this off.
    kubelet_pods_dir: str = "/var/lib/kubelet/pods"

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> PolicySettings:
        """Settings from the HandlerOptions table; ValueError names a key that is wrong."""
        known = {name: field.default for name, field in cls.__dataclass_fields__.items()}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"pyshim policy: unknown HandlerOptions {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in options.items():
            default = known[name]
            if isinstance(default, tuple):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"pyshim policy: {name} must be a list of strings, not {value!r}")
                value = tuple(value)
            elif not isinstance(value, type(default)):
                raise ValueError(f"pyshim policy: {name} must be a {type(default).__name__}, not {value!r}")
            values[name] = value
        settings = cls(**values)
        bad = sorted(set(settings.allowed_host_namespaces) - set(HOST_NAMESPACES))
        if bad:
            raise ValueError(f"pyshim policy: allowed_host_namespaces: unknown {', '.join(bad)} "
                             f"(known: {', '.join(HOST_NAMESPACES)})")
        if not all(os.path.isabs(p) for p in settings.allowed_host_paths):
            raise ValueError(f"pyshim policy: allowed_host_paths must be absolute: {settings.allowed_host_paths}")
        capabilities = tuple(c if c.startswith("CAP_") else f"CAP_{c}" for c in
                             (c.upper() for c in settings.privileged_capabilities))
        return cls(**{**values, "privileged_capabilities": capabilities})


def is_host_namespace(kind: str, path: str) -> bool:
    """Whether the namespace at `path` (/proc/<pid>/ns/<kind>) is the shim's own, i.e. the
    host's: CRI's containers join their pod's namespaces by path, so a pod on the host
    network gives each container the host's network namespace as a path, not as an absence."""
    try:
        theirs, ours = os.stat(path), os.stat(f"/proc/self/ns/{_PROC_NS_NAMES.get(kind, kind)}")
    except OSError:
        return False  # gone or unreadable: runc fails on it anyway
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


_PROC_NS_NAMES = {"network": "net"}


def _within(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory + "/") or directory == "/"


def _is_bind(mount: dict[str, Any]) -> bool:
    options = mount.get("options") or []
    return mount.get("type") == "bind" or "bind" in options or "rbind" in options


def _cri_own_mount(mount: dict[str, Any], source: str, *, container_id: str, bundle: str,
                   annotations: dict[str, str], host_ipc: bool, settings: PolicySettings) -> bool:
    """A bind mount CRI (or the kubelet, for the pod's own directory) adds to every pod:
    nothing the pod's author chose."""
    destination = mount.get("destination", "")
    sandbox = annotations.get("io.kubernetes.cri.sandbox-id", "")
    root = os.path.join(settings.containerd_root, CRI_PLUGIN_DIR)
    # <state>/io.containerd.runtime.v2.task/<namespace>/<id> is the bundle
    state = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(bundle))), CRI_PLUGIN_DIR)
    if sandbox and destination in CRI_SANDBOX_FILES:
        if source == os.path.join(root, "sandboxes", sandbox, CRI_SANDBOX_FILES[destination]):
            return True
    if sandbox and destination == "/dev/shm":
        if source == os.path.join(state, "sandboxes", sandbox, "shm"):
            return True
        if source == "/dev/shm" and host_ipc:  # the host's shm comes with the host's IPC namespace
            return True
    if _within(source, os.path.join(root, "containers", container_id, "volumes")):
        return True  # the image's VOLUMEs, copied there by CRI
    uid = annotations.get("io.kubernetes.cri.sandbox-uid", "")
    return bool(settings.kubelet_pods_dir and uid and _within(source, os.path.join(settings.kubelet_pods_dir, uid)))


def violations(spec: dict[str, Any], *, container_id: str, bundle: str, settings: PolicySettings,
               host_namespace: Callable[[str, str], bool] = is_host_namespace,
               resolve: Callable[[str], str] = os.path.realpath) -> list[str]:
    """What in `spec` breaks the policy, one sentence each (empty: the container may run).

    `host_namespace(kind, path)` says whether a namespace path is the host's; `resolve` turns
    a mount source into the host path the kernel will bind (symlinks followed).
    """
    found: list[str] = []
    process = spec.get("process") or {}
    linux = spec.get("linux") or {}
    annotations = spec.get("annotations") or {}

    if settings.deny_privileged:
        capabilities = process.get("capabilities") or {}
        held: set[str] = set()
        for kind in ("bounding", "effective", "permitted", "inheritable", "ambient"):
            held.update(capabilities.get(kind) or [])
        for capability in settings.privileged_capabilities:
            if capability in held:
                found.append(f"privileged containers are not allowed ({capability} in its capabilities)")
                break

    namespaces = {ns.get("type"): ns.get("path", "") for ns in linux.get("namespaces") or []}
    host = {kind for kind in HOST_NAMESPACES
            if kind not in namespaces or (namespaces[kind] and host_namespace(kind, namespaces[kind]))}
    if settings.deny_host_namespaces:
        for kind in HOST_NAMESPACES:
            if kind in host and kind not in settings.allowed_host_namespaces:
                found.append(f"host {kind} namespace is not in allowed_host_namespaces")

    if settings.deny_host_paths:
        allowed = [resolve(p) for p in settings.allowed_host_paths]
        for mount in spec.get("mounts") or []:
            source = mount.get("source") or ""
            if not _is_bind(mount) or not os.path.isabs(source):
                continue
            real = resolve(source)
            if _cri_own_mount(mount, real, container_id=container_id, bundle=bundle,
                              annotations=annotations, host_ipc="ipc" in host, settings=settings):
                continue
            if not any(_within(real, a) for a in allowed):
                shown = source if real == source else f"{source} (-> {real})"
                found.append(f"host path {shown} is not in allowed_host_paths")
    return found


class Policy(Handler):
    """Refuses, at Create, containers that break the node's policy (see the module's doc).

    Exec is not checked: an exec runs with the container's namespaces, mounts and
    capabilities, which were checked when the container was created.
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = PolicySettings.from_options(self.options)

    async def create(self, container: ContainerInfo) -> None:
        found = violations(container.spec, container_id=container.id, bundle=container.bundle,
                           settings=self.settings)
        if found:
            raise Refused(f"pyshim policy: container {container.id}: " + "; ".join(found))
