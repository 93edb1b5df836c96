"""The example handlers (examples/policy, inject, audit, crun) behind containerd's CRI plugin,
each as its own RuntimeClass beside the plain `pyshim` one in the same containerd:

  pyshim                 no handler: runs whatever it is given
  pyshim-policy          pyshim_policy:Policy; host network (and so UTS) allowed, because the
                         tests' pods run on the host network (no CNI plugin installed here),
                         host paths only under <dir>/data
  pyshim-policy-strict   pyshim_policy:Policy with every host namespace refused
  pyshim-inject          pyshim_inject:Inject: an env var, a CA file, an annotation
  pyshim-audit           pyshim_audit:Audit, writing <dir>/audit.jsonl
  pyshim-crun            pyshim_crun:UseCrun: the sandbox and containers run by crun

One containerd per version serves all of them (a containerd with the CRI plugin takes a
while to start, on a 2-core machine running other tests).

The shims import the examples from the private containerd's environment (PYTHONPATH, which
containerd passes to `start`; the zygote and the daemons it forks keep it: see
PrivateContainerd.env). A refused container must leave nothing behind, and the same
container must run under plain `pyshim`: so it is the handler that refuses.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from conftest import VERSION_IDS, installed_target
from containerd import REPO_ROOT, CriConfig, PrivateContainerd, _mounts_under
from cri_client import CriClient
from pause_image import PAUSE_IMAGE_REF
from shim.api.runtime import v1 as cri_v1
from test_cri import (
    CRI_NAMESPACE,
    HANDLER,
    _container_config,
    _pod,
    _pod_config,
    _run_pod,
    _start_container,
    _status,
    _wait_exited,
    _wait_gone,
    running_cri,
)
from test_example_audit import read_lines
from test_example_crun import CRUN as CRUN_BINARY
from test_example_crun import NEEDS_OCI_VERSION, crun_wrapper, listed_ids
from waiting import async_wait_until

POLICY, STRICT, INJECT = "pyshim-policy", "pyshim-policy-strict", "pyshim-inject"
AUDIT, CRUN = "pyshim-audit", "pyshim-crun"
EXAMPLES = REPO_ROOT / "examples"
CA_DESTINATION = "/etc/ssl/certs/extra-ca.pem"
CA_TEXT = "-----BEGIN CERTIFICATE-----\npyshim e2e\n-----END CERTIFICATE-----\n"


@pytest.fixture(scope="module", params=VERSION_IDS)
def cri(request: pytest.FixtureRequest, busybox_image: Path):
    """A PrivateContainerd with the CRI plugin and the runtime handlers above."""
    target = installed_target(request.param)
    c = PrivateContainerd(target, cri=CriConfig(sandbox_image=PAUSE_IMAGE_REF),
                          shim_python_path=[EXAMPLES / name for name in ("policy", "inject", "audit", "crun")])
    c.data_dir = c.dir / "data"
    (c.data_dir / "app").mkdir(parents=True)
    ca = c.dir / "extra-ca.pem"
    ca.write_text(CA_TEXT)
    # containerd's root is ours, not /var/lib/containerd: the policy must know where CRI
    # keeps a pod's hosts/resolv.conf to recognise those mounts as CRI's own
    policy = {"allowed_host_paths": [str(c.data_dir)], "containerd_root": str(c.root)}
    c.cri = dataclasses.replace(c.cri, extra_handlers={
        POLICY: {"Handler": "pyshim_policy:Policy",
                 "HandlerOptions": {**policy, "allowed_host_namespaces": ["network", "uts"]}},
        STRICT: {"Handler": "pyshim_policy:Policy", "HandlerOptions": policy},
        INJECT: {"Handler": "pyshim_inject:Inject", "HandlerOptions": {
            "env": {"PYSHIM_INJECTED": "from the node", "HTTPS_PROXY": "http://node-proxy:3128"},
            "mounts": {CA_DESTINATION: str(ca)},
            "annotations": {"example.com/injected-by": "pyshim-inject"}}},
        AUDIT: {"Handler": "pyshim_audit:Audit", "HandlerOptions": {"path": str(_audit_path(c))}},
        CRUN: {"Handler": "pyshim_crun:UseCrun", "HandlerOptions": _crun_options(c)},
    })
    with running_cri(c, busybox_image):
        yield c


def _crun_options(c: PrivateContainerd) -> dict[str, str]:
    """pyshim-crun's HandlerOptions: the defaults, except what crun 1.8 on this machine needs
    (examples/crun/README.md): `binary` a wrapper that hides the hybrid cgroup2 mount from
    crun (and records crun's calls in <dir>/crun-calls), and the ociVersion crun 1.8 takes
    for containerd 1.7 and 2.1's specs."""
    wrapper = c.dir / "crun-bin" / "crun"
    wrapper.parent.mkdir()
    crun_wrapper(wrapper, c.dir / "crun-calls")
    options = {"binary": str(wrapper)}
    if c.target.id in NEEDS_OCI_VERSION:
        options["oci_version"] = "1.1.0"
    return options


def _refused_id(error: GRPCError) -> str:
    """The id of the refused container, from the policy's message."""
    match = re.search(r"pyshim policy: container ([0-9a-f]{64}):", error.message or "")
    assert match, f"not the policy's refusal: {error.status} {error.message!r}"
    return match.group(1)


def _runc_ids(c: PrivateContainerd, handler: str) -> list[str]:
    root = c.cri_runc_root_of(handler) / CRI_NAMESPACE
    if not root.exists():
        return []  # runc never ran a container there (runc 1.3's `list` fails on a missing root)
    out = subprocess.run([str(c.runc), "--root", str(root), "list", "-q"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _processes_naming(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if text in cmdline or text in cwd:
                found.append(f"{entry}: {cmdline!r} in {cwd}")
    return found


async def _assert_nothing_left(c: PrivateContainerd, handler: str, cid: str) -> None:
    """A refused container has no runc state, mount, cgroup nor process."""
    assert cid not in _runc_ids(c, handler)
    bundle = c.bundle_dir(CRI_NAMESPACE, cid)
    assert _mounts_under(bundle) == []
    cgroups = [p for p in Path("/sys/fs/cgroup").glob(f"*/{c.cgroup_parent}/{cid}")]
    cgroups += [p for p in [Path("/sys/fs/cgroup") / c.cgroup_parent / cid] if p.exists()]
    assert cgroups == []
    # containerd removes the bundle and stops a shim left without tasks after it answers
    for _ in range(100):
        if not bundle.exists() and not _processes_naming(cid):
            break
        await asyncio.sleep(0.1)
    assert not bundle.exists(), sorted(os.listdir(bundle))
    assert _processes_naming(cid) == []


def _privileged_pod(c: PrivateContainerd, name: str) -> tuple[cri_v1.PodSandboxConfig, cri_v1.ContainerConfig]:
    config = _pod_config(c, name)
    config.linux.security_context.privileged = True  # CRI allows privileged containers only then
    container = _container_config("root", "sleep", "600")
    container.linux.security_context = cri_v1.LinuxContainerSecurityContext(privileged=True)
    return config, container


def _host_path_container(source: Path | str) -> cri_v1.ContainerConfig:
    container = _container_config("mounter", "sleep", "600")
    container.mounts = [cri_v1.Mount(container_path="/host", host_path=str(source), readonly=True)]
    return container


async def _exec(client: CriClient, cid: str, *cmd: str) -> cri_v1.ExecSyncResponse:
    return await client.runtime("ExecSync", cri_v1.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=30))


async def _start_refused(client: CriClient, pod: str, config, container) -> GRPCError:
    """CreateContainer only records the container: the shim's Create (and so the handler)
    runs at StartContainer, whose error carries the refusal."""
    created = await client.runtime("CreateContainer", cri_v1.CreateContainerRequest(
        pod_sandbox_id=pod, config=container, sandbox_config=config))
    with pytest.raises(GRPCError) as refused:
        await client.runtime("StartContainer", cri_v1.StartContainerRequest(container_id=created.container_id))
    assert _refused_id(refused.value) == created.container_id
    status = await _status(client, created.container_id)
    assert status.state == cri_v1.ContainerState.CONTAINER_EXITED, status
    await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=created.container_id))
    return refused.value


# -- policy ---------------------------------------------------------------------------------


async def test_policy_runs_a_complying_pod(cri):
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "complies", POLICY) as (pod, config):
            (cri.data_dir / "app" / "hello").write_text("from the allowed host path\n")
            cid = await _start_container(client, pod, config, _host_path_container(cri.data_dir / "app"))
            assert (await _status(client, cid)).state == cri_v1.ContainerState.CONTAINER_RUNNING
            assert cid in _runc_ids(cri, POLICY)
            r = await _exec(client, cid, "cat", "/host/hello")
            assert (r.exit_code, r.stdout) == (0, b"from the allowed host path\n"), r


