"""Run containers with crun instead of runc, by swapping pyshim's OCI runtime backend.

Runtime options (the runtime handler's TOML)::

    Handler = "pyshim_crun:UseCrun"
    [HandlerOptions]
    binary = "crun"          # name on the shim's PATH, or an absolute path
    oci_version = "1.1.0"    # optional: the ociVersion crun is given (see below)

Why a handler and not `BinaryName = "crun"`: BinaryName only renames the runc binary, so
everything pyshim knows about runc (its wording of "no such container", `update` reading
resources from stdin) would be applied to crun. `UseCrun.runtime` returns the `Crun` backend
(shim.runc.crun), which is runc's CLI with crun's differences, built from everything the
runtime options gave the default one (root, log file, cgroup driver, create flags). pyshim
records the binary in the bundle (file `runtime`), so `delete` run by containerd after a
crashed shim removes the container with crun too.

`oci_version`: crun 1.8 accepts only specs whose ociVersion contains "1.0" (so 1.0.x and
1.1.x); containerd 1.7 and 2.x write 1.2.x, which it refuses with "unknown version
specified". Setting it rewrites the spec's ociVersion in `create`, which is harmless when
crun understands every field of the spec it is given (it ignores the ones it does not know).
"""

from __future__ import annotations

from typing import Any

from shim.handler import ContainerInfo, Handler
from shim.runc.crun import Crun

__all__ = ["UseCrun"]


class UseCrun(Handler):
    """The crun backend for every container of this runtime handler."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        binary = self.options.get("binary", "crun")
        oci_version = self.options.get("oci_version", "")
        # Checked here, at Create, so that a typo fails the container with a clear message
        # rather than some later runtime call.
        if not isinstance(binary, str) or not binary:
            raise ValueError(f"HandlerOptions.binary must be a non-empty string, not {binary!r}")
        if not isinstance(oci_version, str):
            raise ValueError(f"HandlerOptions.oci_version must be a string, not {oci_version!r}")
        self.binary = binary
        self.oci_version = oci_version

    async def create(self, container: ContainerInfo) -> None:
        if self.oci_version:
            container.spec["ociVersion"] = self.oci_version

    def runtime(self, container: ContainerInfo, default):
        return Crun.replacing(default, binary=self.binary)
