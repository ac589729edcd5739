"""Admission control for rate-limited and concurrency-capped tasks.

A task over its limit is handed back to the broker with a delay (never parked in a worker
slot). When a rate-limit slot is taken in the near future, the message goes back re-signed
with that slot in its headers, so it runs at its slot without taking a second one.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from stem.brokers.base import Delivery
from stem.envelope import Envelope, now_ms
from stem.errors import BrokerError, StemError
from stem.limits import ConcurrencyCap, RateLimiter, key_part, parse_rate

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.task import Task
    from stem.worker.settle import Settler

log = logging.getLogger("stem.limits")
_EARLY_MS = 25
# A booked slot older than this no longer admits its message (it books a new one).
_STALE_MS = 60_000
# The header of a deferred message holding the rate-limit slot it booked (epoch ms).
RATE_SLOT_HEADER = "rate_slot_ms"


class LimitGate:
    def __init__(self, app: Stem, settler: Settler) -> None:
        self.app = app
        self.settler = settler
        self.rates = RateLimiter(app.broker)
        self.caps = ConcurrencyCap(app.broker)
        self.overrides: dict[str, str] = {}  # task name -> rate set at run time

    def rate_for(self, task: Task[Any, Any]) -> str | None:
        return self.overrides.get(task.name, task.options.rate_limit)

    def _rate_key(self, task: Task[Any, Any], env: Envelope) -> str:
        opts = task.options
        base = f"rate:{opts.rate_limit_group or task.name}"
        spec = opts.rate_limit_key
        if spec is None:
            return base
        part = key_part("rate_limit_key", spec, env.args, env.kwargs, task.arguments)
        return f"{base}:{part}"

    def admit(self, task: Task[Any, Any], env: Envelope, delivery: Delivery) -> bool:
        """True: run now. False: the delivery was handed back to wait in the broker."""
        rate = self.rate_for(task)
        opts = task.options
        try:
            if rate and not self._rate_ok(task, env, delivery, parse_rate(rate)):
                return False
            if opts.concurrency_limit and not self.caps.acquire(
                f"conc:{task.name}",
                env.id,
                opts.concurrency_limit,
                opts.time_limit or 3600.0,
            ):
                self.settler.release(delivery, delay_s=0.1 + random.uniform(0, 0.2))
                return False
        except BrokerError as exc:
            if opts.limit_store_failure == "open":
                log.warning(
                    "limit store unreachable, running %s anyway (fail open): %s",
                    env.id,
                    exc,
                    extra={"event": "limit-fail-open"},
                )
                return True
            log.warning(
                "limit store unreachable, holding %s back (fail closed): %s",
                env.id,
                exc,
                extra={"event": "limit-fail-closed"},
            )
            self.settler.release(delivery, delay_s=1.0)
            return False
        return True

    def _rate_ok(
        self, task: Task[Any, Any], env: Envelope, delivery: Delivery, rate: float
    ) -> bool:
        now = now_ms()
        booked = env.headers.get(RATE_SLOT_HEADER)
        # A slot booked when this message was deferred, and still recent: a copy coming
        # back much later (a dead letter replayed) books a new one.
        if isinstance(booked, int) and now - _STALE_MS <= booked <= now + _EARLY_MS:
            return True
        slot = self.rates.take(self._rate_key(task, env), rate)
        if slot.run_at_ms is None:
            self.settler.release(delivery, delay_s=slot.retry_after_s)
            return False
        wait_ms = slot.run_at_ms - now
        if wait_ms <= _EARLY_MS:
            return True
        body = None
        keyring = self.app.keyring
        if keyring is None or not keyring.must_sign_but_cannot:
            try:
                body = self.app.seal(
                    env.replace(
                        headers={**env.headers, RATE_SLOT_HEADER: slot.run_at_ms}, signature=None
                    )
                )
            except StemError:
                body = None
        if body is None:
            self.settler.nack(delivery, delay_s=wait_ms / 1000, body=None)
        else:
            # Signed afresh: the bytes first delivered are spent, or a copy of them would
            # run again (booking a slot, and being signed afresh, in its turn).
            self.settler.put_back(delivery, env, delay_s=wait_ms / 1000, body=body)
        return False

    def finished(self, task: Task[Any, Any], env: Envelope) -> None:
        if task.options.concurrency_limit:
            try:
                self.caps.release(f"conc:{task.name}", env.id)
            except BrokerError as exc:
                log.warning("could not release concurrency slot of %s: %s", env.id, exc)