async def test_policy_refuses_a_privileged_container(cri):
    async with CriClient(cri.address) as client:
        config, container = _privileged_pod(cri, "privileged")
        # The sandbox of a privileged pod is not privileged itself (CRI's pause keeps the
        # default capabilities): the pod starts, its privileged container is refused.
        async with _pod(client, cri, "privileged", POLICY, config) as (pod, config):
            error = await _start_refused(client, pod, config, container)
            assert "privileged containers are not allowed (CAP_SYS_ADMIN in its capabilities)" in error.message
            await _assert_nothing_left(cri, POLICY, _refused_id(error))
        config, container = _privileged_pod(cri, "privileged-plain")
        async with _pod(client, cri, "privileged-plain", HANDLER, config) as (pod, config):
            cid = await _start_container(client, pod, config, container)
            r = await _exec(client, cid, "sh", "-c", "grep CapEff /proc/self/status")
            assert r.exit_code == 0 and r.stdout.split()[1] != b"00000000a80425fb", r


async def test_policy_refuses_a_host_path_outside_the_allow_list(cri):
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "host-etc", POLICY) as (pod, config):
            error = await _start_refused(client, pod, config, _host_path_container("/etc"))
            cid = _refused_id(error)
            assert f"pyshim policy: container {cid}: host path /etc is not in allowed_host_paths" in error.message
            await _assert_nothing_left(cri, POLICY, cid)
            # a symlink inside the allowed dir does not lead out of it (CRI resolves a host
            # path's symlinks itself; the policy does too, for other clients)
            (cri.data_dir / "escape").symlink_to("/etc")
            error = await _start_refused(client, pod, config, _host_path_container(cri.data_dir / "escape"))
            assert "host path /etc is not in allowed_host_paths" in error.message
        async with _pod(client, cri, "host-etc-plain", HANDLER) as (pod, config):
            cid = await _start_container(client, pod, config, _host_path_container("/etc"))
            r = await _exec(client, cid, "cat", "/host/hostname")
            assert r.stdout == Path("/etc/hostname").read_bytes(), r


