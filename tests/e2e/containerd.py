"""Private containerd instances and a locally built busybox image, for e2e tests and hack/demo.

No mocks: `PrivateContainerd` runs a real containerd (1.6 from Debian bookworm, 1.7 and 2.1
unpacked by hack/lib.sh under $PYSHIM_DEPS) with its own root, state, sockets and config in a
temp dir, so it never touches the machine's own containerd (if any) or other private ones.

    with PrivateContainerd("1.7") as c:          # starts it, waits until `ctr version` answers
        ns = c.new_namespace()                   # unique namespace with the test image imported
        r = c.ctr("run", "--rm", "--runtime", "io.containerd.pyshim.v2", IMAGE_REF, "id1",
                  "echo", "hi", namespace=ns)
        assert r.returncode == 0 and r.stdout == "hi\\n"
    # on exit: tasks, shims and container processes it started are killed, its mounts unmounted,
    # its dirs (and its shims' sockets under /run/containerd/s) removed

Also runnable as a script (used by hack/demo):

    python tests/e2e/containerd.py run [--version 2.1] [--runtime RT] -- CMD...
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPS = Path(os.environ.get("PYSHIM_DEPS", "/opt/pyshim-deps"))

PYSHIM_RUNTIME = "io.containerd.pyshim.v2"
RUNC_RUNTIME = "io.containerd.runc.v2"
IMAGE_REF = "docker.io/pyshim/busybox:e2e"

# Where shims put their sockets: a constant in every containerd version (not the state dir).
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# The runc shim's default runc --root: /run/containerd/runc/<namespace>/<id>.
RUNC_ROOT = Path("/run/containerd/runc")
CGROUP_V1_ROOT = Path("/sys/fs/cgroup")

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class Target:
    """One containerd version to test against, and the runc it is paired with."""

    id: str  # "1.6", "1.7", "2.1"
    bin_dir: Path  # holds containerd, ctr, containerd-shim-runc-v2
    runc: Path
    config_version: int  # 2 for containerd 1.x, 3 for 2.x
    source: str  # where it came from, for reports

    def package_info(self) -> dict[str, str]:
        """What hack/lib.sh recorded for a private build (package, version, suite, wanted);
        empty for the system's containerd."""
        return private_package_info(self.bin_dir / "containerd")

    def missing(self) -> list[str]:
        need = [self.bin_dir / b for b in ("containerd", "ctr", "containerd-shim-runc-v2")]
        return [str(p) for p in [*need, self.runc] if not os.access(p, os.X_OK)]


def private_package_info(binary: Path) -> dict[str, str]:
    """The VERSION file hack/lib.sh wrote beside BINARY's bin/ (package, version, suite, wanted,
    and glibc when it patched one in); empty for a binary of the system's."""
    try:
        text = (Path(binary).parent.parent / "VERSION").read_text()
    except OSError:
        return {}
    return dict(
        (k.strip(), v.strip()) for k, _, v in (ln.partition(":") for ln in text.splitlines())
    )


def upstream_version(debian_version: str) -> str:
    """1:1.7.24~ds1-6+deb13u1 -> 1.7.24 (as hack/lib.sh compares it with the wanted version)."""
    return re.split(r"[~+-]", debian_version.partition(":")[2] or debian_version, maxsplit=1)[0]


def describe_package(info: dict[str, str]) -> str:
    """"containerd 1.7.24~ds1-6+deb13u1" for a private build's VERSION info, with a loud note
    when hack/lib.sh fell back to another version than the pinned one (which Debian dropped);
    "" for the system's."""
    if not info:
        return ""
    text = f"package {info.get('package', '?')} {info.get('version', '?')}"
    wanted = info.get("wanted", "")
    if wanted and upstream_version(info.get("version", "")) != wanted:
        text += f", NOT the wanted {wanted} (hack/lib.sh fell back)"
    return text


TARGETS: dict[str, Target] = {
    "1.6": Target("1.6", Path("/usr/bin"), Path("/usr/sbin/runc"), 2, "Debian bookworm (apt)"),
    "1.7": Target(
        "1.7", DEPS / "containerd-1.7.24/bin", Path("/usr/sbin/runc"), 2, "Debian trixie"
    ),
    "2.1": Target(
        "2.1", DEPS / "containerd-2.1.9/bin", DEPS / "runc-1.3.6/bin/runc", 3, "Debian sid"
    ),
}


class CtrError(AssertionError):
    pass


@dataclasses.dataclass
class CtrResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> CtrResult:
        if self.returncode != 0:
            raise CtrError(f"{' '.join(self.args)} exited {self.returncode}\n{self}")
        return self

    def __str__(self) -> str:
        return f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"


