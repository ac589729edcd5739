"""Cut the network between a worker and the Redis / PostgreSQL server for a few seconds,
with a TCP proxy (tests/fixtures/tcp_proxy.py) between them: connections reset, or traffic
silently dropped. Every task still ends as SUCCESS; only the cut-off worker's tasks may run
twice. A worker whose connections turned into black holes for good must notice and carry on
by itself: a worker that is alive but no longer consuming is the bug this file hunts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.chaos.conftest import SERVERS, ChaosRun, Worker
from tests.fixtures.tcp_proxy import CutMode, TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TASKS = 500
SLEEP_S = 0.01
LEASE_S = 3.0
CUT_S = LEASE_S + 1.0  # longer than a lease: the cut-off worker's leases lapse


@pytest.fixture(params=SERVERS)
def server_url(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    url: str = request.getfixturevalue(f"{kind}_url")
    return url


@pytest.fixture
def proxy(server_url: str) -> Iterator[TcpProxy]:
    from urllib.parse import urlsplit

    parts = urlsplit(server_url)
    assert parts.hostname and parts.port
    with TcpProxy(parts.hostname, parts.port) as p:
        yield p


@pytest.mark.parametrize("mode", ["reset", "drop"])
def test_network_cut_mid_run_loses_nothing(
    server_url: str, proxy: TcpProxy, mode: CutMode, chaos_run: Callable[[str, str], ChaosRun]
) -> None:
    run = chaos_run(server_url, server_url.split(":", 1)[0])
    # The producer and one worker talk to the server directly; the other worker goes
    # through the proxy, so only it is cut off.
    cut_off = run.start_worker(
        pool="process", concurrency=3, lease_s=LEASE_S, url=proxy.rewrite(server_url)
    )
    direct = run.start_worker(pool="thread", concurrency=3, lease_s=LEASE_S)
    run.wait_ready(cut_off, direct)
    run.publish(TASKS, SLEEP_S)
    run.wait_started(TASKS // 4)
    proxy.cut(mode)
    cut_at = len(run.executions())
    time.sleep(CUT_S)
    proxy.restore()
    restored_s = time.time()
    assert cut_at < TASKS, "every task had started before the cut; make tasks slower"

    tally = run.check_no_loss(f"network cut ({mode}) at {cut_at}/{TASKS}", timeout_s=75)

    line = tally.line()
    # Only the cut-off worker can lose leases: a task it had in hand when the cut began
    # could not be settled, its lease lapsed during the cut and the direct worker ran it
    # again. It reserves nothing new while cut off, and each slot holds one task.
    assert tally.duplicated <= cut_off.slots, f"{line}: more duplicates than its slots"
    for n, runs in tally.duplicated_tasks.items():
        assert any(ex.on(cut_off.pid) and ex.at_s < restored_s for ex in runs), (
            f"{line}: task {n} ran twice but not on the cut-off worker during the cut: {runs}"
        )
    # The cut-off worker is back at work: alone now, it runs a new batch.
    assert_works_alone(run, cut_off, others=[direct])


def assert_works_alone(run: ChaosRun, worker: Worker, others: list[Worker]) -> None:
    for other in others:
        run.stop(other)
    assert worker.alive(), f"the worker exited\n{run.logs()}"
    before = len(run.ids)
    run.publish(30, SLEEP_S)
    tally = run.check_no_loss("a new batch after the fault", timeout_s=30)
    assert tally.lost == 0
    late = {ex.n for ex in run.executions() if ex.n >= before}
    assert all(ex.on(worker.pid) for ex in run.executions() if ex.n >= before), (
        f"tasks of the new batch ran elsewhere: {sorted(late)}"
    )


def test_worker_recovers_from_connections_that_went_silent_for_good(
    server_url: str, proxy: TcpProxy, chaos_run: Callable[[str, str], ChaosRun]
) -> None:
    """Every connection the worker had open becomes a black hole and stays one (a peer
    that vanished without a reset: a NAT entry dropped, a host gone); new connections work.
    TCP keepalives cannot see this (the proxy's kernel answers them), so only the client's
    own timeouts can: the lone worker must notice, reconnect and finish every task."""
    kind = server_url.split(":", 1)[0]
    worker_url = proxy.rewrite(server_url)
    # The mechanism under test is the client's reply deadline; 3 s instead of the 15 s
    # default keeps the test short (with the default it recovers after ~15 s).
    worker_url += "?socket_timeout=3" if kind == "redis" else "?call_timeout_s=3"
    run = chaos_run(server_url, kind)
    worker = run.start_worker(pool="thread", concurrency=3, lease_s=LEASE_S, url=worker_url)
    run.wait_ready(worker)
    tasks = 200
    run.publish(tasks, SLEEP_S)
    run.wait_started(tasks // 4)
    proxy.cut("drop")
    time.sleep(1.0)
    proxy.restore(keep_dropped=True)
    silent_at = len(run.executions())
    assert silent_at < tasks, "every task had started before the cut; make tasks slower"

    tally = run.check_no_loss(f"connections silent for good at {silent_at}/{tasks}", 45)
    # Tasks in hand when the connections went silent may run again if their leases lapsed
    # before the worker reconnected: at most one per slot.
    assert tally.duplicated <= worker.slots, tally.line()
    assert worker.alive(), run.logs()