async def test_policy_refuses_host_namespaces_at_the_sandbox(cri):
    async with CriClient(cri.address) as client:
        daemons = set(cri.pyshim_daemons())
        config = _pod_config(cri, "host-pid")
        config.linux.security_context.namespace_options.pid = cri_v1.NamespaceMode.NODE
        with pytest.raises(GRPCError) as refused:
            await _run_pod(client, config, POLICY)
        sandbox = _refused_id(refused.value)
        assert f"pyshim policy: container {sandbox}: host pid namespace is not in allowed_host_namespaces" \
            in refused.value.message
        await _assert_nothing_left(cri, POLICY, sandbox)
        # The strict policy refuses the host network every pod here uses (and the host UTS
        # namespace CRI gives a pod on the host network).
        with pytest.raises(GRPCError) as refused:
            await _run_pod(client, _pod_config(cri, "host-network"), STRICT)
        sandbox = _refused_id(refused.value)
        assert (f"pyshim policy: container {sandbox}: host network namespace is not in allowed_host_namespaces; "
                "host uts namespace is not in allowed_host_namespaces") in refused.value.message
        await _assert_nothing_left(cri, STRICT, sandbox)
        assert await _wait_gone(list(set(cri.pyshim_daemons()) - daemons)) == []
        # the same pod under plain pyshim: it is the handler that refuses
        async with _pod(client, cri, "host-pid-plain", HANDLER, config) as (pod, config):
            cid = await _start_container(client, pod, config, _container_config("ps", "sleep", "600"))
            r = await _exec(client, cid, "cat", "/proc/1/cmdline")
            assert r.stdout != b"/pause\0", "not the host's pid namespace"


