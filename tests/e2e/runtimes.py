"""The OCI runtimes the e2e matrix runs pyshim with, and how a test asks for one.

A user picks the OCI runtime of a shim by its `BinaryName` runtime option; so do the tests:

    pyshim   ctr run --runtime io.containerd.pyshim.v2 --runtime-config-path <toml> ...
             (the TOML holds `BinaryName = "<path>"`; ctr sends it as runtimeoptions.v1.Options)
    runc-v2  ctr run --runtime io.containerd.runc.v2 --runc-binary <path> ...
             (ctr sends containerd.runc.v1.Options{BinaryName})

Runtimes (ids as in test names, e.g. test_exit_codes[2.1-crun-...]):

    runc1.1  Debian 12's runc 1.1.5, /usr/sbin/runc
    runc1.3  runc 1.3.6 from Debian sid, unpacked by hack/lib.sh under $PYSHIM_DEPS
    crun     Debian 12's crun 1.8.1, /usr/bin/crun

Not every (containerd, runtime) pair runs by default (see DEFAULT_MATRIX); PYSHIM_E2E_MATRIX=full
runs them all, PYSHIM_E2E_RUNTIMES=runc1.1,crun picks runtimes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path

DEPS = Path(os.environ.get("PYSHIM_DEPS", "/opt/pyshim-deps"))

PYSHIM_RUNTIME = "io.containerd.pyshim.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"

# crun 1.8 refuses a hybrid cgroup layout whose cgroup2 hierarchy has controllers ("cgroups
# in hybrid mode not supported, drop all controllers from cgroupv2"), whichever shim runs it;
# this machine's has hugetlb there. Run in a private mount namespace without that mount,
# crun sees plain cgroup v1 (its state, the container's cgroups and namespaces are the same).
UNIFIED = Path("/sys/fs/cgroup/unified")


@dataclasses.dataclass(frozen=True)
class OciRuntime:
    """One OCI runtime binary of the matrix."""

    id: str  # "runc1.1", "runc1.3", "crun"
    binary: Path
    source: str  # where it comes from, for reports

    @property
    def kind(self) -> str:
        """"runc" or "crun": whose wording its errors have."""
        return "crun" if self.id.startswith("crun") else "runc"

    def missing(self) -> list[str]:
        return [] if os.access(self.binary, os.X_OK) else [str(self.binary)]


OCI_RUNTIMES: dict[str, OciRuntime] = {
    r.id: r for r in (
        OciRuntime("runc1.1", Path("/usr/sbin/runc"), "Debian bookworm (apt)"),
        OciRuntime("runc1.3", DEPS / "runc-1.3.6/bin/runc", "Debian sid (hack/lib.sh)"),
        OciRuntime("crun", Path("/usr/bin/crun"), "Debian bookworm (apt)"),
    )
}

#: Which containerd versions run the matrix tests with each runtime by default. runc 1.1 (what
#: Debian 12 users have) with every version; the others where they tell something new at the
#: least cost: runc 1.3 with the containerd it ships beside (2.1), crun with 1.6, the one
#: containerd whose specs (ociVersion 1.0.2-dev) crun 1.8 accepts -- 1.7 and 2.1 write 1.2.x,
#: which crun 1.8 refuses before running anything, with either shim (test_runtime_errors
#: shows that side by side on every version).
DEFAULT_MATRIX: dict[str, tuple[str, ...]] = {
    "runc1.1": ("1.6", "1.7", "2.1"),
    "runc1.3": ("2.1",),
    "crun": ("1.6",),
}


def selected_runtimes(env: str | None) -> list[str]:
    """The runtime ids PYSHIM_E2E_RUNTIMES names (all when unset or empty); ValueError for
    an unknown id."""
    ids = [r.strip() for r in (env or "").split(",") if r.strip()] or list(OCI_RUNTIMES)
    unknown = [r for r in ids if r not in OCI_RUNTIMES]
    if unknown:
        raise ValueError(f"PYSHIM_E2E_RUNTIMES: unknown runtime(s) {', '.join(unknown)}; "
                         f"known: {', '.join(OCI_RUNTIMES)}")
    return ids


def in_matrix(version: str, runtime: str, mode: str | None = None) -> bool:
    """Whether the matrix runs containerd `version` with `runtime`: DEFAULT_MATRIX, or every
    pair when mode (PYSHIM_E2E_MATRIX) is "full". A runtime outside the table runs
    everywhere."""
    if (mode or "").strip() == "full":
        return True
    return version in DEFAULT_MATRIX.get(runtime, (version,))


def matrix_pairs(versions: Iterable[str], runtimes: Iterable[str], mode: str | None = None) -> list[tuple[str, str]]:
    """The (version, runtime) pairs that run, in the order given."""
    runtimes = list(runtimes)
    return [(v, r) for v in versions for r in runtimes if in_matrix(v, r, mode)]


def hybrid_with_v2_controllers(unified: Path = UNIFIED) -> bool:
    try:
        return bool((unified / "cgroup.controllers").read_text().split())
    except OSError:
        return False


def crun_wrapper_script(crun: str, unified: Path = UNIFIED) -> str:
    """A shell script that runs crun (all its arguments passed on) where it sees no cgroup2
    mount, so crun 1.8 takes this machine's hybrid layout for plain cgroup v1."""
    return (
        "#!/bin/sh\n"
        "# crun 1.8 refuses a hybrid cgroup layout with controllers in its cgroup2 hierarchy;\n"
        f"# without the {unified} mount (a private mount namespace) it sees plain cgroup v1.\n"
        f"exec unshare --mount --propagation private sh -c "
        f"'umount {unified} 2>/dev/null; exec {crun} \"$@\"' crun \"$@\"\n"
    )


