"""A warm parent ("zygote") whose forks run the binary's `start` command and become its daemon.

containerd runs the shim binary's `start` for every container (and every pod on 1.x) and
waits for it. A fresh interpreter that imports the shim and then forks the daemon pays for its
imports (asyncio, betterproto2, the generated protobuf modules, the shim's own modules: ~120 ms
here) on the container's path, and so does the daemon. The zygote is one
long-lived process per pyshim installation and binary that has imported all of that once: the
command process (shim/framework/zygote_client.py) hands it its argv, directory, environment
and stdin/stdout/stderr, and a fork of the zygote runs `shim.framework.main.run` there exactly
as the command would have. A `start` that makes a daemon ends with that fork *being* the
daemon; the command process only relays the exit code, so what a command costs is its own
interpreter's start-up.

The exchange on the zygote's unix socket (SOCK_SEQPACKET, one JSON message each way per step):

* command -> zygote: {"v", "argv", "cwd", "env"} with fds 0, 1 and 2 as SCM_RIGHTS;
* zygote: the peer must have our uid (SO_PEERCRED) and our namespaces, credentials,
  capabilities, seccomp and LSM label; then fork. Once the machine is quiet again, the
  zygote checks that the installation's files are still the ones it loaded; when they are
  not, it retires (the next command starts a new zygote);
* worker -> command: {"pid"} once it has taken on the command's cgroups and settings, or
  {"error"} (the command runs itself: nothing ran here);
* command -> worker: "go" (a command that gave up waiting runs itself, and the worker, seeing
  no "go", exits: a command never runs twice);
* worker -> command: {"exit": code} after the command's output is complete and the worker let
  go of the command's stdio (containerd reads it to EOF); for a start that became a daemon,
  {"exit": 0, "daemon": true}, answered "ok" by the command before it exits 0: the daemon
  serves only then, so a start that containerd killed never leaves a daemon behind.

The zygote (`main`, run as ``python -P -c ... <socket> <lock fd> <root> <identity>``):

* imports what the daemon and `start` import, warms betterproto2's per-class
  metadata, `gc.freeze()`s, fills its allocators' holes (shim/framework/forkheap.py: daemons
  then copy fewer pages), offers its memory to KSM (shim/framework/ksm.py), then binds its
  socket (mode 0600, dir 0700) and holds the flock for its whole life, so at most one zygote
  per installation is alive or starting;
* a plain blocking accept loop, no asyncio loop ever runs in it, no threads; it answers one
  request at a time and reaps its workers on SIGCHLD, so no zombie stays behind; a daemon
  outliving the zygote is reparented like a start-forked one;
* it keeps one worker forked ahead (the spare, `pyshim-spare` in ps): it has let go of the
  zygote's fds and made the event loop its daemon would serve on, and takes the next request
  over a socketpair, so a command waits for neither a fork nor a loop. A new spare is forked
  once no request came for QUIET_DELAY after the last (the container just started is being
  created then), or at once when one is waiting; the spare exits with its zygote;
* it ignores SIGHUP/SIGPIPE/SIGINT, survives containerd restarts, exits after
  ``PYSHIM_ZYGOTE_IDLE`` seconds without requests (default 600), on SIGTERM (removing its
  socket) or when its socket file is no longer its own, and appends a small best-effort log
  to its lock file (``<socket>.lock``: the time of the last start attempt, then the log of
  the zygote that attempt started), so one installation leaves one small file behind.

The worker becomes what the command's own process is: own process group (not a session
leader, as a start-forked daemon), the command's signal dispositions and mask, cgroups (v1
and v2), rlimits, umask, CPU affinity, nice value and oom_score_adj, cwd, environment (also
shown in /proc/<pid>/environ) and command line (/proc/<pid>/cmdline and comm, so `ps` and
tools that look for the shim by its arguments see the usual shim), stdio, and none of the
zygote's fds. ``PYSHIM_ZYGOTE=0`` disables all of it.
"""

from __future__ import annotations

import os
import sys

from shim import __version__
from shim.framework.zygote_client import (
    _PAD_VAR, GO_TIMEOUT, MAX_MESSAGE, PROTOCOL, REQUEST_TIMEOUT, WARM_ACTIONS, _sha256, hash_names,
)

