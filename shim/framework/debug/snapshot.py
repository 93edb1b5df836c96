"""What `pyshim ls` and `pyshim inspect` show, read from the daemon's live objects.

Plain dicts of JSON types; process facts the client can read itself from /proc (memory,
fds, uptime) are left to it, so the daemon does no more than walk its own tables.
"""

from __future__ import annotations

import logging
import os

from shim.framework.debug.trace import TRACER


def describe_daemon(daemon) -> dict:
    service = daemon.service
    publisher = service.publisher
    return {
        "pid": os.getpid(),
        "runtime_type": daemon.runtime_type,
        "namespace": daemon.namespace,
        "socket": daemon.task_socket,
        "protocol": daemon.protocol,
        "debug_socket": daemon.debug_socket,
        "started": daemon.started,
        "clients": getattr(daemon.task_server, "connection_count", 0),
        "trace_clients": len(TRACER.sinks),
        "events_pending": publisher.pending,
        "events_dropped": publisher.dropped,
        "log_level": logging.getLevelName(logging.getLogger().level).lower(),
        "tasks": [_task(container) for container in service.containers],
    }


def _process(process) -> dict:
    described = {
        "id": process.id,
        "pid": process.pid,
        "status": process.state.name,
        "exit_status": process.exit_status if process.has_exited else None,
    }
    if process.exited_at is not None:
        described["exited_at"] = process.exited_at.isoformat()
    return described


def _task(container) -> dict:
    init = _process(container.init)
    init["namespace"] = container.namespace
    init["bundle"] = container.bundle
    init["execs"] = [_process(process) for process in container.execs.values()]
    return init


def describe_container(daemon, container_id: str, namespace: str = "") -> dict | None:
    service = daemon.service
    container = service.containers.get((namespace or daemon.namespace, container_id))
    if container is None:
        return None
    described = _task(container)
    described["daemon_pid"] = os.getpid()
    described["processes"] = [_process_detail(p) for p in container.all_processes()]
    runtime = container.runtime
    described["runtime"] = {
        "type": type(runtime).__name__,
        "binary": getattr(runtime, "binary", ""),
        "root": getattr(runtime, "root", ""),
    }
    described["cgroup"] = _cgroup(container.cgroup)
    described["handler"] = _handler(container.handler)
    described["commands_running"] = [c for c in TRACER.running_commands() if c["id"] == container_id]
    described["commands"] = TRACER.recent_commands(container_id)
    described["events_pending"] = service.publisher.pending_for(container_id)
    described["rootfs_mounted"] = container.rootfs_mounted
    return described


def _process_detail(process) -> dict:
    described = _process(process)
    described["terminal"] = process.stdio.terminal
    described["stdio"] = {"stdin": process.stdio.stdin, "stdout": process.stdio.stdout, "stderr": process.stdio.stderr}
    io = process.io
    describe_io = getattr(io, "describe", None)
    described["pumps"] = describe_io() if describe_io is not None else []
    described["stdin_closed"] = process.stdin_closed
    return described


def _cgroup(cgroup) -> dict | None:
    if cgroup is None:
        return None
    describe = getattr(cgroup, "describe", None)
    if describe is not None:
        try:
            return describe()
        except OSError as exc:
            return {"error": str(exc)}
    return {"cgroup": repr(cgroup)}


def _handler(handler) -> dict | None:
    if handler is None:
        return None
    describe = getattr(handler, "describe", None)
    if describe is not None:
        return describe()
    return {"handler": repr(handler)}
