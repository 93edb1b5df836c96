"""`pyshim`: look inside the running shim daemons of this machine (run as root).

    pyshim ls [--json]                 every daemon and the tasks it serves
    pyshim inspect ID [--json]         one container in depth
    pyshim trace [ID] [--json]         what the daemon(s) do, live, until Ctrl-C
    pyshim stacks ID [--json]          every asyncio task and thread of ID's daemon
    pyshim log-level ID LEVEL          change ID's daemon's log level

Daemons are found through their debug sockets in one directory (shim.framework.debug), so
no containerd address or state directory is needed. Process facts the daemon need not spend
time on (memory, fds, uptime) are read here, from /proc, with psutil.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import socket
import sys
import time

from shim.framework.debug import DEBUG_DIR
from shim.framework.debug.wire import ReplyReader, Request, WireError

#: Seconds a daemon has to answer a one-shot request.
ANSWER_TIMEOUT = 5.0


class CommandError(Exception):
    """What goes wrong for the user: printed as `pyshim: <message>`, exit status 1."""


# -- talking to daemons --------------------------------------------------------------------
def debug_sockets(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except PermissionError:
        raise CommandError(f"cannot list {directory}: permission denied (run pyshim as root)") from None
    return [os.path.join(directory, name) for name in names if name.endswith(".sock")]


def connect(path: str, timeout: float = ANSWER_TIMEOUT) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _reply_error(reply: dict) -> None:
    if not reply.get("ok"):
        raise CommandError(str(reply.get("error") or "the daemon refused the request"))


def ask(path: str, request: Request, timeout: float = ANSWER_TIMEOUT) -> object:
    """The result of a one-shot request to the daemon at path; CommandError or OSError."""
    sock = connect(path, timeout)
    try:
        sock.sendall(request.encode())
        reader = ReplyReader()
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = sock.recv(1 << 16)
            if not data:
                reader.feed_eof()
                raise CommandError(f"daemon at {path} closed the connection without an answer")
            replies = reader.feed(data)
            if replies:
                _reply_error(replies[0])
                return replies[0].get("result")
    except socket.timeout:
        raise CommandError(f"daemon at {path} did not answer within {timeout:.0f}s") from None
    except WireError as exc:
        raise CommandError(f"daemon at {path}: {exc}") from None
    finally:
        sock.close()


def _is_stale(exc: OSError) -> bool:
    """The socket file outlived its daemon (killed, so it could not remove it)."""
    return exc.errno in (errno.ECONNREFUSED, errno.ENOENT)


def all_daemons(directory: str) -> tuple[list[dict], list[str]]:
    """What every daemon answers to `ls`, and a line for each that could not be asked."""
    daemons, problems = [], []
    for path in debug_sockets(directory):
        try:
            daemon = ask(path, Request("ls"))
        except PermissionError:
            raise CommandError(f"cannot connect to {path}: permission denied (run pyshim as root)") from None
        except OSError as exc:
            if _is_stale(exc):
                try:
                    os.unlink(path)  # nobody listens: the daemon is gone
                except OSError:
                    pass
            else:
                problems.append(f"{path}: {exc.strerror or exc}")
            continue
        except CommandError as exc:
            problems.append(str(exc))
            continue
        if isinstance(daemon, dict):
            daemon["debug_socket"] = path
            daemons.append(daemon)
    return daemons, problems


def find_daemon(directory: str, container_id: str, namespace: str) -> dict:
    """The daemon serving container_id (in namespace, when given)."""
    daemons, problems = all_daemons(directory)
    found = [
        (d, task.get("namespace", "")) for d in daemons
        for task in d.get("tasks", ())
        if task.get("id") == container_id and (not namespace or task.get("namespace") == namespace)
    ]
    if not found:
        detail = f" ({'; '.join(problems)})" if problems else ""
        where = f" in namespace {namespace}" if namespace else ""
        raise CommandError(f"no pyshim daemon serves container {container_id}{where}{detail}")
    if len(found) > 1:
        # The tasks' namespaces: one daemon may serve a group's containers of several.
        namespaces = ", ".join(sorted({task_namespace for _, task_namespace in found}))
        raise CommandError(f"container {container_id} is in several namespaces ({namespaces}): pick one with -n")
    return found[0][0]


# -- process facts ---------------------------------------------------------------------------
def process_facts(pid: int) -> dict:
    """Memory (PSS and private), open fds and uptime of a daemon, read from /proc."""
    facts: dict = {"pss_bytes": None, "private_bytes": None, "fds": None, "uptime_s": None}
    try:
        import psutil
    except ImportError:
        return facts
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            facts["uptime_s"] = round(time.time() - process.create_time(), 1)
            facts["fds"] = process.num_fds()
            memory = process.memory_full_info()
            facts["pss_bytes"] = getattr(memory, "pss", None)
            facts["private_bytes"] = getattr(memory, "uss", None)
    except (psutil.Error, OSError):
        pass
    return facts


def _size(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _exit(process: dict) -> str:
    status = process.get("exit_status")
    return "-" if status is None else str(status)


# -- commands ----------------------------------------------------------------------------
def cmd_ls(args) -> int:
    daemons, problems = all_daemons(args.debug_dir)
    if args.namespace:
        daemons = [d for d in daemons if d.get("namespace") == args.namespace]
    for daemon in daemons:
        daemon.update(process_facts(daemon.get("pid", 0)))
    if args.json:
        print(json.dumps(daemons, indent=2))
    else:
        print(format_ls(daemons), end="")
    for problem in problems:
        print(f"pyshim: {problem}", file=sys.stderr)
    return 0


def format_ls(daemons: list[dict]) -> str:
    if not daemons:
        return "no pyshim daemons\n"
    lines = []
    header = ("DAEMON", "NAMESPACE", "PROTO", "UPTIME", "PSS", "PRIVATE", "FDS", "CLIENTS", "EVENTS", "SOCKET")
    rows = [header]
    for d in daemons:
        rows.append((
            str(d.get("pid", "?")), d.get("namespace", ""), d.get("protocol", ""), _duration(d.get("uptime_s")),
            _size(d.get("pss_bytes")), _size(d.get("private_bytes")),
            "-" if d.get("fds") is None else str(d["fds"]), str(d.get("clients", "-")),
            str(d.get("events_pending", "-")), d.get("socket", ""),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            continue
        daemon = daemons[index - 1]
        for task in daemon.get("tasks", ()):
            lines.append(f"    task {task.get('id')}  pid {task.get('pid')}  {task.get('status')}  exit {_exit(task)}")
            for process in task.get("execs", ()):
                lines.append(f"      exec {process.get('id')}  pid {process.get('pid')}  {process.get('status')}  exit {_exit(process)}")
    return "\n".join(lines) + "\n"


def cmd_inspect(args) -> int:
    daemon = find_daemon(args.debug_dir, args.id, args.namespace)
    container = ask(daemon["debug_socket"], Request("inspect", id=args.id, namespace=args.namespace))
    if not isinstance(container, dict):
        raise CommandError("the daemon's answer is not a container description")
    container["daemon"] = {k: daemon.get(k) for k in ("pid", "namespace", "socket", "protocol", "runtime_type")}
    container["daemon"].update(process_facts(daemon.get("pid", 0)))
    if args.json:
        print(json.dumps(container, indent=2))
    else:
        print(format_inspect(container), end="")
    return 0


def format_inspect(c: dict) -> str:
    daemon = c.get("daemon") or {}
    lines = [
        f"container {c.get('id')} (namespace {c.get('namespace')})",
        f"  status      {c.get('status')}, pid {c.get('pid')}, exit {_exit(c)}",
        f"  bundle      {c.get('bundle')}",
        f"  daemon      pid {daemon.get('pid')}, {daemon.get('protocol')} on {daemon.get('socket')},"
        f" PSS {_size(daemon.get('pss_bytes'))}, {daemon.get('fds', '-')} fds",
    ]
    runtime = c.get("runtime") or {}
    lines.append(f"  runtime     {runtime.get('binary') or runtime.get('type')}  root {runtime.get('root') or '-'}")
    cgroup = c.get("cgroup")
    if cgroup and "version" in cgroup:
        limit = cgroup.get("memory_limit_bytes")
        cpu = cgroup.get("cpu_usage_ns")
        lines.append(
            f"  cgroup      v{cgroup.get('version')} {cgroup.get('path') or '-'}: memory {_size(cgroup.get('memory_bytes'))}"
            f" (limit {_size(limit) if limit is not None else 'none'}), pids {_or_dash(cgroup.get('pids'))},"
            f" cpu {'-' if cpu is None else f'{cpu / 1e9:.2f}s'}"
        )
    elif cgroup:
        lines.append(f"  cgroup      {cgroup}")
    else:
        lines.append("  cgroup      - (none loaded)")
    handler = c.get("handler")
    if handler:
        hooks = ", ".join(handler.get("hooks") or ()) or "none"
        running = f", running {handler['notification_running']}" if handler.get("notification_running") else ""
        lines.append(f"  handler     {handler.get('name') or handler.get('class')} ({handler.get('class')}; hooks: {hooks};"
                     f" {handler.get('notifications_queued', 0)} notification(s) queued{running})")
    else:
        lines.append("  handler     -")
    lines.append("  processes")
    for process in c.get("processes", ()):
        name = "init" if process.get("id") == c.get("id") else f"exec {process.get('id')}"
        tty = ", tty" if process.get("terminal") else ""
        lines.append(f"    {name}: pid {process.get('pid')}, {process.get('status')}, exit {_exit(process)}{tty}")
        stdio = process.get("stdio") or {}
        for stream in ("stdin", "stdout", "stderr") if not process.get("pumps") else ():
            if stdio.get(stream):  # the pumps below name them when there are any
                lines.append(f"      {stream:<6} {stdio[stream]}")
        for pump in process.get("pumps", ()):
            if pump.get("stream") == "logger":
                lines.append(f"      logger pid {_or_dash(pump.get('pid'))}, {pump.get('state')}: {' '.join(pump.get('argv') or ())}")
                continue
            blocked = ""
            if pump.get("blocked_since"):
                blocked = f" for {pump.get('blocked_for_s') or 0:.1f}s"
            lines.append(f"      copy {pump.get('stream')}: {pump.get('source')} -> {pump.get('target')},"
                         f" {_or_dash(pump.get('bytes'))} bytes, {pump.get('state')}{blocked}")
    running = c.get("commands_running") or []
    commands = c.get("commands") or []
    lines.append(f"  last commands ({len(commands)} kept, {len(running)} running)")
    for command in running:  # the whole command line: this is what a stuck request waits on
        lines.append(f"    {_or_dash(command.get('command')):<10} RUNNING for {command.get('running_for_ms', 0) / 1000:.1f}s,"
                     f" pid {command.get('pid')}: {' '.join(command.get('argv', ()))}")
    for command in commands:  # the command lines are in --json
        when = time.strftime("%H:%M:%S", time.localtime(command.get("started", 0)))
        lines.append(f"    {_or_dash(command.get('command')):<10} {when}  exit {command.get('exit_code')}  {command.get('ms', 0):.1f}ms")
        if command.get("stderr"):
            lines.append(f"      stderr: {command['stderr']}")
    events = c.get("events_pending") or []
    lines.append(f"  events waiting for containerd: {len(events)}")
    for event in events:
        lines.append(f"    {event.get('topic')}{' (in flight)' if event.get('in_flight') else ''}")
    return "\n".join(lines) + "\n"


def format_record(daemon_pid: int, record: dict) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.get("time", 0)))
    stamp += f".{int(record.get('time', 0) * 1000) % 1000:03d}"
    kind = record.get("kind", "?")
    ids = f"id={record.get('id') or '-'}"
    if record.get("exec_id"):
        ids += f" exec={record['exec_id']}"
    if kind == "request":
        status = _or_dash(record.get("status"))
        if record.get("message"):
            status += f" ({record['message']})"
        service = record.get("service", "").removeprefix("containerd.")
        text = f"{service}/{record.get('method')} {ids} {status} {record.get('ms', 0):.1f}ms"
    elif kind == "command":
        program = os.path.basename((record.get("argv") or [""])[0])
        text = f"{program} {record.get('command')} {ids} pid={record.get('pid')} exit={record.get('exit_code')} {record.get('ms', 0):.1f}ms"
        if record.get("stderr"):
            text += f" stderr={record['stderr']!r}"
    elif kind == "event":
        text = f"{record.get('topic')} {ids} {record.get('state')}"
        if record.get("attempts"):
            text += f" attempt {record['attempts']}"
        if record.get("message"):
            text += f" ({record['message']})"
    elif kind == "exit":
        text = f"{ids} pid={record.get('pid')} status={record.get('status')}"
    else:
        text = json.dumps(record)
    return f"{stamp} [{daemon_pid}] {kind:<7} {text}"


def _stop_on_interrupt_and_term() -> None:
    """A trace runs until SIGINT or SIGTERM, even where it was started with SIGINT ignored (a
    shell's background job, or anything such a shell started: Python then installs no handler)."""
    import signal

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(signum, stop)
        except ValueError:  # not the main thread (run from a program, as the tests do)
            return


def cmd_trace(args) -> int:
    _stop_on_interrupt_and_term()
    if args.id:
        targets = [find_daemon(args.debug_dir, args.id, args.namespace)]
    else:
        targets, problems = all_daemons(args.debug_dir)
        if args.namespace:
            targets = [d for d in targets if d.get("namespace") == args.namespace]
        for problem in problems:
            print(f"pyshim: {problem}", file=sys.stderr)
        if not targets:
            raise CommandError("no pyshim daemons to trace")
    selector = selectors.DefaultSelector()
    request = Request("trace", id=args.id, namespace=args.namespace)
    for daemon in targets:
        try:
            sock = connect(daemon["debug_socket"])
            sock.sendall(request.encode())
        except OSError as exc:
            print(f"pyshim: cannot trace daemon {daemon.get('pid')}: {exc}", file=sys.stderr)
            continue
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (daemon.get("pid", 0), ReplyReader(), [False]))
    if not selector.get_map():
        raise CommandError("could not attach to any daemon")
    if not args.json:
        which = f"container {args.id}" if args.id else f"{len(selector.get_map())} daemon(s)"
        print(f"tracing {which}; Ctrl-C to stop", file=sys.stderr, flush=True)
    try:
        while selector.get_map():
            for key, _ in selector.select():
                pid, reader, accepted = key.data
                try:
                    data = key.fileobj.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                try:
                    replies = reader.feed(data) if data else []
                except WireError as exc:
                    print(f"pyshim: daemon {pid}: {exc}", file=sys.stderr)
                    data = b""
                    replies = []
                for reply in replies:
                    if not accepted[0]:
                        accepted[0] = True
                        if not reply.get("ok"):
                            print(f"pyshim: daemon {pid}: {reply.get('error')}", file=sys.stderr)
                            break
                        continue
                    record = reply.get("record")
                    if not isinstance(record, dict):
                        continue
                    if args.json:
                        print(json.dumps({"daemon": pid, **record}), flush=True)
                    else:
                        print(format_record(pid, record), flush=True)
                if not data:
                    selector.unregister(key.fileobj)
                    key.fileobj.close()
                    if not args.json:
                        print(f"pyshim: daemon {pid} closed the trace (it exited?)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        for key in list(selector.get_map().values()):
            key.fileobj.close()
        selector.close()
    return 0


def cmd_stacks(args) -> int:
    daemon = find_daemon(args.debug_dir, args.id, args.namespace)
    stacks = ask(daemon["debug_socket"], Request("stacks"))
    if args.json:
        print(json.dumps(stacks, indent=2))
        return 0
    from shim.framework.debug.stacks import format_stacks

    print(f"daemon {daemon.get('pid')} ({daemon.get('namespace')}, {daemon.get('socket')})")
    print(format_stacks(stacks if isinstance(stacks, dict) else {}), end="")
    return 0


def cmd_log_level(args) -> int:
    daemon = find_daemon(args.debug_dir, args.id, args.namespace)
    changed = ask(daemon["debug_socket"], Request("log-level", level=args.level))
    if isinstance(changed, dict):
        print(f"daemon {daemon.get('pid')}: log level {changed.get('before')} -> {changed.get('after')}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pyshim", description="Look inside running pyshim daemons (run as root).")
    top.add_argument("--debug-dir", default=DEBUG_DIR, help=f"where daemons' debug sockets are (default {DEBUG_DIR})")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("-n", "--namespace", default="", help="containerd namespace of the container")
        sub.set_defaults(func=func)
        return sub

    ls = command("ls", "every pyshim daemon on this machine and the tasks it serves", cmd_ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per daemon, in a list")
    inspect = command("inspect", "one container in depth", cmd_inspect)
    inspect.add_argument("id", help="container id")
    inspect.add_argument("--json", action="store_true")
    trace = command("trace", "what the daemon(s) do, live, one line per request, command, event, exit", cmd_trace)
    trace.add_argument("id", nargs="?", default="", help="only this container (default: every daemon)")
    trace.add_argument("--json", action="store_true", help="one JSON object per line")
    stacks = command("stacks", "every asyncio task and thread of a container's daemon, with its stack", cmd_stacks)
    stacks.add_argument("id", help="container id")
    stacks.add_argument("--json", action="store_true")
    level = command("log-level", "change the log level of a container's daemon", cmd_log_level)
    level.add_argument("id", help="container id")
    level.add_argument("level", help="trace, debug, info, warn, error")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "log-level":
        from shim.framework.debug.wire import LOG_LEVELS

        if args.level.lower() not in LOG_LEVELS:
            print(f"pyshim: unknown log level {args.level!r}: want one of {', '.join(LOG_LEVELS)}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"pyshim: {exc}", file=sys.stderr)
        return 1
    except PermissionError as exc:
        print(f"pyshim: {exc.filename or ''}: permission denied (run pyshim as root)", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0  # `pyshim trace | head`
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