@dataclasses.dataclass(frozen=True)
class RuntimeChoice:
    """An OCI runtime as a test uses it: the BinaryName both shims get, and pyshim's options
    file naming it."""

    runtime: OciRuntime
    binary_name: Path  # the runtime itself, or the crun wrapper on a hybrid host
    config: Path  # TOML: BinaryName = "<binary_name>"

    @property
    def id(self) -> str:
        return self.runtime.id

    @property
    def kind(self) -> str:
        return self.runtime.kind

    @classmethod
    def prepare(cls, runtime: OciRuntime, where: Path, *, wrap_crun: bool | None = None) -> RuntimeChoice:
        """Write what the runtime needs into `where`: the crun wrapper (on a hybrid host, or
        when wrap_crun says so) and pyshim's options file."""
        where.mkdir(parents=True, exist_ok=True)
        binary = runtime.binary
        if runtime.kind == "crun" and (hybrid_with_v2_controllers() if wrap_crun is None else wrap_crun):
            binary = where / "crun"
            binary.write_text(crun_wrapper_script(str(runtime.binary)))
            binary.chmod(0o755)
        config = where / f"{runtime.id}.toml"
        config.write_text(options_toml(binary))
        return cls(runtime, binary, config)

    def flags(self, runtime_type: str = PYSHIM_RUNTIME) -> tuple[str, ...]:
        """`ctr run` flags choosing the shim and, by BinaryName, this OCI runtime."""
        return runtime_flags(runtime_type, self.binary_name, self.config)


def options_toml(binary_name: Path | str) -> str:
    return f"BinaryName = {json.dumps(str(binary_name))}\n"


def runtime_flags(runtime_type: str, binary_name: Path | str | None = None,
                  config: Path | str | None = None) -> tuple[str, ...]:
    """`ctr run` flags for a shim and (optionally) a BinaryName: runc-v2 takes ctr's
    --runc-binary (ctr refuses that flag for any other runtime), every other shim the
    options file (`config`, which names the same binary)."""
    flags: tuple[str, ...] = ("--runtime", runtime_type)
    if binary_name is None:
        return flags
    if runtime_type == RUNC_RUNTIME:
        return (*flags, "--runc-binary", str(binary_name))
    if config is None:
        raise ValueError(f"{runtime_type}: a BinaryName needs an options file")
    return (*flags, "--runtime-config-path", str(config))


#: What each runtime says when a process's executable does not exist (an absolute path): the
#: user sees it after containerd's and the shim's prefixes ("OCI runtime exec failed: ...").
MISSING_EXECUTABLE = {
    "runc": 'exec: "{path}": stat {path}: no such file or directory',
    "crun": "executable file `{path}` not found in $PATH: No such file or directory",
}


def missing_executable(kind: str, path: str) -> str:
    """The runtime's own words for a missing executable `path` ("runc" or "crun" wording)."""
    return MISSING_EXECUTABLE[kind].format(path=path)
