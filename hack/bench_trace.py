"""A traced `containerd-shim-pyshim-v2` for `hack/bench --profile`: the real shim with timestamps.

hack/bench writes a tiny executable `containerd-shim-pyshimtrace-v2` into its private
containerd's bin dir (runtime `io.containerd.pyshimtrace.v2`) that records the time and CPU
spent before it got control, then calls `main` here. `main` runs `shim.cli.main` unchanged and
appends one tab-separated record per event to a trace file:

    pid  unix-time  task-id  role  event  duration-ms  detail

roles: `start` and `delete` (the commands containerd runs), `daemon` (the forked server).
Events: `exec` (the interpreter got control; detail: CPU ms spent so far), `fork`, `forked`,
`exit`, `import` (a top-level import that was not cached, with its inclusive time), `imports`
(self time per package so far, JSON), `accept` (ttrpc connection), `serve` (daemon entered
`shim.framework.daemon.serve`), `listening`, `rpc>Name` / `rpc<Name` (Task API handler in/out),
`call<Name` (the whole ttrpc request: decode + handler + encode), `runc<sub`, `stdio<open`,
`mount<all`, `umount<all`, `delete<runtime` (the `runc delete --force` of `delete`),
`delete<response`.

Nothing in shim/ is changed: handlers are wrapped when their modules are first imported (an
import hook on `_frozen_importlib._find_and_load`), so the daemon imports exactly what it
imports untraced, at the same moments. The hook adds a few microseconds per module loaded.
"""

from __future__ import annotations

import json
import os
import sys
import time

_fd = -1
_task_id = "?"
_role = "cmd"
_imports_self: dict[str, float] = {}


def rec(event: str, dt: float | None = None, detail: str = "", when: float | None = None) -> None:
    """Append one record (best effort: tracing never breaks the shim)."""
    if _fd < 0:
        return
    ms = "" if dt is None else f"{dt * 1000:.3f}"
    t = time.time() if when is None else when
    line = f"{os.getpid()}\t{t:.6f}\t{_task_id}\t{_role}\t{event}\t{ms}\t{detail}\n"
    try:
        os.write(_fd, line.encode(errors="replace"))
    except OSError:
        pass


def _package(name: str) -> str:
    if name.startswith("shim.api"):
        return "shim.api"
    if name.startswith("shim.framework.ttrpc"):
        return "shim.framework.ttrpc"
    if name.startswith("shim."):
        return name
    return name.split(".", 1)[0]


def dump_imports() -> None:
    rec("imports", detail=json.dumps({k: round(v * 1000, 3) for k, v in _imports_self.items()}))


# -- wrappers ----------------------------------------------------------------------------------


def _timed_async(fn, label: str, mark_entry: bool = False):
    async def wrapper(*args, **kwargs):
        if mark_entry:
            rec(label.replace("<", ">", 1))
        t = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            rec(label, time.perf_counter() - t)

    wrapper.__name__ = getattr(fn, "__name__", label)
    wrapper.__qualname__ = getattr(fn, "__qualname__", label)
    return wrapper


def _timed(fn, label: str):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            rec(label, time.perf_counter() - t)

    wrapper.__name__ = getattr(fn, "__name__", label)
    return wrapper


def _patch_service(mod) -> None:
    cls = mod.TaskService
    methods = cls.methods

    def traced_methods(self):
        table = methods(self)
        return {
            name: (req, _timed_async(handler, f"rpc<{name}", mark_entry=True))
            for name, (req, handler) in table.items()
        }

    cls.methods = traced_methods


def _patch_runc(mod) -> None:
    for sub in ("create", "start", "delete", "kill", "state", "exec"):
        fn = getattr(mod.Runc, sub, None)
        if fn is not None:
            setattr(mod.Runc, sub, _timed_async(fn, f"runc<{sub}"))


