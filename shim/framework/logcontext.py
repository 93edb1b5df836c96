"""Which task a log line is about: the id of the container whose request (or exit, or hook)
the running code serves. A group's daemon serves several containers, so the id containerd
started it with is only the default (shim.framework.daemon.FifoLogHandler reads this)."""

from __future__ import annotations

from contextvars import ContextVar

#: The container id the current asyncio task works for ("" when none in particular).
TASK_ID: ContextVar[str] = ContextVar("pyshim_task_id", default="")
