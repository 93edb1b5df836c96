"""The OCI runtime backend interface: what the framework asks of runc, crun or any other
runtime, and the one failure type it understands.

A backend is built per container by `App.runtime()` with everything runtime-specific bound
(binary, root, log file, cgroup driver, create flags). Its methods (all async):

    create(id, bundle, *, pid_file, console_socket, stdin, stdout, stderr)
    start(id)                       kill(id, signal, all=False)    delete(id, force=False)
    exec(id, process_spec, *, pid_file, console_socket, stdin, stdout, stderr)
    pause(id)   resume(id)          update(id, resources)          ps(id) -> [pid]
    restore(id, bundle, criu, *, pid_file, console_socket, stdin, stdout, stderr)

Each raises RuntimeFailure (or a subclass) whose text is the runtime's own message: the
Task API passes it on to containerd's user, prefixed like runc-v2 ("OCI runtime create
failed: ..."). Processes are started through the shim's Reaper so that their exits reach
the exit rules.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """An OCI runtime command failed; str() is the runtime's own message."""


class NotRunning(RuntimeFailure):
    """The process (or container) to signal has already exited."""


class NoSuchContainer(RuntimeFailure):
    """The runtime does not know the container (never created, or already deleted)."""