# -- inject ---------------------------------------------------------------------------------


async def test_inject_adds_env_a_read_only_file_and_an_annotation(cri):
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "injected", INJECT) as (pod, config):
            container = _container_config("app", "sh", "-c", "env; exec sleep 600")
            container.envs = [cri_v1.KeyValue(key="HTTPS_PROXY", value="http://own-proxy:8080")]
            cid = await _start_container(client, pod, config, container)
            r = await _exec(client, cid, "env")
            env = dict(line.split("=", 1) for line in r.stdout.decode().splitlines())
            assert env["PYSHIM_INJECTED"] == "from the node"
            assert env["HTTPS_PROXY"] == "http://own-proxy:8080", "the container's own value wins"
            # init got them too (its `env` went to the container's log)
            log = Path(config.log_directory, container.log_path)
            for _ in range(50):
                if "PYSHIM_INJECTED" in log.read_text():
                    break
                await asyncio.sleep(0.1)
            assert "stdout F PYSHIM_INJECTED=from the node" in log.read_text()
            assert "stdout F HTTPS_PROXY=http://own-proxy:8080" in log.read_text()
            r = await _exec(client, cid, "cat", CA_DESTINATION)
            assert (r.exit_code, r.stdout.decode()) == (0, CA_TEXT), r
            r = await _exec(client, cid, "sh", "-c", f"echo evil >> {CA_DESTINATION}")
            assert r.exit_code != 0 and b"Read-only file system" in r.stderr, r
            assert (cri.dir / "extra-ca.pem").read_text() == CA_TEXT
            state = subprocess.run([str(cri.runc), "--root", str(cri.cri_runc_root_of(INJECT) / CRI_NAMESPACE),
                                    "state", cid], capture_output=True, text=True, timeout=20, check=True)
            annotations = json.loads(state.stdout)["annotations"]
            assert annotations["example.com/injected-by"] == "pyshim-inject"
            assert annotations["io.kubernetes.cri.container-type"] == "container"
            # the sandbox is left alone
            sandbox = json.loads((cri.bundle_dir(CRI_NAMESPACE, pod) / "config.json").read_text())
            assert "example.com/injected-by" not in sandbox["annotations"]
        async with _pod(client, cri, "not-injected", HANDLER) as (pod, config):
            cid = await _start_container(client, pod, config, _container_config("app", "sleep", "600"))
            r = await _exec(client, cid, "sh", "-c", f"env; ls {CA_DESTINATION}")
            assert b"PYSHIM_INJECTED" not in r.stdout and r.exit_code != 0, r


# -- audit ----------------------------------------------------------------------------------

AUDIT_EXECS = 20


def _audit_path(c: PrivateContainerd) -> Path:
    return c.dir / "audit.jsonl"


