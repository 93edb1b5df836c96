"""The Task API (containerd.task.v2.Task, also served as containerd.task.v3.Task).

Handlers translate requests into calls on containers and processes and publish the task
events. The exit rules (containerd's cmd/containerd-shim-runc-v2/spec/Shim.tla) are kept here:

1. An exit that arrives while its process is starting is not lost: init's exit is parked
   until /tasks/start is out; exits of unknown pids seen while an exec is starting are
   collected and matched once `runc exec` has written the exec's pid.
2. /tasks/start (or /tasks/exec-started) is published before that process's /tasks/exit.
   Rules 1 and 2 are kept by one construct, `with self.exits.starting(process)` around
   every start (shim.framework.exits, where they are spelled out and tested one by one).
3. Init's exit waits for execs that are still starting, and for running execs to exit, so
   exec exits are published before init's.
4. A process is marked exited (status, time, Wait released) before /tasks/exit goes out,
   and only after its output was flushed to the client (bounded).
5. Signalled processes report 128+signal (the reaper computes it).
6. /tasks/oom goes out before the /tasks/exit of the init it killed: the kernel signals the
   OOM before the victim dies, but the loop may see the exit first, so a pending OOM
   notification is drained before init's exit is published.

Everything runs on one event loop, so the bookkeeping between two awaits is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator

from shim.api.containerd import events
from shim.api.containerd.task import v2 as task
from shim.api.containerd.types import Mount
from shim.api.google.protobuf import Any, Empty
from shim.framework.container import Container, ContainerRegistry
from shim.framework import delete_record
from shim.framework.debug.trace import TRACER
from shim.framework.dense import bundle_identity
from shim.framework.exits import ExitRouter
from shim.framework.process import Deleted, ExecProcess, InitProcess, Process, Running, Stdio, Stopped, read_pid_file
from shim.framework.backend import NoSuchContainer, NotRunning, RuntimeFailure
from shim.framework.ttrpc.status import Code, TtrpcError

log = logging.getLogger("shim.framework.service")

#: How long an exit waits for the process's output to reach the client before it is
#: published anyway (a background child may hold stdout open forever).
OUTPUT_FLUSH_TIMEOUT = 2.0
#: How long a closing daemon waits for its handlers' queued notification hooks.
HANDLER_DRAIN_TIMEOUT = 5.0
#: How long init's exit waits for running execs to be reaped.
EXEC_EXIT_TIMEOUT = 10.0
#: an exit status of 128+SIGKILL: how the OOM killer's victims end (rule 5)
KILLED_STATUS = 128 + 9

TASK_SERVICES = ("containerd.task.v2.Task", "containerd.task.v3.Task")


def check_kill_error(err: RuntimeFailure) -> TtrpcError:
    """Map a runtime kill failure to what containerd's clients expect (NOT_FOUND is benign)."""
    if isinstance(err, NotRunning):
        return TtrpcError(Code.NOT_FOUND, "process already finished: not found")
    if isinstance(err, NoSuchContainer):
        return TtrpcError(Code.NOT_FOUND, "no such container: not found")
    return TtrpcError(Code.UNKNOWN, f"unknown error after kill: {err}")


@contextlib.contextmanager
def runtime_errors(what: str | None) -> Iterator[None]:
    """A runtime failure as the status the Go shim returns: UNKNOWN, "<what>: <runc's own text>"
    (the backend's text alone when `what` is None)."""
    try:
        yield
    except RuntimeFailure as exc:
        raise TtrpcError(Code.UNKNOWN, f"{what}: {exc}" if what else str(exc)) from None


