"""Custom RuntimeClass handlers: one Python class that runs inside the shim, per runtime handler.

A handler sees and may change a container's OCI spec before the OCI runtime creates it, may
refuse a container or an exec with a message the user sees (`ctr`, `crictl`, `kubectl
describe pod`), and hears about the task's life (started, exited, OOM, deleted)::

    from shim.handler import Handler, Refused

    class NoPrivileged(Handler):
        async def create(self, container):
            if container.spec.get("process", {}).get("capabilities", {}).get("bounding", []) == ALL:
                raise Refused("privileged containers are not allowed on this node")

It is chosen in the runtime's options table (the TOML that also carries BinaryName: inline in
containerd 1.7/2.x CRI config, a ConfigPath file on 1.6, `ctr --runtime-config-path`)::

    Handler = "mypolicy:NoPrivileged"          # module:Class, importable by the shim's Python
    [HandlerOptions]                           # any table; the handler gets it parsed, as a dict
    allowed = ["/data"]

Hook order, against the events containerd sees:

    Create RPC:  create(container)  -> OCI runtime create -> /tasks/create
    Start RPC:   OCI runtime start  -> /tasks/start  -> started(container, init)
    Exec RPC:    exec(container, process)  -> /tasks/exec-added      (refusable, spec mutable)
    Start(exec): OCI runtime exec   -> /tasks/exec-started -> started(container, process)
    exit:        /tasks/exit -> exited(container, process, exit)
    OOM:         /tasks/oom  -> oom(container)
    Delete RPC:  OCI runtime delete, unmount -> /tasks/delete -> deleted(container)

`create` and `exec` run inside their request: they may refuse, and the request waits for them
(bounded by its deadline, or 30 s without one). The others run after their event went out,
one at a time per container and in order (the request that caused them waits for them, at most
30 s); they cannot change anything, and their errors are only logged. Any hook's exception other than
Refused is logged with its traceback (into containerd's log) and, in `create`/`exec`, fails the
request with a clear error; the shim keeps serving. Hooks run on the shim's event loop: await,
never block (use `asyncio.to_thread` for blocking work).

No handler configured: the shim behaves exactly as without this module.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ContainerInfo", "ExitInfo", "Handler", "ProcessInfo", "Refused", "run"]


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


def run(handler: str, runtime_type: str, *, binary_name: str = "", argv: list[str] | None = None) -> int:
    """The whole main() of a handler's own shim binary (Go's shim.Run): the runc application
    with `handler` ("module:Class") for every container whose options name no other::

        # mypolicy/shim.py, installed as the console script containerd-shim-mypolicy-v2
        from shim.handler import run

        def main() -> int:
            return run("mypolicy:Policy", runtime_type="io.containerd.mypolicy.v2")

    containerd finds the binary from the runtime type (io.containerd.mypolicy.v2 ->
    containerd-shim-mypolicy-v2 on its PATH); its daemons, zygote and group annotation
    (io.containerd.mypolicy.v2.group) are its own.
    """
    from shim.framework.app import RuntimeIdentity
    from shim.framework.main import run as run_shim

    identity = RuntimeIdentity(runtime_type, app="shim.runc.app:RuncApp", binary_name=binary_name,
                               default_handler=handler)
    return run_shim(identity, argv)
