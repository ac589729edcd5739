"""Two workers on one queue never run the same live-leased task twice: tasks take more
than twice their lease, so they finish only because the running worker renews the lease,
and the other worker must never take them meanwhile."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest

from tests.chaos.conftest import ChaosRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

LEASE_S = 1.5
TASK_S = 3.5  # > 2 leases: each run needs at least two renewals
SLOTS = 3
# Fewer tasks than slots, published in two halves: both workers get some and both keep
# free slots, so each polls the queue the whole time the other's tasks outlive their
# first lease.
TASKS = 4


def test_two_workers_never_run_a_live_leased_task_twice(
    store: str, chaos_run: Callable[[str, str], ChaosRun]
) -> None:
    run = chaos_run(store, store.split(":", 1)[0])
    workers = [
        run.start_worker(pool="thread", concurrency=SLOTS, lease_s=LEASE_S),
        run.start_worker(pool="process", concurrency=SLOTS, lease_s=LEASE_S),
    ]
    run.wait_ready(*workers)
    run.publish(TASKS // 2, TASK_S)
    run.wait_started(TASKS // 2)
    run.publish(TASKS - TASKS // 2, TASK_S)

    tally = run.check_no_loss(f"{TASKS} tasks of {TASK_S}s, lease {LEASE_S}s", timeout_s=60)

    line = tally.line()
    counts = Counter(ex.n for ex in run.executions())
    twice = {n: c for n, c in counts.items() if c > 1}
    lost_leases = [w.name for w in workers if "was lost" in w.log_text()]
    assert not twice and tally.duplicated == 0, (
        f"{line}: tasks ran more than once {twice} {tally.duplicated_tasks}; "
        f"workers that reported a lost lease: {lost_leases}\n{run.logs()}"
    )
    assert tally.executed == TASKS, line
    # Both workers took part, so they really competed for the same queue.
    ran_on = {w.name for w in workers for ex in run.executions() if ex.on(w.pid)}
    assert ran_on == {w.name for w in workers}, f"{line}: only {ran_on} ran tasks"