#: Seconds without a request after which the zygote exits (env PYSHIM_ZYGOTE_IDLE).
DEFAULT_IDLE = 600.0
#: How often an idle zygote checks that its socket file is still its own.
CHECK_INTERVAL = 5.0
#: After a request, how long the zygote waits for a quiet moment before it forks the next
#: spare and checks the installation's files (~3 ms of CPU): the container that was just
#: started is creating meanwhile (runc create, ~40 ms to the first exit here), and on a small
#: machine that work would wait for ours. A request arriving meanwhile gets a spare at once.
QUIET_DELAY = 0.2


def installation_key() -> str:
    """What a zygote's code depends on: the interpreter (path and file), the shim package
    (path, version, every .py file's inode, size, mtime and ctime), the stdlib and
    site-packages directories (their inode and mtime change when pip or dpkg add, remove or
    replace what they hold: betterproto2, the stdlib), uid and the PYTHON* environment.
    Not sys.path as such: how a process was started changes it (python -m puts the cwd, the
    bundle, first). ~0.5 ms."""
    import site

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # shim/, apps included
    h = _sha256()
    hash_names(h)  # what names the zygote's socket
    stdlib = os.path.dirname(os.__file__)
    try:
        sites = [*site.getsitepackages(), site.getusersitepackages()]
    except AttributeError:  # a virtualenv-made site module
        sites = []
    for path in (sys.executable, stdlib, os.path.join(stdlib, "lib-dynload"), *sites):
        try:
            st = os.stat(path)  # the interpreter through the venv's symlink
            h.update(os.fsencode(f"{path}\0{st.st_ino}\0{st.st_mtime_ns}\n"))
        except OSError:
            pass
    files = []
    stack = [package]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.name.endswith(".py"):
                    st = entry.stat()
                    files.append(f"{entry.path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}")
                elif entry.name != "__pycache__" and entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    for line in sorted(files):
        h.update(os.fsencode(line) + b"\n")
    return h.hexdigest()

# -- the zygote ---------------------------------------------------------------------------------

#: What the daemon imports (at start and in its handlers), imported once by the zygote.
PRELOAD = (
    "shim.framework.daemon",  # first: it keeps asyncio from importing ssl
    "asyncio", "ctypes", "json", "logging", "datetime", "tomllib", "resource",
    "shim.framework.events", "shim.framework.reaper", "shim.framework.service", "shim.framework.ttrpc.server", "shim.framework.ttrpc.client",
    "shim.api.services", "shim.framework.stdio", "shim.framework.console", "shim.framework.cgroups", "shim.framework.mount",
    "shim.framework.container", "shim.framework.debug.server", "shim.framework.dense",
    "shim.framework.process", "shim.framework.app", "shim.framework.backend", "shim.framework.bootstrap", "shim.framework.flags",
    "shim.api.containerd.events", "shim.api.containerd.task.v2",
    "shim.api.containerd.task.v3", "shim.api.containerd.types", "shim.api.containerd.v1.types",
    "shim.api.containerd.runc.v1", "shim.api.runtimeoptions.v1", "shim.api.google.protobuf",
    "shim.api.io.containerd.cgroups.v1", "shim.api.io.containerd.cgroups.v2",
    # what the start command runs in a worker
    "shim.framework.main", "shim.framework.start", "shim.framework.placement", "shim.framework.lightjson",
    "shim.framework.ttrpc.wire",
)

_NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
_SAME_STATUS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
                "NoNewPrivs", "Seccomp")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def _identity(pid: int, status: dict[str, str]) -> dict[str, str]:
    """What must be the same in the zygote and a start command for a fork to stand in."""
    out = {name: status.get(name, "") for name in _SAME_STATUS}
    for ns in _NAMESPACES:
        try:
            out[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except OSError:
            out[ns] = ""
    try:
        out["root"] = os.readlink(f"/proc/{pid}/root")
    except OSError:
        out["root"] = ""
    out["lsm"] = _read(f"/proc/{pid}/attr/current").strip("\0\n")
    return out


def _signal_set(mask_hex: str) -> set[int]:
    try:
        mask = int(mask_hex, 16)
    except ValueError:
        return set()
    return {n + 1 for n in range(mask.bit_length()) if mask >> n & 1}


def _describe(argv: object) -> str:
    """`start id=<id>` for the zygote's log."""
    if not isinstance(argv, list) or not argv:
        return "?"
    words = [str(a) for a in argv]
    task = next((words[i + 1] for i, w in enumerate(words[:-1]) if w.lstrip("-") == "id"), "?")
    return f"{words[-1]} id={task}"


def _detach_stdio() -> None:
    """Flush what the command printed and let go of its stdio: containerd reads the output
    until every copy of the pipe is closed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _report_exit(conn: socket.socket, code: int) -> None:
    _detach_stdio()
    try:
        conn.send(json.dumps({"exit": code}).encode())
    except OSError:
        pass


class Warm:
    """Where a command runs when a zygote's worker runs it (shim.framework.main.run's `warm`):
    the command's parent (containerd, for start's oom_score_adj) and the way to become the
    daemon once the command's output is complete."""

    def __init__(self, conn: socket.socket, parent_pid: int, on_daemon=None) -> None:
        self.conn = conn
        self.parent_pid = parent_pid
        self.on_daemon = on_daemon

    def become_daemon(self, flags, listener, address: str) -> None:
        """Report exit 0 and, once the command has it (and so exits 0), serve `listener` in
        this process. Never returns."""
        _detach_stdio()
        try:
            self.conn.send(json.dumps({"exit": 0, "daemon": True}).encode())
            self.conn.settimeout(GO_TIMEOUT)
            confirmed = self.conn.recv(16) == b"ok"
        except OSError:
            confirmed = False
        if not confirmed:
            # The command died before it exited 0: containerd never learns this socket.
            try:
                os.unlink(address.removeprefix("unix://"))
            except OSError:
                pass
            os._exit(1)
        self.conn.close()
        if self.on_daemon is not None:
            self.on_daemon()
        from shim.framework.start import become_daemon

        become_daemon(flags, listener)


class Refused(Exception):
    pass


class _Stop(Exception):
    pass


