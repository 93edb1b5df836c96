"""Fixtures for e2e tests: a private containerd per version (1.6, 1.7, 2.1) and a test image.

    @pytest.mark.e2e
    def test_x(e2e):                      # runs once per containerd version: test_x[1.6] ...
        cid = e2e.new_id()
        r = e2e.ctr("run", "--rm", "--runtime", PYSHIM_RUNTIME, e2e.image, cid, "true")
        assert r.returncode == 0, r

Lifecycle, exec, terminal, OOM and update tests also run per OCI runtime: a module with
`pytestmark = pytest.mark.usefixtures("oci_runtime")` runs each test with runc 1.1, runc 1.3
and crun (test_x[2.1-crun]), chosen by BinaryName; `e2e.runtime(PYSHIM)` / `e2e.runtime(RUNC)`
give the `ctr run` flags for either shim with that runtime:

    r = e2e.ctr("run", "--rm", *e2e.runtime(PYSHIM), e2e.image, cid, "true")

`e2e` (function scope) gives a fresh namespace with the image in it, on the session's
`containerd` (a started PrivateContainerd, see containerd.py).  Tasks and containers left in the
namespace are killed/deleted after the test; at the end of the session each containerd is
stopped and the session fails if any of its processes, mounts or shim sockets remain.

Environment:
  PYSHIM_E2E_VERSIONS   comma-separated subset of 1.6,1.7,2.1 (default: all)
  PYSHIM_E2E_RUNTIMES   comma-separated subset of runc1.1,runc1.3,crun (default: all): the OCI
                        runtimes of the tests that take `oci_runtime` (see runtimes.py)
  PYSHIM_E2E_MATRIX     "full": every containerd version with every runtime (default: the
                        pairs in runtimes.DEFAULT_MATRIX)
  PYSHIM_E2E_REQUIRED   "1" (hack/test sets it): missing containerd/runc binaries fail instead
                        of skipping
  PYSHIM_E2E_TMP        where the private containerds' temp dirs go (default: $TMPDIR or /tmp)
  PYSHIM_E2E_CACHE      where the image tarball is cached (default: .cache/e2e)
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import uuid
from pathlib import Path

import pytest

from containerd import (
    IMAGE_REF,
    TARGETS,
    CtrResult,
    PrivateContainerd,
    build_busybox_image,
    describe_package,
    image_cache_dir,
    private_package_info,
)
from runtimes import OCI_RUNTIMES, PYSHIM_RUNTIME, RuntimeChoice, in_matrix, runtime_flags, selected_runtimes

HERE = Path(__file__).resolve().parent
VERSION_IDS = [
    v.strip() for v in os.environ.get("PYSHIM_E2E_VERSIONS", ",".join(TARGETS)).split(",")
    if v.strip()
]
RUNTIME_IDS = selected_runtimes(os.environ.get("PYSHIM_E2E_RUNTIMES"))
MATRIX_MODE = os.environ.get("PYSHIM_E2E_MATRIX", "")
REQUIRED = os.environ.get("PYSHIM_E2E_REQUIRED") == "1"
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_root = pytest.mark.skip(
        reason="e2e tests need root (they run containerd, runc and mounts); run hack/test as root"
    )
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
        if not IS_ROOT and "e2e" in item.keywords:
            item.add_marker(skip_root)
    # The runtime matrix: pairs of (containerd version, OCI runtime) outside it are not run.
    keep, dropped = [], []
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if params and "oci_runtime" in params:
            version = params.get("containerd") or params.get("own_containerd")
            if version is not None and not in_matrix(version, params["oci_runtime"], MATRIX_MODE):
                dropped.append(item)
                continue
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


_STARTED: list[str] = []
_RUNTIMES_USED: dict[str, None] = {}


def pytest_terminal_summary(terminalreporter) -> None:
    if _STARTED:
        terminalreporter.write_sep("-", "e2e containerd versions used")
        for line in _STARTED:
            terminalreporter.write_line(line)
    if _RUNTIMES_USED:
        terminalreporter.write_sep("-", "e2e OCI runtimes used (BinaryName)")
        for line in _RUNTIMES_USED:
            terminalreporter.write_line(line)


def _slug(text: str, n: int = 30) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-") or "x"


@pytest.fixture(scope="session")
def busybox_image() -> Path:
    """The OCI image tarball (built once, cached in .cache/e2e); its ref is IMAGE_REF."""
    return build_busybox_image(image_cache_dir())


def installed_target(version_id: str):
    """The Target of a version id, or skip the test (fail it under hack/test, which installs
    everything) when we are not root or its binaries are missing."""
    if not IS_ROOT:
        pytest.skip("e2e tests need root")
    target = TARGETS[version_id]
    missing = target.missing()
    if missing:
        msg = f"containerd {target.id} not installed ({', '.join(missing)}); run hack/test"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    return target


@pytest.fixture(scope="session", params=VERSION_IDS)
def containerd(request: pytest.FixtureRequest, busybox_image: Path):
    """A started PrivateContainerd for one version (ids "1.6", "1.7", "2.1"); one per session."""
    target = installed_target(request.param)
    c = PrivateContainerd(target)
    c.image_archive = busybox_image
    try:
        c.start()
    except BaseException:
        c.close()
        raise
    pkg = describe_package(target.package_info())
    runc_pkg = describe_package(private_package_info(c.runc))
    _STARTED.append(
        f"{target.id}: containerd {c.version} [{pkg + ', ' if pkg else ''}{target.source}, "
        f"{target.bin_dir}], runc {c.runc_version} [{runc_pkg + ', ' if runc_pkg else ''}"
        f"{c.runc}], snapshotter {c.snapshotter}"
    )
    yield c
    log_tail = c.log_tail(40)
    leftovers = c.close()
    if leftovers:
        pytest.fail(
            f"containerd {target.id}: left behind after cleanup:\n  " + "\n  ".join(leftovers)
            + f"\ncontainerd log tail:\n{log_tail}"
        )


_PREPARED: dict[str, RuntimeChoice] = {}


# Function scope: a session-scoped parameter would make pytest order the session by runtime
# first and start each containerd version more than once; the files are prepared once.
@pytest.fixture(params=RUNTIME_IDS)
def oci_runtime(request: pytest.FixtureRequest, tmp_path_factory) -> RuntimeChoice:
    """The OCI runtime of a matrix test (ids "runc1.1", "runc1.3", "crun"), as BinaryName
    and pyshim's options file naming it; skipped (failed under hack/test) when not installed."""
    if request.param in _PREPARED:
        return _PREPARED[request.param]
    if not IS_ROOT:
        pytest.skip("e2e tests need root")
    runtime = OCI_RUNTIMES[request.param]
    missing = runtime.missing()
    if missing:
        msg = f"OCI runtime {runtime.id} not installed ({', '.join(missing)}); run hack/test"
        if REQUIRED:
            pytest.fail(msg)
        pytest.skip(msg)
    choice = RuntimeChoice.prepare(runtime, tmp_path_factory.mktemp(f"oci-{runtime.id}"))
    version = PrivateContainerd._tool_version(runtime.binary)
    via = f", BinaryName {choice.binary_name}" if choice.binary_name != runtime.binary else ""
    _RUNTIMES_USED[f"{runtime.id}: {runtime.kind} {version} [{runtime.source}, {runtime.binary}{via}]"] = None
    _PREPARED[runtime.id] = choice
    return choice


