"""Checkpoint / restore through containerd and a real runc (and CRIU, when it can dump here).

The runtime is a wrapper runc set through the runtime options' BinaryName: it appends its
command line to a file and execs the real runc, so the tests see exactly what reached runc.

Debian 12's criu 3.17 cannot dump on some kernels (it rejects the vDSO layout); the round
trip then skips with CRIU's own reason, found by trying. The failure path is tested with that
real failure, or, where CRIU works, with a wrapper that fails `checkpoint` the way runc does
when CRIU fails (after writing the work dir's dump.log).

Every test runs once per containerd version (1.6, 1.7, 2.1).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import betterproto2
import pytest

from shim.api.containerd.runc.v1 import CheckpointOptions
from shim.api.google.protobuf import Any
from test_lifecycle import PYSHIM, _wait_stopped, task_status
from waiting import wait_until

WRAPPER = """#!/bin/sh
# Record the command line (one line per call), then run the real runc with it.
printf '%s\\n' "$*" >> {log}
if [ -e {fail} ]; then
    for a in "$@"; do
        case "$a" in checkpoint) forced=1 ;; esac
    done
    if [ -n "$forced" ]; then
        # What runc does when CRIU fails: CRIU's dump.log is in the work dir, runc exits 1.
        work=$(printf '%s\\n' "$@" | sed -n '/^--work-path$/{{n;p;}}')
        mkdir -p "$work" && echo "forced failure (test)" > "$work/dump.log"
        echo "criu failed: type NOTIFY errno 0" >&2
        echo "log file: $work/dump.log" >&2
        exit 1
    fi
fi
if [ -e {fake} ]; then
    for a in "$@"; do
        case "$a" in checkpoint) faked=1 ;; esac
    done
    if [ -n "$faked" ]; then
        # A checkpoint that "succeeds" without CRIU: an image no CRIU can restore.
        image=$(printf '%s\n' "$@" | sed -n '/^--image-path$/{{n;p;}}')
        mkdir -p "$image" && echo "not a CRIU image (test)" > "$image/inventory.img"
        exit 0
    fi