class Zygote:
    def __init__(self, path: str, lock_fd: int, idle: float) -> None:
        import signal
        import time

        self.path = path
        self.lock_fd = lock_fd
        self.idle = idle
        self.server = None  # its listening socket.socket
        self.inode: tuple[int, int] | None = None
        self.log_fd = -1
        self.log_keep = 0
        self.me = _identity(os.getpid(), _status(os.getpid()))
        self.key = installation_key()  # a request finding other files retires this zygote
        self.key_checked = 0.0
        self.ignored: set[int] = set()
        self.blocked = False
        self.fd_ceiling = _fd_ceiling()
        self.accepting = False
        self.stopping = False
        self.stale = False
        self.spare: tuple[int, socket.socket] | None = None  # (pid, link) of the next worker
        self._time = time
        self._signal = signal

    # best-effort log, appended to the lock file; never stdout/stderr
    def log(self, msg: str) -> None:
        if self.log_fd < 0:
            return
        try:
            if os.fstat(self.log_fd).st_size > 256 * 1024:
                os.ftruncate(self.log_fd, self.log_keep)  # keep the attempt's time
            stamp = self._time.strftime("%Y-%m-%dT%H:%M:%S", self._time.gmtime())
            os.write(self.log_fd, f"{stamp}Z zygote[{os.getpid()}] {msg}\n".encode(errors="replace"))
        except OSError:
            pass

    def bind(self) -> None:
        try:
            self.log_fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self.log_keep = os.fstat(self.log_fd).st_size
        except OSError:
            self.log_fd = -1
        try:
            os.unlink(self.path)  # a dead zygote's: a live one would hold the lock we hold
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        old = os.umask(0o177)
        try:
            server.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        server.listen(128)
        st = os.stat(self.path)
        self.inode = (st.st_dev, st.st_ino)
        self.server = server

    def _still_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.inode

    def on_sigterm(self, *_: object) -> None:
        self.stopping = True
        if self.accepting:
            raise _Stop

    def run(self) -> int:
        assert self.server is not None
        self.fork_spare()
        last = self._time.monotonic()
        while True:
            remaining = last + self.idle - self._time.monotonic()
            if self.stopping or self.stale or remaining <= 0:
                why = "SIGTERM" if self.stopping else "installation changed" if self.stale else "idle"
                self.retire(why, drain=not (self.stopping or self.stale))
                return 0
            self.server.settimeout(min(remaining, CHECK_INTERVAL))
            try:
                self.accepting = True
                try:
                    conn, _ = self.server.accept()
                finally:
                    self.accepting = False
            except _Stop:
                continue
            except TimeoutError:
                if not self._still_ours():
                    self.log(f"socket {self.path} is no longer ours; exiting")
                    self.server.close()
                    return 0
                continue
            except OSError as exc:
                self.log(f"accept: {exc}")
                self._time.sleep(0.1)
                continue
            last = self._time.monotonic()
            self.serve_one(conn)
            if self.spare is not None:
                continue
            busy = self.next_request_within(QUIET_DELAY)
            if not busy or last - self.key_checked > CHECK_INTERVAL:
                self.check_installation()
            if not (self.stopping or self.stale):
                self.fork_spare()

    def next_request_within(self, seconds: float) -> bool:
        """Whether a command is waiting at our socket, or one comes within `seconds`."""
        import select

        assert self.server is not None
        try:
            readable, _, _ = select.select([self.server], [], [], seconds)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def check_installation(self) -> None:
        """Retire after this request when the installation's files are no longer the ones
        we loaded (the stat of every file: ~0.7 ms): the next command starts a new zygote."""
        self.key_checked = self._time.monotonic()
        if installation_key() != self.key:
            self.log("the installation's files changed since this zygote started: retiring")
            self.stale = True

    def retire(self, why: str, drain: bool = True) -> None:
        """Stop taking requests: unlink the socket, then answer what is already queued (or
        close it: those starts fall back)."""
        assert self.server is not None
        self.drop_spare()  # what is still queued gets a worker of its own
        if self._still_ours():
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.server.setblocking(False)
        while drain:
            try:
                conn, _ = self.server.accept()
            except OSError:
                break
            conn.setblocking(True)
            self.serve_one(conn)
        self.server.close()
        self.log(f"exiting ({why})")

    def serve_one(self, conn: socket.socket) -> None:
        t0 = self._time.perf_counter()
        fds: list[int] = []
        what = "?"
        try:
            conn.settimeout(REQUEST_TIMEOUT)
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_pid, peer_uid = int.from_bytes(raw[0:4], sys.byteorder), int.from_bytes(raw[4:8], sys.byteorder)
            if peer_uid != os.getuid():
                self.log(f"refused peer pid {peer_pid} uid {peer_uid}")
                return
            msg, ancdata, msg_flags, _ = conn.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += [int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, len(data) - 3, 4)]
            try:
                if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                    raise Refused("request truncated")
                request = json.loads(msg)
                if not isinstance(request, dict) or request.get("v") != PROTOCOL:
                    raise Refused("unknown protocol")
                what = _describe(request.get("argv"))
                if len(fds) != 3:
                    raise Refused(f"expected three fds (stdin, stdout, stderr), got {len(fds)}")
                pid = self.fork_worker(conn, fds, request, peer_pid)
                ms = (self._time.perf_counter() - t0) * 1000
                self.log(f"{what} pid {peer_pid}: forked worker {pid} in {ms:.1f} ms")
            except (Refused, ValueError, TypeError, AttributeError, OSError) as exc:
                self.log(f"{what} pid {peer_pid}: refused: {exc}")
                try:
                    conn.send(json.dumps({"error": str(exc)}).encode())
                except OSError:
                    pass
        except OSError as exc:
            self.log(f"request: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
            conn.close()

    def fork_worker(self, conn: socket.socket, fds: list[int], request: dict, peer_pid: int) -> int:
        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise Refused("bad argv")
        if argv[-1] not in WARM_ACTIONS:
            raise Refused(f"not a command the zygote runs: {argv[-1]!r}")
        for key, kind in (("env", dict), ("cwd", str)):
            if not isinstance(request.get(key), kind):
                raise Refused(f"bad {key}")
        if not os.path.isdir(request["cwd"]):
            raise Refused(f"no directory {request['cwd']!r}")
        status = _status(peer_pid)
        them = _identity(peer_pid, status)
        if not status or them != self.me:
            diff = sorted(k for k in self.me if them.get(k) != self.me[k])
            raise Refused(f"the command differs from the zygote in {', '.join(diff) or 'everything'}")
        cgroups = _cgroup_targets(peer_pid)
        settings = _peer_settings(peer_pid, status)
        pid = self.hand_to_spare(conn, fds, request, status, settings, cgroups)
        if pid is None:
            pid = os.fork()
            if pid == 0:
                self.become_worker(conn, fds, request, status, settings, cgroups)  # never returns
        return pid

    def reap(self, *_: object) -> None:
        """SIGCHLD: collect exited workers (our only children) so no zombie stays behind."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    # -- the spare: the next command's worker, forked ahead -----------------------------------

    def fork_spare(self) -> None:
        """Fork the next command's worker while nobody waits: it lets go of our fds, makes the
        event loop a daemon serves on and waits for a request (`hand_to_spare`). The command
        then pays for neither the fork (~1.3 ms here) nor the loop (~1 ms)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError as exc:
            self.log(f"cannot fork a spare worker: {exc}")
            ours.close()
            theirs.close()
            return
        if pid == 0:
            ours.close()
            self.run_spare(theirs)  # never returns
        theirs.close()
        self.spare = (pid, ours)

    def drop_spare(self) -> None:
        """The spare exits when its link closes."""
        if self.spare is not None:
            self.spare[1].close()
            self.spare = None

    def hand_to_spare(self, conn: socket.socket, fds: list[int], request: dict, status: dict[str, str],
                      settings: dict, cgroups: list[str]) -> int | None:
        """The spare's pid once it has the request (its copies of the command's connection and
        fds), or None: fork a worker now."""
        if self.spare is None:
            return None
        pid, link = self.spare
        self.spare = None
        settings = {**settings, "rlimits": [[k, list(v)] for k, v in settings["rlimits"].items()],
                    "cpus": sorted(settings["cpus"]) if settings["cpus"] is not None else None,
                    "argv": [os.fsdecode(a) for a in settings["argv"]]}
        payload = json.dumps({"request": request, "status": status, "settings": settings, "cgroups": cgroups})
        passed = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (conn.fileno(), *fds))
        try:
            link.sendmsg([payload.encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, passed)])
        except OSError as exc:
            self.log(f"spare worker {pid} is gone ({exc}): forking one")
            return None
        finally:
            link.close()
        return pid

    # -- in the worker child -----------------------------------------------------------------

    def _close_ours(self, *keep: int) -> None:
        """Let go of the zygote's fds: its socket, the lock, the log, anything else."""
        self.server.close()  # type: ignore[union-attr]
        kept = sorted({0, 1, 2, *keep})
        for lo, hi in zip(kept, [*kept[1:], self.fd_ceiling]):
            os.closerange(lo + 1, hi)

    def run_spare(self, link: socket.socket) -> None:
        try:
            self._signal.signal(self._signal.SIGTERM, self._signal.SIG_DFL)
            self._close_ours(link.fileno())
            path = os.fsencode(self.path)
            self.spare = None
            try:
                arg_start, arg_end, _, _ = _proc_areas()
                _fill(arg_start, arg_end, [b"pyshim-spare", path], whole=False)  # not a second zygote in `ps`
                _set_comm("pyshim-spare")
            except (OSError, ValueError, IndexError):
                pass
            from shim.framework.daemon import prepare_loop

            prepare_loop()
            msg, ancdata, _flags, _ = link.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * 4), socket.MSG_CMSG_CLOEXEC)
            fds = []
            for level, kind, data in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds += [int.from_bytes(data[i:i + 4], sys.byteorder) for i in range(0, len(data) - 3, 4)]
            link.close()
            if not msg or len(fds) != 4:
                os._exit(0)  # the zygote retired (or is gone): so are we
            handed = json.loads(msg)
            settings = handed["settings"]
            settings["rlimits"] = {k: tuple(v) for k, v in settings["rlimits"]}
            settings["cpus"] = set(settings["cpus"]) if settings["cpus"] is not None else None
            settings["argv"] = [os.fsencode(a) for a in settings["argv"]]
            conn = socket.socket(fileno=fds[0])
        except BaseException:
            os._exit(1)
        self.become_worker(conn, fds[1:], handed["request"], handed["status"], settings, handed["cgroups"],
                           spare=True)

    def become_worker(self, conn: socket.socket, fds: list[int], request: dict, status: dict[str, str],
                      settings: dict, cgroups: list[str], spare: bool = False) -> None:
        """Become what the command's own process is (its cgroups, settings, signals, stdio,
        directory, environment and command line), then run the command there."""
        code = 1
        try:
            if not spare:  # a spare let go of them before it waited
                self._close_ours(conn.fileno(), *fds)
            os.setpgid(0, 0)  # own group, as a start-forked daemon; not a session leader
            self._signals(status)
            try:
                for procs in cgroups:
                    with open(procs, "w") as f:
                        f.write(str(os.getpid()))
            except OSError as exc:
                conn.send(json.dumps({"error": f"cannot join the command's cgroups: {exc}"}).encode())
                return
            score = settings["oom_score_adj"]
            if score and score != _read("/proc/self/oom_score_adj").strip():
                try:
                    with open("/proc/self/oom_score_adj", "w") as f:
                        f.write(score)
                except OSError:  # lowering needs CAP_SYS_RESOURCE: keep the zygote's
                    pass
            conn.send(json.dumps({"pid": os.getpid()}).encode())
            conn.settimeout(GO_TIMEOUT)
            if conn.recv(16) != b"go":
                return  # the command gave up on us and runs itself: never run it twice
            conn.settimeout(None)
            os.chdir(request["cwd"])
            argv = [str(a) for a in request["argv"]]
            sys.argv = argv
            env = {str(k): str(v) for k, v in request["env"].items()}
            os.environ.clear()
            os.environ.update(env)
            _apply_settings(settings)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            from shim.framework.app import identity
            from shim.framework.main import run

            # The command line and environment in /proc, as `ps` shows a shim: for the daemon only
            # (~0.4 ms, after its start reported).
            shown = (settings["argv"], settings["comm"], env)
            code = run(identity(), argv[1:], warm=Warm(conn, int(status.get("PPid", "0") or 0),
                                                       lambda: _set_proc_strings(*shown)))
        except BaseException:
            code = 1
        finally:
            _report_exit(conn, code)
            os._exit(code)

    def note_signals(self) -> None:
        """Remember our own dispositions, so a daemon child changes only what differs."""
        self.ignored = _signal_set(_status(os.getpid()).get("SigIgn", "0"))
        self.blocked = bool(self._signal.pthread_sigmask(self._signal.SIG_BLOCK, []))

    def _signals(self, status: dict[str, str]) -> None:
        """The start command's signal dispositions (ignored, or default; SIGINT as Python sets
        it) and mask: what a daemon forked by the start command itself would have."""
        signal = self._signal
        ignored = _signal_set(status.get("SigIgn", "0"))
        for sig in sorted((ignored ^ self.ignored) | {signal.SIGINT, signal.SIGCHLD, signal.SIGTERM}):
            if sig in ignored:
                handler = signal.SIG_IGN
            elif sig == signal.SIGINT:
                handler = signal.default_int_handler
            else:
                handler = signal.SIG_DFL
            try:
                signal.signal(sig, handler)
            except (OSError, ValueError, RuntimeError):
                pass  # SIGKILL/SIGSTOP, glibc's internal 32 and 33
        blocked = _signal_set(status.get("SigBlk", "0")) & signal.valid_signals()
        if blocked or self.blocked:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _cgroup_lines(pid: int | str) -> dict[str, str]:
    """hierarchy (v1 controllers such as "cpu,cpuacct" or "name=systemd"; "" for v2) -> path"""
    out = {}
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def _unescape(path: str) -> str:
    if "\\" not in path:
        return path
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _cgroup_mounts() -> list[tuple[str, set[str], str, str]]:
    """(fstype, super options, root, mount point) of every cgroup/cgroup2 mount we see."""
    out = []
    for line in _read("/proc/self/mountinfo").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3 or rfields[0] not in ("cgroup", "cgroup2"):
            continue
        out.append((rfields[0], set(rfields[2].split(",")), _unescape(fields[3]), _unescape(fields[4])))
    return out


