"""examples/inject: what is added to a spec and an exec, and what is left alone."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "inject"))

from pyshim_inject import MOUNT_OPTIONS, Inject, InjectSettings, add_annotations, add_env, add_mounts  # noqa: E402

from shim.handler import ContainerInfo, ProcessInfo  # noqa: E402


def test_env_is_added_where_the_container_sets_nothing():
    process = {"env": ["PATH=/bin", "HTTPS_PROXY=http://own:1"]}
    added = add_env(process, {"HTTPS_PROXY": "http://node:3128", "EXTRA": "a=b c"})
    assert added == ["EXTRA"]
    assert process["env"] == ["PATH=/bin", "HTTPS_PROXY=http://own:1", "EXTRA=a=b c"]
    assert add_env({}, {"A": "1"}) == ["A"]


def test_mounts_are_read_only_binds_after_the_others_unless_the_destination_is_taken():
    spec = {"mounts": [{"destination": "/etc/hosts/", "type": "bind", "source": "/x"}]}
    added = add_mounts(spec, {"/etc/hosts": "/etc/hosts", "/etc/ssl/certs/extra-ca.pem": "/ca.pem"})
    assert added == ["/etc/ssl/certs/extra-ca.pem"]
    assert spec["mounts"][-1] == {"destination": "/etc/ssl/certs/extra-ca.pem", "type": "bind",
                                  "source": "/ca.pem", "options": list(MOUNT_OPTIONS)}
    assert "ro" in MOUNT_OPTIONS and "rbind" not in MOUNT_OPTIONS


def test_annotations_never_replace_the_containers_own():
    spec = {"annotations": {"io.kubernetes.cri.container-type": "container"}}
    assert add_annotations(spec, {"io.kubernetes.cri.container-type": "x", "example.com/a": "1"}) == ["example.com/a"]
    assert spec["annotations"] == {"io.kubernetes.cri.container-type": "container", "example.com/a": "1"}


def test_bad_options_say_what_is_wrong():
    for options, message in [({"env": ["A=1"]}, "env must be a table of strings"),
                             ({"env": {"A": 1}}, "env must be a table of strings"),
                             ({"mounts": {"etc/x": "/x"}}, "both must be absolute"),
                             ({"envs": {}}, "unknown HandlerOptions envs"),
                             ({"include_sandbox": "yes"}, "include_sandbox must be a bool")]:
        with pytest.raises(ValueError, match=message):
            InjectSettings.from_options(options)


def _container(tmp_path, kind="container", env=("PATH=/bin",)) -> ContainerInfo:
    spec = {"process": {"args": ["sh"], "env": list(env)},
            "annotations": {"io.kubernetes.cri.container-type": kind}}
    return ContainerInfo(id="c1", namespace="k8s.io", bundle=str(tmp_path), spec=spec)


def test_the_handler_adds_at_create_and_to_execs_but_not_to_the_sandbox(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("pem")
    options = {"env": {"EXTRA": "1"}, "mounts": {"/etc/ssl/certs/extra-ca.pem": str(ca)},
               "annotations": {"example.com/injected": "true"}}
    handler = Inject(options)
    container = _container(tmp_path)
    asyncio.run(handler.create(container))
    assert container.spec["process"]["env"] == ["PATH=/bin", "EXTRA=1"]
    assert container.spec["mounts"][-1]["source"] == str(ca)
    assert container.annotations["example.com/injected"] == "true"
    process = ProcessInfo(container_id="c1", exec_id="e1", spec={"args": ["env"], "env": ["PATH=/bin"]})
    asyncio.run(handler.exec(container, process))
    assert process.spec["env"] == ["PATH=/bin", "EXTRA=1"]

    sandbox_handler = Inject(options)
    sandbox = _container(tmp_path, kind="sandbox")
    asyncio.run(sandbox_handler.create(sandbox))
    assert sandbox.spec == _container(tmp_path, kind="sandbox").spec
    process = ProcessInfo(container_id="c1", exec_id="e1", spec={"env": []})
    asyncio.run(sandbox_handler.exec(sandbox, process))
    assert process.spec == {"env": []}


def test_a_missing_source_fails_create_with_its_name(tmp_path):
    handler = Inject({"mounts": {"/etc/ssl/certs/extra-ca.pem": str(tmp_path / "missing.pem")}})
    with pytest.raises(FileNotFoundError, match=r"missing.pem does not exist on this node"):
        asyncio.run(handler.create(_container(tmp_path)))