def _lines_written(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _check_audited_container(lines: list[dict], cid: str, cri_fields: dict[str, str], status: int,
                             exec_statuses: list[int]) -> None:
    """One container's (or sandbox's) lines: its init's life in order, ending in `status`;
    one exec per status in exec_statuses (each ran `sh -c "exit <status>"`), each
    `exec` < `exec-started` < `exit` with that status; the CRI fields on every line."""
    mine = [line for line in lines if line["container_id"] == cid]
    assert mine, f"no line for {cid}"
    for line in mine:
        assert line["namespace"] == CRI_NAMESPACE, line
        assert {key: line.get(key) for key in ("pod_name", "pod_namespace", "container_name")} == \
            {"container_name": None, **cri_fields}, line
    init = [line for line in mine if line["exec_id"] == ""]
    assert [line["event"] for line in init] == ["create", "start", "exit", "delete"], init
    create, start, exit_, delete = init
    assert create["pid"] == 0 and start["pid"] > 0, init
    assert exit_["pid"] == delete["pid"] == start["pid"], init
    assert exit_["status"] == delete["status"] == status, init
    assert mine[-1] is delete, "delete is the container's last line"
    positions = {id(line): n for n, line in enumerate(mine)}

    by_exec: dict[str, list[dict]] = {}
    for line in mine:
        if line["exec_id"]:
            by_exec.setdefault(line["exec_id"], []).append(line)
    seen = []
    for these in by_exec.values():
        assert [line["event"] for line in these] == ["exec", "exec-started", "exit"], these
        added, started, ended = these
        assert added["args"][:2] == ["sh", "-c"] and added["pid"] == 0, added
        expected_status = int(added["args"][2].removeprefix("exit "))
        assert ended["status"] == expected_status, these
        assert ended["pid"] == started["pid"] > 0, these
        assert positions[id(start)] < positions[id(added)] and positions[id(ended)] < positions[id(exit_)], \
            "execs run between init's start and exit"
        seen.append(expected_status)
    assert sorted(seen) == sorted(exec_statuses)
    times = [line["time"] for line in mine]
    assert times == sorted(times), "one container's hooks run one at a time, in event order"


async def test_audit_records_a_pod_and_its_execs_and_nothing_of_a_plain_pod(cri):
    audit = _audit_path(cri)
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "audited", AUDIT) as (pod, config):
            names = ["first", "second"]
            cids = [await _start_container(client, pod, config, _container_config(name, "sleep", "600"))
                    for name in names]
            # 20 ExecSyncs at once, spread over both containers (one shim serves the pod), each
            # exiting with its own status so that its lines can be told apart.
            statuses = [101 + i for i in range(AUDIT_EXECS)]
            replies = await asyncio.gather(*(_exec(client, cids[i % 2], "sh", "-c", f"exit {status}")
                                             for i, status in enumerate(statuses)))
            assert [r.exit_code for r in replies] == statuses, replies
            # the same handler's pod beside one of plain pyshim, which has no Audit to write
            async with _pod(client, cri, "unaudited", HANDLER) as (plain_pod, plain_config):
                plain = await _start_container(client, plain_pod, plain_config,
                                               _container_config("plain", "sleep", "600"))
                r = await _exec(client, plain, "sh", "-c", "exit 3")
                assert r.exit_code == 3, r
            await client.runtime("StopContainer", cri_v1.StopContainerRequest(container_id=cids[0], timeout=5))
            assert (await _wait_exited(client, cids[0])).exit_code == 143
            await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=cids[0]))
        # _pod ran StopPodSandbox (which kills the second container) and RemovePodSandbox.

    # The shim runs notification hooks (start, exit, delete) after it has answered, and its
    # daemon exits with the pod: the last lines may come a moment later.
    expected = 4 + 4 * len(cids) + 3 * AUDIT_EXECS
    await async_wait_until(lambda: _lines_written(audit), 30, f"{expected} audit lines",
                           until=lambda n: n >= expected)
    lines = read_lines(audit)
    assert len(lines) == expected, lines
    assert {line["container_id"] for line in lines} == {pod, *cids}, "only the audited pod's lines"
    assert not {plain_pod, plain} & {line["container_id"] for line in lines}
    pod_fields = {"pod_name": config.metadata.name, "pod_namespace": config.metadata.namespace}
    assert pod_fields == {"pod_name": "audited", "pod_namespace": "e2e"}
    # The sandbox: no container name, no exec; StopPodSandbox kills pause with SIGKILL.
    _check_audited_container(lines, pod, pod_fields, 137, [])
    for k, (cid, name) in enumerate(zip(cids, names)):
        execs = [status for i, status in enumerate(statuses) if i % 2 == k]
        # StopContainer's SIGTERM ends the first; StopPodSandbox SIGKILLs the second.
        _check_audited_container(lines, cid, {**pod_fields, "container_name": name}, 143 if k == 0 else 137, execs)


