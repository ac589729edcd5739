"""Restart (or crash) the Redis / PostgreSQL server in the middle of a run: every task still
ends as SUCCESS, and only tasks that were in a worker's hands during the outage run twice.

Redis runs with ``appendonly yes`` and ``appendfsync always`` (tests/fixtures/redis_server.py),
so even a SIGKILL loses no acknowledged write; PostgreSQL keeps ``synchronous_commit`` on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import pytest

from tests.chaos.conftest import SERVERS, ChaosRun

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TASKS = 600
SLEEP_S = 0.01
LEASE_S = 3.0
OUTAGE_S = LEASE_S + 1.0  # longer than a lease, so leases lapse while the server is down


class Server(Protocol):
    def stop(self) -> None: ...
    def start(self) -> None: ...
    def kill(self) -> None: ...


@pytest.fixture(params=SERVERS)
def server(request: pytest.FixtureRequest) -> tuple[str, Server]:
    """(clean URL, the shared server to restart). The URL fixtures start the server again
    for the next test if one of ours failed while it was down."""
    kind: str = request.param
    url: str = request.getfixturevalue(f"{kind}_url")
    handle: Server = request.getfixturevalue(f"{kind}_server")
    return url, handle


@pytest.mark.parametrize("how", ["restart", "crash"])
def test_server_restart_mid_run_loses_nothing(
    server: tuple[str, Server], how: str, chaos_run: Callable[[str, str], ChaosRun]
) -> None:
    url, handle = server
    run = chaos_run(url, url.split(":", 1)[0])
    workers = [
        run.start_worker(pool="process", concurrency=3, lease_s=LEASE_S),
        run.start_worker(pool="thread", concurrency=3, lease_s=LEASE_S),
    ]
    run.wait_ready(*workers)
    run.publish(TASKS, SLEEP_S)
    run.wait_started(TASKS // 4)

    if how == "restart":
        handle.stop()  # graceful: SIGTERM (Redis), pg_ctl stop -m fast (PostgreSQL)
    else:
        handle.kill()  # a crash: SIGKILL of redis-server / the postmaster
    down_at = len(run.executions())
    time.sleep(OUTAGE_S)
    handle.start()
    back_at_s = time.time()
    assert down_at < TASKS, "every task had started before the outage; make tasks slower"

    tally = run.check_no_loss(f"server {how} at {down_at}/{TASKS}", timeout_s=75)

    line = tally.line()
    # A task runs twice only if a worker had it in hand when the server went away: its
    # result or ack could not be written, its lease lapsed during the outage, and it was
    # delivered again. A worker takes no new work while the server is down (reserve fails),
    # and each slot holds one task, so at most one duplicate per slot of every worker.
    slots = sum(w.slots for w in workers)
    assert tally.duplicated <= slots, f"{line}: more duplicates than slots ({slots})"
    for n, runs in tally.duplicated_tasks.items():
        first = min(ex.at_s for ex in runs)
        assert first < back_at_s, f"{line}: task {n} first ran after the outage: {runs}"
    assert all(w.alive() for w in workers), f"a worker exited\n{run.logs()}"
