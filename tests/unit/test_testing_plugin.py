"""The pytest plugin users get with Stem: ``stem_app`` and ``stem_worker``."""

from __future__ import annotations

from typing import Any

from stem import Stem, states
from stem.testing import EmbeddedWorker


def test_fixtures_run_queued_tasks_in_process(stem_app: Stem, stem_worker: EmbeddedWorker) -> None:
    calls: list[int] = []

    @stem_app.task(name="double")
    def double(n: int) -> int:
        calls.append(n)
        return n * 2

    @stem_app.task(name="fan_out", queue="fan")
    def fan_out(n: int) -> int:
        for i in range(n):
            double.delay(i)  # tasks enqueued by tasks run in the same drain
        return n

    res = fan_out.delay(3)
    assert stem_worker.drain() == 4
    assert res.get(timeout=1) == 3
    assert sorted(calls) == [0, 1, 2]
    assert stem_worker.drain() == 0


def test_drain_leaves_delayed_tasks_in_the_broker(
    stem_app: Stem, stem_worker: EmbeddedWorker
) -> None:
    @stem_app.task(name="later")
    def later() -> str:
        return "ran"

    res = later.enqueue(countdown=60)
    assert stem_worker.drain() == 0
    assert res.state == states.PENDING
    assert {s.queue: s.delayed for s in stem_app.broker.stats()}["default"] == 1


def test_drain_does_not_run_revoked_tasks(stem_app: Stem, stem_worker: EmbeddedWorker) -> None:
    from stem import control

    ran: list[str] = []

    @stem_app.task(name="charge")
    def charge(tag: str) -> None:
        ran.append(tag)

    revoked, kept = charge.delay("revoked"), charge.delay("kept")
    control.revoke(stem_app, [revoked.id])
    assert stem_worker.drain() == 1
    assert ran == ["kept"]
    assert (revoked.state, kept.state) == (states.REVOKED, states.SUCCESS)


def test_failures_and_retries_are_visible_to_the_test(
    stem_app: Stem, stem_worker: EmbeddedWorker
) -> None:
    @stem_app.task(
        name="flaky",
        bind=True,
        max_retries=2,
        retry_backoff=False,
        default_retry_delay=0.0,
        autoretry_for=(KeyError,),
    )
    def flaky(ctx: Any) -> int:
        if ctx.attempt < 1:
            raise KeyError("missing")
        return ctx.attempt

    res = flaky.delay()
    ran = 0
    for _ in range(5):
        ran += stem_worker.drain()
        if res.ready():
            break
    assert res.get(timeout=1) == 1
    assert ran == 2


def test_explicit_queues(stem_app: Stem) -> None:
    @stem_app.task(name="a", queue="qa")
    def a() -> str:
        return "a"

    @stem_app.task(name="b", queue="qb")
    def b() -> str:
        return "b"

    ra, rb = a.delay(), b.delay()
    assert EmbeddedWorker(stem_app, ["qa"]).drain() == 1
    assert ra.get(timeout=1) == "a" and rb.state == states.PENDING
