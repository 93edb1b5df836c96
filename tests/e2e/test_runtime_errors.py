"""What a user sees when the OCI runtime refuses something, side by side with runc-v2.

Each test does the same thing through io.containerd.pyshim.v2 and io.containerd.runc.v2, both
given the same OCI runtime by BinaryName (runc 1.1, runc 1.3, crun; see runtimes.py), and
compares exit codes and messages; container ids, pids and times are normalized away. The
runtimes word their errors differently (crun: "executable file `x` not found in $PATH"), and
the shim must pass on whichever words its runtime used, as runc-v2 does.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from conftest import RUNTIME_IDS
from runtimes import OCI_RUNTIMES, RUNC_RUNTIME, RuntimeChoice, missing_executable
from test_cgroup_features import _grpc_update
from test_lifecycle import PYSHIM, RUNC, _wait_stopped, run

#: The runtime matrix (runtimes.DEFAULT_MATRIX), for all tests but the first.
matrix = pytest.mark.usefixtures("oci_runtime")


@pytest.mark.parametrize("runtime_id", RUNTIME_IDS)
def test_every_runtime_on_every_containerd(e2e, runtime_id, tmp_path):
    """One container through each shim with each runtime by BinaryName, on every containerd
    version (outside the matrix): the same output and exit code, or the same refusal. crun 1.8
    refuses the specs of containerd 1.7 and 2.1 (ociVersion 1.2.x) before anything runs."""
    runtime = OCI_RUNTIMES[runtime_id]
    if runtime.missing():
        pytest.skip(f"{runtime_id} not installed")  # the matrix fixture fails for it under hack/test
    choice = RuntimeChoice.prepare(runtime, tmp_path)
    command = ("sh", "-c", "echo hi from the runtime; exit 4")
    ours = run(e2e, *command, flags=choice.flags()[2:], cid=e2e.new_id("any"))
    theirs = run(e2e, *command, runtime=RUNC, flags=choice.flags(RUNC_RUNTIME)[2:], cid=e2e.new_id("any"))

    def seen(r) -> tuple:
        return r.returncode, r.stdout, re.sub(r"any-\d+-[0-9a-f]{6}", "<id>", r.stderr)

    assert seen(ours) == seen(theirs)
    if runtime.kind == "crun" and e2e.version != "1.6":
        assert "OCI runtime create failed: unknown version specified" in ours.stderr, ours
    else:
        assert (ours.returncode, ours.stdout) == (4, "hi from the runtime\n"), ours


def normalized(text: str, *ids: str) -> str:
    """`text` with the given container ids, pids in runc's messages and timestamps replaced."""
    for n, cid in enumerate(ids):
        text = text.replace(cid, f"<id{n}>")
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+(Z|[+-]\d\d:\d\d)", "<time>", text)
    text = re.sub(r"\b(pid|process) \d+\b", r"\1 <n>", text)
    text = re.sub(r"\b(usage): \d+", r"\1: <n>", text)  # runc: "(current usage: N, peak usage: N)"
    return text


def start_sleeper(e2e, runtime: str) -> str:
    cid = e2e.new_id(runtime.rsplit(".", 2)[-2])
    e2e.ctr("run", "-d", *e2e.runtime(runtime), e2e.image, cid, "sleep", "600", check=True)
    return cid


def stop_and_remove(e2e, cid: str) -> None:
    e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
    _wait_stopped(e2e, cid)
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)


def each_shim(e2e, action) -> dict[str, tuple]:
    """{shim: action(cid)} on a fresh sleeper per shim, removed afterwards."""
    results = {}
    for runtime in (PYSHIM, RUNC):
        cid = start_sleeper(e2e, runtime)
        try:
            results[runtime] = action(cid)
        finally:
            stop_and_remove(e2e, cid)
    return results


@matrix
def test_exec_of_a_missing_binary(e2e):
    def exec_missing(cid: str) -> tuple[int, str, str]:
        r = e2e.ctr("task", "exec", "--exec-id", "x1", cid, "/no/such/binary")
        again = e2e.ctr("task", "exec", "--exec-id", "x1", cid, "echo", "again")
        assert (again.returncode, again.stdout) == (0, "again\n"), again
        return r.returncode, r.stdout, normalized(r.stderr, cid)

    results = each_shim(e2e, exec_missing)
    ours, theirs = results[PYSHIM], results[RUNC]
    assert ours == theirs
    code, _, stderr = ours
    assert code != 0 and "OCI runtime exec failed: " in stderr, ours
    assert missing_executable(e2e.oci_kind, "/no/such/binary") in stderr, ours


