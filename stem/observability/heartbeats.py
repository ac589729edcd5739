"""Worker heartbeats in the broker, so ``stem workers`` sees every node from anywhere.

On each ``heartbeat`` signal the worker's health snapshot (host, pid, pool size, running
tasks, processed counts, last successful consume) is written as JSON to the broker key
``workers:<name>`` with a TTL of ``ttl_factor`` (3) heartbeats, and at least ``lost_ttl_s``
(60 s). A node that stops beating is shown as *lost* once its last beat is older than two
heartbeats, and disappears when the key expires, so an operator looking a minute after a
crash still sees what was lost. A clean shutdown writes the record once more with
``"offline": true``.

Writes are compare-and-set (``peek`` then ``swap``): a record written by another live
process under the same name is noticed and reported, since two workers sharing a node name
make remote control and this listing ambiguous.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stem.envelope import dumps, loads, now_ms
from stem.errors import BrokerError, DecodeError
from stem.observability import signals

if TYPE_CHECKING:
    from stem.brokers.base import Broker
    from stem.worker.consumer import Worker

log = logging.getLogger("stem.heartbeats")

KEY_PREFIX = "workers:"
MAX_RECORD_BYTES = 64 * 1024


def worker_key(name: str) -> str:
    return f"{KEY_PREFIX}{name}"


class HeartbeatWriter:
    """Keeps ``workers:<name>`` fresh for one worker; detaches itself at its shutdown."""

    def __init__(
        self,
        worker: Worker,
        *,
        ttl_factor: float = 3.0,
        offline_ttl_s: float = 60.0,
        lost_ttl_s: float = 60.0,
    ) -> None:
        self.worker = worker
        self.ttl_factor = ttl_factor
        self.offline_ttl_s = offline_ttl_s
        self.lost_ttl_s = lost_ttl_s
        self._last_written: str | None = None
        self._warned_duplicate = False
        self._receivers = signals.Receivers(
            [(signals.heartbeat, self._on_heartbeat), (signals.worker_shutdown, self._on_shutdown)]
        )

    @property
    def key(self) -> str:
        return worker_key(self.worker.name)

    def detach(self) -> None:
        self._receivers.disconnect_all()

    def _record(self, health: Mapping[str, Any], *, offline: bool) -> str:
        record = dict(health)
        record["heartbeat_s"] = self.worker.config.heartbeat_s
        record["offline"] = offline
        if offline:
            record["at_ms"] = now_ms()
            record["running"] = 0
        return dumps(record).decode()

    def write(self, health: Mapping[str, Any], *, offline: bool = False) -> bool:
        """Write one record; False if the broker could not be reached."""
        new = self._record(health, offline=offline)
        beats_s = self.ttl_factor * self.worker.config.heartbeat_s
        ttl_s = self.offline_ttl_s if offline else max(beats_s, self.lost_ttl_s)
        broker = self.worker.app.broker
        try:
            for _ in range(3):  # a concurrent writer can win the race between peek and swap
                current = broker.peek(self.key)
                if current is not None and current != self._last_written:
                    self._check_duplicate(current)
                if broker.swap(self.key, current, new, ttl_s):
                    self._last_written = new
                    return True
        except BrokerError as exc:
            log.warning(
                "heartbeat not written: %s",
                exc,
                extra={"event": "heartbeat-write-failed", "worker": self.worker.name},
            )
            return False
        return False

    def _check_duplicate(self, current: str) -> None:
        other = _parse(current)
        if other is None or other.get("offline") or self._warned_duplicate:
            return
        health = self.worker.health()
        # A predecessor that crashed beat last before we started; a twin beats after.
        beat = other.get("at_ms")
        fresh = isinstance(beat, int) and beat >= health["started_ms"]
        if fresh and (other.get("host"), other.get("pid")) != (health["host"], health["pid"]):
            self._warned_duplicate = True
            log.warning(
                "another live worker (host %s, pid %s) uses the node name %r; give each "
                "worker its own --name",
                other.get("host"),
                other.get("pid"),
                self.worker.name,
                extra={"event": "worker-name-duplicate", "worker": self.worker.name},
            )

    def _on_heartbeat(self, worker: Worker, health: Mapping[str, Any], **_: Any) -> None:
        if worker is self.worker:
            self.write(health)

    def _on_shutdown(self, worker: Worker, **_: Any) -> None:
        if worker is self.worker:
            self.detach()
            self.write(worker.health(), offline=True)


def attach_heartbeats(worker: Worker, **options: Any) -> HeartbeatWriter:
    """Publish ``worker``'s heartbeats to the broker until it shuts down."""
    return HeartbeatWriter(worker, **options)


def _parse(raw: str) -> dict[str, Any] | None:
    if len(raw) > MAX_RECORD_BYTES:
        return None
    try:
        data = loads(raw)
    except DecodeError:
        return None
    return data if isinstance(data, dict) else None


def worker_status(record: Mapping[str, Any], heartbeat_s: float, at_ms: int) -> str:
    """``offline`` (stopped cleanly), ``lost`` (no beat for two heartbeats) or ``online``."""
    if record.get("offline"):
        return "offline"
    beat_s = record.get("heartbeat_s")
    if not isinstance(beat_s, int | float) or beat_s <= 0:
        beat_s = heartbeat_s
    last = record.get("at_ms")
    if not isinstance(last, int) or at_ms - last > 2 * beat_s * 1000:
        return "lost"
    return "online"


def list_workers(
    broker: Broker, heartbeat_s: float = 5.0, *, at_ms: int | None = None
) -> list[dict[str, Any]]:
    """Every worker with a heartbeat record, sorted by name, each with ``status``
    (see :func:`worker_status`; a record's own ``heartbeat_s`` wins over the argument) and
    ``age_s`` (seconds since its last beat)."""
    now = at_ms if at_ms is not None else now_ms()
    out = []
    for key, raw in broker.scan(KEY_PREFIX).items():
        record = _parse(raw)
        if record is None:
            continue
        record.setdefault("worker", key.removeprefix(KEY_PREFIX))
        record["status"] = worker_status(record, heartbeat_s, now)
        last = record.get("at_ms")
        record["age_s"] = round((now - last) / 1000, 1) if isinstance(last, int) else None
        out.append(record)
    return sorted(out, key=lambda r: str(r["worker"]))
