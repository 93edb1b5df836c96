"""Every asyncio task and thread of this daemon with its stack and what it waits on.

asyncio's Task.get_stack() stops at the task's outermost coroutine (a suspended coroutine's
frame has no f_back), so the await chain is walked by hand through cr_await: outermost
coroutine first, down to the future the innermost one waits on. Reading frames does not stop
anything: the loop is ours and is running this very code.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
import types

from shim.framework.debug.trace import TRACER

#: Deepest await chain shown (a recursion bug must not make the answer unbounded).
MAX_DEPTH = 64


def _frame_line(frame: types.FrameType) -> dict:
    code = frame.f_code
    return {"file": code.co_filename, "line": frame.f_lineno, "function": code.co_qualname}


def _await_chain(awaitable: object) -> tuple[list[dict], str]:
    """Frames of a coroutine's await chain (outermost first), and the leaf it waits on."""
    frames: list[dict] = []
    current = awaitable
    for _ in range(MAX_DEPTH):
        frame = getattr(current, "cr_frame", None) or getattr(current, "gi_frame", None) or getattr(current, "ag_frame", None)
        if frame is None:
            break
        frames.append(_frame_line(frame))
        following = getattr(current, "cr_await", None) or getattr(current, "gi_yieldfrom", None) or getattr(current, "ag_await", None)
        if following is None:
            break
        current = following
    leaf = None if current is awaitable and frames else current
    return frames, _describe_awaitable(leaf)


def _describe_awaitable(awaitable: object) -> str:
    if awaitable is None:
        return ""
    if isinstance(awaitable, asyncio.Task):
        return f"task {awaitable.get_name()}"
    # A bare future (or its __await__ iterator) says less than the innermost frame awaiting
    # it (Event.wait, Queue.get...); a coroutine still running its own code has its frame.
    return ""



def _task(task: asyncio.Task) -> dict:
    coro = task.get_coro()
    frames, waiting_on = _await_chain(coro)
    waiter = getattr(task, "_fut_waiter", None)  # the future the task is parked on
    if isinstance(waiter, asyncio.Task):
        waiting_on = _describe_awaitable(waiter)
    if not waiting_on and frames:
        # What it waits in: the innermost function, and the innermost of ours when that is
        # library code (Reaper.run → wait).
        innermost = frames[-1]["function"]
        ours = [f["function"] for f in frames if "/shim/" in f["file"]]
        waiting_on = innermost if not ours or ours[-1] == innermost else f"{ours[-1]} → {innermost}"
    return {
        "name": task.get_name(),
        "coroutine": getattr(coro, "__qualname__", type(coro).__name__),
        "done": task.done(),
        "stack": frames,
        "waiting_on": waiting_on,
    }


def _threads() -> list[dict]:
    frames = sys._current_frames()
    threads = []
    for thread in threading.enumerate():
        if thread.ident == threading.get_ident():
            # The loop's thread, busy taking this very dump: its tasks above are what it runs.
            threads.append({"name": thread.name, "ident": thread.ident, "daemon": thread.daemon,
                            "stack": [], "note": "runs the event loop (its tasks are listed above)"})
            continue
        frame = frames.get(thread.ident or -1)
        stack = [] if frame is None else [
            {"file": f.filename, "line": f.lineno, "function": f.name} for f in traceback.extract_stack(frame)
        ]
        threads.append({"name": thread.name, "ident": thread.ident, "daemon": thread.daemon, "stack": stack})
    return threads


def describe_stacks() -> dict:
    current = asyncio.current_task()
    tasks = [_task(t) for t in asyncio.all_tasks() if t is not current]
    tasks.sort(key=lambda t: t["name"])
    return {"taken": time.time(), "tasks": tasks, "threads": _threads(), "commands_running": TRACER.running_commands()}


def format_stacks(stacks: dict) -> str:
    """Text for people (pyshim stacks, and SIGUSR1 into containerd's log)."""
    lines = []
    running = stacks.get("commands_running") or []
    if running:
        lines.append(f"=== {len(running)} command(s) running ===")
        for command in running:
            lines.append(f"{command['command']} for {command['id'] or '-'} (pid {command['pid']}), "
                         f"running {command['running_for_ms'] / 1000:.1f}s: {' '.join(command['argv'])}")
        lines.append("")
    tasks = stacks.get("tasks") or []
    lines.append(f"=== {len(tasks)} asyncio task(s) ===")
    for task in tasks:
        lines.append(f"task {task['name']} ({task['coroutine']})")
        for frame in task["stack"]:
            lines.append(f"    {frame['file']}:{frame['line']} in {frame['function']}")
        if task.get("waiting_on"):
            lines.append(f"    waiting on {task['waiting_on']}")
        lines.append("")
    threads = stacks.get("threads") or []
    lines.append(f"=== {len(threads)} thread(s) ===")
    for thread in threads:
        note = f": {thread['note']}" if thread.get("note") else ""
        lines.append(f"thread {thread['name']} (ident {thread['ident']}){note}")
        for frame in thread["stack"]:
            lines.append(f"    {frame['file']}:{frame['line']} in {frame['function']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
