"""`Runc`: the OCI runtime CLI (runc, or crun, which takes the same arguments) driven from asyncio.

Every call spawns ``<binary> --root <root> --log <bundle>/log.json --log-format json
[--systemd-cgroup] <subcommand> ...`` through the shim's one `Reaper` (never a shell, never
`subprocess`), with NOTIFY_SOCKET removed from the environment, as containerd's go-runc does.

Errors: a non-zero exit raises `RuncError` whose message is what the runtime said, taken like
containerd's runc shim does from the last ``"level":"error"`` entry of the ``--log`` file
(runc 1.1 and crun both write one JSON object per line), then from stderr, then
``exit status N``. containerd's shim puts "OCI runtime <action> failed: " in front; that
prefix belongs to the caller. A ctr user then sees, for a missing executable:

* runc 1.1.5: ``runc create failed: unable to start container process: exec: "nosuch":
  executable file not found in $PATH``
* crun 1.8: ``executable file `nosuch` not found in $PATH: No such file or directory``

Unlike containerd, which takes the last error anywhere in the (ever-growing) log file, only
the entries written during the failing call are considered, so a stale error from an earlier
command is never reported for a new failure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shim.framework.reaper import PIPE, Reaper, Result
from shim.framework.backend import NoSuchContainer, NotRunning, RuntimeFailure

__all__ = [
    "DEFAULT_ROOT",
    "LogEntry",
    "Runc",
    "RuncError",
    "RuntimeVersion",
    "command_failure",
    "last_error",
    "parse_log",
    "read_pid_file",
]

DEFAULT_ROOT = "/run/containerd/runc"

# logrus (runc) and crun level names that mean the command failed.
_ERROR_LEVELS = frozenset({"error", "fatal", "panic"})
_KNOWN_KEYS = frozenset({"msg", "message", "level", "lvl", "time"})


@dataclass(frozen=True, slots=True)
class CriuOptions:
    """What `checkpoint` and `restore` share: where CRIU's images are and how it treats
    the process tree (containerd.runc.v1.CheckpointOptions, and the restore side of Create)."""

    image_path: str
    work_path: str | None = None
    parent_path: str | None = None
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    empty_ns: Sequence[str] = ()
    manage_cgroups_mode: str | None = None

    def args(self) -> list[str]:
        # Same order as go-runc's CheckpointOpts; without an image path the runtime uses its
        # default (runc: ./checkpoint), as go-runc leaves the flag out then.
        args = ["--image-path", self.image_path] if self.image_path else []
        if self.work_path:
            args += ["--work-path", self.work_path]
        if self.parent_path:
            args += ["--parent-path", self.parent_path]
        if self.tcp_established:
            args.append("--tcp-established")
        if self.ext_unix_sk:
            args.append("--ext-unix-sk")
        if self.shell_job:
            args.append("--shell-job")
        if self.file_locks:
            args.append("--file-locks")
        if self.manage_cgroups_mode:
            args += ["--manage-cgroups-mode", self.manage_cgroups_mode]
        for ns in self.empty_ns:
            args += ["--empty-ns", ns]
        return args


class RuncError(RuntimeFailure):
    """The OCI runtime exited non-zero. str() is the runtime's own message."""

    def __init__(
        self,
        message: str,
        *,
        command: str = "",
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        output: str = "",
    ):
        super().__init__(message)
        self.message = message
        #: The subcommand, e.g. "create".
        self.command = command
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        #: Everything it printed (stdout, then stderr), unstripped: go-runc's "output".
        self.output = output


def command_failure(err: RuncError) -> RuncError:
    """`err` in go-runc's words for a command whose error containerd does not read from the
    runtime's log: "<binary> did not terminate successfully: exit status N: <output>", the
    output as printed (runc's ends with a newline). runc-v2 returns Update's failure so, with
    no "OCI runtime update failed" in front."""
    status = f"exit status {err.returncode}"
    binary = err.argv[0] if err.argv else "runc"
    message = f"{binary} did not terminate successfully: {status}: {err.output}"
    return type(err)(message, command=err.command, argv=err.argv, returncode=err.returncode,
                     stderr=err.stderr, output=err.output)


class RuncNotRunning(RuncError, NotRunning):
    """`kill` of a process that has already exited."""


class RuncNoSuchContainer(RuncError, NoSuchContainer):
    """The runtime has no such container."""