def _cgroup_targets(peer_pid: int) -> list[str]:
    """The cgroup.procs files that put a child of ours into peer_pid's cgroups, for every
    hierarchy (v1 and v2) where those differ from ours."""
    want = _cgroup_lines(peer_pid)
    have = _cgroup_lines("self")
    todo = {h: p for h, p in want.items() if have.get(h) != p}
    if not todo:
        return []
    mounts = _cgroup_mounts()
    targets = []
    for hierarchy, path in todo.items():
        if hierarchy == "":
            candidates = [m for m in mounts if m[0] == "cgroup2"]
        else:
            need = set(hierarchy.split(","))
            candidates = [m for m in mounts if m[0] == "cgroup" and need <= m[1]]
        target = None
        for _fs, _opts, root, mountpoint in candidates:
            root = root.rstrip("/")
            if path == root or path.startswith(root + "/") or root == "":
                target = os.path.join(mountpoint, path[len(root):].lstrip("/"), "cgroup.procs")
                break
        if target is None:
            if not candidates:
                continue  # a hierarchy nobody mounted here: nothing manages it
            raise Refused(f"cgroup {hierarchy}:{path} is not under any of its mounts")
        targets.append(target)
    return targets


def _peer_settings(peer_pid: int, status: dict[str, str]) -> dict:
    """What else the start command would have passed on to a daemon it forked: umask,
    rlimits, CPU affinity, nice value, oom_score_adj, command line and name."""
    import resource

    out: dict = {"umask": status.get("Umask", ""), "rlimits": {}, "cpus": None, "nice": None}
    for name in dir(resource):
        if name.startswith("RLIMIT_"):
            which = getattr(resource, name)
            try:
                out["rlimits"][which] = resource.prlimit(peer_pid, which)
            except (OSError, ValueError):
                pass
    try:
        out["cpus"] = os.sched_getaffinity(peer_pid)
    except OSError:
        pass
    try:
        out["nice"] = os.getpriority(os.PRIO_PROCESS, peer_pid)
    except OSError:
        pass
    out["oom_score_adj"] = _read(f"/proc/{peer_pid}/oom_score_adj").strip()
    try:
        with open(f"/proc/{peer_pid}/cmdline", "rb") as f:
            out["argv"] = [a for a in f.read().split(b"\0") if a]
    except OSError:
        out["argv"] = []
    out["comm"] = _read(f"/proc/{peer_pid}/comm").strip()
    return out


