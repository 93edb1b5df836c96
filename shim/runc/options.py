"""Runtime options: what containerd.runc.v1.Options asks of the shim, and where they are kept.

Create writes them into the bundle (options.json, runtime) so that `delete` can clean up
with the same runtime binary and root when the daemon is gone. No asyncio, no protobuf at
import time: `delete` imports this.
"""

from __future__ import annotations

import os

DEFAULT_RUNC_ROOT = "/run/containerd/runc"


#: The subset of containerd.runc.v1.Options the shim acts on (names as in the proto), with
#: their defaults.
FIELDS: dict[str, bool | int | str] = {
    "no_pivot_root": False,
    "no_new_keyring": False,
    "shim_cgroup": "",
    "io_uid": 0,
    "io_gid": 0,
    "binary_name": "",
    "root": "",
    "systemd_cgroup": False,
    "criu_image_path": "",
    "criu_work_path": "",
    # pyshim's own (TOML only): a custom handler (shim.handler) and its settings.
    "handler": "",
    "handler_options": {},
}

#: Fields that containerd.runc.v1.Options has (the rest only come from the TOML table).
PROTO_FIELDS = tuple(FIELDS)[:10]


class RuntimeOptions:
    """Runtime options of a container. A plain class: `delete` imports this, and importing
    dataclasses would cost that command ~5 ms on every container's teardown."""

    __slots__ = tuple(FIELDS)
    no_pivot_root: bool
    no_new_keyring: bool
    shim_cgroup: str
    io_uid: int
    io_gid: int
    binary_name: str
    root: str
    systemd_cgroup: bool
    criu_image_path: str
    criu_work_path: str
    handler: str
    handler_options: dict

    def __init__(self, **values) -> None:
        for name, default in FIELDS.items():
            value = values.pop(name, default)
            setattr(self, name, dict(value) if isinstance(default, dict) else value)
        if values:
            raise TypeError(f"unknown runtime options: {', '.join(values)}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuntimeOptions) and all(getattr(self, n) == getattr(other, n) for n in FIELDS)

    def __repr__(self) -> str:
        return "RuntimeOptions(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in FIELDS) + ")"

    @classmethod
    def from_any(cls, any_message) -> RuntimeOptions:
        """Decode CreateTaskRequest.options: runc Options, runtimeoptions.v1 or nothing.

        containerd sends runc Options for runtime_type io.containerd.runc.v2 and, for any
        other runtime_type (ours), CRI and `ctr --runtime-config-path` send
        runtimeoptions.v1.Options: a TOML options table, inline (1.7+) or as a file path.
        Raises ValueError with a message for the user when the options cannot be read.
        """
        if any_message is None or not any_message.type_url:
            return cls()
        type_url = any_message.type_url.rsplit("/", 1)[-1]
        if type_url == "containerd.runc.v1.Options":
            from shim.api.containerd.runc.v1 import Options

            options = Options.parse(any_message.value)
            return cls(**{name: getattr(options, name) for name in PROTO_FIELDS})
        if type_url == "runtimeoptions.v1.Options":
            from shim.api.runtimeoptions.v1 import Options as ConfigOptions

            config = ConfigOptions.parse(any_message.value)
            if config.config_path:
                try:
                    with open(config.config_path, "rb") as f:
                        return cls.from_toml(f.read(), config.config_path)
                except OSError as exc:
                    raise ValueError(f"runtime options file {config.config_path}: {exc.strerror}") from None
            return cls.from_toml(config.config_body, "runtime options")
        # Unknown option types are not an error: run with the defaults.
        return cls()

    @classmethod
    def from_toml(cls, data: bytes, source: str) -> RuntimeOptions:
        """A runc options table as CRI writes it (BinaryName = "crun", SystemdCgroup = true, ...)."""
        import tomllib

        try:
            table = tomllib.loads(data.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"{source}: not valid TOML: {exc}") from None
        by_key = {name.replace("_", ""): name for name in FIELDS}
        by_key["handleroptions"] = "handler_options"
        values = {}
        for key, value in table.items():
            name = by_key.get(key.lower().replace("_", ""))
            if name is None:
                continue  # options we do not act on (CriuPath, TaskAPIAddress, ...)
            expected = type(FIELDS[name])
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"{source}: {key} must be a {expected.__name__}, not {value!r}")
            values[name] = value
        return cls(**values)

    @property
    def runtime_binary(self) -> str:
        return self.binary_name or "runc"

    def runtime_root(self, namespace: str) -> str:
        return os.path.join(self.root or DEFAULT_RUNC_ROOT, namespace)

    def write(self, bundle: str) -> None:
        """options.json and runtime, read back by `delete` when the daemon is gone."""
        data = {k: v for k, v in ((n, getattr(self, n)) for n in FIELDS) if v}
        import json  # the daemon's; `delete` only reads

        write_atomic(os.path.join(bundle, "options.json"), json.dumps(data))
        write_atomic(os.path.join(bundle, "runtime"), self.binary_name)

    @classmethod
    def read(cls, bundle: str) -> RuntimeOptions:
        from shim.framework.lightjson import loads

        try:
            with open(os.path.join(bundle, "options.json")) as f:
                data = loads(f.read())  # `delete` runs this: lightjson, not json (~5 ms)
        except (OSError, ValueError):
            return cls()
        return cls(**{k: v for k, v in data.items() if k in FIELDS})


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
