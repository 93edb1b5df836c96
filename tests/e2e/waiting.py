"""Waiting for OS or containerd state with a deadline, for the e2e tests (and tests/v2).

containerd, the shim and the kernel finish things after they report them done: a task is
listed STOPPED (or gone) before a dead shim's `delete` has unmounted its rootfs, a daemon
exits a moment after `ctr run --rm` returns, a shim's log line reaches containerd's log
through a FIFO that containerd copies at its own pace.  A test asserting such state polls it
until it holds, with a generous deadline (never a limit on speed), and on timeout says what
it waited for and what it saw last:

    wait_until(lambda: task_status(e2e, cid) == "STOPPED", 15, f"{cid} to stop")
    wait_gone(lambda: mounts_of(bundle), 20, "the rootfs to be unmounted")

`until` (default: truthiness) judges each observed value, so the timeout message can show the
value itself -- the mounts still there, say -- rather than False; wait_gone waits for an
empty observation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

INTERVAL = 0.05


def not_(value: object) -> bool:
    """`until=not_`: wait for an empty (falsy) observation, e.g. no mounts or pids left."""
    return not value


def _timed_out(what: str, timeout: float, value: object) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g}s waiting for {what}; last observed: {value!r}")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, *,
               until: Callable[[T], object] = bool, interval: float = INTERVAL) -> T:
    """Call predicate() until until(value) holds (by default: until the value is truthy) and
    return that value; AssertionError naming `what` and the last value after `timeout` s.
    The predicate is always called at least once, and once more at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        time.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))


async def async_wait_until(predicate: Callable[[], T | Awaitable[T]], timeout: float, what: str, *,
                           until: Callable[[T], object] = bool, interval: float = INTERVAL) -> T:
    """wait_until for async tests: sleeps without blocking the event loop; the predicate may
    be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if until(value):
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout, value)
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0.0)))


def wait_gone(observe: Callable[[], T], timeout: float, what: str) -> T:
    """Wait until observe() returns nothing (an empty list, False, None): what is still there
    shows in the message on timeout."""
    return wait_until(observe, timeout, what, until=not_)
