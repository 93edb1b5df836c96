"""The daemon's flight recorder: what it does, as small dict records.

Producers (the Task API wrapper in service.py, the reaper's command runner, the event
publisher, the exit router) call `TRACER.<kind>(...)`. Records go to attached sinks (the debug
server's `trace` clients) only while one is attached: `if TRACER.sinks` is the whole cost
otherwise. The last few OCI runtime commands of each container are kept either way (a deque
append per command), for `pyshim inspect` to show after the fact, and commands still running
are known, for `pyshim stacks` to name what a stuck request waits on.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shim.framework.logcontext import TASK_ID

#: Commands kept per container for `pyshim inspect`.
RECENT_COMMANDS = 16
#: Bytes of a failed command's stderr kept with its record.
STDERR_TAIL = 512

Record = dict
Sink = Callable[[Record], None]


@dataclass(slots=True)
class CommandRun:
    """One run of an external command (runc, crun, ...) on behalf of a container."""

    container_id: str
    label: str  # what it does, e.g. runc's subcommand
    argv: Sequence[str]
    started: float  # time.time()
    started_mono: float = field(default_factory=time.monotonic)
    pid: int = 0
    duration: float | None = None  # seconds; None while running
    exit_code: int | None = None
    stderr: str = ""

    def as_record(self) -> Record:
        record = {
            "id": self.container_id,
            "command": self.label,
            "argv": list(self.argv),
            "pid": self.pid,
            "started": self.started,
        }
        if self.duration is None:
            record["running_for_ms"] = round((time.monotonic() - self.started_mono) * 1000, 1)
        else:
            record["ms"] = round(self.duration * 1000, 1)
            record["exit_code"] = self.exit_code
            if self.stderr:
                record["stderr"] = self.stderr
        return record


class Tracer:
    """One per daemon process (TRACER below); everything runs on the daemon's loop."""

    def __init__(self) -> None:
        self.sinks: list[Sink] = []
        self._recent: dict[str, collections.deque[CommandRun]] = {}
        self._running: dict[int, CommandRun] = {}
        self._ids = itertools.count(1)

    # -- sinks ----------------------------------------------------------------------------
    def attach(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def detach(self, sink: Sink) -> None:
        try:
            self.sinks.remove(sink)
        except ValueError:
            pass

    def emit(self, kind: str, record: Record) -> None:
        record["kind"] = kind
        record["time"] = time.time()
        for sink in tuple(self.sinks):
            sink(record)

    # -- producers ------------------------------------------------------------------------
    def request(self, service: str, method: str, container_id: str, exec_id: str, code: str,
                message: str, seconds: float) -> None:
        if self.sinks:
            self.emit("request", {"service": service, "method": method, "id": container_id,
                                  "exec_id": exec_id, "status": code, "message": message,
                                  "ms": round(seconds * 1000, 2)})

    def command_started(self, label: str, argv: Sequence[str]) -> int:
        run = CommandRun(TASK_ID.get(), label, tuple(argv), time.time())
        token = next(self._ids)
        self._running[token] = run
        return token

    def command_spawned(self, token: int, pid: int) -> None:
        run = self._running.get(token)
        if run is not None:
            run.pid = pid

    def command_finished(self, token: int, exit_code: int | None, stderr: bytes = b"") -> None:
        run = self._running.pop(token, None)
        if run is None:
            return
        run.duration = time.monotonic() - run.started_mono
        run.exit_code = exit_code
        if exit_code and stderr:
            run.stderr = stderr[-STDERR_TAIL:].decode("utf-8", "replace").strip()
        recent = self._recent.get(run.container_id)
        if recent is None:
            recent = self._recent[run.container_id] = collections.deque(maxlen=RECENT_COMMANDS)
        recent.append(run)
        if self.sinks:
            self.emit("command", run.as_record())

    def event(self, topic: str, container_id: str, state: str, attempts: int = 0, message: str = "") -> None:
        if self.sinks:
            record = {"topic": topic, "id": container_id, "state": state}
            if attempts:
                record["attempts"] = attempts
            if message:
                record["message"] = message
            self.emit("event", record)

    def exit(self, container_id: str, exec_id: str, pid: int, status: int) -> None:
        if self.sinks:
            self.emit("exit", {"id": container_id, "exec_id": exec_id, "pid": pid, "status": status})

    # -- queries --------------------------------------------------------------------------
    def recent_commands(self, container_id: str) -> list[Record]:
        return [run.as_record() for run in self._recent.get(container_id, ())]

    def running_commands(self) -> list[Record]:
        return [run.as_record() for run in self._running.values()]

    def forget(self, container_id: str) -> None:
        """The container was deleted: its command history goes with it."""
        self._recent.pop(container_id, None)


TRACER = Tracer()
