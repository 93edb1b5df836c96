"""Checkpoint and restore of a runc container with CRIU: containerd.runc.v1.CheckpointOptions
in, `runc checkpoint` / the CriuOptions of `runc restore` out, and errors worded as runc-v2's."""

from __future__ import annotations

import logging
import os
import shutil

from shim.framework.ttrpc.status import Code, TtrpcError
from shim.runc.runtime import CriuOptions, RuncError

log = logging.getLogger("shim.runc.checkpoint")

#: The type of CheckpointTaskRequest.options (what ctr and containerd's client send).
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"


def criu_dump_log(container) -> str:
    """Where a failed checkpoint's CRIU log is kept (its work dir is removed)."""
    return os.path.join(container.bundle, "criu-dump.log")


def restore_options(container, checkpoint: str, parent_checkpoint: str = "") -> CriuOptions:
    """The CriuOptions `runc restore` gets for a Create with a checkpoint."""
    return CriuOptions(
        image_path=checkpoint,
        work_path=container.options.criu_work_path or container.work_dir,
        parent_path=parent_checkpoint or None,
    )


async def checkpoint(container, image_path: str, options_any) -> None:
    """`runc checkpoint` of the container's init (CheckpointTaskRequest, its options decoded).

    Without `exit` the container keeps running (--leave-running); with it, runc stops it after
    the dump and its exit is reaped and published like any other. On failure CRIU's dump.log
    is copied to <bundle>/criu-dump.log, because a default work dir is removed.
    """
    options = decode_checkpoint_options(options_any)
    container.init.state.check("checkpoint")
    work_path = options.work_path or os.path.join(container.work_dir, "criu-work")
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
    kept_log = criu_dump_log(container)
    try:
        await container.runtime.checkpoint(container.id, criu, leave_running=not options.exit)
    except RuncError as exc:
        try:
            shutil.copyfile(os.path.join(work_path, "dump.log"), kept_log)
        except OSError as copy_error:
            log.error("%s: cannot copy CRIU's dump.log to %s: %s", container.id, kept_log, copy_error)
        raise TtrpcError(Code.UNKNOWN, f"{criu_error(exc)} path= {kept_log}") from None
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