@dataclasses.dataclass(frozen=True)
class CriConfig:
    """Opt-in CRI plugin for a PrivateContainerd: runtime handlers and the sandbox image.

    The handler's `options` table goes to the shim as containerd passes it to a runtime type
    other than runc's: runtimeoptions.v1.Options with the table as TOML (inline in 1.7+, as a
    file named by ConfigPath in 1.6). Root defaults to a runc root inside the instance's dir,
    BinaryName to the instance's runc: nothing of the machine's runc state is touched.
    """

    sandbox_image: str
    handler: str = "pyshim"
    runtime_type: str = PYSHIM_RUNTIME
    options: tuple[tuple[str, object], ...] = ()
    #: More runtime handlers (RuntimeClasses) beside `handler`: name -> options table, e.g.
    #: {"pyshim-policy": {"Handler": "pyshim_policy:Policy", "HandlerOptions": {...}}}. Each
    #: is a pyshim runtime with the same defaults (BinaryName, SystemdCgroup) and its own
    #: runc Root, PrivateContainerd.cri_runc_root_of(name). Nested tables (HandlerOptions)
    #: become TOML tables.
    extra_handlers: dict[str, dict[str, object]] = dataclasses.field(default_factory=dict)
    #: A handler served by containerd's own runc shim (io.containerd.runc.v2) beside pyshim's,
    #: for side-by-side comparisons (hack/bench_lib.py's pods); "" for none. Same BinaryName
    #: and SystemdCgroup, its own runc Root, PrivateContainerd.cri_runc_root_of(name).
    runc_handler: str = ""
    #: SystemdCgroup for every handler (runc's systemd cgroup driver, as on a node whose
    #: kubelet uses the systemd driver; pods then give cgroup parents like "kubepods.slice").
    systemd_cgroup: bool = False
    #: ShimCgroup for every handler: the cgroup each shim moves itself into at start.
    shim_cgroup: str = ""


# ------------------------------------------------------------------------------------------
# The test image
# ------------------------------------------------------------------------------------------


def _goarch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(m, m)


def build_busybox_image(
    cache_dir: Path, ref: str = IMAGE_REF, busybox: Path = Path("/bin/busybox")
) -> Path:
    """Build an OCI image layout tarball with busybox-static in it; return its path.

    Deterministic (fixed mtimes, sorted entries), cached by the busybox binary's hash and ref.
    The index entry carries both `io.containerd.image.name` (the full ref, which ctr import
    uses as the image name in 1.6, 1.7 and 2.x) and `org.opencontainers.image.ref.name`.
    """
    bb = busybox.read_bytes()
    key = hashlib.sha256(bb + ref.encode() + b"v1").hexdigest()[:16]
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"busybox-{key}.oci.tar"
    if out.exists():
        return out

    mtime = 1_700_000_000
    applets = subprocess.run(
        [str(busybox), "--list"], check=True, capture_output=True, text=True
    ).stdout.split()

    layer_raw = io.BytesIO()
    with tarfile.open(fileobj=layer_raw, mode="w", format=tarfile.PAX_FORMAT) as t:

        def add(name: str, *, kind: bytes = tarfile.DIRTYPE, mode: int = 0o755,
                data: bytes = b"", link: str = "") -> None:
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, mtime, 0, 0
            ti.uname = ti.gname = "root"
            if kind == tarfile.SYMTYPE:
                ti.linkname = link
            if kind == tarfile.REGTYPE:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
            else:
                t.addfile(ti)

        for d in ("bin", "dev", "etc", "proc", "root", "sys", "usr", "usr/bin", "var"):
            add(d, mode=0o700 if d == "root" else 0o755)
        add("tmp", mode=0o1777)
        add("var/tmp", mode=0o1777)
        add("bin/busybox", kind=tarfile.REGTYPE, data=bb)
        for a in sorted(set(applets) - {"busybox"}):
            if "/" not in a:
                add(f"bin/{a}", kind=tarfile.SYMTYPE, link="busybox")
        add("usr/bin/env", kind=tarfile.SYMTYPE, link="/bin/busybox")
        files = {
            "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            "etc/group": "root:x:0:\nnogroup:x:65534:\n",
            "etc/hostname": "pyshim\n",
            "etc/hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
        }
        for name, text in files.items():
            add(name, kind=tarfile.REGTYPE, mode=0o644, data=text.encode())
    layer_tar = layer_raw.getvalue()
    layer_gz = gzip.compress(layer_tar, compresslevel=6, mtime=0)

    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def canon(obj: dict) -> bytes:
        return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()

    arch = _goarch()
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Env": [f"PATH={SYSTEM_PATH}"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {
            "type": "layers",
            "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()],
        },
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "pyshim tests/e2e"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(canon(config), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(layer_gz, "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    mdesc = blob(canon(manifest), "application/vnd.oci.image.manifest.v1+json")
    mdesc["platform"] = {"architecture": arch, "os": "linux"}
    mdesc["annotations"] = {
        "io.containerd.image.name": ref,
        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
    }
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [mdesc],
    }

    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:

        def put(name: str, data: bytes | None, mode: int = 0o644) -> None:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode = mtime, mode
            if data is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))

        put("oci-layout", canon({"imageLayoutVersion": "1.0.0"}))
        put("index.json", canon(index))
        put("blobs", None)
        put("blobs/sha256", None)
        for digest in sorted(blobs):
            put(f"blobs/sha256/{digest.split(':', 1)[1]}", blobs[digest])
    tmp.rename(out)
    return out