@matrix
def test_create_with_a_missing_binary(e2e):
    ours, theirs = (run(e2e, "/no/such/binary", runtime=rt, cid=e2e.new_id("missing")) for rt in (PYSHIM, RUNC))
    assert ours.returncode == theirs.returncode != 0, (ours, theirs)

    def words(r) -> str:
        return re.sub(r"missing-\d+-[0-9a-f]{6}", "<id>", r.stderr).strip()

    assert words(ours) == words(theirs)
    assert missing_executable(e2e.oci_kind, "/no/such/binary") in ours.stderr, ours


@matrix
def test_kill_of_a_stopped_task(e2e):
    def kill_stopped(cid: str) -> tuple[int, str]:
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        _wait_stopped(e2e, cid)
        again = e2e.ctr("task", "kill", "-s", "SIGKILL", cid)
        all_again = e2e.ctr("task", "kill", "-a", "-s", "SIGKILL", cid)
        return again.returncode, normalized(again.stderr, cid), all_again.returncode, normalized(all_again.stderr, cid)

    results = each_shim(e2e, kill_stopped)
    assert results[PYSHIM] == results[RUNC]
    code, stderr, *_ = results[PYSHIM]
    assert code != 0 and "not found" in stderr, results


@matrix
def test_pause_and_resume_refused_alike(e2e):
    def refusals(cid: str) -> list[tuple[int, str]]:
        out = [e2e.ctr("task", "resume", cid)]  # a running task cannot be resumed
        e2e.ctr("task", "kill", "-s", "SIGKILL", cid, check=True)
        _wait_stopped(e2e, cid)
        out += [e2e.ctr("task", "pause", cid), e2e.ctr("task", "resume", cid)]
        return [(r.returncode, normalized(r.stderr, cid)) for r in out]

    results = each_shim(e2e, refusals)
    assert results[PYSHIM] == results[RUNC]
    assert all(code != 0 for code, _ in results[PYSHIM]), results


#: Updates the runtime (not the shim, not containerd) refuses: a CFS period under the
#: kernel's 1 ms minimum, and a memory limit below what the container already uses.
BAD_UPDATES = {
    "cpu-period": {"cpu": {"quota": 1000, "period": 10}},
    "memory-below-usage": {"memory": {"limit": 4096}},
}


@matrix
@pytest.mark.parametrize("name", list(BAD_UPDATES))
def test_update_with_bad_values(e2e, name):
    from grpclib.exceptions import GRPCError

    def update(cid: str) -> tuple[str, str]:
        try:
            asyncio.run(_grpc_update(e2e.address, e2e.namespace, cid, BAD_UPDATES[name]))
        except GRPCError as exc:
            return exc.status.name, normalized(str(exc.message), cid)
        return "OK", ""

    results = each_shim(e2e, update)
    ours, theirs = results[PYSHIM], results[RUNC]
    assert ours == theirs
    # go-runc's words, the runtime's output after them; no "OCI runtime update failed"
    binary = e2e.oci.binary_name
    assert ours[0] == "UNKNOWN" and ours[1].startswith(f"{binary} did not terminate successfully: exit status 1: "), results


@matrix
def test_update_with_a_value_of_the_wrong_type(e2e):
    """Resources that are not a LinuxResources at all (a string for a number)."""
    from grpclib.exceptions import GRPCError

    def update(cid: str) -> tuple[str, str]:
        try:
            asyncio.run(_grpc_update(e2e.address, e2e.namespace, cid, {"cpu": {"shares": "many"}}))
        except GRPCError as exc:
            return exc.status.name, normalized(str(exc.message), cid)
        return "OK", ""

    results = each_shim(e2e, update)
    ours, theirs = results[PYSHIM], results[RUNC]
    assert ours[0] == theirs[0] == "UNKNOWN", results
    assert ours[1].startswith("json: cannot unmarshal string into Go struct field LinuxCPU.cpu.shares"), results
    # refused by the shim, before any runtime ran (crun would take it): Go's words, the struct
    # named as Go up to 1.26 names it (containerd 1.6 and 1.7's runc-v2); Debian's 2.1.9 is
    # built with Go 1.27, which names the outer struct, "LinuxResources.cpu.shares"
    if e2e.version == "2.1":
        theirs = (theirs[0], theirs[1].replace("LinuxResources.cpu.shares", "LinuxCPU.cpu.shares"))
    assert ours == theirs
