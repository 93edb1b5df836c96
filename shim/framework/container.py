"""A container: its bundle, its OCI runtime, its init process and its exec processes.

The Task API layer finds a container by id and a process by exec id; the container owns
the resources that outlive single processes (the rootfs mount, the runtime options).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from shim.framework.process import ExecProcess, InitProcess, Process
from shim.framework.ttrpc.status import Code, TtrpcError

log = logging.getLogger("shim.framework.container")

@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    namespace: str
    options: object  # the app's options (shim.framework.app.App.parse_options)
    runtime: object  # its OCI runtime backend (shim.framework.backend)
    init: InitProcess
    rootfs_mounted: bool = False
    execs: dict[str, ExecProcess] = field(default_factory=dict)
    #: execs whose `runc exec` is in flight; init's exit waits for them (Shim.tla).
    starting_execs: int = 0
    #: init's cgroup (shim.framework.cgroups.Cgroup), loaded at Create (or Start); None: no Stats.
    cgroup: object | None = None
    #: its armed OOM notification (shim.framework.cgroups.OomWatch), closed at Delete.
    oom_watch: object | None = None
    #: its custom handler (shim.framework.hooks.HandlerRunner), None without one.
    handler: object | None = None

    @property
    def rootfs(self) -> str:
        return os.path.join(self.bundle, "rootfs")

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        found = self.execs.get(exec_id)
        if found is None:
            raise TtrpcError(Code.NOT_FOUND, f"process {exec_id} does not exist: not found")
        return found

    def all_processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]

    @property
    def work_dir(self) -> str:
        """containerd's per-task state directory, linked into the bundle as `work`."""
        return os.path.join(self.bundle, "work")


class ContainerRegistry:
    """The daemon's containers, keyed by (namespace, id): one daemon may serve a whole group,
    and containers of one id may exist in two namespaces. A plain id means the daemon's own
    namespace (the one containerd started it for), which is what every Task API request
    addresses today."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._by_key: dict[tuple[str, str], Container] = {}

    def _key(self, key) -> tuple[str, str]:
        return key if isinstance(key, tuple) else (self.namespace, key)

    def get(self, key, default=None) -> Container | None:
        """The container of `id` (daemon's namespace) or of `(namespace, id)`."""
        return self._by_key.get(self._key(key), default)

    def add(self, container: Container) -> None:
        self._by_key[(container.namespace, container.id)] = container

    def remove(self, container: Container) -> None:
        self._by_key.pop((container.namespace, container.id), None)

    def __getitem__(self, key) -> Container:
        return self._by_key[self._key(key)]

    def __contains__(self, key) -> bool:
        return self._key(key) in self._by_key

    def __iter__(self):
        return iter(list(self._by_key.values()))

    def __len__(self) -> int:
        return len(self._by_key)

    def keys(self) -> list[tuple[str, str]]:
        return list(self._by_key)
