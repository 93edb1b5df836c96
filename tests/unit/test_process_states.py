"""Process states refuse what they do not allow with the Go shim's texts and codes."""

from __future__ import annotations

import pytest

from shim.framework.process import Created, Deleted, Paused, Running, Stopped
from shim.framework.ttrpc.status import Code, TtrpcError


@pytest.mark.parametrize(
    ("state", "operation", "code", "text"),
    [
        (Running, "start", Code.UNKNOWN, "cannot start a running process"),
        (Stopped, "start", Code.UNKNOWN, "cannot start a stopped process"),
        (Stopped, "exec", Code.UNKNOWN, "cannot exec in a stopped state"),
        (Stopped, "update", Code.UNKNOWN, "cannot update a stopped container"),
        (Stopped, "pause", Code.UNKNOWN, "cannot pause a stopped container"),
        (Stopped, "resume", Code.UNKNOWN, "cannot resume a stopped container"),
        (Paused, "start", Code.UNKNOWN, "cannot start a paused process"),
        (Running, "resume", Code.UNKNOWN, "cannot resume a running process"),
        (Deleted, "kill", Code.NOT_FOUND, "cannot kill a deleted process: not found"),
    ],
)
def test_refusals(state, operation, code, text):
    with pytest.raises(TtrpcError) as caught:
        state.check(operation)
    assert (caught.value.code, caught.value.message) == (code, text)


@pytest.mark.parametrize(("state", "operation"), [(Created, "start"), (Running, "update"), (Paused, "update"),
                                                  (Stopped, "delete"), (Stopped, "kill")])
def test_allowed(state, operation):
    state.check(operation)