def _apply_settings(settings: dict) -> None:
    """Take on `_peer_settings` but oom_score_adj, which the zygote sets (best effort where
    raising a limit or lowering a nice value needs a privilege we may not have)."""
    import resource

    if settings["umask"]:
        os.umask(int(settings["umask"], 8))
    for which, limit in settings["rlimits"].items():
        try:
            if resource.getrlimit(which) != limit:
                resource.setrlimit(which, limit)
        except (OSError, ValueError):
            pass
    try:
        if settings["cpus"] and settings["cpus"] != os.sched_getaffinity(0):
            os.sched_setaffinity(0, settings["cpus"])
    except OSError:
        pass
    try:
        if settings["nice"] is not None and settings["nice"] != os.getpriority(os.PRIO_PROCESS, 0):
            os.setpriority(os.PRIO_PROCESS, 0, settings["nice"])
    except OSError:
        pass

def _fd_ceiling() -> int:
    """Above any fd this process can have (fs.nr_open caps every RLIMIT_NOFILE)."""
    try:
        return int(_read("/proc/sys/fs/nr_open")) + 1
    except ValueError:
        return max(1 << 20, os.sysconf("SC_OPEN_MAX"))


def _proc_areas() -> tuple[int, int, int, int]:
    """arg_start, arg_end, env_start, env_end of this process (fields 48-51 of stat)."""
    fields = _read("/proc/self/stat").rsplit(")", 1)[1].split()
    return int(fields[45]), int(fields[46]), int(fields[47]), int(fields[48])