def classify(err: RuncError) -> RuncError:
    """The framework's failure kind of a runc (or crun) error, read from its message: the
    only place runc's wording is matched."""
    text = str(err)
    if "container not running" in text or "no such process" in text.lower() or "process already finished" in text:
        kind = RuncNotRunning
    elif "does not exist" in text:
        kind = RuncNoSuchContainer
    else:
        return err
    return kind(err.message, command=err.command, argv=err.argv, returncode=err.returncode, stderr=err.stderr)


@dataclass(frozen=True, slots=True)
class LogEntry:
    level: str
    msg: str
    time: str = ""
    #: Every other key of the entry (runc --debug adds "file" and "func").
    extra: dict[str, Any] = field(default_factory=dict)


def parse_log(data: bytes | str) -> list[LogEntry]:
    """Entries of a runtime --log-format json log; anything that is not one is skipped.

    Tolerates what a crashing or concurrent writer leaves: blank lines, a truncated last line,
    non-JSON text, objects without a level or message, and several objects on one line.
    """
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    decoder = json.JSONDecoder()
    entries = []
    for line in text.splitlines():
        pos = 0
        while True:
            start = pos
            while start < len(line) and line[start] in " \t\r":
                start += 1
            if start >= len(line):
                break
            try:
                obj, pos = decoder.raw_decode(line, start)
            except ValueError:
                break  # the rest of this line is not JSON
            if not isinstance(obj, dict):
                continue
            msg = obj.get("msg", obj.get("message"))
            level = obj.get("level", obj.get("lvl"))
            if not isinstance(msg, str) or not isinstance(level, str):
                continue
            when = obj.get("time", "")
            extra = {k: v for k, v in obj.items() if k not in _KNOWN_KEYS}
            entries.append(LogEntry(level.lower(), msg, str(when), extra))
    return entries


def last_error(entries: Iterable[LogEntry], stderr: str = "") -> str | None:
    """The message of the last error-level entry (stripped), or None.

    With several candidates (another runtime call on the same bundle failed concurrently and
    wrote to the same log), prefer the last one our own stderr repeats; runc 1.1 and crun
    print their fatal message to stderr as well as to the log.
    """
    errors = [e.msg.strip() for e in entries if e.level in _ERROR_LEVELS and e.msg.strip()]
    if not errors:
        return None
    if len(errors) > 1 and stderr:
        for msg in reversed(errors):
            if msg in stderr:
                return msg
    return errors[-1]


def read_pid_file(path: str) -> int:
    """The pid runc/crun wrote with --pid-file (a decimal number, no newline with runc)."""
    with open(path) as f:
        return int(f.read().strip())


@dataclass(frozen=True, slots=True)
class RuntimeVersion:
    """Parsed ``<binary> --version``."""

    #: "runc" or "crun" (the first word of the output).
    name: str
    version: str
    commit: str = ""
    spec: str = ""
    #: Other "key: value" lines (runc: go, libseccomp; crun: rundir).
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> RuntimeVersion:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        if not lines:
            raise ValueError("empty version output")
        words = lines[0].split()
        # "runc version 1.1.5+ds1" / "crun version 1.8.1"
        if len(words) < 3 or words[1] != "version":
            raise ValueError(f"unexpected version line {lines[0]!r}")
        fields: dict[str, str] = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        commit = fields.pop("commit", "")
        spec = fields.pop("spec", "")
        return cls(words[0], words[2], commit, spec, fields)


