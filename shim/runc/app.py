"""RuncApp: the runc application on the framework (what io.containerd.pyshim.v2 runs).

Options are containerd.runc.v1.Options or the runtimeoptions TOML table (shim.runc.options);
the backend is runc's CLI, or any runc-compatible binary named by BinaryName (crun).
"""

from __future__ import annotations

import os

from shim.framework.app import App

#: containerd waits 5 s for the whole `delete` command; leave room for unmounting and replying.
RUNTIME_DELETE_TIMEOUT = 3.0


class RuncApp(App):
    """The runc application: runc (or crun) options, backend, checkpointing and cleanup."""

    preload = ("shim.runc.runtime", "shim.runc.options", "shim.runc.app")

    def parse_options(self, any_message):
        """containerd.runc.v1.Options or runtimeoptions.v1.Options (TOML) as RuntimeOptions."""
        from shim.runc.options import RuntimeOptions

        return RuntimeOptions.from_any(any_message)

    def runtime(self, options, *, namespace: str, bundle: str, reaper):
        """A Runc for the options' binary, root (per namespace), cgroup driver and flags."""
        from shim.runc.runtime import Runc

        return Runc(reaper, binary=options.runtime_binary, root=options.runtime_root(namespace),
                    log_path=os.path.join(bundle, "log.json"), systemd_cgroup=options.systemd_cgroup,
                    no_pivot=options.no_pivot_root, no_new_keyring=options.no_new_keyring)

    def runtime_chosen(self, bundle: str, runtime) -> None:
        """Note the binary that runs the container in the bundle's `runtime` file."""
        # `delete` without a daemon runs this binary (crun swapped in by a handler, say)
        binary = getattr(runtime, "binary", "")
        if binary:
            from shim.runc.options import write_atomic

            write_atomic(os.path.join(bundle, "runtime"), binary)

    def process_details(self, exec_id: str):
        """containerd.runc.v1.ProcessDetails naming the exec, as runc-v2 answers Pids."""
        from shim.api.containerd.runc.v1 import ProcessDetails
        from shim.api.google.protobuf import Any

        return Any(type_url="containerd.runc.v1.ProcessDetails", value=bytes(ProcessDetails(exec_id=exec_id)))

    def restore_options(self, container, checkpoint: str, parent_checkpoint: str):
        """CriuOptions for `runc restore` (shim.runc.checkpoint)."""
        from shim.runc.checkpoint import restore_options

        return restore_options(container, checkpoint, parent_checkpoint)

    async def checkpoint(self, container, image_path: str, options_any) -> None:
        """`runc checkpoint` with the decoded CheckpointOptions (shim.runc.checkpoint)."""
        from shim.runc.checkpoint import checkpoint

        await checkpoint(container, image_path, options_any)

    def cleanup(self, namespace: str, container_id: str, bundle: str) -> None:
        """`runc delete --force` when runc still knows the container (the daemon is gone);
        after a normal teardown runc's state is gone and this costs one stat."""
        from shim.runc.options import RuntimeOptions

        options = RuntimeOptions.read(bundle)
        root = options.runtime_root(namespace)
        if not os.path.exists(os.path.join(root, container_id)):
            return
        import subprocess
        import sys

        binary = _read(os.path.join(bundle, "runtime")) or options.runtime_binary
        argv = [binary, "--root", root, "--log", os.path.join(bundle, "log.json"), "--log-format", "json"]
        if options.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv += ["delete", "--force", container_id]
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        try:
            result = subprocess.run(argv, env=env, capture_output=True, timeout=RUNTIME_DELETE_TIMEOUT, check=False)
            if result.returncode != 0 and b"does not exist" not in result.stderr:
                # stderr is logged by containerd as a warning; the cleanup goes on.
                sys.stderr.write(f"{binary} delete --force {container_id}: "
                                 f"{result.stderr.decode(errors='replace').strip()}\n")
        except (OSError, subprocess.TimeoutExpired) as exc:
            sys.stderr.write(f"{binary} delete --force {container_id}: {exc}\n")

    def features(self, options_any) -> bytes | None:
        """`<binary> features` of the binary the options name."""
        from shim.framework.info import runtime_features
        from shim.runc.options import RuntimeOptions

        return runtime_features(RuntimeOptions.from_any(options_any).runtime_binary)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
