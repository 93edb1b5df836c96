"""The pod sandbox image for the CRI e2e tests: tests/e2e/pause.c, built static, alone in an
OCI image layout tarball (no registry is reachable, so the CRI plugin cannot pull one).

    archive = build_pause_image(cache_dir)      # compiles with `gcc -static -Os` when needed
    ctr -n k8s.io images import <archive>       # then the CRI plugin knows PAUSE_IMAGE_REF
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from containerd import _goarch

HERE = Path(__file__).resolve().parent
PAUSE_SOURCE = HERE / "pause.c"
PAUSE_IMAGE_REF = "docker.io/pyshim/pause:e2e"
MTIME = 1_700_000_000


def build_pause_binary(cache_dir: Path) -> Path:
    """gcc -static -Os pause.c, cached by the source's hash."""
    source = PAUSE_SOURCE.read_bytes()
    out = cache_dir / f"pause-{hashlib.sha256(source).hexdigest()[:16]}"
    if out.exists():
        return out
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FileNotFoundError("gcc is needed to build the pause image (hack/lib.sh installs it)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    subprocess.run([gcc, "-static", "-Os", "-s", "-Wall", "-o", str(tmp), str(PAUSE_SOURCE)],
                   check=True, capture_output=True, text=True)
    tmp.rename(out)
    return out


def _tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    """A deterministic tar of (name, data or None for a directory, mode)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data, mode in entries:
            ti = tarfile.TarInfo(name)
            ti.mtime, ti.mode, ti.uid, ti.gid = MTIME, mode, 0, 0
            if data is None:
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            else:
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    return raw.getvalue()


def _canon(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_pause_image(cache_dir: Path, ref: str = PAUSE_IMAGE_REF) -> Path:
    """The OCI archive of an image whose entrypoint is /pause; cached by binary and ref."""
    binary = build_pause_binary(cache_dir).read_bytes()
    key = hashlib.sha256(binary + ref.encode()).hexdigest()[:16]
    out = cache_dir / f"pause-{key}.oci.tar"
    if out.exists():
        return out

    layer = _tar([("pause", binary, 0o755)])
    layer_gz = gzip.compress(layer, compresslevel=6, mtime=0)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    arch = _goarch()
    config = {
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": {"Entrypoint": ["/pause"], "WorkingDir": "/", "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "pyshim tests/e2e/pause.c"}],
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(_canon(config), "application/vnd.oci.image.config.v1+json"),
        "layers": [blob(layer_gz, "application/vnd.oci.image.layer.v1.tar+gzip")],
    }
    mdesc = blob(_canon(manifest), "application/vnd.oci.image.manifest.v1+json")
    mdesc["platform"] = {"architecture": arch, "os": "linux"}
    mdesc["annotations"] = {
        "io.containerd.image.name": ref,
        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1],
    }
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [mdesc]}
    entries: list[tuple[str, bytes | None, int]] = [
        ("oci-layout", _canon({"imageLayoutVersion": "1.0.0"}), 0o644),
        ("index.json", _canon(index), 0o644),
        ("blobs", None, 0o755),
        ("blobs/sha256", None, 0o755),
    ]
    entries += [(f"blobs/sha256/{d.split(':', 1)[1]}", blobs[d], 0o644) for d in sorted(blobs)]
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(_tar(entries))
    tmp.rename(out)
    return out
