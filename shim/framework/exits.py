"""Which container process a reaped exit belongs to, and when it may be handled.

The reaper sees every exit of the shim's children; `ExitRouter.on_exit` hands each one to
`handle(process, exit)` (the service publishes it) or holds it back, by these rules (rules
1 and 2 of the service's exit rules; containerd's cmd/containerd-shim-runc-v2 keeps the
same ones in its preStart):

1. A process may exit before its start returns, even before its pid is known: `runc
   create/exec/restore` writes the pid file and returns while the process may already be
   gone. While such a start is in flight, exits of unknown pids are collected; once the pid
   is read (`Start.running(pid)`) the collected exit with that pid, if any, is the
   process's, handled when the start ends.
2. An exit of a process whose start is in flight (Start of a created init, whose pid is
   known) is parked and handled when the start ends: the start event (/tasks/start,
   /tasks/exec-started) is published inside the block, so the exit always follows it.
3. When the start fails, a parked exit is still handled (the process exited; its start
   failing does not undo that); a collected one is dropped with its unknown pid.

One construct for every start (Create, Start, restore at Start, exec Start)::

    with router.starting(process) as start:
        await runtime.exec(...)              # the exit may arrive during any await
        start.running(read_pid_file(...))    # pid known: register it (or find its exit)
        publish("/tasks/exec-started", ...)  # no await between running() and the event
    # here the held exit, if any, has been handed to `handle`, after the event

Everything runs on one event loop: between two awaits the bookkeeping is atomic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


class Start:
    """One start in flight (see ExitRouter.starting)."""

    __slots__ = ("process", "_router", "_unknown", "_early")

    def __init__(self, router: ExitRouter, process) -> None:
        self.process = process
        self._router = router
        self._unknown: list = []  # exits of pids nobody knew while this start was in flight
        self._early = None  # the process's own exit among them (rule 1)

    def running(self, pid: int) -> None:
        """The runtime returned and the process's pid is known: route its exits from now
        on, or keep the one that already happened for the end of the block."""
        self.process.pid = pid
        self._early = next((e for e in self._unknown if e.pid == pid), None)
        if self._early is None:
            self._router.by_pid[pid] = self.process


class ExitRouter:
    """Exits to processes; see the module docstring for the rules."""

    def __init__(self, handle: Callable[[object, object], None]) -> None:
        #: Processes whose exits are expected, by pid (registered by `Start.running` or `watch`).
        self.by_pid: dict[int, object] = {}
        self._handle = handle
        self._starts: list[Start] = []
        self._parked: dict[object, object] = {}

    def watch(self, process) -> None:
        """Route the exits of a process whose pid is already known."""
        self.by_pid[process.pid] = process

    def forget(self, process) -> None:
        """No exit of this process is expected any more (deleted without one)."""
        if self.by_pid.get(process.pid) is process:
            del self.by_pid[process.pid]

    def is_watched(self, process) -> bool:
        """True while the process's exit has not been reaped (it is still in by_pid)."""
        return self.by_pid.get(process.pid) is process

    def is_starting(self, process) -> bool:
        """True while a `starting` block of this process is open."""
        return any(start.process is process for start in self._starts)

    def on_exit(self, exit_) -> None:
        """A reaped exit: hand it on, or hold it (rules 1 and 2)."""
        process = self.by_pid.pop(exit_.pid, None)
        if process is None:
            # Maybe a starting process whose pid we do not know yet; else a reparented orphan.
            for start in self._starts:
                start._unknown.append(exit_)
            return
        if self.is_starting(process):
            self._parked[process] = exit_
            return
        self._handle(process, exit_)

    @contextlib.contextmanager
    def starting(self, process, *, finished: Callable[[], None] | None = None) -> Iterator[Start]:
        """The block in which `process` starts. When it ends, the process's held exit (parked
        or found early) goes to `handle`, then `finished` runs (an exec's start ending may
        release its init's exit: rule 3 of the service)."""
        start = Start(self, process)
        self._starts.append(start)
        try:
            yield start
        finally:
            # By identity: two starts are never equal, but their bookkeeping might compare so.
            self._starts = [s for s in self._starts if s is not start]
            held = self._parked.pop(process, None) or start._early
            if held is not None:
                self._handle(process, held)
            if finished is not None:
                finished()
