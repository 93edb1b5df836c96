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
