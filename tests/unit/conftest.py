"""Unit tests run as the pyshim binary would: its RuntimeIdentity installed (the entry point
does that before anything else), so code that asks for the identity or the App finds them."""

import pytest

from shim.cli import IDENTITY
from shim.framework.app import install

install(IDENTITY)


@pytest.fixture
def no_trace_sinks_left():
    """The test ends with the daemon's tracer detached from every client (debug socket tests)."""
    from shim.framework.debug.trace import TRACER

    yield
    left = list(TRACER.sinks)
    TRACER.sinks.clear()
    assert left == []


@pytest.fixture
def debug_dir(tmp_path, monkeypatch):
    """A private directory for debug sockets instead of /run/pyshim."""
    from shim.framework.debug import server as server_module

    directory = tmp_path / "debug"
    monkeypatch.setattr(server_module, "DEBUG_DIR", str(directory))
    return directory
