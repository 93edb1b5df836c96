"""`ctr run --log-uri binary://... | file://...`: container output to a logger process or a file.

Every test runs once per containerd version (1.6, 1.7, 2.1) with real runc.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from test_lifecycle import PYSHIM, RUNC, mounts_of, pyshim_daemons, run
from waiting import wait_gone

# A binary:// logger (containerd's logging protocol): fd 3 = the container's stdout, fd 4 =
# its stderr, fd 5 = "ready" (closing it says so). Its environment holds only CONTAINER_ID and
# CONTAINER_NAMESPACE (dash finds cat on its built-in PATH).
LOGGER = """#!/bin/sh
dir=$2
cat <&3 > "$dir/stdout" 5>&- &
cat <&4 > "$dir/stderr" 5>&- &
env > "$dir/env"
echo "$@" > "$dir/args"
exec 3<&- 4<&- 5>&-
wait
"""

FAILING_LOGGER = """#!/bin/sh
echo "logger giving up" >&2
exit 7
"""


def write_script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def processes_running(path: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if path.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("runtime", [PYSHIM, RUNC])
def test_binary_logger_gets_stdout_and_stderr(e2e, tmp_path, runtime):
    logger = write_script(tmp_path / "logger", LOGGER)
    logs = tmp_path / "logs"
    logs.mkdir()
    cid = e2e.new_id()
    r = run(e2e, "sh", "-c", "echo to-out; echo to-err >&2; echo more-out", cid=cid,
            runtime=runtime, flags=("--log-uri", f"binary://{logger}?dir={logs}"))
    assert r.returncode == 0, r
    assert (r.stdout, r.stderr) == ("", ""), r
    # The logger is SIGTERMed at Delete; it got EOF on both pipes before that.
    wait_gone(lambda: processes_running(logger), 20, "the logger to exit")
    assert (logs / "stdout").read_text() == "to-out\nmore-out\n"
    assert (logs / "stderr").read_text() == "to-err\n"
    assert (logs / "args").read_text() == f"dir {logs}\n"
    env = sorted((logs / "env").read_text().split())
    assert f"CONTAINER_ID={cid}" in env and f"CONTAINER_NAMESPACE={e2e.namespace}" in env, env
    assert not [e for e in env if e.startswith(("PATH=/usr/local", "TTRPC_ADDRESS", "GRPC_ADDRESS"))], env


def test_binary_logger_that_exits_is_a_clear_error_and_leaves_nothing(e2e, tmp_path):
    logger = write_script(tmp_path / "quitter", FAILING_LOGGER)
    before = set(pyshim_daemons(e2e))
    cid = e2e.new_id()
    started = time.monotonic()
    r = run(e2e, "echo", "never", cid=cid, flags=("--log-uri", f"binary://{logger}"), timeout=60)
    assert r.returncode != 0, r
    assert f"binary logger {logger} exited with status 7 before it was ready" in r.stderr, r
    assert time.monotonic() - started < 15
    assert e2e.ctr("task", "ls", check=True).stdout.split("\n", 1)[1].strip() == ""
    assert cid not in e2e.ctr("container", "ls", "-q", check=True).stdout.split()
    wait_gone(lambda: set(pyshim_daemons(e2e)) - before, 20, "the shim to exit")
    assert not processes_running(logger)
    assert not e2e.bundle_dir(cid).exists()
    assert mounts_of(e2e.bundle_dir(cid)) == []


def test_file_log_uri_gets_stdout_and_stderr(e2e, tmp_path):
    log_file = tmp_path / "sub dir" / "c.log"
    r = run(e2e, "sh", "-c", "echo to-out; sleep 0.1; echo to-err >&2",
            flags=("--log-uri", "file://" + str(log_file).replace(" ", "%20")))
    assert r.returncode == 0, r
    assert log_file.read_text() == "to-out\nto-err\n"
    # A second container appends to the same file.
    assert run(e2e, "echo", "again", flags=("--log-uri", f"file://{log_file}")).returncode == 0
    assert log_file.read_text().endswith("to-err\nagain\n")


def test_logger_that_ignores_sigterm_is_killed_when_create_fails(e2e, tmp_path):
    # runc create fails (no such executable); the shim then exits, but not before the logger
    # it started is gone: SIGTERM, 12 s, SIGKILL, as the Go shim.
    logger = write_script(tmp_path / "stubborn", f"#!/bin/sh\ntrap '' TERM\necho $$ > {tmp_path}/pid\n"
                                                  "exec 5>&-\nwhile :; do sleep 0.1; done\n")
    started = time.monotonic()
    r = run(e2e, "/no/such/binary", flags=("--log-uri", f"binary://{logger}"), timeout=60)
    assert r.returncode != 0 and "no such file or directory" in r.stderr, r
    pid = int((tmp_path / "pid").read_text())
    wait_gone(lambda: os.path.exists(f"/proc/{pid}"), 20, "the logger to be gone with its shim")
    assert time.monotonic() - started < 30
