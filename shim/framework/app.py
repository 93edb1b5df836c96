"""How an application plugs into the framework: its identity and the App it provides.

An application (shim.runc is the first) is a shim binary built on shim.framework: its
console script calls `shim.framework.main.run(identity)` with a RuntimeIdentity that names
the runtime type containerd knows it by and, as "module:attribute", the App class the
daemon, `delete` and `-info` load lazily (`start` never loads it: it only binds a socket
and forks). The warm zygote that forks daemons is keyed by the identity, so two binaries
never share one, and preloads `App.preload`.

Kept import-light: every `start` imports this.
"""

from __future__ import annotations


class RuntimeIdentity:
    """Who a shim binary is: runtime type, binary name, App, and an optional default handler
    (shim.handler.Handler, "module:Class") for containers whose options name none."""

    __slots__ = ("runtime_type", "binary_name", "app", "default_handler")

    def __init__(self, runtime_type: str, *, app: str, binary_name: str = "", default_handler: str = "") -> None:
        self.runtime_type = runtime_type
        # io.containerd.pyshim.v2 -> containerd-shim-pyshim-v2, containerd's own rule
        self.binary_name = binary_name or _binary_name(runtime_type)
        self.app = app
        self.default_handler = default_handler

    @property
    def group_annotation(self) -> str:
        """The OCI annotation that puts containers into one shim of this runtime."""
        return f"{self.runtime_type}.group"

    def __repr__(self) -> str:
        return f"RuntimeIdentity({self.runtime_type!r}, app={self.app!r}, default_handler={self.default_handler!r})"


def _binary_name(runtime_type: str) -> str:
    parts = runtime_type.split(".")
    if len(parts) >= 2:
        return f"containerd-shim-{parts[-2]}-{parts[-1]}"
    return f"containerd-shim-{runtime_type}"


class App:
    """What an application gives the framework. Subclass and override; the framework calls
    nothing else of it.

    Options objects are the app's own; the framework reads only these attributes of them:
    `io_uid`, `io_gid` (owner of the container's stdio pipes), `handler`, `handler_options`
    (shim.handler), and calls `write(bundle)` at Create.
    """

    #: Modules the zygote imports for this app's daemons (what its `runtime()` needs).
    preload: tuple[str, ...] = ()

    def parse_options(self, any_message):
        """CreateTaskRequest.options (a google.protobuf.Any, or None) as this app's options
        object; ValueError with a message for the user when they cannot be read."""
        raise NotImplementedError

    def runtime(self, options, *, namespace: str, bundle: str, reaper):
        """The OCI runtime backend (shim.framework.backend.OciRuntime) for one container."""
        raise NotImplementedError

    def runtime_chosen(self, bundle: str, runtime) -> None:
        """The backend that will run the container in `bundle` (a handler may have swapped
        the one `runtime()` built): note what `cleanup` will need to find it again."""

    def process_details(self, exec_id: str):
        """Pids: what an exec's ProcessInfo.info says (a google.protobuf.Any), or None."""
        return None

    def restore_options(self, container, checkpoint: str, parent_checkpoint: str):
        """What `runtime.restore` gets for a Create from a checkpoint image."""
        raise NotImplementedError

    async def checkpoint(self, container, image_path: str, options_any) -> None:
        """CheckpointTaskRequest: checkpoint the container's init (raises TtrpcError)."""
        raise NotImplementedError

    def cleanup(self, namespace: str, container_id: str, bundle: str) -> None:
        """`delete` without a daemon: remove the container from the OCI runtime (forced),
        quickly (containerd waits 5 s for the whole command), writing problems to stderr."""

    def features(self, options_any) -> bytes | None:
        """`-info`: the OCI runtime's features document (compact JSON), or None."""
        return None


_identity: RuntimeIdentity | None = None
_app: App | None = None


def install(identity: RuntimeIdentity) -> None:
    """Make `identity` this process's (the entry point does it first thing)."""
    global _identity, _app
    if _identity is not identity:
        _identity, _app = identity, None


def identity() -> RuntimeIdentity:
    """This process's RuntimeIdentity (installed by the entry point)."""
    if _identity is None:
        raise RuntimeError("no shim identity installed (shim.framework.app.install)")
    return _identity


def current() -> App:
    """This process's App, loaded from the identity on first use."""
    global _app
    if _app is None:
        _app = load(identity().app)
    return _app


def load(spec: str) -> App:
    """An App instance from "module:attribute" (a class, or an instance)."""
    import sys

    module_name, _, attribute = spec.partition(":")
    __import__(module_name)  # importlib.import_module would import importlib (~0.5 ms for `delete`)
    target = getattr(sys.modules[module_name], attribute)
    return target() if isinstance(target, type) else target
