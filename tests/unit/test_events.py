"""EventPublisher against a fake containerd Events endpoint (our own ttrpc Server on a temp socket).

Interop with a real containerd is covered by the e2e tests; here we check ordering, the wire
details containerd validates, and delivery across containerd being down or restarting.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import shutil
import tempfile
import threading
import time

import pytest

from shim.api.containerd.events import TaskCreate, TaskExit, TaskOom, TaskStart
from shim.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from shim.api.google.protobuf import Empty
from shim.framework.events import METHOD, SERVICE, EventPublisher, event_type_url
from shim.framework.ttrpc import CallContext, Code, Server, TtrpcError

FAST = dict(backoff_initial=0.01, backoff_max=0.05, call_timeout=1.0, dial_timeout=1.0)


class FakeContainerd:
    """Records every Forwarded envelope; can reject topics and be stopped and restarted."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[Envelope] = []
        self.reject_topics: set[str] = set()
        self.on_forward = None  # optional hook(envelope) run after recording
        self._server: Server | None = None

    async def start(self) -> None:
        server = Server()
        server.register(SERVICE, METHOD, ForwardRequest, self._forward)
        await server.start(path=self.path)
        self._server = server

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.close()

    async def _forward(self, request: ForwardRequest, context: CallContext) -> Empty:
        envelope = request.envelope
        assert envelope is not None
        if envelope.topic in self.reject_topics:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"topic {envelope.topic}: rejected by test")
        self.received.append(envelope)
        if self.on_forward is not None:
            self.on_forward(envelope)
        return Empty()

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                await asyncio.sleep(0.005)

    def ids(self) -> list[str]:
        return [TaskExit.parse(e.event.value).id for e in self.received]


