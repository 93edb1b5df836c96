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
(bounded by its deadline, or 30 s without one). The others are queued when their event goes
out and run in the background, one at a time per container, in event order, each bounded at
30 s; no request waits for them, they cannot change anything, and their errors are only logged. Any hook's exception other than
Refused is logged with its traceback (into containerd's log) and, in `create`/`exec`, fails the
request with a clear error; the shim keeps serving. Hooks run on the shim's event loop: await,
never block (use `asyncio.to_thread` for blocking work).

No handler configured: the shim behaves exactly as without this module.
"""

from __future__ import annotations

from shim.framework.handler_api import ContainerInfo, ExitInfo, Handler, ProcessInfo, Refused

__all__ = ["ContainerInfo", "ExitInfo", "Handler", "ProcessInfo", "Refused", "run"]


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