# ------------------------------------------------------------------------------------------
# Processes and mounts
# ------------------------------------------------------------------------------------------


def _proc_cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _proc_cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _mounts_under(prefix: Path) -> list[str]:
    """Mount points at or under prefix (from /proc/self/mountinfo), deepest first."""
    pre = str(prefix).rstrip("/")
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == pre or mp.startswith(pre + "/"):
            found.append(mp)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


_libc = None


def _umount_detach(path: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    MNT_DETACH = 2
    _libc.umount2(path.encode(), MNT_DETACH)


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
        if alive:
            time.sleep(0.05)
    return alive


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return ""


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


# ------------------------------------------------------------------------------------------
# The private containerd
# ------------------------------------------------------------------------------------------


def _default_shim_bin_dir() -> Path:
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix) / "bin"
    return REPO_ROOT / ".venv" / "bin"


def _pick_snapshotter(where: Path) -> str:
    try:
        have_overlay = "overlay" in Path("/proc/filesystems").read_text()
    except OSError:
        have_overlay = False
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(where)], capture_output=True, text=True
    ).stdout.strip()
    # overlayfs cannot use an overlayfs upper dir (e.g. when /tmp itself is a container's overlay)
    return "overlayfs" if have_overlay and fstype not in ("overlayfs", "overlay") else "native"


