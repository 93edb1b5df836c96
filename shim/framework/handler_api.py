"""The handler API's types (re-exported by shim.handler, the module handler authors read):
Handler and its hooks' arguments. Defined in the framework so that the framework's hook
runner (shim.framework.hooks) needs nothing from outside it."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

class Refused(Exception):
    """Raise in `create` or `exec` to refuse the request. Its message is the error text the
    client gets (as a PERMISSION_DENIED status), and nothing of the container is left behind."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(eq=False)
class ContainerInfo:
    """A container as a handler sees it.

    `spec` is the bundle's OCI runtime spec (config.json) as a dict. Changes made to it in
    `create` are what the OCI runtime gets (the shim writes config.json back); later changes
    have no effect.
    """

    id: str
    namespace: str
    bundle: str
    spec: dict[str, Any]
    #: The runtime handler's HandlerOptions table (empty when there is none).
    options: dict[str, Any] = field(default_factory=dict)
    #: The init process's pid once it is created (0 before).
    pid: int = 0

    @property
    def annotations(self) -> dict[str, str]:
        """The spec's annotations (CRI puts the pod's name, namespace and uid there)."""
        return self.spec.setdefault("annotations", {})

    @property
    def rootfs(self) -> str:
        """Where the container's root filesystem is mounted (spec root.path, in the bundle)."""
        import os

        path = (self.spec.get("root") or {}).get("path") or "rootfs"
        return path if os.path.isabs(path) else os.path.join(self.bundle, path)


@dataclass(eq=False)
class ProcessInfo:
    """The init process (exec_id "") or an exec. In `exec`, `spec` is the OCI process spec
    (args, env, cwd, user, terminal) as a dict: changes made there are what runs."""

    container_id: str
    exec_id: str
    spec: dict[str, Any]
    pid: int = 0
    terminal: bool = False

    @property
    def is_init(self) -> bool:
        """True for the container's init process (exec_id "")."""
        return not self.exec_id


@dataclass(frozen=True)
class ExitInfo:
    """How a process ended: its status (128+signal when killed) and when."""

    status: int
    exited_at: datetime.datetime
    pid: int


class Handler:
    """Base of RuntimeClass handlers: override the hooks you need; each default does nothing.

    One instance per container, made when the container is created, with the runtime
    handler's HandlerOptions table as `options`.
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    async def create(self, container: ContainerInfo) -> None:
        """Before the OCI runtime creates the container. Change `container.spec`, or raise
        Refused."""

    async def exec(self, container: ContainerInfo, process: ProcessInfo) -> None:
        """An exec is being added (ExecProcess): change `process.spec`, or raise Refused."""

    async def started(self, container: ContainerInfo, process: ProcessInfo) -> None:
        """After /tasks/start (init) or /tasks/exec-started (an exec); `process.pid` is set."""

    async def exited(self, container: ContainerInfo, process: ProcessInfo, exit: ExitInfo) -> None:
        """After the process's /tasks/exit went out."""

    async def oom(self, container: ContainerInfo) -> None:
        """After /tasks/oom: the kernel killed a process of the container for memory."""

    async def deleted(self, container: ContainerInfo) -> None:
        """After /tasks/delete: the container is gone from the runtime and its rootfs unmounted."""

    def runtime(self, container: ContainerInfo, default):
        """The OCI runtime backend that runs this container (shim.framework.backend), chosen
        right after `create`: `default` is the one the runtime options give (runc, or the
        BinaryName binary). Return another to swap it, e.g. `Crun.replacing(default)`
        (shim.runc.crun). Called once per container; must not block."""
        return default
