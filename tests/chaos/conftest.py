"""Shared harness for the chaos tests: real ``stem worker`` processes (the CLI, as an
operator runs it) on the app in ``chaos_tasks.py``, a producer in the test process, and a
record of every task execution, so each scenario can count what ran, what ran twice and
what never finished.

Counting: ``chaos.work(n)`` appends a ``start`` line when it begins (see chaos_tasks.py).
``executed`` is the number of starts, ``duplicated`` the starts beyond the first for the
same task, ``lost`` the tasks that do not end as SUCCESS with their own value.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from stem import Stem, states
from stem.errors import StemError
from stem.result import ResultRecord
from tests.fixtures.stores import store_url

CHAOS_DIR = Path(__file__).parent
ROOT = CHAOS_DIR.parents[1]
QUEUE = "chaos"
TASK = "chaos.work"

STORES = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
]
SERVERS = STORES[1:]


def value_for(n: int) -> int:
    """What ``chaos.work(n, ...)`` returns (chaos_tasks.py), so each task is checked to
    carry its own result."""
    return n * 7 + 3


@dataclass(frozen=True)
class Execution:
    n: int
    pid: int
    ppid: int
    at_s: float

    def on(self, worker_pid: int) -> bool:
        """Ran on that worker: in the worker itself (thread pool) or in one of its pool
        processes (process pool)."""
        return worker_pid in (self.pid, self.ppid)


@dataclass(frozen=True)
class Tally:
    executed: int
    duplicated: int
    lost: int
    duplicated_tasks: dict[int, list[Execution]]  # n -> every execution of it
    bad: dict[int, str]  # n -> what is wrong with its result

    def line(self) -> str:
        return f"executed={self.executed} duplicated={self.duplicated} lost={self.lost}"


class Worker:
    def __init__(self, proc: subprocess.Popen[bytes], name: str, log: Path, slots: int):
        self.proc = proc
        self.name = name
        self.log = log
        self.slots = slots

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class ChaosRun:
    """One scenario: a producer on ``url``, workers on ``url`` or on another URL (a
    proxy), and the execution record."""

    def __init__(self, tmp: Path, url: str, label: str) -> None:
        self.tmp = tmp
        self.url = url
        self.label = label
        self.record = tmp / "executions.log"
        self.record.touch()
        self.workers: list[Worker] = []
        self.producer = Stem("chaos-producer", broker=url, backend=url)
        self.ids: list[str] = []

    # -- workers -----------------------------------------------------------------------------

    def start_worker(
        self,
        *,
        pool: str = "process",
        concurrency: int = 3,
        lease_s: float = 3.0,
        url: str | None = None,
        extra: Sequence[str] = (),
    ) -> Worker:
        name = f"w{len(self.workers)}"
        log = self.tmp / f"{name}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(CHAOS_DIR), str(ROOT)]),
            "STEM_APP": "chaos_tasks:app",
            "STEM_CHAOS_BROKER": url or self.url,
            "STEM_CHAOS_RECORD": str(self.record),
        }
        args = [
            sys.executable, "-m", "stem.cli.main", "worker",
            "-Q", QUEUE, "--pool", pool, "-c", str(concurrency), "--lease", str(lease_s),
            "--name", f"{self.label}-{name}", *extra,
        ]  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        worker = Worker(proc, name, log, concurrency)
        self.workers.append(worker)
        return worker

    def wait_ready(self, *workers: Worker, timeout_s: float = 30) -> None:
        """Wait until each worker logged that it is ready (its pool is up)."""
        deadline = time.monotonic() + timeout_s
        for w in workers:
            while " ready: " not in w.log_text():
                if not w.alive() or time.monotonic() > deadline:
                    raise AssertionError(f"worker {w.name} did not become ready\n{self.logs()}")
                time.sleep(0.02)

    def kill(self, worker: Worker) -> None:
        """SIGKILL the worker process (its pool processes notice and exit on their own)."""
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(10)

    def stop_all(self) -> None:
        for w in self.workers:
            if w.alive():
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        self.producer.close()

    def logs(self, tail: int = 4000) -> str:
        parts = [f"--- {w.name} (pid {w.pid}) ---\n{w.log_text()[-tail:]}" for w in self.workers]
        return "\n".join(parts)

    # -- tasks -------------------------------------------------------------------------------

    def publish(self, count: int, sleep_s: float) -> None:
        """Publish ``count`` more tasks, numbered on from the ones already published."""
        first = len(self.ids)
        envs = [
            self.producer.build_envelope(TASK, [n, sleep_s], queue=QUEUE)
            for n in range(first, first + count)
        ]
        for i in range(0, count, 500):
            self.producer.publish(envs[i : i + 500])
        self.ids.extend(e.id for e in envs)

    def stop(self, worker: Worker) -> None:
        """SIGTERM: the worker drains and exits."""
        worker.proc.terminate()
        worker.proc.wait(30)

    def executions(self) -> list[Execution]:
        out = []
        text = self.record.read_text()
        # Whole lines only: a task may be writing the last one as it is read.
        for line in text[: text.rfind("\n") + 1].splitlines():
            kind, n, pid, ppid, at = line.split()
            if kind == "start":
                out.append(Execution(int(n), int(pid), int(ppid), float(at)))
        return out

    def wait_started(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.executions()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"only {len(self.executions())} of {count} executions started within "
                    f"{timeout_s}s\n{self.logs()}"
                )
            dead = [w for w in self.workers if not w.alive()]
            if dead and len(dead) == len(self.workers):
                raise AssertionError(f"every worker exited\n{self.logs()}")
            time.sleep(0.02)

    def results(self) -> list[ResultRecord | None]:
        return self.producer.result_store.read_many(self.ids)

    def wait_results(self, timeout_s: float) -> list[ResultRecord | None]:
        """Poll until every task is in a final state (or the time is up); the store may be
        unreachable for a while (a restart), which only delays the answer."""
        deadline = time.monotonic() + timeout_s
        records: list[ResultRecord | None] = [None] * len(self.ids)
        while True:
            try:
                records = self.results()
            except StemError:
                pass
            else:
                if all(r is not None and r.state in states.READY_STATES for r in records):
                    return records
            if time.monotonic() > deadline:
                return records
            time.sleep(0.25)

    def tally(self, records: Sequence[ResultRecord | None]) -> Tally:
        runs = self.executions()
        per_task: defaultdict[int, list[Execution]] = defaultdict(list)
        for ex in runs:
            per_task[ex.n].append(ex)
        bad: dict[int, str] = {}
        for n, rec in enumerate(records):
            if rec is None:
                bad[n] = "no result"
            elif rec.state != states.SUCCESS:
                bad[n] = f"{rec.state}: {rec.error}"
            elif rec.result != value_for(n):
                bad[n] = f"wrong value {rec.result!r}"
        duplicated = {n: exs for n, exs in per_task.items() if len(exs) > 1}
        return Tally(
            executed=len(runs),
            duplicated=sum(len(exs) - 1 for exs in duplicated.values()),
            lost=len(bad),
            duplicated_tasks=duplicated,
            bad=bad,
        )

    def report(self, scenario: str, tally: Tally) -> str:
        """Print the counts (``pytest -s`` shows them) and return them for messages."""
        line = f"[chaos] {self.label} {scenario}: {tally.line()}"
        print(line)
        return line

    def check_no_loss(self, scenario: str, timeout_s: float) -> Tally:
        """Wait for every result; assert nothing was lost and the queue is empty."""
        records = self.wait_results(timeout_s)
        tally = self.tally(records)
        line = self.report(scenario, tally)
        if tally.lost:
            sample = dict(list(tally.bad.items())[:10])
            missing = [n for n in range(len(self.ids)) if n not in {e.n for e in self.executions()}]
            raise AssertionError(
                f"{line}\nnot SUCCESS (first 10): {sample}\nnever started: {len(missing)} "
                f"(first 10: {missing[:10]})\n{self.logs()}"
            )
        assert tally.executed >= len(self.ids), line
        self.assert_queue_empty(line)
        return tally

    def assert_queue_empty(self, line: str) -> None:
        # Acks follow result writes: give the last few a moment to land.
        deadline = time.monotonic() + 10
        while True:
            stats = [s for s in self.producer.broker.stats([QUEUE]) if s.queue == QUEUE]
            depths = (0, 0, 0, 0)
            if stats:
                depths = (stats[0].ready, stats[0].delayed, stats[0].reserved, stats[0].dead)
            if depths == (0, 0, 0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert depths == (0, 0, 0, 0), (
            f"{line}\nqueue {QUEUE} not empty (ready, delayed, reserved, dead) = {depths}"
        )


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A clean store URL per test: a fresh SQLite file or the shared Redis/PostgreSQL server
    (flushed/truncated by its fixture)."""
    kind: str = request.param
    return store_url(request, kind, tmp_path)


@pytest.fixture
def chaos_run(tmp_path: Path) -> Iterator[Callable[[str, str], ChaosRun]]:
    """``chaos_run(url, label)`` makes a run; its workers are stopped after the test."""
    runs: list[ChaosRun] = []

    def make(url: str, label: str) -> ChaosRun:
        directory = tmp_path / f"run{len(runs)}"
        directory.mkdir()
        run = ChaosRun(directory, url, label)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.stop_all()
