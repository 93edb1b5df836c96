"""A container: its bundle, its OCI runtime, its init process and its exec processes.

The Task API layer finds a container by id and a process by exec id; the container owns
the resources that outlive single processes (the rootfs mount, the runtime options).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field

from shim.runc.options import RuntimeOptions
from shim.framework.process import ExecProcess, InitProcess, Process
from shim.framework.ttrpc.status import Code, TtrpcError

log = logging.getLogger("shim.framework.container")

#: The type of CheckpointTaskRequest.options (what ctr and containerd's client send).
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"

@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    namespace: str
    options: RuntimeOptions
    runtime: object  # shim.runc.runtime.Runc
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

    @property
    def criu_dump_log(self) -> str:
        """Where a failed checkpoint's CRIU log is kept (its work dir is removed)."""
        return os.path.join(self.bundle, "criu-dump.log")

    def restore_options(self, checkpoint: str, parent_checkpoint: str = ""):
        """The CriuOptions `runc restore` gets for a Create with a checkpoint."""
        from shim.runc.runtime import CriuOptions

        return CriuOptions(
            image_path=checkpoint,
            work_path=self.options.criu_work_path or self.work_dir,
            parent_path=parent_checkpoint or None,
        )

    async def checkpoint(self, image_path: str, options) -> None:
        """`runc checkpoint` of the init process (CheckpointTaskRequest with its decoded
        containerd.runc.v1.CheckpointOptions).

        Without `exit` the container keeps running (--leave-running); with it, runc stops it
        after the dump and its exit is reaped and published like any other. On failure CRIU's
        dump.log is copied to <bundle>/criu-dump.log, because a default work dir is removed.
        """
        from shim.runc.runtime import CriuOptions, RuncError

        self.init.state.check("checkpoint")
        work_path = options.work_path or os.path.join(self.work_dir, "criu-work")
        criu = CriuOptions(
            image_path=image_path or options.image_path,
            work_path=work_path,
            parent_path=options.parent_path or None,
            tcp_established=options.open_tcp,
            ext_unix_sk=options.external_unix_sockets,
            shell_job=options.terminal,
            file_locks=options.file_locks,
            empty_ns=tuple(options.empty_namespaces),
        )
        try:
            await self.runtime.checkpoint(self.id, criu, leave_running=not options.exit)
        except RuncError as exc:
            try:
                shutil.copyfile(os.path.join(work_path, "dump.log"), self.criu_dump_log)
            except OSError as copy_error:
                log.error("%s: cannot copy CRIU's dump.log to %s: %s", self.id, self.criu_dump_log, copy_error)
            raise TtrpcError(Code.UNKNOWN, f"{criu_error(exc)} path= {self.criu_dump_log}") from None
        finally:
            if not options.work_path:  # a work path the client chose is kept for it
                shutil.rmtree(work_path, ignore_errors=True)


def decode_checkpoint_options(any_message):
    """CheckpointTaskRequest.options as containerd.runc.v1.CheckpointOptions (defaults when
    absent); anything else is the client's mistake, INVALID_ARGUMENT."""
    from shim.api.containerd.runc.v1 import CheckpointOptions

    if any_message is None or (not any_message.type_url and not any_message.value):
        return CheckpointOptions()
    type_url = any_message.type_url
    if type_url.rsplit("/", 1)[-1] != CHECKPOINT_OPTIONS_TYPE:
        raise TtrpcError(
            Code.INVALID_ARGUMENT, f"checkpoint options of type {type_url!r}: expected {CHECKPOINT_OPTIONS_TYPE}"
        )
    try:
        return CheckpointOptions.parse(any_message.value)
    except Exception as exc:  # betterproto2 raises assorted errors for malformed bytes
        raise TtrpcError(Code.INVALID_ARGUMENT, f"checkpoint options ({type_url}) do not decode: {exc}") from None


def criu_error(err) -> str:
    """A failed checkpoint's message as the Go shim words it: the first line of go-runc's
    "<runc> did not terminate successfully: exit status N: <runc's output>" (later lines name
    the work dir's log, which is gone)."""
    text = str(err).strip()
    returncode = getattr(err, "returncode", None)
    if returncode is not None:
        argv = getattr(err, "argv", None) or ["runc"]
        text = f"{argv[0]} did not terminate successfully: exit status {returncode}: {text}"
    return text.split("\n", 1)[0]