fi
exec {runc} "$@"
"""


@dataclass
class RecordingRunc:
    """The wrapper runc and the runtime options file that selects it."""

    config: Path
    log: Path
    fail: Path
    fake: Path
    binary: Path

    def calls(self, subcommand: str, cid: str) -> list[list[str]]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        calls = [line.split() for line in lines]
        return [c for c in calls if subcommand in c and c[-1] == cid]

    def force_failure(self) -> None:
        self.fail.touch()

    def fake_checkpoints(self) -> None:
        self.fake.touch()


@pytest.fixture
def recording_runc(e2e, tmp_path) -> RecordingRunc:
    log, fail, fake = tmp_path / "runc-calls.log", tmp_path / "fail-checkpoint", tmp_path / "fake-checkpoint"
    wrapper = tmp_path / "runc-recorder"
    wrapper.write_text(WRAPPER.format(log=log, fail=fail, fake=fake, runc=e2e.containerd.runc))
    wrapper.chmod(0o755)
    config = tmp_path / "runtime.toml"
    config.write_text(f'BinaryName = "{wrapper}"\n')
    return RecordingRunc(config, log, fail, fake, wrapper)


def start(e2e, runc: RecordingRunc, *command: str) -> str:
    cid = e2e.new_id()
    e2e.ctr("run", "-d", "--runtime", PYSHIM, "--runtime-config-path", str(runc.config),
            e2e.image, cid, *command, check=True)
    return cid


def remove(e2e, cid: str) -> None:
    if task_status(e2e, cid) in ("RUNNING", "PAUSED"):
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        _wait_stopped(e2e, cid)
    if task_status(e2e, cid):
        e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


CRIU_DUMP_LOG = re.compile(r"path= (\S+/criu-dump\.log)")


def ctr_checkpoint(e2e, cid: str, *flags: str):
    """`ctr task checkpoint`: pause, Checkpoint (the shim's RPC), resume; prints the image ref."""
    return e2e.ctr("task", "checkpoint", *flags, cid, timeout=120)


def test_checkpoint_reaches_runc_and_a_criu_failure_is_clear(e2e, recording_runc):
    cid = start(e2e, recording_runc, "sleep", "600")
    bundle = e2e.bundle_dir(cid)
    try:
        first = ctr_checkpoint(e2e, cid)
        if first.returncode == 0:  # CRIU works on this machine: fail it the way runc does
            assert task_status(e2e, cid) == "RUNNING"  # --leave-running
            recording_runc.force_failure()
        r = ctr_checkpoint(e2e, cid) if first.returncode == 0 else first
        # The runc shim's words: "<first line of runc's error> path= <bundle>/criu-dump.log".
        assert r.returncode != 0, r
        match = CRIU_DUMP_LOG.search(r.stderr)
        assert match, r
        assert match.group(1) == str(bundle / "criu-dump.log"), r
        assert "did not terminate successfully: exit status 1: " in r.stderr and "criu" in r.stderr.lower(), r
        assert (bundle / "criu-dump.log").stat().st_size > 0
        assert not (bundle / "work" / "criu-work").exists()  # the default work dir is removed

        (argv,) = recording_runc.calls("checkpoint", cid)[-1:]
        ns_root = f"/run/containerd/runc/{e2e.namespace}"
        assert argv[argv.index("checkpoint") + 1:] == [
            "--image-path", flag(argv, "--image-path"),
            "--work-path", str(bundle / "work" / "criu-work"),
            "--leave-running", cid,
        ], argv
        assert flag(argv, "--root") == ns_root and flag(argv, "--log") == str(bundle / "log.json"), argv
        assert os.path.isabs(flag(argv, "--image-path")), argv  # containerd's temp dir

        # The task is still the same running task, and still ours to kill and delete.
        assert task_status(e2e, cid) == "RUNNING"
        e2e.ctr("task", "exec", "--exec-id", "after", cid, "true", check=True)
    finally:
        remove(e2e, cid)


def test_criu_failure_reads_as_the_runc_shims(e2e, recording_runc):
    from test_lifecycle import RUNC

    errors = {}
    for runtime in (RUNC, PYSHIM):
        cid = e2e.new_id(runtime.split(".")[2])
        e2e.ctr("run", "-d", "--runtime", runtime, e2e.image, cid, "sleep", "600", check=True)
        try:
            r = ctr_checkpoint(e2e, cid)
            if r.returncode == 0:
                pytest.skip("CRIU can dump on this machine: no failure to compare")
            errors[runtime] = r.stderr.replace(str(e2e.bundle_dir(cid)), "<bundle>").strip()
            assert task_status(e2e, cid) == "RUNNING"
        finally:
            remove(e2e, cid)
    assert errors[PYSHIM] == errors[RUNC]


def _restore_attempt(e2e, runc: RecordingRunc, runtime: str) -> tuple[list[str], str]:
    """Checkpoint (faked by the wrapper) and `ctr container restore --live` under `runtime`:
    the restore argv and ctr's error, with run-specific paths replaced by placeholders."""
    cid = e2e.new_id(runtime.split(".")[2])
    ref = f"checkpoint/{cid}:fake"
    runtime_flags = (("--runtime-config-path", str(runc.config)) if runtime == PYSHIM
                     else ("--runc-binary", str(runc.binary)))
    e2e.ctr("run", "-d", "--runtime", runtime, *runtime_flags, e2e.image, cid, "sleep", "600", check=True)
    try:
        e2e.ctr("container", "checkpoint", "--task", cid, ref, check=True, timeout=120)
        assert task_status(e2e, cid) == "RUNNING"  # left running
        remove(e2e, cid)
        r = e2e.ctr("container", "restore", "--live", cid, ref, timeout=120)
        assert r.returncode != 0, r  # real runc cannot restore the fake image
        bundle = e2e.bundle_dir(cid)
        # The task stays created (no process) and is deleted like any created task.
        assert task_status(e2e, cid) == "CREATED", r
        (argv,) = runc.calls("restore", cid)
        e2e.ctr("task", "rm", cid, check=True)
        e2e.ctr("container", "rm", cid, check=True)
        assert not bundle.exists()
    finally:
        if cid in e2e.ctr("container", "ls", "-q").stdout.split():
            remove(e2e, cid)
        e2e.ctr("image", "rm", ref)

    image = flag(argv, "--image-path")

    def normal(text: str) -> str:
        text = text.replace(str(bundle), "<bundle>").replace(str(runc.binary), "runc")
        return text.replace(image, "<image>").replace(cid, "<id>")

    argv = [normal(a) for a in argv]
    return argv[1:], normal(r.stderr.strip())


def test_restore_reaches_runc_as_from_the_runc_shim(e2e, recording_runc):
    recording_runc.fake_checkpoints()
    ours, our_error = _restore_attempt(e2e, recording_runc, PYSHIM)
    from test_lifecycle import RUNC

    theirs, their_error = _restore_attempt(e2e, recording_runc, RUNC)
    assert ours[ours.index("restore"):] == [
        "restore", "--image-path", "<image>", "--work-path", "<bundle>/work", "--detach",
        "--pid-file", "<bundle>/init.pid", "--no-subreaper", "--bundle", "<bundle>", "<id>",
    ], ours
    # go-runc spells the flag -no-subreaper; runc reads both.
    assert ours == [("--no-subreaper" if a == "-no-subreaper" else a) for a in theirs]
    assert "OCI runtime restore failed" in our_error, our_error
    assert our_error == their_error


class _RawCodec:
    """grpclib codec: betterproto2 requests out, raw bytes back."""

    __content_subtype__ = "proto"

    def encode(self, message, message_type) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type):
        return data


