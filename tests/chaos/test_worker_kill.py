"""SIGKILL a worker in the middle of 2,000 tasks: nothing is lost, and only the tasks that
were running on the killed worker may run twice."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.chaos.conftest import ChaosRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TASKS = 2000
SLEEP_S = 0.004  # a few ms per task, so the kill lands mid-run with plenty left to do
LEASE_S = 3.0


def test_sigkill_a_worker_mid_run_loses_nothing(
    store: str, chaos_run: Callable[[str, str], ChaosRun]
) -> None:
    run = chaos_run(store, store.split(":", 1)[0])
    victim = run.start_worker(pool="process", concurrency=3, lease_s=LEASE_S)
    survivor = run.start_worker(pool="thread", concurrency=3, lease_s=LEASE_S)
    run.wait_ready(victim, survivor)
    run.publish(TASKS, SLEEP_S)
    # Kill once both workers are busy and well before the end.
    run.wait_started(TASKS // 4)
    assert any(ex.on(victim.pid) for ex in run.executions()), (
        f"the worker to kill has run nothing yet\n{run.logs()}"
    )
    run.kill(victim)
    killed_at = len(run.executions())
    # What a supervisor does: start a replacement. Its tasks come back after LEASE_S.
    run.start_worker(pool="process", concurrency=3, lease_s=LEASE_S)
    assert killed_at < TASKS, "every task had started before the kill; make tasks slower"

    tally = run.check_no_loss(f"worker SIGKILL at {killed_at}/{TASKS}", timeout_s=90)

    line = tally.line()
    # A task runs twice only if a killed worker had it in hand: running in a pool process
    # (or finished, with its result written but not yet acked). Each slot holds one task at
    # a time, so at most `slots` of them; tasks merely reserved by the victim and not yet
    # started run once, on another worker, after their lease lapses.
    assert tally.duplicated <= victim.slots, f"{line}: more duplicates than the victim's slots"
    for n, runs in tally.duplicated_tasks.items():
        assert any(ex.on(victim.pid) for ex in runs), (
            f"{line}: task {n} ran twice without the killed worker: {runs}"
        )
    assert survivor.alive(), run.logs()
