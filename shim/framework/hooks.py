"""Runs a container's custom handler (shim.handler.Handler) for the Task API.

Loading: the runtime options' `Handler = "module:Class"` names the class; one instance per
container, given the HandlerOptions table. A handler that cannot be loaded fails Create with
INVALID_ARGUMENT saying why.

Running: `create` and `exec` are guarded (Refused -> PERMISSION_DENIED with exactly its
message; any other exception -> logged with its traceback, UNKNOWN naming the hook; a hook
still running at the request's deadline, or after HOOK_TIMEOUT without one -> DEADLINE_EXCEEDED).
The notification hooks (started, exited, oom, deleted) are queued when their event goes out
and run by one worker per container, in that order, each bounded at HOOK_TIMEOUT: failures
and timeouts are logged, never returned, and no request waits for them (the daemon does,
briefly, before it exits).
"""

from __future__ import annotations

import asyncio
import collections
import importlib
import logging

from shim.framework.handler_api import ContainerInfo, ExitInfo, Handler, ProcessInfo, Refused
from shim.framework.ttrpc.status import Code, TtrpcError

log = logging.getLogger("shim.framework.hooks")

#: Bound of a hook when its request carries no deadline, and of every notification hook.
HOOK_TIMEOUT = 30.0

#: What a handler may override: the public methods of the base class, in its order.
HOOK_NAMES = tuple(name for name, value in vars(Handler).items() if not name.startswith("_") and callable(value))


def load_handler(spec: str, options: dict) -> Handler:
    """An instance of the class named by `spec` ("package.module:ClassName")."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise TtrpcError(Code.INVALID_ARGUMENT, f"runtime option Handler = {spec!r}: expected \"module:ClassName\"")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except Exception as exc:
        log.error("cannot load handler %s", spec, exc_info=True)
        raise TtrpcError(Code.INVALID_ARGUMENT, f"runtime option Handler = {spec!r}: cannot load it: {exc!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise TtrpcError(Code.INVALID_ARGUMENT, f"runtime option Handler = {spec!r}: not a shim.handler.Handler subclass")
    try:
        return cls(options)
    except Exception as exc:
        log.error("handler %s failed to start", spec, exc_info=True)
        raise TtrpcError(Code.INVALID_ARGUMENT, f"handler {spec}: {exc!r}") from None


class HandlerRunner:
    """A container's handler instance and the views it is given."""

    def __init__(self, handler: Handler, name: str, container: ContainerInfo) -> None:
        self.handler = handler
        self.name = name
        self.container = container
        # Notification hooks are queued when their event goes out (synchronously, so the
        # queue's order is the events' order) and run one at a time by one worker task.
        # No request waits for them: a slow hook delays the next hook, never containerd.
        self._pending: collections.deque = collections.deque()
        self._worker: asyncio.Task | None = None
        self._running_notification: str | None = None  # the hook the worker is in, for describe()

    def describe(self) -> dict:
        """For `pyshim inspect`, as JSON types: the spec it was loaded as (`name`), its
        `class`, the notification hooks waiting (`notifications_queued`) and the one running
        now (`notification_running`, None when idle), and which `hooks` it overrides."""
        cls = type(self.handler)
        return {
            "name": self.name,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "notifications_queued": len(self._pending),
            "notification_running": self._running_notification,
            "hooks": [name for name in HOOK_NAMES if getattr(cls, name, None) is not getattr(Handler, name)],
        }

    async def guarded(self, hook: str, deadline: float | None, *args) -> None:
        """Run a refusable hook inside its request; errors become the request's status."""
        loop = asyncio.get_running_loop()
        timeout = HOOK_TIMEOUT if deadline is None else max(0.0, deadline - loop.time())
        try:
            async with asyncio.timeout(timeout):
                await getattr(self.handler, hook)(self.container, *args)
        except Refused as refused:
            log.info("%s: %s.%s refused: %s", self.container.id, self.name, hook, refused.message)
            raise TtrpcError(Code.PERMISSION_DENIED, refused.message) from None
        except TimeoutError:
            log.error("%s: handler %s.%s did not finish within %.3gs", self.container.id, self.name, hook, timeout)
            raise TtrpcError(Code.DEADLINE_EXCEEDED,
                             f"handler {self.name}.{hook} did not finish within {timeout:.3g}s") from None
        except TtrpcError:
            raise
        except Exception as exc:
            log.error("%s: handler %s.%s failed", self.container.id, self.name, hook, exc_info=True)
            raise TtrpcError(Code.UNKNOWN, f"handler {self.name}.{hook} failed: {exc!r}") from None

    def post(self, hook: str, *args) -> asyncio.Task:
        """Queue a notification hook (call it right after its event was published); returns
        the worker task that will run it (the daemon waits for it before exiting)."""
        self._pending.append((hook, args))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run_pending())
        return self._worker

    async def _run_pending(self) -> None:
        from shim.framework.logcontext import TASK_ID

        TASK_ID.set(self.container.id)
        while self._pending:
            hook, args = self._pending.popleft()
            self._running_notification = hook
            try:
                await self.notify(hook, *args)
            finally:
                self._running_notification = None

    async def notify(self, hook: str, *args) -> None:
        """Run a notification hook now: bounded, its errors logged and swallowed."""
        try:
            async with asyncio.timeout(HOOK_TIMEOUT):
                await getattr(self.handler, hook)(self.container, *args)
        except TimeoutError:
            log.error("%s: handler %s.%s did not finish within %.0fs", self.container.id, self.name, hook, HOOK_TIMEOUT)
        except Exception:
            log.error("%s: handler %s.%s failed", self.container.id, self.name, hook, exc_info=True)


def process_info(process) -> ProcessInfo:
    """The handler's view of a shim.framework.process.Process."""
    spec = getattr(process, "spec", None)
    return ProcessInfo(container_id=process.container_id, exec_id=process.exec_id,
                       spec=spec if isinstance(spec, dict) else {}, pid=process.pid,
                       terminal=process.stdio.terminal)


def exit_info(process) -> ExitInfo:
    """The handler's view of a process's exit (after it was recorded)."""
    return ExitInfo(status=process.exit_status, exited_at=process.exit_time(), pid=process.pid)