@dataclass(eq=False, repr=False)
class CheckpointTaskRequest(betterproto2.Message):
    """containerd.services.tasks.v1.CheckpointTaskRequest (containerd's own API)."""

    container_id: "str" = betterproto2.field(1, betterproto2.TYPE_STRING)
    parent_checkpoint: "str" = betterproto2.field(2, betterproto2.TYPE_STRING)
    options: "Any | None" = betterproto2.field(3, betterproto2.TYPE_MESSAGE, optional=True)


async def _grpc_checkpoint(address: str, namespace: str, cid: str, options: CheckpointOptions) -> None:
    from grpclib.client import Channel
    from grpclib.const import Cardinality

    channel = Channel(path=address, codec=_RawCodec())
    try:
        request = CheckpointTaskRequest(
            container_id=cid,
            options=Any(type_url="containerd.runc.v1.CheckpointOptions", value=bytes(options)),
        )
        async with channel.request("/containerd.services.tasks.v1.Tasks/Checkpoint", Cardinality.UNARY_UNARY,
                                   CheckpointTaskRequest, bytes, timeout=120,
                                   metadata={"containerd-namespace": namespace}) as stream:
            await stream.send_message(request, end=True)
            await stream.recv_message()
    finally:
        channel.close()


def test_checkpoint_options_reach_runc(e2e, recording_runc, tmp_path):
    # ctr passes CheckpointOptions only for runtimes named io.containerd.runc.* before 2.x,
    # so the options go through containerd's API, as a client such as CRI sends them.
    from grpclib.exceptions import GRPCError

    cid = start(e2e, recording_runc, "sleep", "600")
    work = tmp_path / "criu-work-kept"
    try:
        options = CheckpointOptions(exit=True, open_tcp=True, file_locks=True, work_path=str(work),
                                    empty_namespaces=["network"])
        try:
            asyncio.run(_grpc_checkpoint(e2e.address, e2e.namespace, cid, options))
        except GRPCError as exc:  # CRIU cannot dump here
            assert "criu-dump.log" in str(exc.message), exc
            assert (work / "dump.log").exists()  # a client's work path is kept, with CRIU's log
            assert task_status(e2e, cid) == "RUNNING"
        else:  # exit: runc stops the container after the dump
            _wait_stopped(e2e, cid)
        (argv,) = recording_runc.calls("checkpoint", cid)
        assert argv[argv.index("checkpoint") + 1:] == [
            "--image-path", flag(argv, "--image-path"), "--work-path", str(work), "--tcp-established",
            "--file-locks", "--empty-ns", "network", cid,
        ], argv  # exit: no --leave-running
    finally:
        remove(e2e, cid)


