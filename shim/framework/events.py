"""EventPublisher: forwards task events to containerd over ttrpc (`Events.Forward`).

The shim produces events (`/tasks/create`, `/tasks/exit`, ...) from handlers and from the
reaper; containerd consumes them on its ttrpc socket (`TTRPC_ADDRESS`). `publish` only
enqueues, so a handler or the reaper never waits on containerd; `run` is the one loop that
delivers, one event at a time, in publish order (shim-protocol.md §6.3: create before start
before exit before delete).

Delivery rules, and why they differ from the Go shim (`pkg/shim/publisher.go`):
- Head of line: an event that cannot be delivered because containerd is unreachable (dial
  error, connection lost, no answer within the per-call timeout) is retried, with back-off,
  before any later event. The Go shim re-queues failures behind later events (so a retry can
  overtake) and drops an event after 5 tries; we keep order and never give up while
  containerd is merely down, because a lost `/tasks/exit` leaves the task "running" forever.
  The price is at-least-once: an event whose call timed out may arrive twice.
- The queue is bounded (`max_queued`); past it the oldest queued event is dropped with an
  error log, so a shim whose containerd never returns cannot grow without limit.
- An event containerd answers with a status error (INVALID_ARGUMENT for a bad namespace or
  topic, ...) is logged and dropped: sending it again would fail the same way.

Wire details containerd checks (§6.2, §15 pitfall 9): the envelope timestamp must be
non-zero (taken at publish time), and the Any's type url must be the bare proto name
(`containerd.events.TaskExit`); a `type.googleapis.com/` prefix breaks 1.6 consumers.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import logging
import threading
from dataclasses import dataclass
from typing import Any as _AnyType

from shim.api.containerd.services.events.ttrpc.v1 import Envelope, ForwardRequest
from shim.api.google.protobuf import Any
from shim.api.message_pool import default_message_pool
from shim.framework.debug.trace import TRACER
from shim.framework.ttrpc import Client, Code, TtrpcError
from shim.framework.ttrpc.encode import encode

log = logging.getLogger("shim.framework.events")

SERVICE = "containerd.services.events.ttrpc.v1.Events"
METHOD = "Forward"

# Failures that mean "containerd is not there right now": keep the event and retry.
# ConnectionClosed carries UNAVAILABLE; a call with no answer in time, DEADLINE_EXCEEDED.
_RETRYABLE = frozenset({Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED})


def event_type_url(event: _AnyType) -> str:
    """The bare type url containerd expects for a generated message, e.g. `containerd.events.TaskOOM`.

    Taken from the proto full name the generated code registers (so `TaskOom` maps to the
    proto's `TaskOOM`), without betterproto2's `type.googleapis.com/` prefix.
    Raises KeyError for a type that is not a registered generated message.
    """
    url = default_message_pool.type_to_url[type(event)]
    return url.rpartition("/")[2]


@dataclass(slots=True)
class _Queued:
    topic: str
    #: The container the event is about ("" when it names none), for the debug socket.
    container_id: str
    #: The serialized ForwardRequest, built at publish time: the timestamp is the publish
    #: time, and later changes to the caller's event object cannot leak into what is sent.
    payload: bytes


class EventPublisher:
    """Queues events and forwards them to containerd in order; see the module docstring.

    Owner's protocol: start `run()` as a task, call `publish()` freely, `await close()` on
    shutdown (which flushes what it can, then stops `run()`).
    """

    def __init__(
        self,
        ttrpc_address: str,
        namespace: str,
        *,
        call_timeout: float = 5.0,
        dial_timeout: float = 5.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 2.0,
        max_queued: int = 10_000,
    ) -> None:
        # Client.connect strips `unix://` (and `ttrpc+unix://`) itself.
        self._address = ttrpc_address
        self._namespace = namespace
        self._call_timeout = call_timeout
        self._dial_timeout = dial_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._max_queued = max_queued

        self._queue: collections.deque[_Queued] = collections.deque()
        self._current: _Queued | None = None  # being delivered (head of line)
        self._client: Client | None = None
        # asyncio.Event binds to a loop only when first awaited, so publish() may run
        # before run() has started.
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued and nothing in flight
        self._idle.set()
        self._runner: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._closed = False  # publish() refuses new events
        self._stopping = False  # close() is cancelling run()
        self.dropped = 0  # events lost to the queue bound (not rejected ones)

    def pending_for(self, container_id: str) -> list[dict]:
        """The undelivered events about one container, oldest (maybe in flight) first."""
        items = ([self._current] if self._current is not None else []) + list(self._queue)
        return [{"topic": item.topic, "in_flight": item is self._current}
                for item in items if item.container_id == container_id]

    @property
    def pending(self) -> int:
        """Events published but not yet delivered (including the one in flight)."""
        return len(self._queue) + (self._current is not None)

    # -- producing ------------------------------------------------------------------------
    def publish(self, topic: str, event: _AnyType) -> None:
        """Queue `event` (a generated containerd.events message) under `topic`.

        Never blocks and never raises: failures are logged. Meant for the loop thread (from a
        coroutine or a plain callback); a call from another thread is handed to the loop.
        """
        try:
            if self._closed:
                log.error("event publisher closed: dropping %s event %r", topic, event)
                return
            envelope = Envelope(
                timestamp=datetime.datetime.now(datetime.timezone.utc),
                namespace=self._namespace,
                topic=topic,
                event=Any(type_url=event_type_url(event), value=encode(event)),
            )
            item = _Queued(topic, getattr(event, "container_id", ""), encode(ForwardRequest(envelope=envelope)))
            loop = self._loop
            if loop is not None and threading.get_ident() != self._loop_thread:
                loop.call_soon_threadsafe(self._enqueue, item)
            else:
                self._enqueue(item)
        except Exception:
            log.exception("cannot publish %s event %r", topic, event)

    def _enqueue(self, item: _Queued) -> None:
        if self._closed:
            log.error("event publisher closed: dropping %s event", item.topic)
            return
        if len(self._queue) >= self._max_queued:
            oldest = self._queue.popleft()
            self.dropped += 1
            TRACER.event(oldest.topic, oldest.container_id, "dropped", message="queue full")
            log.error(
                "event queue full (%d events, containerd at %s unreachable): dropping oldest %s event"
                " (%d dropped so far)",
                self._max_queued,
                self._address,
                oldest.topic,
                self.dropped,
            )
        self._queue.append(item)
        TRACER.event(item.topic, item.container_id, "queued")
        self._idle.clear()
        self._wakeup.set()

    # -- delivering -----------------------------------------------------------------------
    async def run(self) -> None:
        """Deliver queued events until `close()`; returns normally when closed that way.

        Returns at once if `close()` has already begun: close() then flushes by itself.
        """
        if self._closed:
            return
        await self._run()

    async def _run(self) -> None:
        if self._runner is not None and not self._runner.done():
            raise RuntimeError("EventPublisher.run() is already running")
        task = asyncio.current_task()
        assert task is not None
        self._runner = task
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            while True:
                # A run() cancelled by its owner mid-delivery leaves _current set; a later
                # run() resumes with it, so the event is neither lost nor reordered.
                if self._current is None:
                    while not self._queue:
                        self._idle.set()
                        self._wakeup.clear()
                        await self._wakeup.wait()
                    self._current = self._queue.popleft()
                await self._deliver(self._current)
                self._current = None
        except asyncio.CancelledError:
            # close() cancels us to interrupt a dial, a call or a back-off sleep. Any other
            # cancellation (the owner's) is re-raised.
            if not self._stopping or task.uncancel() > 0:
                raise
        finally:
            if not self._stopping:
                self._log_undelivered("event publisher stopped")
            await self._disconnect()

    def _log_undelivered(self, why: str) -> None:
        items = ([self._current] if self._current is not None else []) + list(self._queue)
        if not items:
            return
        topics = [item.topic for item in items[:20]] + (["..."] if len(items) > 20 else [])
        log.error("%s with %d undelivered events: %s", why, len(items), ", ".join(topics))

    async def _deliver(self, item: _Queued) -> None:
        delay = self._backoff_initial
        attempt = 0
        while True:
            attempt += 1
            try:
                client = await self._connect()
                code, message, _ = await client.call_raw(
                    SERVICE, METHOD, item.payload, timeout=self._call_timeout
                )
            except TtrpcError as exc:  # ConnectionClosed, DEADLINE_EXCEEDED, oversized request
                code, message = exc.code, exc.message
            except (OSError, TimeoutError) as exc:  # dial failed: no socket, refused, slow
                code, message = Code.UNAVAILABLE, f"dial {self._address}: {exc or type(exc).__name__}"
            if code == Code.OK:
                TRACER.event(item.topic, item.container_id, "delivered", attempt)
                if attempt > 1:
                    log.info("forwarded %s event after %d attempts", item.topic, attempt)
                return
            error = TtrpcError(code, message)
            if code not in _RETRYABLE:
                TRACER.event(item.topic, item.container_id, "rejected", attempt, str(error))
                log.error("containerd did not accept %s event (%s): dropping it", item.topic, error)
                return
            # Warn once per event, not on every retry: containerd may be down for minutes.
            TRACER.event(item.topic, item.container_id, "retrying", attempt, str(error))
            level = logging.WARNING if attempt == 1 else logging.DEBUG
            log.log(level, "cannot forward %s event (%s): retrying until containerd is back", item.topic, error)
            await self._disconnect()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _connect(self) -> Client:
        if self._client is None or self._client.closed:
            await self._disconnect()
            self._client = await Client.connect(self._address, timeout=self._dial_timeout)
        return self._client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # closing a dead connection must not stop the publisher
                log.debug("closing events connection", exc_info=True)

    # -- shutdown -------------------------------------------------------------------------
    async def close(self, flush_timeout: float = 2.0) -> None:
        """Stop accepting events, try for `flush_timeout` seconds to deliver what is queued,
        then stop `run()` and close the connection. Undelivered events are logged as lost."""
        if self._runner is not None and self._runner is asyncio.current_task():
            raise RuntimeError("EventPublisher.close() called from run()")
        self._closed = True
        runner = self._runner
        if (runner is None or runner.done()) and self.pending:
            # Nobody is delivering (run() never started, or it died): flush ourselves.
            # An owner's run() task that starts only now sees _closed and returns at once.
            runner = asyncio.get_running_loop().create_task(self._run(), name="event-publisher-flush")
        if runner is not None and not runner.done():
            if self.pending:
                try:
                    async with asyncio.timeout(flush_timeout):
                        await self._idle.wait()
                except TimeoutError:
                    pass
            self._stopping = True
            runner.cancel()
            await asyncio.wait([runner])
        self._log_undelivered(f"event publisher closed (flush timeout {flush_timeout:g}s)")
        await self._disconnect()