def _patch_server(mod) -> None:
    server_start = mod.Server.start

    async def start(self, *args, **kwargs):
        await server_start(self, *args, **kwargs)
        rec("listening", detail=f"modules={len(sys.modules)}")
        dump_imports()

    mod.Server.start = start
    proto = mod._ServerProtocol
    made = proto.connection_made

    def connection_made(self, transport):
        rec("accept")
        return made(self, transport)

    proto.connection_made = connection_made
    call = proto._call

    async def traced_call(self, request):
        t = time.perf_counter()
        try:
            return await call(self, request)
        finally:
            rec(f"call<{request.method}", time.perf_counter() - t)

    proto._call = traced_call


def _patch_daemon(mod) -> None:
    serve = mod.serve

    def traced_serve(*args, **kwargs):
        rec("serve")
        return serve(*args, **kwargs)

    mod.serve = traced_serve


def _patch_stdio(mod) -> None:
    mod.open_process_io = _timed_async(mod.open_process_io, "stdio<open")


def _patch_mount(mod) -> None:
    mod.mount_all = _timed(mod.mount_all, "mount<all")
    mod.unmount_all = _timed(mod.unmount_all, "umount<all")


def _patch_delete(mod) -> None:
    import subprocess

    # shim.framework.delete calls subprocess.run exactly once: the runtime's `delete --force`
    subprocess.run = _timed(subprocess.run, "delete<runtime")
    mod._delete_response = _timed(mod._delete_response, "delete<response")


_PATCHERS = {
    "shim.framework.service": _patch_service,
    "shim.runc.runtime": _patch_runc,
    "shim.framework.ttrpc.server": _patch_server,
    "shim.framework.daemon": _patch_daemon,
    "shim.framework.stdio": _patch_stdio,
    "shim.framework.mount": _patch_mount,
    "shim.framework.delete": _patch_delete,
}


def _install_import_hook() -> None:
    import _frozen_importlib as bootstrap

    real = bootstrap._find_and_load
    stack: list[list[float]] = []  # [start, time spent in nested imports]

    def find_and_load(name, import_):
        stack.append([time.perf_counter(), 0.0])
        try:
            module = real(name, import_)
        finally:
            start, nested = stack.pop()
            total = time.perf_counter() - start
            key = _package(name)
            _imports_self[key] = _imports_self.get(key, 0.0) + total - nested
            if stack:
                stack[-1][1] += total
            else:
                rec("import", total, name)
        patch = _PATCHERS.get(name)
        if patch is not None:
            try:
                patch(module)
            except Exception as exc:  # a renamed function: trace less, never fail
                rec("patch-failed", detail=f"{name}: {exc!r}")
        return module

    bootstrap._find_and_load = find_and_load


def _install_fork_hook() -> None:
    real_fork = os.fork
    real_exit = os._exit

    def fork():
        global _role
        rec("fork")
        pid = real_fork()
        if pid == 0:
            _role = "daemon"
            rec("forked")
        return pid

    def _exit(code):
        if _role == "daemon":
            rec("exit", detail=str(code))
            dump_imports()
        real_exit(code)

    os.fork = fork
    os._exit = _exit


def _flag(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        bare = arg.lstrip("-")
        if bare == name and i + 1 < len(argv):
            return argv[i + 1]
        if bare.startswith(name + "="):
            return bare.split("=", 1)[1]
    return ""


def main(trace_path: str, t0: float, cpu0: float) -> int:
    global _fd, _task_id, _role
    argv = sys.argv[1:]
    _task_id = _flag(argv, "id") or "?"
    _role = next((a for a in reversed(argv) if a in ("start", "delete")), "cmd")
    try:
        _fd = os.open(trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        _fd = -1
    rec("exec", detail=f"cpu_ms={cpu0 * 1000:.1f}", when=t0)
    _install_import_hook()
    _install_fork_hook()
    from shim.cli import main as cli_main

    code = 1
    try:
        code = cli_main()
    finally:
        rec("exit", detail=str(code))
        dump_imports()
    return code