class TaskService:
    def __init__(
        self, namespace: str, publisher, reaper, on_shutdown: Callable[[], None], app=None,
        default_handler: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.publisher = publisher
        self.reaper = reaper
        self._on_shutdown = on_shutdown
        if app is None:
            from shim.framework.app import current, identity

            app = current()
            default_handler = identity().default_handler if default_handler is None else default_handler
        #: The application (shim.framework.app.App): options, OCI runtime, checkpointing.
        self.app = app
        #: The handler of containers whose options name none (a handler's own binary).
        self.default_handler = default_handler or ""
        #: The containers this daemon serves, by (namespace, id).
        self.containers = ContainerRegistry(namespace)
        #: Every container created here, id -> its bundle's identity (a dense daemon tells its
        #: own deleted ones' bundles from newcomers' at exit: shim.framework.dense.may_exit).
        self.served_bundles: dict[str, int] = {}
        #: Handlers' notification workers still running (waited for at close).
        self._hook_workers: set[asyncio.Task] = set()
        #: Reaped exits to processes, held while a process is starting (rules 1 and 2).
        self.exits = ExitRouter(lambda process, exit_: self._spawn(self._process_exit(process, exit_)))
        self._pending_init_exits: dict[str, object] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- wiring ---------------------------------------------------------------------------
    def methods(self) -> dict[str, tuple[type, Callable]]:
        from shim.api.services import SERVICES

        table = SERVICES[TASK_SERVICES[0]]
        handlers = {
            "State": self.state,
            "Create": self.create,
            "Start": self.start,
            "Delete": self.delete,
            "Pids": self.pids,
            "Kill": self.kill,
            "Exec": self.exec,
            "ResizePty": self.resize_pty,
            "CloseIO": self.close_io,
            "Wait": self.wait,
            "Connect": self.connect,
            "Shutdown": self.shutdown,
            "Pause": self.pause,
            "Resume": self.resume,
            "Stats": self.stats,
            "Update": self.update,
            "Checkpoint": self.checkpoint,
        }
        methods = {}
        for name, (request_type, _response_type) in table.items():
            methods[name] = (request_type, _for_its_task(handlers.get(name) or _unimplemented(name)))
        return methods

    def register(self, server) -> None:
        methods = self.methods()
        for service in TASK_SERVICES:
            server.register_service(service, methods)

    async def handle_exits(self, subscription) -> None:
        """Consume every exit the reaper did not route to a watcher (container processes)."""
        async for exit_ in subscription:
            self.on_exit(exit_)

    def _spawn(self, coro) -> None:
        task_ = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task_)
        task_.add_done_callback(self._task_done)

    def _task_done(self, task_: asyncio.Task) -> None:
        self._tasks.discard(task_)
        if not task_.cancelled() and task_.exception() is not None:
            log.error("exit handling failed", exc_info=task_.exception())

    async def close(self) -> None:
        # Handlers' queued notifications (the last container's `deleted`) run before we go.
        if self._hook_workers:
            _, pending = await asyncio.wait(list(self._hook_workers), timeout=HANDLER_DRAIN_TIMEOUT)
            if pending:
                log.warning("%d handler notification queue(s) still running at shutdown", len(pending))
        for task_ in list(self._tasks):
            task_.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- lookups --------------------------------------------------------------------------
    def _container(self, container_id: str) -> Container:
        container = self.containers.get(container_id)
        if container is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {container_id} not found: not found")
        return container

    # -- exits ----------------------------------------------------------------------------
    def on_exit(self, exit_) -> None:
        self.exits.on_exit(exit_)  # rules 1 and 2 (shim.framework.exits), then _process_exit

    async def _process_exit(self, process: Process, exit_) -> None:
        from shim.framework.logcontext import TASK_ID

        TASK_ID.set(process.container_id)  # a task of its own: its log lines name the container
        TRACER.exit(process.container_id, process.exec_id, exit_.pid, exit_.status)
        asyncio.current_task().set_name(f"exit of {process.id} in {process.container_id}")
        container = self.containers.get(process.container_id)
        if container is not None and process is container.init and container.oom_watch is not None:
            # rule 6, early: under systemd's cgroup driver the init's cgroup may be gone a moment
            # after its last process, so look before the waits below
            container.oom_watch.poll(killed=exit_.status == KILLED_STATUS)
        if container is not None and process is container.init:
            if container.starting_execs:
                self._pending_init_exits[container.id] = exit_  # rule 3
                return
            await self._kill_remaining_on_init_exit(container)
            await self._wait_for_running_execs(container)
        if process.io is not None:
            if not await process.io.wait_output_flushed(OUTPUT_FLUSH_TIMEOUT):
                log.warning("%s: output still open %.0fs after exit; publishing the exit", process.id, OUTPUT_FLUSH_TIMEOUT)
        if container is not None and process is container.init and container.oom_watch is not None:
            container.oom_watch.poll(killed=exit_.status == KILLED_STATUS)  # rule 6
        process.set_exited(exit_.status, exit_.timestamp)  # rule 4
        if isinstance(process, InitProcess):
            self._record_init_exit(process, exit_.timestamp)
        self.publisher.publish(
            "/tasks/exit",
            events.TaskExit(
                container_id=process.container_id,
                id=process.id,
                pid=process.pid,
                exit_status=process.exit_status,
                exited_at=process.exited_at,
            ),
        )
        if container is not None:
            self._notify(container, "exited", process)

    @staticmethod
    def _record_init_exit(init: InitProcess, exited_at_ns: int) -> None:
        # Durable before /tasks/exit goes out: if containerd is down now and this daemon
        # dies before it is back, `delete` still answers with the real status.
        from shim.framework import exit_record

        try:
            exit_record.write(init.bundle, init.pid, init.exit_status, exited_at_ns)
        except OSError as exc:
            log.warning("%s: cannot record the exit in the bundle: %s", init.id, exc)

    async def _kill_remaining_on_init_exit(self, container: Container) -> None:
        """When init dies, the kernel kills everything else in its pid namespace only if the
        namespace is its own. Without one (a pod's shared namespace, another container's, the
        host's), children that init forked live on, keep the container's output open and
        keep the task from ever being reported stopped (the pod hangs at StopPodSandbox).
        So, as runc-v2 does, every process left in the container is SIGKILLed here: whenever
        the spec has no private pid namespace, and when the spec cannot be read."""
        if not kill_all_on_init_exit(container.bundle):
            return
        try:
            await container.runtime.kill(container.id, 9, all=True)
        except Exception as exc:  # nothing left to kill is fine; anything else is logged
            log.warning("%s: killing the processes left after init exited: %s", container.id, exc)

    async def _wait_for_running_execs(self, container: Container) -> None:
        running = [e for e in container.execs.values() if e.pid and not e.has_exited]
        if not running:
            return
        waits = [asyncio.ensure_future(e.wait()) for e in running]
        done, pending = await asyncio.wait(waits, timeout=EXEC_EXIT_TIMEOUT)
        for w in pending:
            w.cancel()
        if pending:
            log.warning("%s: %d exec(s) still running after init exited", container.id, len(pending))

    def _exec_start_finished(self, container: Container) -> None:
        container.starting_execs -= 1
        if container.starting_execs == 0:
            pending = self._pending_init_exits.pop(container.id, None)
            if pending is not None:
                self._spawn(self._process_exit(container.init, pending))

    # -- handler hooks (shim.handler) -----------------------------------------------------
    async def _run_create_hook(self, req: task.CreateTaskRequest, options, handler_spec: str, deadline):
        """Load the container's handler and run its `create` hook on the bundle's spec; what
        the hook changed, and the request's terminal flag (align_terminal), are written back
        to config.json once, before the OCI runtime reads it. Runs before anything is mounted
        or started, so a refusal leaves nothing behind."""
        import json

        from shim.framework.hooks import ContainerInfo, HandlerRunner, load_handler

        handler = load_handler(handler_spec, options.handler_options)
        config = os.path.join(req.bundle, "config.json")
        try:
            with open(config) as f:
                original = f.read()
            spec = json.loads(original)
        except (OSError, ValueError) as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {req.bundle}: cannot read config.json: {exc}") from None
        info = ContainerInfo(id=req.id, namespace=self.namespace, bundle=req.bundle, spec=spec,
                             options=options.handler_options)
        runner = HandlerRunner(handler, handler_spec, info)
        await runner.guarded("create", deadline)
        if not isinstance(info.spec, dict):
            raise TtrpcError(Code.UNKNOWN, f"handler {handler_spec}.create left a spec that is not an object")
        before = json.loads(original)
        if info.spec.get("annotations") == {} and "annotations" not in before:
            del info.spec["annotations"]  # only read through ContainerInfo.annotations
        set_terminal(info.spec, req.terminal)  # the request decides, whatever the hook wrote
        if before != info.spec:
            write_spec(config, info.spec)
        return runner

    def _notify(self, container: Container, hook: str, process: Process | None) -> None:
        """Queue a notification hook of the container's handler, right after its event."""
        runner = container.handler
        if runner is None:
            return
        from shim.framework.hooks import exit_info, process_info

        if process is None:
            worker = runner.post(hook)
        elif hook == "exited":
            worker = runner.post(hook, process_info(process), exit_info(process))
        else:
            worker = runner.post(hook, process_info(process))
        if worker not in self._hook_workers:
            self._hook_workers.add(worker)
            worker.add_done_callback(self._hook_workers.discard)

    # -- Task API -------------------------------------------------------------------------
    async def create(self, req: task.CreateTaskRequest, ctx) -> task.CreateTaskResponse:
        from shim.framework.mount import mount_all, unmount_all

        if not req.id:
            raise TtrpcError(Code.INVALID_ARGUMENT, "task id must not be empty")
        if req.id in self.containers:
            raise TtrpcError(Code.ALREADY_EXISTS, f"container {req.id}: already exists")
        bundle = req.bundle
        try:
            options = self.app.parse_options(req.options)
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        options.write(bundle)
        handler = None
        handler_spec = getattr(options, "handler", "") or self.default_handler
        if handler_spec:
            handler = await self._run_create_hook(req, options, handler_spec, getattr(ctx, "deadline", None))
        else:
            try:
                align_terminal(bundle, req.terminal)
            except (OSError, ValueError) as exc:
                raise TtrpcError(Code.INVALID_ARGUMENT, f"bundle {bundle}: cannot read or write config.json: {exc}") from None
        rootfs = os.path.join(bundle, "rootfs")
        mounted = False
        if req.rootfs:
            os.makedirs(rootfs, mode=0o711, exist_ok=True)
            try:
                mount_all(list(req.rootfs), rootfs)
            except Exception as exc:
                raise TtrpcError(Code.UNKNOWN, f"failed to mount rootfs component: {exc}") from None
            mounted = True
        runtime = self.app.runtime(options, namespace=self.namespace, bundle=bundle, reaper=self.reaper)
        if handler is not None:
            try:
                runtime = handler.handler.runtime(handler.container, runtime)
            except Exception as exc:
                if mounted:
                    unmount_all(rootfs)
                log.error("%s: handler %s.runtime failed", req.id, handler.name, exc_info=True)
                raise TtrpcError(Code.UNKNOWN, f"handler {handler.name}.runtime failed: {exc!r}") from None
            self.app.runtime_chosen(bundle, runtime)
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        init = InitProcess(req.id, bundle, stdio)
        container = Container(req.id, bundle, self.namespace, options, runtime, init, rootfs_mounted=mounted)
        container.handler = handler
        if req.checkpoint:
            # Restore: no `runc create`; the IO is opened now and Start runs `runc restore`.
            init.restore_from(self.app.restore_options(container, req.checkpoint, req.parent_checkpoint))
        # Rule 1: init may die before `runc create` returns (killed, OOM); its exit is then of
        # a pid we do not know yet, held until /tasks/create is out.
        with self.exits.starting(init) as start:
            try:
                io = await self._create_init(req, options, runtime, init, stdio)
            except BaseException:
                if mounted:
                    unmount_all(rootfs)
                raise
            init.io = io
            self.containers.add(container)
            self.served_bundles[container.id] = bundle_identity(bundle)
            if init.restore is None:  # a restored init has no pid (nor cgroup) before Start
                start.running(read_pid_file(init.pid_file))
                self._load_cgroup(container)  # now: an OOM right after create must not be missed
            if handler is not None:
                handler.container.pid = init.pid
            self.publisher.publish(
                "/tasks/create",
                events.TaskCreate(
                    container_id=req.id,
                    bundle=bundle,
                    rootfs=[Mount(type=m.type, source=m.source, target=m.target, options=list(m.options)) for m in req.rootfs],
                    io=events.TaskIo(stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal),
                    checkpoint=req.checkpoint,
                    pid=init.pid,
                ),
            )
        return task.CreateTaskResponse(pid=init.pid)

    async def _create_init(self, req, options, runtime, init: InitProcess, stdio: Stdio):
        """Open init's IO and run the runtime's create (not for a restore: Start does that);
        the IO, copying. On failure nothing is left open."""
        from shim.framework.console import attach_console
        from shim.framework.stdio import open_process_io

        io = None
        try:
            io = await open_process_io(stdio.stdin, stdio.stdout, stdio.stderr, terminal=stdio.terminal,
                                       uid=options.io_uid, gid=options.io_gid,
                                       container_id=req.id, namespace=self.namespace, reaper=self.reaper)
            stdin_fd, stdout_fd, stderr_fd = io.child_fds()
            if init.restore is None:
                with runtime_errors("OCI runtime create failed"):
                    async with attach_console(io) as console_socket:  # terminal: runc sends the pty master
                        await runtime.create(
                            req.id,
                            req.bundle,
                            pid_file=init.pid_file,
                            console_socket=console_socket,
                            stdin=stdin_fd,
                            stdout=stdout_fd,
                            stderr=stderr_fd,
                        )
                io.start_copying()
                io.close_child_ends()
                read_pid_file(init.pid_file)  # fails here, with the IO closed, if runc wrote none
        except BaseException as exc:
            if io is not None:
                io.close()
                if not isinstance(exc, asyncio.CancelledError):
                    # A binary:// logger: containerd shuts this shim down right after a failed
                    # Create, so see it gone first (SIGTERM, then SIGKILL after 12 s, as Go does).
                    await io.wait_closed()
            raise
        return io

    async def start(self, req: task.StartRequest, ctx) -> task.StartResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        if self.exits.is_starting(process):
            # Its Start is in flight (the Go shim serializes them, then refuses the second).
            # Let through, it ran the runtime again and, failing, ended the first one's start
            # early, so an exit could go out before /tasks/start (rule 2).
            raise TtrpcError(Code.UNKNOWN, "cannot start a running process")
        if isinstance(process, ExecProcess):
            return await self._start_exec(container, process)
        process.state.check("start")
        if process.restore is not None:
            return await self._start_restore(container, process)
        if container.cgroup is None:
            self._load_cgroup(container)
        with self.exits.starting(process):  # an exit meanwhile follows /tasks/start (rule 2)
            with runtime_errors("OCI runtime start failed"):
                await container.runtime.start(container.id)
            process.transition("start", Running)  # its exit, if any, is parked until after the event
            self.publisher.publish("/tasks/start", events.TaskStart(container_id=container.id, pid=process.pid))
        self._notify(container, "started", process)
        return task.StartResponse(pid=process.pid)

    async def _start_restore(self, container: Container, process: InitProcess) -> task.StartResponse:
        """Start of an init created from a checkpoint: `runc restore --detach`, with the IO
        opened at Create (a new console socket for a terminal, as the Go shim)."""
        from shim.framework.console import attach_console

        # As for an exec, the pid is only known once runc wrote it (rule 1).
        with self.exits.starting(process) as start:
            io = process.io
            stdin_fd, stdout_fd, stderr_fd = io.child_fds()
            with runtime_errors("OCI runtime restore failed"):
                async with attach_console(io) as console_socket:
                    await container.runtime.restore(
                        container.id, container.bundle, process.restore,
                        pid_file=process.pid_file, console_socket=console_socket,
                        stdin=stdin_fd, stdout=stdout_fd, stderr=stderr_fd,
                    )
            io.start_copying()
            io.close_child_ends()
            pid = read_pid_file(process.pid_file)
            process.restore = None
            process.transition("start", Running)
            start.running(pid)
            self._load_cgroup(container)
            self.publisher.publish("/tasks/start", events.TaskStart(container_id=container.id, pid=process.pid))
        self._notify(container, "started", process)
        return task.StartResponse(pid=process.pid)

    async def _start_exec(self, container: Container, process: ExecProcess) -> task.StartResponse:
        from shim.framework.console import attach_console
        from shim.framework.stdio import open_process_io

        init = container.init
        # Rule 3: refused from the moment init's exit is reaped (it is no longer watched), not only
        # once it is published: an exec started in between would not be waited for.
        if init.has_exited or init.state in (Stopped, Deleted) or not self.exits.is_watched(init):
            raise TtrpcError(Code.FAILED_PRECONDITION, f"container {container.id} init process is not running: failed precondition")
        process.state.check("start")
        container.starting_execs += 1  # init's exit waits for this start to end (rule 3)
        with self.exits.starting(process, finished=lambda: self._exec_start_finished(container)) as start:
            io = await open_process_io(
                process.stdio.stdin, process.stdio.stdout, process.stdio.stderr, terminal=process.stdio.terminal,
                uid=container.options.io_uid, gid=container.options.io_gid,
                container_id=container.id, namespace=self.namespace, reaper=self.reaper,
            )
            # ctr sends CloseIO as soon as its stdin ends, which can be while `runc exec`
            # runs: the IO must be reachable (and a CloseIO before this point applied) now.
            process.io = io
            if process.stdin_closed:
                io.close_stdin()
            try:
                stdin_fd, stdout_fd, stderr_fd = io.child_fds()
                async with attach_console(io) as console_socket:  # terminal: runc sends the pty master
                    await container.runtime.exec(
                        container.id, process.spec, pid_file=process.pid_file, console_socket=console_socket,
                        stdin=stdin_fd, stdout=stdout_fd, stderr=stderr_fd,
                    )
                io.start_copying()
                io.close_child_ends()
                pid = read_pid_file(process.pid_file)
            except RuntimeFailure as exc:
                process.io = None
                io.close()
                raise TtrpcError(Code.UNKNOWN, f"OCI runtime exec failed: {exc}") from None
            except BaseException:
                process.io = None
                io.close()
                raise
            process.transition("start", Running)
            start.running(pid)
            self.publisher.publish(
                "/tasks/exec-started",
                events.TaskExecStarted(container_id=container.id, exec_id=process.id, pid=process.pid),
            )
        self._notify(container, "started", process)
        return task.StartResponse(pid=process.pid)

    async def delete(self, req: task.DeleteRequest, ctx) -> task.DeleteResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        if isinstance(process, ExecProcess):
            if process.pid and not process.has_exited:
                raise TtrpcError(Code.UNKNOWN, "cannot delete a running process")
            await process.close_io()
            _remove_quietly(process.pid_file)
            del container.execs[process.id]
            return task.DeleteResponse(pid=process.pid, exit_status=process.exit_status, exited_at=process.exit_time())
        from shim.framework.mount import unmount_all
        process.state.check("delete")
        try:
            await container.runtime.delete(container.id, force=False)
        except NoSuchContainer:
            pass
        except RuntimeFailure as exc:
            raise TtrpcError(Code.UNKNOWN, f"failed to delete task: {exc}") from None
        if container.oom_watch is not None:
            container.oom_watch.close()
            container.oom_watch = None
        if process.io is not None:
            await process.io.wait_output_flushed(OUTPUT_FLUSH_TIMEOUT)
        await process.close_io()
        for exec_process in container.execs.values():
            await exec_process.close_io()
        if container.rootfs_mounted:
            unmount_all(container.rootfs)
            container.rootfs_mounted = False
        process.transition("delete", Deleted)
        for gone in container.all_processes():  # execs that never exited go with the container
            self.exits.forget(gone)
        self.containers.remove(container)
        TRACER.forget(container.id)  # its last commands, kept for `pyshim inspect`
        self.publisher.publish(
            "/tasks/delete",
            events.TaskDelete(
                container_id=container.id,
                pid=process.pid,
                exit_status=process.exit_status,
                exited_at=process.exit_time(),
            ),
        )
        response = task.DeleteResponse(pid=process.pid, exit_status=process.exit_status, exited_at=process.exit_time())
        try:  # all the `delete` command would do is done: it only has to print this
            delete_record.write(container.bundle, bytes(response))
        except OSError as exc:
            log.warning("%s: cannot record the delete for the delete command: %s", container.id, exc)
        self._notify(container, "deleted", None)
        return response

    async def exec(self, req: task.ExecProcessRequest, ctx) -> Empty:
        import json

        container = self._container(req.id)
        if req.exec_id in container.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"id {req.exec_id}: already exists")
        if not req.exec_id:
            raise TtrpcError(Code.INVALID_ARGUMENT, "exec id must not be empty")
        container.init.state.check("exec")
        try:
            spec = json.loads(req.spec.value) if req.spec is not None else {}
        except ValueError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec {req.exec_id}: process spec is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec {req.exec_id}: process spec must be a JSON object")
        # The request's flag decides: containerd's Go client builds an exec from the container's
        # own process spec (terminal false) and asks for a TTY through its IO, and runc refuses
        # a console socket for a process spec without a terminal.
        spec["terminal"] = bool(req.terminal)
        if container.handler is not None:
            from shim.framework.hooks import ProcessInfo

            view = ProcessInfo(container_id=container.id, exec_id=req.exec_id, spec=spec, terminal=bool(req.terminal))
            await container.handler.guarded("exec", getattr(ctx, "deadline", None), view)
            if req.exec_id in container.execs:  # another Exec of this id got in while the hook ran
                raise TtrpcError(Code.ALREADY_EXISTS, f"id {req.exec_id}: already exists")
            spec = view.spec
            spec["terminal"] = bool(req.terminal)  # the IO decides, whatever the hook wrote
        stdio = Stdio(req.stdin, req.stdout, req.stderr, req.terminal)
        container.execs[req.exec_id] = ExecProcess(req.exec_id, container.id, container.bundle, stdio, spec)
        self.publisher.publish("/tasks/exec-added", events.TaskExecAdded(container_id=container.id, exec_id=req.exec_id))
        return Empty()

    async def state(self, req: task.StateRequest, ctx) -> task.StateResponse:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        from shim.api.containerd.v1.types import Status

        return task.StateResponse(
            id=process.id,
            bundle=container.bundle,
            pid=process.pid,
            status=Status(process.status),
            stdin=process.stdio.stdin,
            stdout=process.stdio.stdout,
            stderr=process.stdio.stderr,
            terminal=process.stdio.terminal,
            exit_status=process.exit_status,
            exited_at=process.exit_time(),
        )

    async def kill(self, req: task.KillRequest, ctx) -> Empty:
        container = self._container(req.id)
        process = container.process(req.exec_id)
        if process.state is Deleted:
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        # An exited init with `all` still goes to the runtime, as in runc-v2: what it left in
        # a shared pid namespace may live on (CRI sends this SIGKILL when it deletes a task).
        init_kill_all = isinstance(process, InitProcess) and req.all
        if (process.has_exited or process.state is Stopped) and not init_kill_all:
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        if isinstance(process, InitProcess):
            try:
                await container.runtime.kill(container.id, req.signal, all=req.all)
            except RuntimeFailure as exc:
                raise check_kill_error(exc) from None
            return Empty()
        if not process.pid:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"process {process.id} has not been started: failed precondition")
        try:
            os.kill(process.pid, req.signal)
        except ProcessLookupError:
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found") from None
        return Empty()

    async def wait(self, req: task.WaitRequest, ctx) -> task.WaitResponse:
        process = self._container(req.id).process(req.exec_id)
        status, exited_at = await process.wait()
        return task.WaitResponse(exit_status=status, exited_at=exited_at)

    async def pids(self, req: task.PidsRequest, ctx) -> task.PidsResponse:
        from shim.api.containerd.v1.types import ProcessInfo
        container = self._container(req.id)
        if container.init.has_exited:
            # runc-v2 answers an empty list here, and containerd 1.7+/2.x, reloading its shims
            # after a restart, takes an empty list for a leaked shim and deletes the task:
            # an exit that happened while containerd was down vanished with it. The exited
            # init is listed instead, so the task stays, STOPPED with its real status.
            return task.PidsResponse(processes=[ProcessInfo(pid=container.init.pid)])
        with runtime_errors("failed to list pids"):
            pids = await container.runtime.ps(container.id)
        exec_of = {e.pid: e.id for e in container.execs.values() if e.pid}
        processes = []
        for pid in pids:
            info = None
            if pid in exec_of:
                info = self.app.process_details(exec_of[pid])
            processes.append(ProcessInfo(pid=pid, info=info))
        return task.PidsResponse(processes=processes)

    async def close_io(self, req: task.CloseIoRequest, ctx) -> Empty:
        process = self._container(req.id).process(req.exec_id)
        process.stdin_closed = True  # also applies to IO opened later (an exec not yet started)
        if process.io is not None:
            process.io.close_stdin()
        return Empty()

    async def resize_pty(self, req: task.ResizePtyRequest, ctx) -> Empty:
        process = self._container(req.id).process(req.exec_id)
        resize = getattr(process.io, "resize", None)
        if resize is not None:
            try:
                resize(width=req.width, height=req.height)
            except OSError as exc:
                raise TtrpcError(Code.UNKNOWN, f"resizing the console of {process.id}: {exc}") from None
        return Empty()  # no console (any more): nothing to resize, as the Go shim answers

    async def pause(self, req: task.PauseRequest, ctx) -> Empty:
        from shim.framework.process import Paused
        container = self._container(req.id)
        init = container.init
        started_in = init.state
        started_in.check("pause")
        with runtime_errors("OCI runtime pause failed"):
            await container.runtime.pause(container.id)
        init.complete("pause", started_in, Paused)
        self.publisher.publish("/tasks/paused", events.TaskPaused(container_id=container.id))
        return Empty()

    async def resume(self, req: task.ResumeRequest, ctx) -> Empty:
        container = self._container(req.id)
        init = container.init
        started_in = init.state
        started_in.check("resume")
        with runtime_errors("OCI runtime resume failed"):
            await container.runtime.resume(container.id)
        init.complete("resume", started_in, Running)
        self.publisher.publish("/tasks/resumed", events.TaskResumed(container_id=container.id))
        return Empty()

    async def stats(self, req: task.StatsRequest, ctx) -> task.StatsResponse:
        container = self._container(req.id)
        if container.cgroup is None:
            raise TtrpcError(Code.NOT_FOUND, f"container {req.id}: no cgroup to read stats from: not found")
        metrics = container.cgroup.stats()
        return task.StatsResponse(stats=Any(type_url=container.cgroup.metrics_type, value=bytes(metrics)))

    async def checkpoint(self, req: task.CheckpointTaskRequest, ctx) -> Empty:
        container = self._container(req.id)
        await self.app.checkpoint(container, req.path, req.options)
        return Empty()  # no event from the shim (containerd publishes /tasks/checkpointed)

    async def update(self, req: task.UpdateTaskRequest, ctx) -> Empty:
        import json

        container = self._container(req.id)
        container.init.state.check("update")
        if req.resources is None or not req.resources.value:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"container {req.id}: update without resources")
        # containerd marshals the OCI LinuxResources (a Go struct, not a proto) as JSON.
        try:
            resources = json.loads(req.resources.value)
        except ValueError as exc:
            raise TtrpcError(
                Code.INVALID_ARGUMENT, f"container {req.id}: resources ({req.resources.type_url}) are not JSON: {exc}"
            ) from None
        # runc-v2 decodes them into the OCI struct first: a value of the wrong type is refused
        # in the shim, in Go's words, whatever the runtime (crun would ignore it).
        from shim.framework.resources import linux_resources_error

        refused = linux_resources_error(req.resources.value)
        if refused:
            raise TtrpcError(Code.UNKNOWN, refused)
        if resources is None:
            resources = {}  # JSON null: Go's zero LinuxResources
        # No "OCI runtime update failed" here: runc-v2 returns the runtime command's error as
        # it is, and the backend words it (shim.runc: go-runc's "<binary> did not terminate
        # successfully: exit status 1: <output>").
        with runtime_errors(None):
            await container.runtime.update(container.id, resources)
        return Empty()

    def _load_cgroup(self, container: Container) -> None:
        from shim.framework import cgroups

        try:
            container.cgroup = cgroups.load_container(container.init.pid)
        except Exception as exc:  # an unreadable or odd /proc entry: no stats, not a failed task
            log.warning("%s: cannot load the cgroup of pid %d: %s", container.id, container.init.pid, exc)
            return
        if container.cgroup is None or container.oom_watch is not None:
            return
        try:
            container.oom_watch = container.cgroup.watch_oom(lambda: self._publish_oom(container.id))
        except OSError as exc:
            log.warning("%s: cannot watch %r for OOM kills: %s", container.id, container.cgroup, exc)

    def _publish_oom(self, container_id: str) -> None:
        log.info("%s: OOM kill in its cgroup", container_id)
        self.publisher.publish("/tasks/oom", events.TaskOom(container_id=container_id))
        container = self.containers.get(container_id)
        if container is not None and container.handler is not None:
            self._notify(container, "oom", None)

    async def connect(self, req: task.ConnectRequest, ctx) -> task.ConnectResponse:
        container = self.containers.get(req.id)
        return task.ConnectResponse(shim_pid=os.getpid(), task_pid=container.init.pid if container else 0)

    async def shutdown(self, req: task.ShutdownRequest, ctx) -> Empty:
        # Sent after every task delete; with several containers on this shim (grouping, or
        # containerd 2.0 sending pod containers here) it must not stop the others.
        if not self.containers:
            asyncio.get_running_loop().call_soon(self._on_shutdown)
        return Empty()


