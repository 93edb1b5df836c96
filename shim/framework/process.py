"""A container's processes: the init process and exec'd processes, and their states.

A process is in one state at a time. Each state is a small object that says which
operations it allows; asking for anything else raises a clear error that containerd shows
to its user ("cannot start a running process"), never a crash. The texts and codes follow
containerd's runc shim, because clients (ctr, CRI) read them.

Exit handling rules live in service.py, next to the code that keeps them.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from dataclasses import dataclass

from shim.framework.ttrpc.status import Code, TtrpcError

#: What the Go shim reports as exited_at for a process that has not exited: Go's zero time.
NOT_EXITED = datetime.datetime(1, 1, 1, tzinfo=datetime.timezone.utc)


@dataclass(frozen=True, slots=True)
class Stdio:
    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


class State:
    """Base of the process states; subclasses name what they allow."""

    name = "unknown"
    allowed: frozenset[str] = frozenset()

    @classmethod
    def check(cls, operation: str) -> None:
        if operation not in cls.allowed:
            # The Go shim returns these as plain errors, which reach clients as UNKNOWN;
            # ctr users and CRI see the same text and code from us.
            raise TtrpcError(Code.UNKNOWN, cls.refusal(operation))

    @classmethod
    def refusal(cls, operation: str) -> str:
        return f"cannot {operation} a {cls.name} process"


class Created(State):
    name = "created"
    allowed = frozenset({"start", "delete", "kill", "exec", "update", "exit"})

    @classmethod
    def refusal(cls, operation: str) -> str:
        if operation == "checkpoint":
            return "cannot checkpoint a task in created state"
        return super().refusal(operation)


class CreatedCheckpoint(Created):
    """Created from a checkpoint: no runtime container exists until Start runs `runc
    restore`, so there is nothing to exec into yet (the Go shim's createdCheckpointState)."""

    allowed = frozenset({"start", "delete", "kill", "update", "exit"})

    @classmethod
    def refusal(cls, operation: str) -> str:
        if operation == "exec":
            return "cannot exec in a created state"
        return super().refusal(operation)


class Running(State):
    name = "running"
    allowed = frozenset({"kill", "exec", "update", "pause", "checkpoint", "exit"})


class Paused(State):
    name = "paused"
    allowed = frozenset({"kill", "resume", "update", "checkpoint", "exit"})

    @classmethod
    def refusal(cls, operation: str) -> str:
        # the Go shim's pausedState words these two its own way
        if operation == "pause":
            return "cannot pause a paused container"
        if operation == "exec":
            return "cannot exec in a paused state"
        return super().refusal(operation)


class Stopped(State):
    name = "stopped"
    allowed = frozenset({"delete", "kill"})

    @classmethod
    def refusal(cls, operation: str) -> str:
        if operation == "exec":
            return "cannot exec in a stopped state"
        if operation in ("update", "pause", "resume", "checkpoint"):
            return f"cannot {operation} a stopped container"  # the Go shim's word here
        return super().refusal(operation)


class Deleted(State):
    name = "deleted"
    allowed = frozenset()

    @classmethod
    def check(cls, operation: str) -> None:
        raise TtrpcError(Code.NOT_FOUND, f"cannot {operation} a deleted process: not found")


# containerd.v1.types.Status values, kept here so that State() answers without importing protos.
STATUS_OF = {"created": 1, "running": 2, "stopped": 3, "paused": 4}


class Process:
    """Common to init and exec processes: identity, pid, stdio, exit status and waiting."""

    def __init__(self, process_id: str, container_id: str, stdio: Stdio) -> None:
        self.id = process_id
        self.container_id = container_id
        self.stdio = stdio
        self.pid = 0
        self.state: type[State] = Created
        self.exit_status = 0
        self.exited_at: datetime.datetime | None = None
        self.io = None  # shim.framework.stdio.ProcessIO once opened
        self.stdin_closed = False  # CloseIO was received
        self._exited = asyncio.Event()

    @property
    def exec_id(self) -> str:
        return ""

    @property
    def status(self) -> int:
        return STATUS_OF.get(self.state.name, 0)

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    def transition(self, operation: str, new_state: type[State]) -> None:
        self.state.check(operation)
        self.state = new_state

    def complete(self, operation: str, started_in: type[State], new_state: type[State]) -> bool:
        """Finish an operation that awaited the runtime: move to `new_state` only if the
        process is still in `started_in`. An exit (or another request) may have changed the
        state during the await, and what it set wins: a container that died while `runc
        pause` ran is stopped, not paused. True when the transition was made."""
        if self.state is not started_in:
            return False
        self.transition(operation, new_state)
        return True

    def set_exited(self, status: int, timestamp_ns: int) -> None:
        """Record the exit and release waiters. Must happen before /tasks/exit is published."""
        if self._exited.is_set():
            return
        self.exit_status = status
        self.exited_at = datetime.datetime.fromtimestamp(timestamp_ns / 1e9, tz=datetime.timezone.utc)
        if self.state is not Deleted:
            self.state = Stopped
        self._exited.set()

    async def wait(self) -> tuple[int, datetime.datetime]:
        await self._exited.wait()
        assert self.exited_at is not None
        return self.exit_status, self.exited_at

    def exit_time(self) -> datetime.datetime:
        return self.exited_at if self.exited_at is not None else NOT_EXITED

    async def close_io(self) -> None:
        if self.io is not None:
            io, self.io = self.io, None
            io.close()
            await io.wait_closed()  # a binary:// logger has exited (SIGTERM, then SIGKILL)


class InitProcess(Process):
    """The container's first process, created and started through `runc create/start`, or,
    when created from a checkpoint, brought back by `runc restore` at Start."""

    def __init__(self, container_id: str, bundle: str, stdio: Stdio) -> None:
        super().__init__(container_id, container_id, stdio)
        self.bundle = bundle
        self.pid_file = os.path.join(bundle, "init.pid")
        #: Where Start restores from (a shim.runc.runtime.CriuOptions); None: a plain `runc start`.
        self.restore = None

    def restore_from(self, criu) -> None:
        """Record the checkpoint to restore at Start (Create with a checkpoint)."""
        self.restore = criu
        self.state = CreatedCheckpoint


class ExecProcess(Process):
    """An additional process run inside the container with `runc exec`."""

    def __init__(self, exec_id: str, container_id: str, bundle: str, stdio: Stdio, spec: dict) -> None:
        super().__init__(exec_id, container_id, stdio)
        self.spec = spec
        self.pid_file = os.path.join(bundle, f"{exec_id}.pid")

    @property
    def exec_id(self) -> str:
        return self.id


def read_pid_file(path: str) -> int:
    with open(path) as f:
        return int(f.read().strip())
