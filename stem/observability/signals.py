"""In-process lifecycle signals that user code can connect to.

A receiver that raises is logged and skipped: a broken receiver never breaks a worker or a
producer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from stem.errors import HardTimeLimitExceeded, SoftTimeLimitExceeded

if TYPE_CHECKING:
    from stem.envelope import Envelope

log = logging.getLogger("stem.signals")

Receiver = Callable[..., Any]


class Signal:
    def __init__(self, name: str) -> None:
        self.name = name
        self._receivers: tuple[Receiver, ...] = ()
        self._lock = threading.Lock()

    def connect(self, receiver: Receiver) -> Receiver:
        """Connect a receiver (usable as a decorator). Receivers get keyword arguments."""
        with self._lock:
            if receiver not in self._receivers:
                self._receivers = (*self._receivers, receiver)
        return receiver

    def disconnect(self, receiver: Receiver) -> None:
        with self._lock:
            # `!=`, not `is not`: a bound method is a new object at every attribute access.
            self._receivers = tuple(r for r in self._receivers if r != receiver)

    @property
    def has_receivers(self) -> bool:
        return bool(self._receivers)

    def send(self, **payload: Any) -> None:
        for receiver in self._receivers:
            try:
                receiver(signal=self.name, **payload)
            except (SoftTimeLimitExceeded, HardTimeLimitExceeded):
                # The running task's time limit, raised while a receiver ran inside it (a
                # publish's after_publish, say): the task's to see, not a broken receiver.
                raise
            except Exception:
                log.exception(
                    "signal receiver failed",
                    extra={"event": "signal-receiver-failed", "signal": self.name},
                )

    def __repr__(self) -> str:
        return f"<Signal {self.name}>"


class Receivers:
    """Connections made together and undone together (one object's receivers)."""

    def __init__(self, pairs: list[tuple[Signal, Receiver]] | None = None) -> None:
        self._pairs: list[tuple[Signal, Receiver]] = []
        for sig, receiver in pairs or []:
            self.connect(sig, receiver)

    def connect(self, sig: Signal, receiver: Receiver) -> None:
        sig.connect(receiver)
        self._pairs.append((sig, receiver))

    def __len__(self) -> int:
        return len(self._pairs)

    def disconnect_all(self) -> None:
        for sig, receiver in self._pairs:
            sig.disconnect(receiver)
        self._pairs.clear()


before_publish = Signal("before_publish")
after_publish = Signal("after_publish")
task_received = Signal("task_received")
task_prerun = Signal("task_prerun")
task_postrun = Signal("task_postrun")
task_success = Signal("task_success")
task_failure = Signal("task_failure")
task_retry = Signal("task_retry")
task_revoked = Signal("task_revoked")
task_rejected = Signal("task_rejected")
task_unknown = Signal("task_unknown")
task_expired = Signal("task_expired")
lease_renewed = Signal("lease_renewed")
lease_lost = Signal("lease_lost")
worker_init = Signal("worker_init")
worker_ready = Signal("worker_ready")
worker_shutting_down = Signal("worker_shutting_down")
worker_shutdown = Signal("worker_shutdown")
pool_process_init = Signal("pool_process_init")
pool_process_shutdown = Signal("pool_process_shutdown")
heartbeat = Signal("heartbeat")
# In a worker: a task running in one of its pool processes published a message (the fields
# of child_published_fields). after_publish fires in that process itself.
child_published = Signal("child_published")
CHILD_PUBLISHED_FIELDS = ("task", "task_id", "queue", "attempt", "eta_ms")


def child_published_fields(envelope: Envelope) -> dict[str, Any]:
    """What a pool process tells its worker of a message it published (child_published)."""
    values = (envelope.task, envelope.id, envelope.queue, envelope.attempt, envelope.not_before_ms)
    return dict(zip(CHILD_PUBLISHED_FIELDS, values, strict=True))


# A control request this worker refused (reason: malformed, signature-missing, ...).
control_rejected = Signal("control_rejected")