def _for_its_task(handler):
    """A Task API handler whose log lines name the request's container (requests carry `id`),
    and which reports each call (method, ids, status, latency) to the trace and, with -debug,
    to containerd's log."""
    from shim.framework.debug.trace import TRACER
    from shim.framework.logcontext import TASK_ID

    async def for_its_task(request, ctx):
        container_id = getattr(request, "id", "") or ""
        TASK_ID.set(container_id)  # this request's own asyncio task
        method = getattr(ctx, "method", "")  # tests call handlers without a context
        asyncio.current_task().set_name(f"{method} {container_id}")  # for `pyshim stacks`
        if not TRACER.sinks and not log.isEnabledFor(logging.DEBUG):
            return await handler(request, ctx)
        started = time.monotonic()
        code, message = "OK", ""
        try:
            return await handler(request, ctx)
        except TtrpcError as exc:
            code, message = exc.code.name, exc.message
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:
            code, message = "UNKNOWN", str(exc)
            raise
        finally:
            seconds = time.monotonic() - started
            exec_id = getattr(request, "exec_id", "") or ""
            service = getattr(ctx, "service", "")
            TRACER.request(service, method, container_id, exec_id, code, message, seconds)
            log.debug("%s %s id=%s exec_id=%s: %s%s (%.1f ms)", service, method, container_id, exec_id,
                      code, f" {message}" if message else "", seconds * 1000)

    return for_its_task


