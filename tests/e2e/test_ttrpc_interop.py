"""Our ttrpc against real Go ttrpc peers: containerd-shim-runc-v2 and containerd itself."""

from __future__ import annotations

import asyncio
import datetime
import json
import select
import subprocess
import time

import pytest

from shim.api.containerd import events
from shim.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from shim.api.containerd.task import v2 as task
from shim.api.containerd.v1.types import Status
from shim.api.google.protobuf import Any, Empty
from shim.framework.ttrpc import Client, Code, TtrpcError
from test_lifecycle import wait_subscribed

RUNC_RUNTIME = "io.containerd.runc.v2"
EVENTS = "containerd.services.events.ttrpc.v1.Events"


def runc_shim_endpoint(e2e, cid: str) -> tuple[str, str]:
    """(socket address, Task service name) of the runc shim serving cid."""
    bundle = e2e.bundle_dir(cid)
    bootstrap = bundle / "bootstrap.json"  # containerd 2.x records the shim's reply here
    if bootstrap.exists():
        info = json.loads(bootstrap.read_text())
        return info["address"], f"containerd.task.v{info.get('version', 2)}.Task"
    return (bundle / "address").read_text().strip(), "containerd.task.v2.Task"


def task_pid(e2e, cid: str) -> int:
    for line in e2e.ctr("task", "ls", check=True).stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return int(fields[1])
    raise AssertionError(f"task {cid} not listed")


async def test_client_calls_go_runc_shim(e2e):
    cid = e2e.new_id("interop")
    e2e.ctr("run", "-d", "--runtime", RUNC_RUNTIME, e2e.image, cid, "sleep", "60", check=True)
    address, service = runc_shim_endpoint(e2e, cid)
    pid = task_pid(e2e, cid)
    async with await Client.connect(address) as client:
        connected = await client.call(service, "Connect", task.ConnectRequest(id=cid), task.ConnectResponse, timeout=5)
        assert connected.task_pid == pid
        with open(f"/proc/{connected.shim_pid}/cmdline", "rb") as f:
            assert b"containerd-shim-runc-v2" in f.read()

        # A Wait stays in flight on the same connection while many other calls are answered:
        # the Go server replies out of order and we must route every reply by stream id.
        waiting = asyncio.create_task(client.call(service, "Wait", task.WaitRequest(id=cid), task.WaitResponse))
        states = await asyncio.gather(
            *(client.call(service, "State", task.StateRequest(id=cid), task.StateResponse, timeout=5) for _ in range(25))
        )
        assert {(s.id, s.pid, s.status) for s in states} == {(cid, pid, Status.RUNNING)}
        assert not waiting.done()

        await client.call(service, "Kill", task.KillRequest(id=cid, signal=9), Empty, timeout=5)
        waited = await asyncio.wait_for(waiting, 10)
        assert waited.exit_status == 137
        assert waited.exited_at.year >= 2024

        with pytest.raises(TtrpcError) as err:
            await client.call(service, "State", task.StateRequest(id="no-such-task"), task.StateResponse, timeout=5)
        assert err.value.code == Code.NOT_FOUND
        with pytest.raises(TtrpcError) as err:
            await client.call(service, "NoSuchMethod", task.StateRequest(id=cid), task.StateResponse, timeout=5)
        assert err.value.code == Code.UNIMPLEMENTED
    e2e.ctr("task", "rm", cid, check=True)
    e2e.ctr("container", "rm", cid, check=True)


def envelope(namespace: str, topic: str, event, when: datetime.datetime | None) -> ForwardRequest:
    name = type(event).__name__.replace("Oom", "OOM")
    return ForwardRequest(
        envelope=Envelope(
            timestamp=when,
            namespace=namespace,
            topic=topic,
            event=Any(type_url=f"containerd.events.{name}", value=bytes(event)),
        )
    )


async def test_client_forwards_events_to_containerd(e2e):
    watcher = subprocess.Popen(
        [str(e2e.containerd.bin_dir / "ctr"), "--address", e2e.address, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e2e.containerd.env(),
    )
    try:
        wait_subscribed(watcher, e2e.containerd, e2e.namespace)  # before we publish
        marker = e2e.new_id("oom")
        now = datetime.datetime.now(datetime.timezone.utc)
        async with await Client.connect(e2e.ttrpc_address) as client:
            await client.call(
                EVENTS, "Forward", envelope(e2e.namespace, "/tasks/oom", events.TaskOom(container_id=marker), now), Empty, timeout=5
            )
            # containerd validates envelopes: a bad namespace is refused with an error status.
            with pytest.raises(TtrpcError):
                await client.call(
                    EVENTS, "Forward", envelope("bad namespace!", "/tasks/oom", events.TaskOom(container_id="x"), now), Empty, timeout=5
                )
        deadline = time.monotonic() + 10
        seen = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([watcher.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                continue
            line = watcher.stdout.readline()
            seen += line
            if marker in line:
                assert e2e.namespace in line and "/tasks/oom" in line
                break
        else:
            pytest.fail(f"event not shown by ctr events; saw:\n{seen}")
    finally:
        watcher.kill()
        watcher.communicate()
