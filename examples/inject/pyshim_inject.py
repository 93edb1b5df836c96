"""Node-wide additions to every container of a RuntimeClass: environment variables,
read-only bind mounts of host files and OCI annotations, set once in the runtime options
instead of in every pod spec (a corporate CA bundle, a proxy, a node-local endpoint)::

    Handler = "pyshim_inject:Inject"
    [HandlerOptions.env]
    HTTPS_PROXY = "http://proxy.internal:3128"
    [HandlerOptions.mounts]                       # destination in the container = host source
    "/etc/ssl/certs/extra-ca.pem" = "/etc/pyshim/extra-ca.pem"
    [HandlerOptions.annotations]
    "example.com/injected" = "true"

The container's own settings win: a variable the container (or an exec) already sets, a
mount the container already has at that destination and an annotation it already carries are
left as they are, so a workload can always override a node default, and nothing CRI relies
on (its io.kubernetes.cri.* annotations, /etc/hosts) can be replaced.

Environment variables are added to execs too: CRI (ExecSync, `kubectl exec`) and ctr build
an exec's process from the container's spec as containerd stored it, which never saw what
this handler added at Create.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shim.handler import ContainerInfo, Handler, ProcessInfo

__all__ = ["Inject", "InjectSettings", "add_annotations", "add_env", "add_mounts"]

#: How an injected mount is made: read-only, no device files, no set-uid. A plain (not
#: recursive) bind: mounts under a host directory are not carried along, so none of them can
#: be writable inside.
MOUNT_OPTIONS = ("bind", "ro", "nosuid", "nodev", "rprivate")
CONTAINER_TYPE = "io.kubernetes.cri.container-type"


@dataclass(frozen=True)
class InjectSettings:
    """The HandlerOptions of Inject, checked."""

    env: dict[str, str] = field(default_factory=dict)
    #: destination in the container -> source on the host
    mounts: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: CRI's sandbox (pause) container runs no workload: leave it alone unless asked.
    include_sandbox: bool = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InjectSettings:
        """Settings from the HandlerOptions table; ValueError names what is wrong."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"pyshim inject: unknown HandlerOptions {', '.join(unknown)}")
        for name in ("env", "mounts", "annotations"):
            table = options.get(name, {})
            if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
                raise ValueError(f"pyshim inject: {name} must be a table of strings, not {table!r}")
        for name in options.get("env", {}):
            if not name or "=" in name:
                raise ValueError(f"pyshim inject: env: {name!r} is not a variable name")
        for destination, source in options.get("mounts", {}).items():
            if not (os.path.isabs(destination) and os.path.isabs(source)):
                raise ValueError(f"pyshim inject: mounts: {destination!r} = {source!r}: both must be absolute paths")
        include = options.get("include_sandbox", False)
        if not isinstance(include, bool):
            raise ValueError(f"pyshim inject: include_sandbox must be a bool, not {include!r}")
        return cls(env=dict(options.get("env", {})), mounts=dict(options.get("mounts", {})),
                   annotations=dict(options.get("annotations", {})), include_sandbox=include)


def add_env(process: dict[str, Any], env: dict[str, str]) -> list[str]:
    """Append NAME=value to the OCI process's env for each variable it does not set yet;
    returns the names added."""
    current = process.setdefault("env", [])
    present = {entry.partition("=")[0] for entry in current}
    added = [name for name in env if name not in present]
    current.extend(f"{name}={env[name]}" for name in added)
    return added


def add_mounts(spec: dict[str, Any], mounts: dict[str, str]) -> list[str]:
    """Append a read-only bind mount for each destination the spec does not mount yet (after
    the others, so that it lands on top of a mount of a parent directory); returns the
    destinations added."""
    current = spec.setdefault("mounts", [])
    present = {os.path.normpath(m.get("destination", "")) for m in current}
    added = [d for d in mounts if os.path.normpath(d) not in present]
    current.extend({"destination": d, "type": "bind", "source": mounts[d], "options": list(MOUNT_OPTIONS)}
                   for d in added)
    return added


def add_annotations(spec: dict[str, Any], annotations: dict[str, str]) -> list[str]:
    """Add each annotation the spec does not carry yet; returns the keys added."""
    current = spec.setdefault("annotations", {})
    added = [key for key in annotations if key not in current]
    current.update((key, annotations[key]) for key in added)
    return added


class Inject(Handler):
    """Adds the configured env, mounts and annotations at Create, and the env to each exec."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.settings = InjectSettings.from_options(self.options)
        self.applies = True

    async def create(self, container: ContainerInfo) -> None:
        settings = self.settings
        if container.annotations.get(CONTAINER_TYPE) == "sandbox" and not settings.include_sandbox:
            self.applies = False
            return
        for destination, source in settings.mounts.items():
            # runc would fail with "no such file or directory" and no hint of where it came from
            if not os.path.exists(source):
                raise FileNotFoundError(f"pyshim inject: mounts: {destination} = {source}: "
                                        f"{source} does not exist on this node")
        add_env(container.spec.setdefault("process", {}), settings.env)
        add_mounts(container.spec, settings.mounts)
        add_annotations(container.spec, settings.annotations)

    async def exec(self, container: ContainerInfo, process: ProcessInfo) -> None:
        if self.applies:
            add_env(process.spec, self.settings.env)
