"""An audit trail for pyshim: one JSON line per task lifecycle event, appended to a file.

Runtime options (the runtime handler's TOML)::

    Handler = "pyshim_audit:Audit"
    [HandlerOptions]
    path = "/var/log/pyshim-audit.jsonl"   # where the lines go (created 0640 if missing)
    required = false                       # true: refuse create/exec that cannot be recorded

Events: create, start, exec, exec-started, exit (init or exec), oom, delete. See README.md for
the fields of each line.

How a line is written, and why:

* One `os.write` of the whole line to a descriptor opened with O_APPEND. Linux appends each
  write to a regular file atomically (the offset moves and the data lands under the inode
  lock), so lines from every shim writing the same file (one per pod or container, each with
  many containers when grouped) never interleave or overwrite each other.
* The file is opened for every line, not kept open: a rotated (renamed) or removed file is
  picked up at the next line without a signal, and no descriptor of ours lives on in the shim
  (O_CLOEXEC: nor in what the shim spawns).
* Synchronously, on the shim's event loop. Measured on ext4 (367-byte lines): open+write+close
  takes ~4 us median, ~12-40 us p99; `asyncio.to_thread` costs ~45-50 us per line before any
  writing and hands the lines to threads, which may write them in another order than the
  hooks ran. A hook that does not await also runs entirely before anything else on the loop,
  so a process's lines keep the order of its hooks (see README.md, "Ordering").
* Never fails a request because the file cannot be written (unless `required = true`, and
  then only create and exec, the requests a handler can refuse): the error is logged, into
  containerd's log, once when lines start being lost and once when they are written again.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import time
from typing import Any

from shim.handler import ContainerInfo, ExitInfo, Handler, ProcessInfo, Refused

__all__ = ["Audit", "DEFAULT_PATH", "rfc3339"]

log = logging.getLogger("pyshim_audit")

DEFAULT_PATH = "/var/log/pyshim-audit.jsonl"

#: CRI's spec annotations -> the field names of a line.
CRI_ANNOTATIONS = {
    "io.kubernetes.cri.sandbox-name": "pod_name",
    "io.kubernetes.cri.sandbox-namespace": "pod_namespace",
    "io.kubernetes.cri.container-name": "container_name",
}

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def rfc3339(ns: int) -> str:
    """RFC 3339 UTC time with nanoseconds, as containerd prints times: 2025-01-02T03:04:05.123456789Z."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def _ns(when: datetime.datetime) -> int:
    """Nanoseconds since the epoch of an aware (or UTC-naive) datetime, without float rounding."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return (when - _EPOCH) // datetime.timedelta(microseconds=1) * 1000


class Audit(Handler):
    """Appends one JSON line per lifecycle event of its container to `options["path"]`.

    One instance per container (the shim makes it at create), so the times it remembers
    (create, each process's start) are that container's.
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        path = self.options.get("path", DEFAULT_PATH)
        required = self.options.get("required", False)
        # A wrong option is a configuration error: it fails create (INVALID_ARGUMENT) with this
        # message rather than auditing to an unexpected place.
        if not isinstance(path, str) or not path:
            raise ValueError(f"HandlerOptions.path must be a non-empty string, not {path!r}")
        if not isinstance(required, bool):
            raise ValueError(f"HandlerOptions.required must be true or false, not {required!r}")
        self.path = path
        self.required = required
        self._cri: dict[str, str] = {}
        self._created_ns = 0
        #: exec id ("" for init) -> when its start was seen, for the exit's duration.
        self._started_ns: dict[str, int] = {}
        self._init_status: int | None = None
        #: Lines lost since the file last took one (logged when it takes one again).
        self._lost = 0

    # -- hooks ----------------------------------------------------------------------------
    async def create(self, container: ContainerInfo) -> None:
        """Record the create request (pid 0: the OCI runtime has not made the container yet)."""
        # Not container.annotations: it adds an empty "annotations" to a spec without one,
        # which makes the shim rewrite config.json for a hook that changed nothing.
        annotations = container.spec.get("annotations") or {}
        self._cri = {field: annotations[key] for key, field in CRI_ANNOTATIONS.items()
                     if isinstance(annotations.get(key), str)}
        self._created_ns = time.time_ns()
        self._record_refusably("create", container, None, now=self._created_ns)

    async def exec(self, container: ContainerInfo, process: ProcessInfo) -> None:
        """Record an exec being added, with what it will run."""
        self._record_refusably("exec", container, process.exec_id,
                               args=list(process.spec.get("args") or []), terminal=process.terminal)

    async def started(self, container: ContainerInfo, process: ProcessInfo) -> None:
        """Record init's start or an exec's, and remember when, for its exit's duration."""
        now = time.time_ns()
        self._started_ns[process.exec_id] = now
        event = "start" if process.is_init else "exec-started"
        self._record(event, container, process.exec_id, pid=process.pid, now=now)

    async def exited(self, container: ContainerInfo, process: ProcessInfo, exit: ExitInfo) -> None:
        """Record an exit with its status and how long the process ran."""
        exited_ns = _ns(exit.exited_at)
        fields: dict[str, Any] = {"pid": exit.pid, "status": exit.status, "exited_at": rfc3339(exited_ns)}
        started_ns = self._started_ns.pop(process.exec_id, None)
        if started_ns is not None:
            fields["started_at"] = rfc3339(started_ns)
            # The start is when the shim saw it (after the OCI runtime returned); a process
            # that ended before that ran for less than we can tell: 0, never negative.
            fields["duration_s"] = max(0, exited_ns - started_ns) / 1e9
        if process.is_init:
            self._init_status = exit.status
        self._record("exit", container, process.exec_id, **fields)

    async def oom(self, container: ContainerInfo) -> None:
        """Record an OOM kill in the container's cgroup."""
        self._record("oom", container, None, pid=container.pid)

    async def deleted(self, container: ContainerInfo) -> None:
        """Record the container's deletion and its lifetime since create."""
        now = time.time_ns()
        fields: dict[str, Any] = {"pid": container.pid}
        if self._init_status is not None:
            fields["status"] = self._init_status
        if self._created_ns:
            fields["duration_s"] = max(0, now - self._created_ns) / 1e9
        self._record("delete", container, None, now=now, **fields)
        if self._lost:
            log.error("%s: audit log %s: %d line(s) of this container were lost",
                      container.id, self.path, self._lost)

    # -- writing --------------------------------------------------------------------------
    def _record_refusably(self, event: str, container: ContainerInfo, exec_id: str | None,
                          **fields: Any) -> None:
        error = self._record(event, container, exec_id, **fields)
        if error is not None and self.required:
            raise Refused(f"audit log {self.path} cannot be written ({error}) and the runtime "
                          f"handler requires it: {event} refused")

    def _record(self, event: str, container: ContainerInfo, exec_id: str | None, *,
                now: int | None = None, **fields: Any) -> str | None:
        """Append the event's line; on failure log it and return why (None when written)."""
        line: dict[str, Any] = {
            "time": rfc3339(now if now is not None else time.time_ns()),
            "event": event,
            "namespace": container.namespace,
            "container_id": container.id,
            "exec_id": exec_id or "",
            "pid": fields.pop("pid", 0),
        }
        line.update(fields)
        line.update(self._cri)
        # ensure_ascii: a line is pure ASCII, control characters escaped: one line, always.
        data = (json.dumps(line, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        error = self._append(data)
        if error is None:
            if self._lost:
                log.warning("%s: audit log %s is written again; %d line(s) were lost",
                            container.id, self.path, self._lost)
                self._lost = 0
            return None
        if not self._lost:
            log.error("%s: cannot write the audit log %s (%s): %s lines are lost until it can be",
                      container.id, self.path, error, event)
        else:
            log.debug("%s: audit log %s: %s line lost (%s)", container.id, self.path, event, error)
        self._lost += 1
        return error

    def _append(self, data: bytes) -> str | None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o640)
        except OSError as exc:
            return exc.strerror or str(exc)
        try:
            written = os.write(fd, data)
        except OSError as exc:
            return exc.strerror or str(exc)
        finally:
            os.close(fd)
        if written != len(data):
            # A regular file takes a whole write unless the disk is full or a limit is hit.
            # Writing the rest separately could split the line around another shim's, so the
            # fragment is only ended, which keeps the next line from being glued to it.
            self._end_fragment()
            return f"short write: {written} of {len(data)} bytes (disk full?)"
        return None

    def _end_fragment(self) -> None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o640)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
        except OSError:
            pass  # the next line may then follow the fragment; nothing better can be done
