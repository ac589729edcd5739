"""The events stream: small JSON messages about tasks and workers, on a broker queue.

With ``stem worker --events`` the worker's :class:`EventPublisher` turns lifecycle signals
into events on the queue ``stem.events``; ``stem events`` tails them (:func:`tail`).

Delivery semantics, which operators should know: the stream is an ordinary queue, so each
event goes to ONE tailer (it is reserved and acked). Two ``stem events`` running at once
split the stream between them. Events are best-effort: they are buffered in memory and
published in batches by a background thread, dropped (and counted) when the broker is
unreachable or the buffer is full, and the queue is purged when nobody reads it and it grows
past ``max_backlog``. Task outcomes live in the result backend; events are for watching.

An event is one flat JSON object: ``type``, ``ts_ms``, ``worker`` and, for task events,
``task``, ``task_id``, ``queue``, ``attempt`` plus ``state`` or ``reason``. Argument values
and error messages are never included (they may hold secrets); errors appear by type name.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from stem import states
from stem.brokers.base import Message
from stem.envelope import dumps, loads, new_id, now_ms
from stem.errors import BrokerError, DecodeError
from stem.observability import signals

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.brokers.base import Broker, Delivery
    from stem.envelope import Envelope
    from stem.result import ErrorInfo
    from stem.worker.consumer import Worker

log = logging.getLogger("stem.events")

EVENTS_QUEUE = "stem.events"
MAX_EVENT_BYTES = 16 * 1024

TASK_EVENTS = (
    "task-sent",
    "task-received",
    "task-started",
    "task-succeeded",
    "task-failed",
    "task-retried",
    "task-revoked",
    "task-expired",
    "task-dead-lettered",
)
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")


def task_event(
    kind: str, env: Envelope | None, worker: str | None, **fields: Any
) -> dict[str, Any]:
    event: dict[str, Any] = {"type": kind, "ts_ms": now_ms(), "worker": worker}
    if env is not None:
        event.update(task=env.task, task_id=env.id, queue=env.queue, attempt=env.attempt)
    event.update(fields)
    return {k: v for k, v in event.items() if v is not None}


class EventPublisher:
    """Publishes lifecycle events of this process to ``queue``.

    With ``worker`` set, worker events are those of that worker and the publisher closes
    itself when the worker shuts down (after publishing ``worker-offline``). Without it (a
    producer), only ``task-sent`` is published and ``source`` names the sender.
    """

    def __init__(
        self,
        app: Stem,
        *,
        worker: Worker | None = None,
        source: str | None = None,
        queue: str = EVENTS_QUEUE,
        flush_interval_s: float = 0.2,
        max_buffer: int = 10_000,
        max_backlog: int = 100_000,
        batch_size: int = 500,
    ) -> None:
        self.app = app
        self.worker = worker
        self.source = source or (worker.name if worker else f"producer@{socket.gethostname()}")
        self.queue = queue
        self.flush_interval_s = flush_interval_s
        self.max_backlog = max_backlog
        self.batch_size = batch_size
        self.dropped = 0
        self.overflowed = 0  # of dropped: pushed out of a full buffer
        self._overflow_told = 0
        self.published = 0
        self._buffer: deque[dict[str, Any]] = deque(maxlen=max_buffer)
        self._cond = threading.Condition()
        self._closed = False
        self._next_backlog_check = 0.0
        self._warned_at = 0.0
        pairs: list[tuple[signals.Signal, Callable[..., Any]]] = [
            (signals.after_publish, self._on_sent)
        ]
        if worker is not None:
            pairs += [
                (signals.child_published, self._on_child_sent),
                (signals.task_received, self._on_received),
                (signals.task_prerun, self._on_started),
                (signals.task_success, self._on_succeeded),
                (signals.task_failure, self._on_failed),
                (signals.task_retry, self._on_retried),
                (signals.task_revoked, self._on_revoked),
                (signals.task_expired, self._on_expired),
                (signals.task_rejected, self._on_dead_lettered),
                (signals.worker_ready, self._on_online),
                (signals.heartbeat, self._on_heartbeat),
                (signals.worker_shutdown, self._on_offline),
            ]
        self._receivers = signals.Receivers(pairs)
        self._thread = threading.Thread(target=self._run, name="stem-events", daemon=True)
        self._thread.start()

    # -- buffering and publishing --------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        """Queue one event for publishing (never blocks, never raises)."""
        with self._cond:
            if self._closed:
                return
            if len(self._buffer) == self._buffer.maxlen:
                self.dropped += 1  # deque drops the oldest on append
                self.overflowed += 1
            self._buffer.append(event)
            if len(self._buffer) >= self.batch_size:
                self._cond.notify()

    def _take(self) -> list[dict[str, Any]]:
        with self._cond:
            n = min(len(self._buffer), self.batch_size)
            return [self._buffer.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._closed:
                    self._cond.wait(self.flush_interval_s)
                closed = self._closed
            self.flush()
            if closed:
                return

    def flush(self) -> None:
        """Publish everything buffered now."""
        if self.overflowed > self._overflow_told and self._warn(
            # Said here, on the publishing thread: emit() runs on the task path.
            f"{self.overflowed} events dropped so far: more were emitted than could be "
            f"published (buffer of {self._buffer.maxlen})"
        ):
            self._overflow_told = self.overflowed
        while batch := self._take():
            messages = [Message(id=new_id(), queue=self.queue, body=dumps(e)) for e in batch]
            try:
                self.app.broker.publish(messages)
                self.published += len(messages)
            except BrokerError as exc:
                self.dropped += len(messages)
                self._warn(f"events dropped, broker unavailable: {exc}")
                return
        self._cap_backlog()

    def _cap_backlog(self) -> None:
        now = time.monotonic()
        if now < self._next_backlog_check:
            return
        self._next_backlog_check = now + 10.0
        try:
            stats = self.app.broker.stats([self.queue])
            ready = sum(s.ready + s.delayed for s in stats)
            if ready > self.max_backlog:
                purged = self.app.broker.purge(self.queue)
                self._warn(f"nobody reads {self.queue!r}: purged {purged} unread events")
        except BrokerError as exc:
            self._warn(f"events backlog not checked: {exc}")

    def _warn(self, message: str) -> bool:
        """Log ``message`` unless a warning went out in the last 30 s; True if logged."""
        now = time.monotonic()
        if now - self._warned_at < 30.0:  # one line per 30 s, not one per batch
            return False
        self._warned_at = now
        log.warning(message, extra={"event": "events-degraded", "worker": self.source})
        return True

    def close(self) -> None:
        """Disconnect, publish what is buffered, and stop the background thread."""
        self._receivers.disconnect_all()
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- receivers -----------------------------------------------------------------------

    def _task(self, kind: str, env: Envelope | None, **fields: Any) -> None:
        self.emit(task_event(kind, env, self.source, **fields))

    def _on_sent(self, envelope: Envelope, **_: Any) -> None:
        if envelope.queue != self.queue:
            self._task("task-sent", envelope, eta_ms=envelope.not_before_ms)

    def _on_child_sent(self, **fields: Any) -> None:
        if fields.get("queue") != self.queue:
            self.emit(task_event("task-sent", None, self.source, **fields))

    def _on_received(self, envelope: Envelope, **_: Any) -> None:
        self._task("task-received", envelope, state=states.RECEIVED)

    def _on_started(self, envelope: Envelope, **_: Any) -> None:
        self._task("task-started", envelope, state=states.STARTED)

    def _on_succeeded(self, envelope: Envelope, **_: Any) -> None:
        self._task("task-succeeded", envelope, state=states.SUCCESS)

    def _on_failed(self, envelope: Envelope, error: ErrorInfo | None = None, **_: Any) -> None:
        self._task("task-failed", envelope, state=states.FAILURE, error=_etype(error))

    def _on_retried(
        self, envelope: Envelope, delay_s: float = 0.0, error: ErrorInfo | None = None, **_: Any
    ) -> None:
        self._task(
            "task-retried",
            envelope,
            state=states.RETRY,
            delay_s=round(delay_s, 3),
            error=_etype(error),
        )

    def _on_revoked(self, envelope: Envelope, **_: Any) -> None:
        self._task("task-revoked", envelope, state=states.REVOKED)

    def _on_expired(self, envelope: Envelope, **_: Any) -> None:
        self._task("task-expired", envelope, state=states.EXPIRED)

    def _on_dead_lettered(
        self,
        delivery: Delivery,
        reason: str,
        envelope: Envelope | None = None,
        **_: Any,
    ) -> None:
        event = task_event("task-dead-lettered", envelope, self.source, reason=reason)
        event.setdefault("task_id", delivery.message_id)  # undecodable: no envelope
        event.setdefault("queue", delivery.queue)
        self.emit(event)

    def _mine(self, worker: Worker) -> bool:
        return worker is self.worker

    def _on_online(self, worker: Worker, **_: Any) -> None:
        if self._mine(worker):
            self.emit(_worker_event("worker-online", worker.health()))

    def _on_heartbeat(self, worker: Worker, health: dict[str, Any], **_: Any) -> None:
        if self._mine(worker):
            self.emit(_worker_event("worker-heartbeat", health))

    def _on_offline(self, worker: Worker, **_: Any) -> None:
        if self._mine(worker):
            self.emit(_worker_event("worker-offline", {"worker": worker.name}))
            self.close()


def _etype(error: ErrorInfo | None) -> str | None:
    return error.type if error is not None else None


def _worker_event(kind: str, health: dict[str, Any]) -> dict[str, Any]:
    event = {
        "type": kind,
        "ts_ms": now_ms(),
        "worker": health.get("worker"),
        "host": health.get("host"),
        "pid": health.get("pid"),
        "concurrency": health.get("concurrency"),
        "running": health.get("running"),
        "processed": health.get("processed"),
    }
    return {k: v for k, v in event.items() if v is not None}


def enable_events(worker: Worker) -> EventPublisher:
    """Publish ``worker``'s events until it shuts down (``stem worker --events``)."""
    return EventPublisher(worker.app, worker=worker)