@pytest.fixture
def sock_dir():
    # Short path: unix socket paths are limited to 108 bytes.
    path = tempfile.mkdtemp(prefix="ev-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def containerd(sock_dir):
    fake = FakeContainerd(f"{sock_dir}/ttrpc.sock")
    yield fake
    await fake.stop()


@pytest.fixture
async def publisher(containerd):
    pub = EventPublisher(f"unix://{containerd.path}", "k8s.io", **FAST)
    task = asyncio.create_task(pub.run())
    pub.test_task = task  # type: ignore[attr-defined]
    yield pub
    await pub.close(flush_timeout=0.1)
    assert task.done()


def exit_event(n: int) -> TaskExit:
    return TaskExit(
        container_id="c1",
        id=f"e{n}",
        pid=1000 + n,
        exit_status=n,
        exited_at=datetime.datetime.now(datetime.timezone.utc),
    )


async def wait_until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_order_wire_details_and_envelope_fields(containerd, publisher):
    await containerd.start()
    before = datetime.datetime.now(datetime.timezone.utc)
    publisher.publish("/tasks/create", TaskCreate(container_id="c1", bundle="/b", pid=42))
    publisher.publish("/tasks/start", TaskStart(container_id="c1", pid=42))
    publisher.publish("/tasks/oom", TaskOom(container_id="c1"))
    for n in range(50):
        publisher.publish("/tasks/exit", exit_event(n))
    after = datetime.datetime.now(datetime.timezone.utc)
    await containerd.wait_for(53)
    await wait_until(lambda: publisher.pending == 0)

    got = containerd.received
    assert [e.topic for e in got[:3]] == ["/tasks/create", "/tasks/start", "/tasks/oom"]
    # Bare type urls, from the proto name (TaskOOM, not the Python class name TaskOom).
    assert [e.event.type_url for e in got[:4]] == [
        "containerd.events.TaskCreate",
        "containerd.events.TaskStart",
        "containerd.events.TaskOOM",
        "containerd.events.TaskExit",
    ]
    assert not any(e.event.type_url.startswith("type.googleapis.com/") for e in got)
    assert TaskCreate.parse(got[0].event.value).bundle == "/b"
    assert [TaskExit.parse(e.event.value).exit_status for e in got[3:]] == list(range(50))
    for envelope in got:
        assert envelope.namespace == "k8s.io"
        assert envelope.timestamp is not None
        assert before <= envelope.timestamp <= after
    stamps = [e.timestamp for e in got]
    assert stamps == sorted(stamps)


def test_event_type_url():
    assert event_type_url(TaskExit()) == "containerd.events.TaskExit"
    assert event_type_url(TaskOom()) == "containerd.events.TaskOOM"


async def test_timestamp_is_publish_time_not_send_time(containerd, publisher):
    publisher.publish("/tasks/exit", exit_event(0))
    published = datetime.datetime.now(datetime.timezone.utc)
    await asyncio.sleep(0.3)  # containerd is down: the event waits in the queue
    await containerd.start()
    await containerd.wait_for(1)
    assert containerd.received[0].timestamp <= published


async def test_events_published_while_down_are_delivered_after_start(containerd, publisher):
    for n in range(3):
        publisher.publish("/tasks/exit", exit_event(n))
    await asyncio.sleep(0.3)
    assert publisher.pending == 3  # kept while retrying, not dropped after a few tries
    await containerd.start()
    await containerd.wait_for(3)
    assert containerd.ids() == ["e0", "e1", "e2"]
    await wait_until(lambda: publisher.pending == 0)


async def test_restart_between_events(containerd, publisher):
    await containerd.start()
    for n in range(5):
        publisher.publish("/tasks/exit", exit_event(n))
    await containerd.wait_for(5)
    await containerd.stop()
    for n in range(5, 10):
        publisher.publish("/tasks/exit", exit_event(n))
    await asyncio.sleep(0.2)
    assert len(containerd.received) == 5
    await containerd.start()  # same path: a restarted containerd
    await containerd.wait_for(10)
    assert containerd.ids() == [f"e{n}" for n in range(10)]


async def test_restart_while_a_call_is_in_flight(containerd, publisher):
    """containerd dies with Forwards in flight: nothing is lost and order is kept.

    An event whose reply was lost is sent again (at-least-once), so duplicates are allowed,
    but only of the event at the head of the line.
    """
    restarted = asyncio.Event()

    def crash_after_event_3(envelope: Envelope) -> None:
        if TaskExit.parse(envelope.event.value).id == "e3" and not restarted.is_set():
            restarted.set()
            asyncio.get_running_loop().create_task(containerd.stop())

    containerd.on_forward = crash_after_event_3
    await containerd.start()
    for n in range(8):
        publisher.publish("/tasks/exit", exit_event(n))
    await restarted.wait()
    await asyncio.sleep(0.2)
    await containerd.start()
    await wait_until(lambda: publisher.pending == 0)
    ids = containerd.ids()
    deduplicated = [i for k, i in enumerate(ids) if k == 0 or ids[k - 1] != i]
    assert deduplicated == [f"e{n}" for n in range(8)]


async def test_rejected_event_is_dropped_and_next_goes_through(containerd, publisher, caplog):
    containerd.reject_topics.add("/tasks/bad")
    await containerd.start()
    with caplog.at_level(logging.ERROR, logger="shim.framework.events"):
        publisher.publish("/tasks/exit", exit_event(1))
        publisher.publish("/tasks/bad", exit_event(2))
        publisher.publish("/tasks/exit", exit_event(3))
        await containerd.wait_for(2)
        await wait_until(lambda: publisher.pending == 0)
    assert containerd.ids() == ["e1", "e3"]
    assert any("/tasks/bad" in r.getMessage() and "INVALID_ARGUMENT" in r.getMessage() for r in caplog.records)


async def test_close_flushes_queue_and_run_returns(containerd):
    pub = EventPublisher(containerd.path, "default", **FAST)
    task = asyncio.create_task(pub.run())
    for n in range(20):
        pub.publish("/tasks/exit", exit_event(n))
    await asyncio.sleep(0.1)
    await containerd.start()
    await pub.close(flush_timeout=5)
    assert pub.pending == 0
    assert containerd.ids() == [f"e{n}" for n in range(20)]
    assert task.done() and not task.cancelled() and task.exception() is None
    pub.publish("/tasks/exit", exit_event(99))  # after close: dropped, no exception
    assert pub.pending == 0


async def test_close_without_run_still_flushes(containerd):
    await containerd.start()
    pub = EventPublisher(containerd.path, "default", **FAST)
    pub.publish("/tasks/exit", exit_event(0))
    pub.publish("/tasks/exit", exit_event(1))
    await pub.close()
    assert containerd.ids() == ["e0", "e1"]


async def test_close_gives_up_after_flush_timeout(containerd, caplog):
    pub = EventPublisher(containerd.path, "default", **FAST)
    task = asyncio.create_task(pub.run())
    pub.publish("/tasks/exit", exit_event(0))
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="shim.framework.events"):
        await pub.close(flush_timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 2
    assert task.done() and not task.cancelled()
    assert pub.pending == 1
    assert any("undelivered" in r.getMessage() and "/tasks/exit" in r.getMessage() for r in caplog.records)


async def test_publish_from_plain_callbacks_and_functions(containerd, publisher):
    await containerd.start()

    def sync_producer(n: int) -> None:  # e.g. a reaper callback: not a coroutine
        publisher.publish("/tasks/exit", exit_event(n))

    sync_producer(0)
    loop = asyncio.get_running_loop()
    loop.call_soon(sync_producer, 1)
    loop.call_later(0.01, sync_producer, 2)
    await containerd.wait_for(3)
    assert containerd.ids() == ["e0", "e1", "e2"]


async def test_publish_before_run_starts(containerd):
    await containerd.start()
    pub = EventPublisher(containerd.path, "default", **FAST)
    pub.publish("/tasks/exit", exit_event(0))
    task = asyncio.create_task(pub.run())
    await containerd.wait_for(1)
    await pub.close()
    assert task.done()


async def test_publish_from_another_thread(containerd, publisher):
    await containerd.start()
    await asyncio.sleep(0)  # let run() record its loop
    thread = threading.Thread(target=lambda: [publisher.publish("/tasks/exit", exit_event(n)) for n in range(5)])
    thread.start()
    await asyncio.to_thread(thread.join)
    await containerd.wait_for(5)
    assert containerd.ids() == [f"e{n}" for n in range(5)]


async def test_publish_never_raises(publisher, caplog):
    with caplog.at_level(logging.ERROR, logger="shim.framework.events"):
        publisher.publish("/tasks/exit", object())  # not a message
        publisher.publish("/tasks/exit", "nonsense")
    assert publisher.pending == 0
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 2


async def test_queue_bound_drops_oldest(containerd, caplog):
    pub = EventPublisher(containerd.path, "default", max_queued=5, **FAST)
    with caplog.at_level(logging.ERROR, logger="shim.framework.events"):
        for n in range(8):
            pub.publish("/tasks/exit", exit_event(n))
    assert pub.pending == 5 and pub.dropped == 3
    assert sum("queue full" in r.getMessage() for r in caplog.records) == 3
    await containerd.start()
    task = asyncio.create_task(pub.run())
    await containerd.wait_for(5)
    assert containerd.ids() == [f"e{n}" for n in range(3, 8)]
    await pub.close()
    assert task.done()


async def test_owner_cancel_propagates_and_rerun_resumes_head_event(containerd):
    pub = EventPublisher(containerd.path, "default", **FAST)
    task = asyncio.create_task(pub.run())
    pub.publish("/tasks/exit", exit_event(0))
    pub.publish("/tasks/exit", exit_event(1))
    await asyncio.sleep(0.1)  # e0 is at the head of the line, being retried
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pub.pending == 2
    await containerd.start()
    task = asyncio.create_task(pub.run())
    await containerd.wait_for(2)
    assert containerd.ids() == ["e0", "e1"]
    await pub.close()


async def test_call_timeout_is_retried(containerd):
    """A containerd that accepts the connection but does not answer in time: retried, not dropped."""
    answered = asyncio.Event()
    calls = 0

    async def slow_then_ok(request: ForwardRequest, context: CallContext) -> Empty:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(10)
        containerd.received.append(request.envelope)
        answered.set()
        return Empty()

    server = Server()
    server.register(SERVICE, METHOD, ForwardRequest, slow_then_ok)
    await server.start(path=containerd.path)
    pub = EventPublisher(containerd.path, "default", **{**FAST, "call_timeout": 0.2})
    task = asyncio.create_task(pub.run())
    try:
        pub.publish("/tasks/exit", exit_event(0))
        async with asyncio.timeout(5):
            await answered.wait()
        assert calls == 2 and containerd.ids() == ["e0"]
    finally:
        await pub.close()
        await server.close()
    assert task.done()