def _fill(start: int, end: int, items: list[bytes], whole: bool) -> None:
    """Write NUL-terminated items over [start, end), NUL-padded. /proc/<pid>/cmdline and
    environ show that memory (a NUL last byte keeps the kernel from reading past `end`)."""
    import ctypes

    size = end - start
    if size <= 0:
        return
    data = b""
    for item in items:
        chunk = item.replace(b"\0", b"") + b"\0"
        if len(data) + len(chunk) > size:
            if not whole:
                data = (data + chunk)[: size - 1] + b"\0"
            break
        data += chunk
    ctypes.memmove(start, data.ljust(size, b"\0"), size)


def _set_proc_strings(argv: list[bytes], comm: str, env: dict[str, str]) -> None:
    """Show the start command's command line and name, and our environment, in /proc."""
    try:
        arg_start, arg_end, env_start, env_end = _proc_areas()
        if argv:
            _fill(arg_start, arg_end, argv, whole=False)
        _fill(env_start, env_end, [os.fsencode(f"{k}={v}") for k, v in env.items()], whole=True)
        if comm:
            _set_comm(comm)
    except (OSError, ValueError, IndexError):
        pass


def _set_comm(name: str) -> None:
    import ctypes

    PR_SET_NAME = 15
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(os.fsencode(name)[:15]), 0, 0, 0)


