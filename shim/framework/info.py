"""`containerd-shim-pyshim-v2 -info`: the RuntimeInfo containerd 2.x asks a runtime for.

containerd writes the handler's runtime options (a protobuf google.protobuf.Any, possibly
empty) to our stdin and reads a protobuf containerd.types.RuntimeInfo from stdout: our name
and version, the options echoed back, and the OCI runtime's features document (`runc
features`, JSON in an Any). CRI uses the features to decide e.g. whether idmapped mounts can
be asked for; a runtime without a `features` command (older runc, youki) just gets no
features, as with the Go shim.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from shim.api.containerd.types import RuntimeInfo, RuntimeVersion
from shim.api.google.protobuf import Any

FEATURES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
#: `runc features` answers at once; a runtime that hangs must not hang containerd's caller.
FEATURES_TIMEOUT = 10.0


def runtime_features(binary: str) -> bytes | None:
    """`<binary> features` as compact JSON, or None when the runtime has no such command."""
    path = shutil.which(binary)
    if path is None:
        return None
    try:
        proc = subprocess.run([path, "features"], capture_output=True, timeout=FEATURES_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        document = json.loads(proc.stdout)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    return json.dumps(document, separators=(",", ":")).encode()


def runtime_info(options_data: bytes) -> RuntimeInfo:
    """RuntimeInfo for the options containerd sent; ValueError when they cannot be read."""
    from shim import __version__
    from shim.framework.app import current, identity

    options = Any.parse(options_data) if options_data else None
    info = RuntimeInfo(name=identity().runtime_type, version=RuntimeVersion(version=__version__))
    if options is not None and options.type_url:
        info.options = options
    features = current().features(options)
    if features is not None:
        info.features = Any(type_url=FEATURES_TYPE_URL, value=features)
    return info


def main() -> int:
    data = sys.stdin.buffer.read() if sys.stdin is not None else b""
    try:
        info = runtime_info(data)
    except ValueError as exc:
        from shim.framework.app import identity

        print(f"{identity().binary_name} -info: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(bytes(info))
    sys.stdout.flush()
    return 0
