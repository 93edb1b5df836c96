"""Crun: crun as an OCI runtime backend, the second implementation of the interface.

crun takes runc's command line (same subcommands and flags, JSON log), so the backend is
Runc with crun's differences: its name, its wording of "no such container", and resources
given to `update` as a file (crun's --resources takes a path). A handler swaps it in::

    class UseCrun(Handler):
        def runtime(self, container, default):
            return Crun.replacing(default, binary=self.options.get("binary", "crun"))
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from shim.runc.runtime import Runc, RuncError, RuncNoSuchContainer, classify, command_failure


class Crun(Runc):
    """crun through its CLI; same construction as Runc (binary defaults to "crun")."""

    def __init__(self, reaper, *, binary: str = "crun", **kwargs) -> None:
        super().__init__(reaper, binary=binary or "crun", **kwargs)

    @classmethod
    def replacing(cls, runc: Runc, *, binary: str = "crun") -> Crun:
        """A Crun with everything `runc` was given (root, log file, cgroup driver, flags)."""
        return cls(runc.reaper, binary=binary, root=runc.root, log_path=runc.log_path,
                   systemd_cgroup=runc.systemd_cgroup, no_pivot=runc.no_pivot,
                   no_new_keyring=runc.no_new_keyring)

    def classify(self, err: RuncError) -> RuncError:
        """crun's error as the framework's failure kind (its own wording first)."""
        # crun: "error opening file `<root>/<id>/status`: No such file or directory" (kill),
        # "cannot open directory '<root>/<id>': No such file or directory" (delete)
        text = str(err)
        if "No such file or directory" in text and self.root in text:
            return RuncNoSuchContainer(err.message, command=err.command, argv=err.argv,
                                       returncode=err.returncode, stderr=err.stderr)
        return classify(err)

    async def update(self, id: str, resources: Mapping[str, Any]) -> None:
        """`crun update --resources FILE` (crun reads the resources from a file, not stdin)."""
        fd, path = tempfile.mkstemp(prefix="pyshim-resources-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(resources, f)
            await self._run("update", "--resources", path, id)
        except RuncError as exc:
            raise command_failure(exc) from None
        finally:
            os.unlink(path)