def _unimplemented(name: str):
    async def handler(request, ctx):
        raise TtrpcError(Code.UNIMPLEMENTED, f"{name} is not implemented by pyshim yet")

    return handler


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def align_terminal(bundle: str, terminal: bool) -> None:
    """Make the bundle's process.terminal say what the request says (rewriting config.json
    only when they differ). The request decides because it decides the IO: a console socket
    for a terminal, pipes otherwise, and runc refuses either one against a spec that says the
    opposite. runc-v2 passes the spec as it is and fails with runc's error; a client that
    asked for a TTY in its IO only then works with us too."""
    import json

    path = os.path.join(bundle, "config.json")
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        return  # runc says what is missing, in its own words
    if set_terminal(spec, terminal):
        write_spec(path, spec)


def set_terminal(spec, terminal: bool) -> bool:
    """Set spec's process.terminal to `terminal`; True when that changed it."""
    process = spec.get("process") if isinstance(spec, dict) else None
    if not isinstance(process, dict) or bool(process.get("terminal", False)) == bool(terminal):
        return False
    process["terminal"] = bool(terminal)
    return True


def write_spec(path: str, spec: dict) -> None:
    """Replace config.json atomically (runc must never read half of it)."""
    import json

    tmp = path + ".pyshim-tmp"
    with open(tmp, "w") as f:
        json.dump(spec, f)
    os.replace(tmp, path)


def kill_all_on_init_exit(bundle: str) -> bool:
    """Whether the processes left in a container must be killed when its init exits: true
    unless the bundle's spec gives it a pid namespace of its own (a `pid` entry without a
    path), and true when the spec cannot be read (runc-v2's ShouldKillAllOnExit rule)."""
    import json

    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
        namespaces = (spec.get("linux") or {}).get("namespaces") or []
        return not any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)
    except (OSError, ValueError, AttributeError, TypeError):
        return True