class PrivateContainerd:
    """A containerd of one version with its own dirs and sockets under a fresh temp dir.

    Attributes a test uses:
      target         the Target (version id, binaries, runc)
      version        what `containerd --version` says, e.g. "1.7.24~ds1"
      address        gRPC socket path (what `ctr --address` / shims' `-address` get)
      ttrpc_address  containerd's ttrpc socket path (what shims publish events to)
      root, state    containerd's root and state dirs; bundles are in
                     state / "io.containerd.runtime.v2.task" / <namespace> / <id>
      dir            the temp dir holding all of it; log_path: containerd's debug log
      snapshotter    "overlayfs" (or "native" where overlay can't be used)
      path_env       the PATH containerd (and so its shims) run with: private bin dir with
                     containerd/ctr/containerd-shim-runc-v2/runc first, then `extra_path`,
                     then the venv's bin (containerd-shim-pyshim-v2), then the system's
    """

    def __init__(
        self,
        target: str | Target,
        *,
        base_dir: Path | str | None = None,
        _adopt: tuple[Path, str] | None = None,
        runc: Path | str | None = None,
        shim_bin_dir: Path | str | None = None,
        snapshotter: str | None = None,
        enable_cri: bool = False,
        cri: CriConfig | None = None,
        extra_config: str = "",
        log_level: str = "debug",
        containerd_env: dict[str, str] | None = None,
        shim_python_path: list[Path] | tuple[Path, ...] = (),
        extra_path: tuple[Path | str, ...] = (),
    ) -> None:
        self.target = TARGETS[target] if isinstance(target, str) else target
        self.runc = Path(runc) if runc else self.target.runc
        self.shim_bin_dir = Path(shim_bin_dir) if shim_bin_dir else _default_shim_bin_dir()
        base = Path(base_dir or os.environ.get("PYSHIM_E2E_TMP", tempfile.gettempdir()))
        base.mkdir(parents=True, exist_ok=True)
        if _adopt:
            self.dir, self.token = _adopt
        else:
            self.dir = Path(tempfile.mkdtemp(prefix=f"pyshim-e2e-{self.target.id}-", dir=base))
            os.chmod(self.dir, 0o711)
            self.token = uuid.uuid4().hex[:8]
            # lets a later run clean up after one that was killed (see sweep_stale)
            me = os.getpid()
            (self.dir / OWNER_FILE).write_text(f"{me} {_start_time(me)} {self.token}\n")
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.bin_dir = self.dir / "bin"
        self.address = str(self.dir / "containerd.sock")
        self.ttrpc_address = str(self.dir / "containerd.sock.ttrpc")
        self.debug_address = str(self.dir / "debug.sock")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        self.fifo_dir = self.dir / "fifo"
        self.snapshotter = snapshotter or _pick_snapshotter(self.dir)
        self.enable_cri = enable_cri or cri is not None
        self.cri = cri
        # runc's --root for the CRI handler (see CriConfig)
        self.cri_runc_root = self.dir / "runc"
        self.extra_config = extra_config
        self.log_level = log_level
        # extra environment for containerd itself, which its shims inherit (PYSHIM_PROTOCOL=grpc)
        self.containerd_env = dict(containerd_env or {})
        # directories the shims import from after this checkout (custom handler modules)
        self.shim_python_path = [Path(p) for p in shim_python_path]
        # extra_path: more shim binaries (a handler's own, containerd-shim-<name>-v2)
        self.path_env = ":".join([str(self.bin_dir), *map(str, extra_path), str(self.shim_bin_dir), SYSTEM_PATH])
        self.proc: subprocess.Popen | None = None
        self.version = ""
        self.runc_version = ""
        self.namespaces: list[str] = []
        self._seen_tasks: set[tuple[str, str]] = set()
        self._log_file = None

    # -- setup ------------------------------------------------------------------------------

    def _write_config(self) -> None:
        v3 = self.target.config_version >= 3
        cri = (
            ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images",
             "io.containerd.cri.v1.runtime"] if v3 else ["io.containerd.grpc.v1.cri"]
        )
        disabled = [] if self.enable_cri else cri
        # NRI would listen on the machine-wide /var/run/nri/nri.sock; tracing is not needed.
        # (The tasks service needs the 1.x v1 runtime and 2.x transfer needs image verifiers,
        # so those stay, with their dirs moved into ours.)
        disabled += ["io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp",
                     "io.containerd.internal.v1.tracing"]

        def q(s: str) -> str:
            return json.dumps(s)

        lines = [
            f"version = {3 if v3 else 2}",
            f"root = {q(str(self.root))}",
            f"state = {q(str(self.state))}",
            f"temp = {q(str(self.dir / 'tmp'))}",
            f"disabled_plugins = [{', '.join(q(p) for p in disabled)}]",
            "",
            "[grpc]",
            f"  address = {q(self.address)}",
            "",
            "[ttrpc]",
            f"  address = {q(self.ttrpc_address)}",
            "",
            "[debug]",
            f"  address = {q(self.debug_address)}",
            f"  level = {q(self.log_level)}",
            "",
            "[plugins]",
            '  [plugins."io.containerd.internal.v1.opt"]',
            f"    path = {q(str(self.dir / 'opt'))}",
        ]
        if v3:
            lines += [
                '  [plugins."io.containerd.image-verifier.v1.bindir"]',
                f"    bin_dir = {q(str(self.dir / 'opt' / 'image-verifier' / 'bin'))}",
            ]
        else:
            lines += [
                '  [plugins."io.containerd.runtime.v1.linux"]',
                f"    runtime_root = {q(str(self.state / 'runtime-v1-root'))}",
            ]
        if self.cri is not None:
            lines += ["", *self._cri_config_lines(self.cri)]
        if self.extra_config:
            lines += ["", self.extra_config]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _cri_config_lines(self, cri: CriConfig) -> list[str]:
        """The CRI plugin's tables (config version 2 for 1.x, 3 for 2.x), all state in our dir.

        No CNI plugins: the tests' pods use the host network, which needs none; the CNI dirs
        are private and empty so that nothing of the machine's /etc/cni is read. The
        machine lacks CAP_SYS_RESOURCE, hence restrict_oom_score_adj (the CRI would give the
        pause container -998 otherwise, which runc cannot set).
        """
        def q(s: object) -> str:
            return json.dumps(s)

        systemd = cri.systemd_cgroup
        # ShimCgroup, when set, for every handler (runc's options have it under the same name)
        shim_cgroup = {"ShimCgroup": cri.shim_cgroup} if cri.shim_cgroup else {}
        options = {"BinaryName": str(self.runc), "Root": str(self.cri_runc_root),
                   "SystemdCgroup": systemd, **shim_cgroup, **dict(cri.options)}
        cni = self.dir / "cni"
        for d in (cni / "bin", cni / "net.d"):
            d.mkdir(parents=True, exist_ok=True)
        if self.target.config_version >= 3:
            runtime, images = "io.containerd.cri.v1.runtime", "io.containerd.cri.v1.images"
            lines = [
                f'  [plugins."{images}"]',
                f"    snapshotter = {q(self.snapshotter)}",
                f'  [plugins."{images}".pinned_images]',
                f"    sandbox = {q(cri.sandbox_image)}",
                f'  [plugins."{runtime}"]',
            ]
            section = f'plugins."{runtime}"'
        else:
            lines = [
                '  [plugins."io.containerd.grpc.v1.cri"]',
                f"    sandbox_image = {q(cri.sandbox_image)}",
            ]
            section = 'plugins."io.containerd.grpc.v1.cri"'
        lines += [
            "    restrict_oom_score_adj = true",
            "    disable_apparmor = true",
            "    enable_selinux = false",
            "    enable_cdi = false",
            f"  [{section}.cni]",
            f"    bin_dir = {q(str(cni / 'bin'))}",
            f"    conf_dir = {q(str(cni / 'net.d'))}",
            f"  [{section}.containerd]",
            f"    default_runtime_name = {q(cri.handler)}",
        ]
        if self.target.config_version < 3:
            lines.append(f"    snapshotter = {q(self.snapshotter)}")
        lines += self._runtime_lines(section, cri.handler, cri.runtime_type, options)
        for name, table in cri.extra_handlers.items():
            extra = {"BinaryName": str(self.runc), "Root": str(self.cri_runc_root_of(name)),
                     "SystemdCgroup": systemd, **shim_cgroup, **table}
            lines += self._runtime_lines(section, name, PYSHIM_RUNTIME, extra)
        if cri.runc_handler:
            runc = {"BinaryName": str(self.runc), "Root": str(self.cri_runc_root_of(cri.runc_handler)),
                    "SystemdCgroup": systemd, **shim_cgroup}
            lines += self._runtime_lines(section, cri.runc_handler, RUNC_RUNTIME, runc)
        return lines

    def _runtime_lines(self, section: str, name: str, runtime_type: str,
                       options: dict[str, object]) -> list[str]:
        """One runtime handler's table and its options (nested tables as TOML tables)."""
        handler = f"{section}.containerd.runtimes.{_toml_key(name)}"
        lines = [f"  [{handler}]", f"    runtime_type = {json.dumps(runtime_type)}"]
        if self.target.id == "1.6" and runtime_type != RUNC_RUNTIME:
            # 1.6 decodes the table into runtimeoptions.v1.Options itself (runc's own shim
            # gets its runc options, decoded as such): the runc options can only travel in a
            # file.
            lines.append(f"  [{handler}.options]")
            path = self.dir / f"cri-{name}-options.toml"
            path.write_text("".join(f"{line}\n" for line in _toml_table(None, options, indent="")))
            lines.append(f"    ConfigPath = {json.dumps(str(path))}")
        else:
            lines += _toml_table(f"{handler}.options", options, indent="    ", header_indent="  ")
        return lines

    def cri_runc_root_of(self, handler: str) -> Path:
        """runc's --root for a CRI runtime handler: cri_runc_root for CriConfig.handler, a
        sibling per extra handler (so a test can tell whose containers runc holds)."""
        if self.cri is None or handler == self.cri.handler:
            return self.cri_runc_root
        return self.dir / f"runc-{handler}"

    @property
    def cri_runc_roots(self) -> list[Path]:
        """Every CRI handler's runc root (each holds one directory per namespace)."""
        if self.cri is None:
            return [self.cri_runc_root]
        names = [*self.cri.extra_handlers, *([self.cri.runc_handler] if self.cri.runc_handler else [])]
        return [self.cri_runc_root, *(self.cri_runc_root_of(name) for name in names)]

    def start(self, timeout: float = 30.0) -> PrivateContainerd:
        sweep_stale(self.dir.parent)
        missing = self.target.missing()
        if missing:
            raise FileNotFoundError(f"containerd {self.target.id}: missing {missing}; run hack/test")
        for d in (self.root, self.state, self.bin_dir, self.dir / "tmp", self.fifo_dir):
            d.mkdir(parents=True, exist_ok=True)
        for name in ("containerd", "ctr", "containerd-shim-runc-v2"):
            (self.bin_dir / name).symlink_to(self.target.bin_dir / name)
        (self.bin_dir / "runc").symlink_to(self.runc)
        self._write_config()
        self.version = self._tool_version(self.bin_dir / "containerd")
        self.runc_version = self._tool_version(self.runc)

        self._launch(timeout)
        return self

    def _launch(self, timeout: float) -> None:
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.bin_dir / "containerd"), "--config", str(self.config_path),
             "--log-level", self.log_level],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=self.env(self.containerd_env), cwd=self.dir, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"containerd {self.target.id} exited {self.proc.returncode}:\n{self.log_tail()}"
                )
            if os.path.exists(self.address):
                last = self.ctr("version", namespace="default", timeout=10)
                if last.returncode == 0:
                    return
            time.sleep(0.05)
        self.close()
        raise TimeoutError(f"containerd {self.target.id} did not answer: {last}\n{self.log_tail()}")

    def pyshim_daemons(self, binary: str = "containerd-shim-pyshim-v2") -> dict[int, str]:
        """pyshim daemons serving this containerd: pid -> cwd (the bundle they were started in);
        `binary` for those of another shim binary built on pyshim."""
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if os.fsencode(binary) in cmdline and cwd.startswith(str(self.state)):
                found[int(entry)] = cwd
        return found

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Stop containerd alone (shims and containers keep running), as a crash (SIGKILL)
        or an administrator's restart (SIGTERM) would."""
        assert self.proc is not None and self.proc.poll() is None, "containerd is not running"
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def restart_daemon(self, timeout: float = 30.0) -> int:
        """Start containerd again on the same root, state and sockets after `stop_daemon`;
        returns the offset in log_path where the new instance's log starts."""
        assert self.proc is None or self.proc.poll() is not None, "containerd is still running"
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._launch(timeout)
        return offset

    @staticmethod
    def _tool_version(path: Path) -> str:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
        # "containerd github.com/containerd/containerd 1.7.24~ds1 ..." / "runc version 1.3.6+ds1"
        words = out.split()
        for w in words:
            if re.match(r"v?\d+\.\d+\.\d+", w):
                return w.lstrip("v")
        return out.strip()

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTAINERD_")}
        env["PATH"] = self.path_env
        env["CONTAINERD_SNAPSHOTTER"] = self.snapshotter
        # Each private containerd's shims get their own zygote, which exits by itself once
        # close() has removed this directory (it checks that its socket is still its own).
        env.setdefault("PYSHIM_ZYGOTE_DIR", str(self.dir / "zygote"))
        # The shim on PATH is the venv's console script, which imports `shim` from wherever
        # the venv's project was installed (editable) from: another checkout, for a worktree
        # sharing a venv. PYTHONPATH puts the checkout under test first; containerd passes
        # its environment to `start`, and the zygote and daemons keep it (the zygote is keyed
        # by the PYTHON* variables, so a different path gets its own zygote).
        inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        paths = [str(REPO_ROOT), *map(str, self.shim_python_path), *inherited]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if extra:
            env.update(extra)
        return env

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- use --------------------------------------------------------------------------------

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        timeout: float = 60.0,
        check: bool = False,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> CtrResult:
        """Run this version's ctr against this containerd: `ctr --address A --namespace N ARGS`.

        namespace defaults to the first namespace made with new_namespace().  On timeout the
        ctr process is killed and CtrError raised with its output so far.
        """
        ns = namespace or (self.namespaces[0] if self.namespaces else "default")
        cmd = [str(self.bin_dir / "ctr"), "--address", self.address, "--namespace", ns, *args]
        try:
            p = subprocess.run(
                cmd, input=input, stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True, text=True, timeout=timeout, env=self.env(env),
                cwd=self.dir,
            )
        except subprocess.TimeoutExpired as e:
            def s(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            raise CtrError(
                f"timed out after {timeout}s: {' '.join(cmd)}\n--- stdout ---\n{s(e.stdout)}"
                f"--- stderr ---\n{s(e.stderr)}"
            ) from None
        r = CtrResult(cmd, p.returncode, p.stdout, p.stderr)
        return r.check() if check else r

    def new_namespace(self, prefix: str = "t", *, image: Path | None = None) -> str:
        """Create a unique namespace (remembered for cleanup); import `image` into it if given."""
        ns = f"pyshim-{self.token}-{prefix}-{uuid.uuid4().hex[:6]}"
        ns = re.sub(r"[^a-zA-Z0-9]+", "-", ns)[:76].strip("-")
        self.namespaces.append(ns)
        self.ctr("namespaces", "create", ns, namespace="default", check=True)
        if image is not None:
            self.import_image(image, ns)
        return ns

    def import_image(self, archive: Path, namespace: str) -> None:
        r = self.ctr("images", "import", "--no-unpack", str(archive), namespace=namespace,
                     timeout=120, check=True)
        del r
        # unpack separately: `import` without --no-unpack does not choose our snapshotter in
        # every version the same way
        self.ctr("images", "unpack", "--snapshotter", self.snapshotter, IMAGE_REF,
                 namespace=namespace, timeout=120)
        ls = self.ctr("images", "ls", "-q", namespace=namespace, check=True)
        if IMAGE_REF not in ls.stdout.split():
            raise CtrError(f"image {IMAGE_REF} not in namespace {namespace} after import:\n{ls}")

    def bundle_dir(self, namespace: str, id: str) -> Path:
        return self.state / "io.containerd.runtime.v2.task" / namespace / id

    def shim_socket_address(self, namespace: str, id: str, debug: bool = False) -> str:
        """The ttrpc socket a shim for (namespace, id) listens on, as containerd computes it."""
        path = os.path.join(self.address, namespace, id)
        if debug:
            path = os.path.join(path, "debug")
        return f"unix://{SHIM_SOCKET_DIR}/{hashlib.sha256(path.encode()).hexdigest()}"

    # -- teardown ---------------------------------------------------------------------------

    def _known_tasks(self) -> set[tuple[str, str]]:
        tasks = set(self._seen_tasks)
        v2 = self.state / "io.containerd.runtime.v2.task"
        if v2.is_dir():
            for nsdir in v2.iterdir():
                if nsdir.is_dir():
                    tasks |= {(nsdir.name, b.name) for b in nsdir.iterdir()}
        for pid, cmd in self._our_processes():
            ns = _flag(cmd, "-namespace")
            id_ = _flag(cmd, "-id")
            if ns and id_:
                tasks.add((ns, id_))
        self._seen_tasks = tasks
        return tasks

    def note_task(self, namespace: str, id: str) -> None:
        """Remember a (namespace, id) so close() removes its shim's socket even if containerd
        never got to know the shim (e.g. a shim that failed half-way through `start`)."""
        self._seen_tasks.add((namespace, id))

    def _our_shim_sockets(self) -> set[str]:
        """Shim sockets (under /run/containerd/s) of our tasks: computed from the (namespace, id)
        pairs seen, plus every such address our containerd logged (it logs each shim it
        connects to)."""
        socks = set()
        for ns, id_ in self._seen_tasks:
            for debug in (False, True):
                socks.add(self.shim_socket_address(ns, id_, debug).removeprefix("unix://"))
        try:
            log = self.log_path.read_text(errors="replace")
        except OSError:
            log = ""
        pat = re.escape(str(SHIM_SOCKET_DIR)) + r"/[0-9a-f]{64}"
        socks |= set(re.findall(pat, log))
        return socks

    def _our_processes(self) -> list[tuple[int, list[str]]]:
        """Processes this instance started: containerd itself, its shims (their cmdline names our
        socket, their cwd is a bundle under our state dir) and anything else run from our dir."""
        me = os.getpid()
        ours = []
        d = str(self.dir)
        for pid in _all_pids():
            if pid == me:
                continue
            cmd = _proc_cmdline(pid)
            if not cmd:
                continue
            joined = "\0".join(cmd)
            cwd = _proc_cwd(pid)
            if self.address in joined or d + "/" in joined or cwd == d or cwd.startswith(d + "/"):
                ours.append((pid, cmd))
        return ours

    def _own_namespaces(self) -> list[str]:
        """The namespaces this instance made (named with its token). Others it may list, such
        as the CRI's k8s.io, share machine-wide runc roots and cgroup names: not ours to clean."""
        return [ns for ns in self.namespaces if ns.startswith(f"pyshim-{self.token}-")]

    def _our_cgroups(self) -> list[Path]:
        found = []
        if not CGROUP_V1_ROOT.is_dir():
            return found
        for ctrl in CGROUP_V1_ROOT.iterdir():
            for ns in self._own_namespaces():
                if (ctrl / ns).is_dir():
                    found.append(ctrl / ns)
        return found

    def _kill_cgroups(self) -> None:
        for top in self._our_cgroups():
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for cg in [*dirs, top]:
                for name in ("cgroup.procs", "tasks"):
                    try:
                        for pid in (cg / name).read_text().split():
                            _kill(int(pid))
                    except OSError:
                        pass
        for top in self._our_cgroups():
            dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
            for cg in [*dirs, top]:
                for _ in range(20):
                    try:
                        cg.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.05)

    def cleanup_namespace(self, namespace: str, timeout: float = 20.0) -> list[str]:
        """Kill and delete every task and container in a namespace; returns what it found."""
        found = []
        tasks = self.ctr("tasks", "ls", "-q", namespace=namespace, timeout=timeout)
        for tid in tasks.stdout.split():
            found.append(f"task {namespace}/{tid}")
            self._seen_tasks.add((namespace, tid))
            self.ctr("tasks", "kill", "-a", "-s", "SIGKILL", tid, namespace=namespace,
                     timeout=timeout)
            self.ctr("tasks", "delete", "-f", tid, namespace=namespace, timeout=timeout)
        ctrs = self.ctr("containers", "ls", "-q", namespace=namespace, timeout=timeout)
        for cid in ctrs.stdout.split():
            found.append(f"container {namespace}/{cid}")
            self._seen_tasks.add((namespace, cid))
            self.ctr("containers", "delete", cid, namespace=namespace, timeout=timeout)
        return found

    def close(self) -> list[str]:
        """Stop everything this instance started and remove its dirs; return leftovers found
        afterwards (processes, mounts, files) -- an empty list when all is clean."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                # a timeout here (a hung shim or containerd) skips straight to killing
                ns_ls = self.ctr("namespaces", "ls", "-q", namespace="default", timeout=5)
                for ns in ns_ls.stdout.split():
                    if ns not in self.namespaces and ns != "default":
                        self.namespaces.append(ns)
                for ns in [*self.namespaces, "default"]:
                    self.cleanup_namespace(ns, timeout=5)
            except CtrError:
                pass
        self._known_tasks()

        # runc containers left in our namespaces (their shims may be gone already)
        own = self._own_namespaces()
        roots = [RUNC_ROOT / ns for ns in own]
        for cri_root in self.cri_runc_roots:
            if cri_root.is_dir():
                roots += [d for d in cri_root.iterdir() if d.is_dir()]
        for rroot in roots:
            if rroot.is_dir():
                for c in rroot.iterdir():
                    subprocess.run([str(self.runc), "--root", str(rroot), "delete", "--force",
                                    c.name], capture_output=True, timeout=20)
        # shims, then containerd
        pids = [p for p, _ in self._our_processes() if not self.proc or p != self.proc.pid]
        for p in pids:
            _kill(p)
        _wait_gone(pids, 5)
        self._kill_cgroups()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        self._known_tasks()
        pids = [p for p, _ in self._our_processes()]
        for p in pids:
            _kill(p)
        _wait_gone(pids, 5)
        self._kill_cgroups()

        for _ in range(3):
            mps = _mounts_under(self.dir)
            if not mps:
                break
            for mp in mps:
                _umount_detach(mp)

        for sock in self._our_shim_sockets():
            try:
                os.unlink(sock)
            except OSError:
                pass
        for ns in own:
            shutil.rmtree(RUNC_ROOT / ns, ignore_errors=True)

        leftovers = self.leftovers()
        if not any(x.startswith("mount") for x in leftovers):
            shutil.rmtree(self.dir, ignore_errors=True)
            if self.dir.exists():
                leftovers.append(f"dir {self.dir} could not be removed")
        return leftovers

    def leftovers(self) -> list[str]:
        out = [f"process {p}: {' '.join(c)}" for p, c in self._our_processes()]
        out += [f"mount {m}" for m in _mounts_under(self.dir)]
        out += [f"cgroup {c}" for c in self._our_cgroups()]
        out += [f"shim socket {s}" for s in self._our_shim_sockets() if os.path.exists(s)]
        out += [f"runc state {RUNC_ROOT / ns}" for ns in self._own_namespaces()
                if (RUNC_ROOT / ns).exists()]
        return out

    def __enter__(self) -> PrivateContainerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PrivateContainerd {self.target.id} ({self.version}) at {self.dir}>"


OWNER_FILE = "owner"


def sweep_stale(base: Path) -> list[str]:
    """Clean up after private containerds whose owning process died without cleaning up (a
    killed pytest): only dirs named pyshim-e2e-* made by this module, whose owner file names a
    process that no longer exists.  Returns what it could not clean."""
    left: list[str] = []
    for d in sorted(Path(base).glob("pyshim-e2e-*")):
        try:
            pid, start, token = (d / OWNER_FILE).read_text().split()[:3]
        except (OSError, ValueError):
            continue  # not ours, or still being set up
        if _start_time(int(pid)) == start:
            continue  # its owner is alive
        vid = d.name.split("-")[2]
        target = TARGETS.get(vid, TARGETS["1.6"])
        c = PrivateContainerd(target, _adopt=(d, token))
        prefix = f"pyshim-{token}-"
        found = set()
        for where in (RUNC_ROOT, c.state / "io.containerd.runtime.v2.task",
                      *(CGROUP_V1_ROOT.iterdir() if CGROUP_V1_ROOT.is_dir() else [])):
            try:
                found |= {n for n in os.listdir(where) if n.startswith(prefix)}
            except OSError:
                pass
        c.namespaces = sorted(found)
        print(f"pyshim e2e: cleaning up stale {d} (owner pid {pid} is gone)", file=sys.stderr)
        left += c.close()
    return left


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: object) -> str:
    """A TOML value: JSON's strings, numbers, booleans and arrays are TOML's too; a table
    inside an array is written inline."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _toml_table(header: str | None, table: dict[str, object], *, indent: str = "    ",
                header_indent: str = "  ") -> list[str]:
    """`[header]` (none for a document's top level), its plain keys, then each nested table as
    `[header.key]`: TOML wants a table's own keys before its sub-tables."""
    lines = [f"{header_indent}[{header}]"] if header is not None else []
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines += [f"{indent}{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items() if k not in nested]
    for key, sub in nested.items():
        name = f"{header}.{_toml_key(key)}" if header is not None else _toml_key(key)
        lines += _toml_table(name, sub, indent=indent, header_indent=header_indent)
    return lines


def _flag(cmd: list[str], name: str) -> str | None:
    for i, a in enumerate(cmd):
        if a in (name, "-" + name) and i + 1 < len(cmd):
            return cmd[i + 1]
        if a.startswith(name + "=") or a.startswith("-" + name + "="):
            return a.split("=", 1)[1]
    return None


def image_cache_dir() -> Path:
    return Path(os.environ.get("PYSHIM_E2E_CACHE", REPO_ROOT / ".cache" / "e2e"))


# ------------------------------------------------------------------------------------------
# Script entry point (hack/demo)
# ------------------------------------------------------------------------------------------


# What a shim says when containerd runs `start` on it and it has no lifecycle yet.
UNIMPLEMENTED_MARKERS = re.compile(
    r"not implemented|only -v is implemented|No module named '?shim\.|unknown action",
    re.IGNORECASE,
)
EXIT_UNIMPLEMENTED = 3


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="containerd.py", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser(
        "run",
        help="run one container on a private containerd",
        description=f"Exits {EXIT_UNIMPLEMENTED} when the shim says it does not implement "
        "`start` yet.",
    )
    run.add_argument("--version", default="2.1", choices=sorted(TARGETS))
    run.add_argument("--runtime", default=PYSHIM_RUNTIME)
    run.add_argument("--id", default="demo")
    run.add_argument("--timeout", type=float, default=60)
    run.add_argument("command", nargs="+")
    a = ap.parse_args(argv)

    image = build_busybox_image(image_cache_dir())
    c = PrivateContainerd(a.version)
    rc = 1
    try:
        c.start()
        print(f"containerd {c.version} (runc {c.runc_version}), private, at {c.address}; "
              f"snapshotter {c.snapshotter}", file=sys.stderr)
        ns = c.new_namespace("demo", image=image)
        c.note_task(ns, a.id)
        cmd = ["run", "--rm", "--runtime", a.runtime, IMAGE_REF, a.id, *a.command]
        print(f"$ ctr --namespace {ns} {' '.join(cmd)}", file=sys.stderr, flush=True)
        r = c.ctr(*cmd, namespace=ns, timeout=a.timeout)
        sys.stdout.write(r.stdout)
        sys.stdout.flush()
        sys.stderr.write(r.stderr)
        rc = r.returncode
        if rc != 0:
            if UNIMPLEMENTED_MARKERS.search(r.stderr):
                rc = EXIT_UNIMPLEMENTED
            else:
                print(f"ctr exited {rc}; containerd log tail:\n{c.log_tail(30)}", file=sys.stderr)
    finally:
        left = c.close()
        if left:
            print("leftovers after cleanup:\n  " + "\n  ".join(left), file=sys.stderr)
            rc = rc or 1
    return rc


if __name__ == "__main__":
    sys.exit(_main())