@dataclasses.dataclass
class E2E:
    """Per-test handle: a unique namespace (with the test image) on the session's containerd."""

    containerd: PrivateContainerd
    namespace: str
    image: str = IMAGE_REF
    #: The OCI runtime of a matrix test (None: the runc first on containerd's PATH).
    oci: RuntimeChoice | None = None
    _ids: itertools.count = dataclasses.field(default_factory=itertools.count)

    def new_id(self, prefix: str = "c") -> str:
        """A container id unique in the session (valid for containerd and runc)."""
        id = f"{_slug(prefix, 20)}-{next(self._ids)}-{uuid.uuid4().hex[:6]}"
        self.containerd.note_task(self.namespace, id)
        return id

    def ctr(self, *args: str, **kw) -> CtrResult:
        """containerd.ctr(...) in this test's namespace (pass namespace= to override)."""
        kw.setdefault("namespace", self.namespace)
        return self.containerd.ctr(*args, **kw)

    def runtime(self, runtime_type: str = PYSHIM_RUNTIME) -> tuple[str, ...]:
        """`ctr run` flags for a shim (pyshim or runc-v2) with this test's OCI runtime."""
        if self.oci is None:
            return runtime_flags(runtime_type)
        return self.oci.flags(runtime_type)

    @property
    def oci_kind(self) -> str:
        """"runc" or "crun": whose words the runtime's errors are in."""
        return self.oci.kind if self.oci else "runc"

    @property
    def runtime_binary(self) -> str:
        """The OCI runtime binary the test's containers run with (for `list`, `state`)."""
        return str(self.oci.runtime.binary if self.oci else self.containerd.runc)

    @property
    def version(self) -> str:
        return self.containerd.target.id

    @property
    def address(self) -> str:
        return self.containerd.address

    @property
    def ttrpc_address(self) -> str:
        return self.containerd.ttrpc_address

    @property
    def state(self) -> Path:
        return self.containerd.state

    def bundle_dir(self, id: str) -> Path:
        return self.containerd.bundle_dir(self.namespace, id)

    def shim_socket_address(self, id: str) -> str:
        return self.containerd.shim_socket_address(self.namespace, id)


@pytest.fixture
def e2e(containerd: PrivateContainerd, request: pytest.FixtureRequest):
    ns = containerd.new_namespace(_slug(request.node.originalname, 24),
                                  image=containerd.image_archive)
    oci = request.getfixturevalue("oci_runtime") if "oci_runtime" in request.fixturenames else None
    yield E2E(containerd, ns, oci=oci)
    containerd.cleanup_namespace(ns)


@pytest.fixture(params=VERSION_IDS)
def own_containerd(request, busybox_image: Path):
    """A PrivateContainerd for this test alone (per version), with a namespace `.ns` holding
    the image: for tests that restart or reconfigure containerd. Fails on leftovers."""
    c = PrivateContainerd(installed_target(request.param))
    c.image_archive = busybox_image
    try:
        c.start()
        c.ns = c.new_namespace(_slug(request.node.originalname, 24), image=busybox_image)
        yield c
    finally:
        log_tail = c.log_tail(40)
        leftovers = c.close()
        assert not leftovers, f"left behind: {leftovers}\n{log_tail}"