# -- reading ---------------------------------------------------------------------------------


def parse_event(body: bytes) -> dict[str, Any] | None:
    """An event from a message body, or None for anything that is not one. Bodies come from
    whoever can write to the broker: they are shown, never acted on."""
    if len(body) > MAX_EVENT_BYTES:
        return None
    try:
        data = loads(body)
    except DecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    return data


def tail(
    broker: Broker,
    *,
    follow: bool = True,
    limit: int | None = None,
    wait_s: float = 1.0,
    queue: str = EVENTS_QUEUE,
    stop: threading.Event | None = None,
) -> Iterator[dict[str, Any]]:
    """Take events off the stream (each event goes to one reader: see module docstring).

    With ``follow`` it waits for more until ``limit`` events were read or ``stop`` is set;
    without, it returns once nothing is ready."""
    seen = 0
    while limit is None or seen < limit:
        if stop is not None and stop.is_set():
            return
        want = 100 if limit is None else min(100, limit - seen)
        deliveries = broker.reserve([queue], want, 30.0, wait_s if follow else 0.0)
        if not deliveries:
            if follow:
                continue
            return
        # Acked once yielded: a reader that stops early (--limit, Ctrl-C, a closed pipe)
        # leaves the rest for the next one (handed back now, or after the lease if it was
        # killed). Lines written into a pipe count as shown: `stem events | head -3`
        # takes a whole batch (up to 100) if the pipe holds it before head exits.
        done = 0
        try:
            for d in deliveries:
                done += 1  # counted before the yield: a reader that stops there saw it
                event = parse_event(d.body)
                if event is not None:
                    seen += 1
                    yield event
        finally:
            if done:
                broker.ack(deliveries[:done])
            for d in deliveries[done:]:
                broker.nack(d)