# -- crun -----------------------------------------------------------------------------------


def _crun_state(c: PrivateContainerd) -> Path:
    """Where crun keeps the state of pyshim-crun's containers: runc's Root for that handler,
    which the shim gives crun as it would runc, with containerd's namespace appended."""
    return c.cri_runc_root_of(CRUN) / CRI_NAMESPACE


async def test_crun_runs_a_pod_through_cri(cri):
    state = _crun_state(cri)
    wrapper = cri.dir / "crun-bin" / "crun"
    async with CriClient(cri.address) as client:
        async with _pod(client, cri, "crun", CRUN) as (pod, config):
            cids = [await _start_container(client, pod, config, _container_config(name, "sleep", "600"))
                    for name in ("first", "second")]
            ours = {pod, *cids}
            # crun has them (and nothing else), runc does not know them, and each bundle names
            # crun for a `delete` after a crash.
            assert listed_ids(CRUN_BINARY, str(state)) == ours
            assert listed_ids(str(cri.runc), str(state)) & ours == set()
            for cid in ours:
                assert (cri.bundle_dir(CRI_NAMESPACE, cid) / "runtime").read_text() == str(wrapper)

            # a plain pyshim pod beside it is runc's
            async with _pod(client, cri, "runc", HANDLER) as (plain_pod, plain_config):
                plain = await _start_container(client, plain_pod, plain_config,
                                               _container_config("plain", "sleep", "600"))
                plain_state = str(cri.cri_runc_root_of(HANDLER) / CRI_NAMESPACE)
                assert {plain_pod, plain} <= listed_ids(str(cri.runc), plain_state)
                assert listed_ids(CRUN_BINARY, plain_state) & {plain_pod, plain} == set()

            r = await _exec(client, cids[0], "sh", "-c", "echo out; echo err >&2; exit 7")
            assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7), r

            stats = (await client.runtime("ContainerStats", cri_v1.ContainerStatsRequest(container_id=cids[0]))).stats
            assert stats.attributes.id == cids[0]
            assert stats.cpu.timestamp > 0 and stats.cpu.usage_core_nano_seconds.value > 0, stats
            assert stats.memory.timestamp > 0 and stats.memory.working_set_bytes.value > 0, stats

            await client.runtime("StopContainer", cri_v1.StopContainerRequest(container_id=cids[0], timeout=5))
            status = await _wait_exited(client, cids[0])
            assert (status.exit_code, status.reason) == (143, "Error"), status
            await client.runtime("RemoveContainer", cri_v1.RemoveContainerRequest(container_id=cids[0]))
            assert listed_ids(CRUN_BINARY, str(state)) == {pod, cids[1]}
        listed = await client.runtime("ListContainers", cri_v1.ListContainersRequest())
        assert not {c.id for c in listed.containers} & ours
        with pytest.raises(GRPCError) as gone:
            await client.runtime("PodSandboxStatus", cri_v1.PodSandboxStatusRequest(pod_sandbox_id=pod))
        assert gone.value.status == Status.NOT_FOUND, gone.value
    # StopPodSandbox and RemovePodSandbox (by _pod) deleted the rest with crun: its state is
    # empty (the module's fixture checks for processes, mounts and cgroups left behind).
    assert listed_ids(CRUN_BINARY, str(state)) == set()
    assert sorted(os.listdir(state)) == []