def _warm_messages() -> int:
    """Build betterproto2's lazy per-class metadata now, once, instead of in every daemon."""
    try:
        import betterproto2
    except ImportError:
        return 0
    n = 0
    for name, module in list(sys.modules.items()):
        if not name.startswith("shim.api") or module is None:
            continue
        for value in list(vars(module).values()):
            if isinstance(value, type) and issubclass(value, betterproto2.Message) and value.__module__ == name:
                try:
                    value._betterproto  # noqa: B018 (the classproperty fills the cache)
                    n += 1
                except Exception:
                    pass
    return n


def main(args: list[str]) -> int:
    """The zygote process: args are the socket path, the locked fd, the package root."""
    import gc
    import signal
    import time

    # The zygote's half of this module speaks through `socket` and `json`, which `start`
    # (spawn_daemon, the other half) must not pay for: imported here, as module globals.
    global json, socket
    import json
    import socket

    t0 = time.perf_counter()
    path, lock_fd = args[0], int(args[1])
    preload_app: tuple[str, ...] = ()
    missing_app = ""
    if len(args) > 3 and args[3].startswith("{"):
        # The binary that started us: its identity (so its daemons know their App and
        # runtime type) and its App's modules to preload.
        from shim.framework import app as app_module

        fields = json.loads(args[3])
        app_module.install(app_module.RuntimeIdentity(fields["runtime_type"], app=fields["app"],
                                                      binary_name=fields["binary_name"],
                                                      default_handler=fields["default_handler"]))
        try:
            preload_app = tuple(app_module.current().preload)
        except Exception as exc:  # the daemon reports it properly when it loads it
            missing_app = f"{fields['app']}: {exc!r}"
    for sig in (signal.SIGHUP, signal.SIGPIPE, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    os.chdir("/")
    env = {k: v for k, v in os.environ.items() if k != _PAD_VAR}
    os.environ.clear()  # C's environ no longer points into the area we rewrite below
    os.environ.update(env)
    # nothing but our stdio (/dev/null) and the lock, whatever the start command inherited
    os.closerange(3, lock_fd)
    os.closerange(lock_fd + 1, _fd_ceiling())
    os.set_inheritable(lock_fd, False)
    gc.disable()
    missing = []
    # A zygote started for a gRPC-mode daemon (shim/framework/bootstrap.py) shares grpclib with its daemons too.
    grpc = ("shim.framework.grpc_server",) if os.environ.get("PYSHIM_PROTOCOL") == "grpc" else ()
    if missing_app:
        missing.append(missing_app)
    for module in PRELOAD + preload_app + grpc:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    warmed = _warm_messages()
    gc.collect()
    gc.freeze()  # the daemons' collections never touch (and so never copy) what we imported
    gc.enable()
    from shim.framework.forkheap import fill_holes

    # After the freeze: what the daemons will allocate goes to fresh pages, not into our
    # holes (the filler lives as long as this frame: the zygote's whole life).
    filled = fill_holes()
    from shim.framework.ksm import offer_to_ksm

    # Last, so that the heap and arenas the daemons will inherit are all in the mappings marked.
    offered = offer_to_ksm()
    try:
        idle = float(os.environ.get("PYSHIM_ZYGOTE_IDLE", DEFAULT_IDLE))
    except ValueError:
        idle = DEFAULT_IDLE
    zygote = Zygote(path, lock_fd, idle)
    try:
        arg_start, arg_end, env_start, env_end = _proc_areas()
        _fill(arg_start, arg_end, [b"pyshim-zygote", os.fsencode(path)], whole=False)
        _fill(env_start, env_end, [os.fsencode(f"{k}={v}") for k, v in os.environ.items()], whole=True)
        _set_comm("pyshim-zygote")
    except (OSError, ValueError, IndexError):
        pass
    signal.signal(signal.SIGCHLD, zygote.reap)
    signal.signal(signal.SIGTERM, zygote.on_sigterm)
    zygote.note_signals()
    zygote.bind()
    zygote.log(f"serving {path} (pyshim {__version__}, {sys.executable}); ready in "
               f"{(time.perf_counter() - t0) * 1000:.0f} ms, {warmed} message classes warmed, filled {filled}, "
               f"{offered >> 20} MiB offered to KSM, idle exit "
               f"after {idle:g} s" + (f"; not importable: {', '.join(missing)}" if missing else ""))
    return zygote.run()