def test_checkpoint_of_a_stopped_task_is_refused(e2e, recording_runc):
    # Through containerd's API: ctr would first pause, which a stopped task refuses.
    from grpclib.exceptions import GRPCError

    cid = start(e2e, recording_runc, "true")
    try:
        _wait_stopped(e2e, cid)
        with pytest.raises(GRPCError) as err:
            asyncio.run(_grpc_checkpoint(e2e.address, e2e.namespace, cid, CheckpointOptions()))
        assert "cannot checkpoint a stopped container" in str(err.value.message), err.value
        assert recording_runc.calls("checkpoint", cid) == []
    finally:
        remove(e2e, cid)


COUNTER = "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"


def _count(e2e, cid: str, exec_id: str) -> str:
    """/tmp/count in the container: '' while the counter rewrites it (echo truncates first)."""
    return e2e.ctr("task", "exec", "--exec-id", exec_id, cid, "cat", "/tmp/count", check=True).stdout.strip()


def test_round_trip_restores_the_running_state(e2e, recording_runc):
    cid = start(e2e, recording_runc, "sh", "-c", COUNTER)
    ref = f"checkpoint/{cid}:1"
    restored = False
    exec_ids = (f"count-{n}" for n in itertools.count())

    def count() -> int:
        return int(wait_until(lambda: _count(e2e, cid, next(exec_ids)), 20, "/tmp/count written"))

    try:
        before = wait_until(count, 20, "the counter to pass 1", until=lambda n: n > 1)
        # --rw: the restored rootfs has /tmp/count too (CRIU restores memory, not files).
        r = e2e.ctr("container", "checkpoint", "--task", "--rw", cid, ref, timeout=120)
        if r.returncode != 0:
            dump_log = CRIU_DUMP_LOG.search(r.stderr)
            reason = ""
            if dump_log and os.path.exists(dump_log.group(1)):
                errors = [ln for ln in Path(dump_log.group(1)).read_text(errors="replace").splitlines() if "Error" in ln]
                reason = errors[-1] if errors else ""
            if "criu" in r.stderr.lower():
                pytest.skip(f"CRIU cannot dump on this machine ({r.stderr.strip()}; {reason})")
            raise AssertionError(r)
        remove(e2e, cid)
        # The same container id again, from the checkpoint image, with its memory (--live).
        e2e.ctr("container", "restore", "--live", "--rw", cid, ref, check=True, timeout=120)
        restored = True
        assert task_status(e2e, cid) == "RUNNING"
        (argv,) = recording_runc.calls("restore", cid)
        assert "--detach" in argv and flag(argv, "--pid-file").endswith("/init.pid"), argv
        after = count()
        assert after >= before, (before, after)  # continued, not started again from 1
        wait_until(count, 20, f"the counter to pass {after}", until=lambda n: n > after)  # and still running
    finally:
        if restored or task_status(e2e, cid) or cid in e2e.ctr("container", "ls", "-q").stdout.split():
            remove(e2e, cid)
        e2e.ctr("image", "rm", ref)
