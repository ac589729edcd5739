"""Retry policy: a pure function from (attempt, failure) to a decision.

Backoff is exponential with full jitter (a uniform draw between 0 and the capped exponential
delay), which spreads retries of a failed dependency instead of synchronising them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from stem.envelope import now_ms


@dataclass(frozen=True, slots=True)
class RetryDecision:
    retry: bool
    delay_s: float = 0.0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_retries`` None means retry forever; 0 means never."""

    max_retries: int | None = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 600.0
    backoff: bool = True
    jitter: bool = True

    def backoff_delay_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """Delay before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        if not self.backoff:
            return self.backoff_base_s
        ceiling = min(self.backoff_max_s, self.backoff_base_s * (2.0 ** min(attempt, 62)))
        if not self.jitter:
            return ceiling
        return float((rng or random).uniform(0.0, ceiling))

    def decide(
        self,
        attempt: int,
        *,
        countdown_s: float | None = None,
        max_retries: int | None = None,
        rng: random.Random | None = None,
    ) -> RetryDecision:
        """Whether a task that failed on ``attempt`` (0-based) runs again, and when.

        An explicit ``countdown_s`` (from ``ctx.retry(countdown=...)``) replaces the backoff;
        an explicit ``max_retries`` replaces the policy's own limit.
        """
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and attempt >= limit:
            return RetryDecision(False, 0.0, f"retries exhausted ({limit} allowed)")
        delay = countdown_s if countdown_s is not None else self.backoff_delay_s(attempt, rng)
        return RetryDecision(True, max(0.0, delay), "retry")


class Retry(Exception):
    """Raised (by ``ctx.retry``) to ask for the task to run again."""

    def __init__(
        self,
        countdown: float | None = None,
        eta: datetime | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> None:
        if eta is not None and countdown is None:
            countdown = max(0.0, (eta.timestamp() * 1000 - now_ms()) / 1000)
        self.countdown = countdown
        self.exc = exc
        self.max_retries = max_retries
        super().__init__(f"retry requested (countdown={countdown}, cause={exc!r})")


def seconds(value: float | timedelta | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)
