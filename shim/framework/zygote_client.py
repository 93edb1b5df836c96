"""The command's side of the zygote (shim/framework/zygote.py): hand `start` to a warm fork, or
start a zygote for the next commands.

Imported by every start before anything else of it, so: stdlib C modules only
(`_socket`, `_sha256`), lightjson for the two JSON messages, nothing that imports `re` or
`enum`. The zygote's own half, with the protocol's description, is in zygote.py.
"""

from __future__ import annotations

import os
import sys

from shim import __version__

DEFAULT_DIR = "/run/containerd/s"
#: `run_warm`'s limit for each step before the command runs (connect, send, the worker's pid).
CLIENT_TIMEOUT = 2.0
#: The zygote's limit for reading a request; the worker's for receiving "go" (and, as a
#: daemon, "ok").
REQUEST_TIMEOUT = 2.0
GO_TIMEOUT = 10.0
#: Seconds between two attempts to start a zygote (one that fails is not retried per start).
RESPAWN_DELAY = 10.0
PROTOCOL = 2
MAX_MESSAGE = 1 << 20
#: Room in the zygote's argv and environ areas for the daemons' /proc cmdline and environ.
ARG_ROOM = 4096
ENV_ROOM = 32768
_PAD_VAR = "PYSHIM_ZYGOTE_PAD"
_NAME = "pyshim-zygote-"

#: Why the last `run_warm` returned None (for tests and debugging; never printed: containerd
#: reads the start command's output as the address), and the pid of its last worker.
last_error = ""
last_worker = 0


def _enabled() -> bool:
    return os.environ.get("PYSHIM_ZYGOTE", "1").strip().lower() not in ("0", "false", "no", "off")


def _sha256():
    try:
        from _sha256 import sha256  # the built-in one: hashlib would load OpenSSL (~3 ms)
    except ImportError:
        from hashlib import sha256
    return sha256()


def _identity_argument() -> str:
    """The installed RuntimeIdentity as the zygote's JSON argument ("" when none is)."""
    from shim.framework import app as app_module

    try:
        identity = app_module.identity()
    except RuntimeError:
        return ""
    from shim.framework.lightjson import dumps

    return dumps({name: getattr(identity, name) for name in sorted(identity.__slots__)})


def _name_key() -> str:
    """What names a zygote's socket, cheap enough for every `start`: the
    interpreter, the package directory and version, uid, the binary's identity and the
    PYTHON* environment. The zygote itself checks the rest of `installation_key` (the files)
    at every request and retires when they changed."""
    h = _sha256()
    hash_names(h)
    return h.hexdigest()


def hash_names(h) -> None:
    """Feed `h` what `_name_key` covers (installation_key starts with the same)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for part in (sys.executable, package, __version__, str(os.getuid()), _identity_argument()):
        h.update(os.fsencode(part) + b"\0")
    for name in sorted(k for k in os.environ if k.startswith("PYTHON") and k != _PAD_VAR):
        h.update(os.fsencode(f"{name}={os.environ[name]}") + b"\0")


def socket_path(directory: str | None = None) -> str:
    directory = directory or os.environ.get("PYSHIM_ZYGOTE_DIR") or DEFAULT_DIR
    return os.path.join(directory, _NAME + _name_key()[:32])


#: The commands a warm zygote runs for the binary. Not `delete`: run by itself it imports next
#: to nothing and costs ~2 ms beyond the interpreter's start-up, less than the exchange.
WARM_ACTIONS = ("start",)


def run_warm(argv: list[str], *, directory: str | None = None) -> int | None:
    """Have a warm zygote's fork run this command (`argv` as the binary got it, its last word
    one of WARM_ACTIONS) on our stdin, stdout and stderr, in our directory and environment;
    its exit code, or None: run it yourself (nothing of it ran).

    The fork runs exactly what this process would (shim.framework.main.run), with everything
    imported already: containerd reads the same output and exit code. For a `start` that
    makes a daemon, the fork becomes that daemon once we have its exit code. When
    no zygote is listening, one is started for the next commands and None returned.
    """
    global last_error, last_worker
    last_error, last_worker = "", 0
    if not _enabled():
        last_error = "disabled by PYSHIM_ZYGOTE"
        return None
    # Runs before anything else of the command: _socket and lightjson, not socket and json.
    import _socket

    from shim.framework.lightjson import dumps, loads

    conn = None
    try:
        path = socket_path(directory)
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        conn.settimeout(CLIENT_TIMEOUT)
        try:
            conn.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            last_error = f"no zygote at {path}: {exc}"
            start_zygote(path)
            return None
        request = dumps({"v": PROTOCOL, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
        conn.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        reply = loads(conn.recv(65536) or b"{}")
        pid = reply.get("pid")
        if type(pid) is not int or pid <= 0:
            last_error = f"zygote refused: {reply.get('error', 'no reply')}"
            return None
        # From here on the command runs (or has run) in the fork: no falling back.
        conn.send(b"go")
        last_worker = pid
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        if conn is not None:
            conn.close()
        last_error = f"zygote failed: {exc!r}"
        return None
    try:
        conn.settimeout(None)  # the command's own time: containerd's timeout bounds it
        reply = loads(conn.recv(65536) or b"{}")
        code = reply.get("exit")
        if type(code) is not int:
            raise ValueError(f"no exit status from the zygote's worker {pid}")
        if reply.get("daemon"):
            conn.send(b"ok")  # it serves only once we are sure to exit 0
        return code
    except (OSError, ValueError, AttributeError) as exc:
        os.write(2, f"pyshim: {argv[-1] if argv else 'command'}: {exc}\n".encode(errors="replace"))
        return 1
    finally:
        conn.close()


def start_zygote(path: str) -> bool:
    """Start a zygote serving `path` unless one is alive or starting (it holds the lock)."""
    import fcntl
    import time

    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not sys.executable:
            return False
        # The lock file holds the time of the last attempt: a zygote that cannot start (or
        # dies at once) is retried every RESPAWN_DELAY seconds, not at every container start.
        now = time.time()
        try:
            last = float(os.pread(lock, 64, 0).split(b"\n", 1)[0] or b"0")
        except ValueError:
            last = 0.0
        if 0 <= now - last < RESPAWN_DELAY:
            return False
        os.ftruncate(lock, 0)
        os.pwrite(lock, f"{now:.3f}\n".encode(), 0)
        os.set_inheritable(lock, True)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        boot = ("import sys; sys.path.insert(0, sys.argv[3]); from shim.framework.zygote import main; "
                "sys.exit(main(sys.argv[1:]))")
        argv = [sys.executable, "-P", "-c", boot, path, str(lock), root, _identity_argument(), "-" * ARG_ROOM]
        env = {**os.environ, _PAD_VAR: "-" * ENV_ROOM}
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
            (os.POSIX_SPAWN_DUP2, 0, 1),
            (os.POSIX_SPAWN_DUP2, 0, 2),
        ]
        # containerd's pipes are 0-2; whatever else this process might have inherited must
        # not reach a process that outlives it
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if fd > 2 and fd != lock and os.get_inheritable(fd):
                    actions.append((os.POSIX_SPAWN_CLOSE, fd))
            except OSError:
                pass
        os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=actions)
        return True
    finally:
        os.close(lock)  # the zygote holds its own copy of the locked file