class Runc:
    """Async client for one runtime binary, root and log file (one per container).

    `root` is the runtime's state directory for the containerd namespace, i.e.
    ``(Options.root or DEFAULT_ROOT) + "/" + namespace`` (pass `namespace` to have it
    appended here). `log_path` is normally ``<bundle>/log.json``.
    """

    def __init__(
        self,
        reaper: Reaper,
        *,
        binary: str = "runc",
        root: str = DEFAULT_ROOT,
        namespace: str | None = None,
        log_path: str | None = None,
        systemd_cgroup: bool = False,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ):
        self.reaper = reaper
        #: create/restore flags from the runtime options (NoPivotRoot, NoNewKeyring).
        self.no_pivot = no_pivot
        self.no_new_keyring = no_new_keyring
        self.binary = binary or "runc"
        root = root or DEFAULT_ROOT
        self.root = os.path.join(root, namespace) if namespace else root
        self.log_path = log_path
        self.systemd_cgroup = systemd_cgroup

    def classify(self, err: RuncError) -> RuncError:
        """This runtime's error as the framework's failure kind (NotRunning, NoSuchContainer)."""
        return classify(err)

    # -- argv --------------------------------------------------------------------------------

    def argv(self, *args: str) -> list[str]:
        """The full command line for a subcommand and its arguments."""
        out = [self.binary, "--root", self.root]
        if self.log_path:
            out += ["--log", self.log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            out.append("--systemd-cgroup")
        out += args
        return out

    @staticmethod
    def create_args(
        id: str,
        bundle: str,
        *,
        pid_file: str,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> list[str]:
        args = ["create", "--bundle", bundle, "--pid-file", os.path.abspath(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        return args + [id]

    @staticmethod
    def exec_args(
        id: str,
        process_path: str,
        *,
        pid_file: str,
        detach: bool = True,
        console_socket: str | None = None,
    ) -> list[str]:
        args = ["exec", "--process", process_path]
        if console_socket:
            args += ["--console-socket", console_socket]
        if detach:
            args.append("--detach")
        return args + ["--pid-file", os.path.abspath(pid_file), id]

    @staticmethod
    def checkpoint_args(id: str, criu: CriuOptions, *, leave_running: bool = False, pre_dump: bool = False) -> list[str]:
        args = ["checkpoint", *criu.args()]
        if leave_running:
            args.append("--leave-running")
        if pre_dump:
            args.append("--pre-dump")
        return args + [id]

    @staticmethod
    def restore_args(
        id: str,
        bundle: str,
        criu: CriuOptions,
        *,
        pid_file: str,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_subreaper: bool = True,
        detach: bool = True,
    ) -> list[str]:
        args = ["restore", *criu.args()]
        if detach:
            args.append("--detach")
        args += ["--pid-file", os.path.abspath(pid_file)]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_subreaper:
            # go-runc spells it "-no-subreaper"; runc's flag parser takes both, and the
            # double-dash form is the one other runtimes' option parsers understand.
            args.append("--no-subreaper")
        return args + ["--bundle", bundle, id]

    # -- running -----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        # A NOTIFY_SOCKET inherited from systemd would make runc pass sd_notify through to
        # the container and wait for READY=1 (go-runc drops it for the same reason).
        return {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}

    def _log_size(self) -> int:
        if not self.log_path:
            return 0
        try:
            return os.stat(self.log_path).st_size
        except OSError:
            return 0

    def _read_log_since(self, offset: int) -> list[LogEntry]:
        if not self.log_path:
            return []
        try:
            with open(self.log_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                # A log that shrank was truncated or replaced: everything in it is new.
                f.seek(offset if offset <= size else 0)
                return parse_log(f.read())
        except OSError:
            return []

    async def _run(
        self,
        *args: str,
        input: bytes | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
        capture: bool = True,
    ) -> Result:
        """Run one subcommand; RuncError unless it exits 0.

        capture=True collects stdout and stderr; otherwise the given fds are passed on (the
        container's stdio for create/exec/restore: those are inherited by the container
        process, so they must never be our capture pipes).
        """
        argv = self.argv(*args)
        offset = self._log_size()
        if capture:
            stdout = stderr = PIPE
        result = await self.reaper.run(
            argv, input=input, stdin=stdin, stdout=stdout, stderr=stderr, env=self._env(), label=args[0]
        )
        if result.returncode != 0:
            stderr_text = result.stderr.decode("utf-8", "replace").strip()
            message = (
                last_error(self._read_log_since(offset), stderr_text)
                or stderr_text
                or f"exit status {result.returncode}"
            )
            raise RuncError(
                message,
                command=args[0],
                argv=argv,
                returncode=result.returncode,
                stderr=stderr_text,
                output=(result.stdout + result.stderr).decode("utf-8", "replace"),
            )
        return result

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(
        self,
        id: str,
        bundle: str,
        *,
        pid_file: str,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> None:
        """`runc create`: sets the container up and exits; its init waits for `start`.

        stdin/stdout/stderr become the container process's stdio (None: /dev/null). The init
        is re-parented to the (subreaper) shim when runc exits, so its exit reaches the
        reaper's subscribers: subscribe before calling this. Its pid is in `pid_file`.
        """
        args = self.create_args(
            id, bundle, pid_file=pid_file, console_socket=console_socket,
            no_pivot=no_pivot or self.no_pivot, no_new_keyring=no_new_keyring or self.no_new_keyring,
        )
        await self._run(*args, stdin=stdin, stdout=stdout, stderr=stderr, capture=False)

    async def start(self, id: str) -> None:
        await self._run("start", id)

    async def state(self, id: str) -> dict[str, Any]:
        """`runc state`: the OCI state (id, pid, status, bundle, ...)."""
        result = await self._run("state", id)
        return _json_output(result, "state")

    async def kill(self, id: str, signal: int, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [id, str(int(signal))]
        try:
            await self._run(*args)
        except RuncError as exc:
            raise self.classify(exc) from None

    async def delete(self, id: str, force: bool = False) -> None:
        args = ["delete"] + (["--force"] if force else []) + [id]
        try:
            await self._run(*args)
        except RuncError as exc:
            raise self.classify(exc) from None

    async def ps(self, id: str) -> list[int]:
        """Pids of all processes in the container (host pid namespace)."""
        result = await self._run("ps", "--format", "json", id)
        pids = _json_output(result, "ps") if result.stdout.strip() else None
        return [int(p) for p in pids or ()]

    async def exec(
        self,
        id: str,
        process_spec: Mapping[str, Any],
        *,
        pid_file: str,
        detach: bool = True,
        console_socket: str | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> None:
        """`runc exec --process <spec file>`: with detach, returns once the process runs.

        The exec'd process is re-parented to the shim and its exit goes to subscribers;
        its pid is in `pid_file`.
        """
        path = _write_process_file(process_spec)
        try:
            args = self.exec_args(
                id, path, pid_file=pid_file, detach=detach, console_socket=console_socket
            )
            await self._run(*args, stdin=stdin, stdout=stdout, stderr=stderr, capture=False)
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass

    async def pause(self, id: str) -> None:
        await self._run("pause", id)

    async def resume(self, id: str) -> None:
        await self._run("resume", id)

    async def update(self, id: str, resources: Mapping[str, Any]) -> None:
        """`runc update --resources -`: the OCI LinuxResources object on stdin. A failure is
        worded like go-runc's (see command_failure)."""
        try:
            await self._run("update", "--resources", "-", id, input=json.dumps(resources).encode())
        except RuncError as exc:
            raise command_failure(exc) from None

    async def checkpoint(
        self, id: str, criu: CriuOptions, *, leave_running: bool = False, pre_dump: bool = False
    ) -> None:
        """`runc checkpoint` (CheckpointOptions: exit=False means leave_running=True)."""
        await self._run(*self.checkpoint_args(id, criu, leave_running=leave_running, pre_dump=pre_dump))

    async def restore(
        self,
        id: str,
        bundle: str,
        criu: CriuOptions,
        *,
        pid_file: str,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_subreaper: bool = True,
        detach: bool = True,
        stdin: int | None = None,
        stdout: int | None = None,
        stderr: int | None = None,
    ) -> None:
        """`runc restore --detach`: the restored init runs (pid in `pid_file`) when this returns."""
        args = self.restore_args(
            id, bundle, criu, pid_file=pid_file, console_socket=console_socket,
            no_pivot=no_pivot or self.no_pivot, no_subreaper=no_subreaper, detach=detach,
        )
        await self._run(*args, stdin=stdin, stdout=stdout, stderr=stderr, capture=False)

    async def version(self) -> RuntimeVersion:
        result = await self.reaper.run([self.binary, "--version"], env=self._env(), label="version")
        if result.returncode != 0:
            text = result.stderr.decode("utf-8", "replace").strip()
            raise RuncError(
                text or f"exit status {result.returncode}", command="--version",
                argv=[self.binary, "--version"], returncode=result.returncode, stderr=text,
            )
        return RuntimeVersion.parse(result.stdout.decode("utf-8", "replace"))

    async def features(self) -> dict[str, Any]:
        """`runc features` (runc >= 1.1; OCI runtime features JSON, for the shim's -info)."""
        result = await self._run("features")
        return _json_output(result, "features")


def _json_output(result: Result, command: str) -> Any:
    try:
        return json.loads(result.stdout)
    except ValueError as e:
        raise RuncError(
            f"{command}: cannot parse the runtime's output: {e}",
            command=command,
            returncode=result.returncode,
            stderr=result.stderr.decode("utf-8", "replace").strip(),
        ) from None


def _write_process_file(spec: Mapping[str, Any]) -> str:
    """The exec process spec in a private file (go-runc puts it in $XDG_RUNTIME_DIR or /tmp)."""
    directory = os.environ.get("XDG_RUNTIME_DIR") or os.environ.get("TMPDIR") or "/tmp"
    data = json.dumps(spec).encode()
    for _ in range(100):
        path = os.path.join(directory, f"runc-process-{os.urandom(8).hex()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            continue
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
        except BaseException:
            os.unlink(path)
            raise
        return path
    raise FileExistsError(f"could not create a process spec file in {directory}")
