"""Stem's workloads on one broker, in this process as the producer (run by run.py).

    python benchmarks/stem_bench.py --broker URL [--tasks 20000] [--pools thread:8,process:2]
                                    [--round-trips 300] [--json PATH]

Signing keys, if any, come from STEM_SIGNING_* in the environment (set by run.py), which the
worker subprocesses inherit. Workloads, for one producer and one worker process:

enqueue-single   ``task.delay()`` N times, one message per call (sealed, signed if keys
                 are set, published): N / elapsed.
enqueue-bulk     ``app.build_envelope`` + ``app.publish`` in batches of 1,000 (envelope
                 building included): N / elapsed; once per pool below, the median reported.
drain            per pool: the worker is started on a queue holding N no-op tasks that
                 store no result; from its sd_notify ``READY=1`` until the queue has nothing
                 ready or leased (see common.py).
round trip       per pool, on the same (now idle) worker: ``delay()`` + ``get()`` of a no-op
                 that stores its result, sequentially; 20 warm-up, then --round-trips timed.
drain+results    for the best pool and the best process pool: as drain, but every task
                 stores its result before it is acknowledged.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from common import (  # noqa: E402
    ReadySocket,
    Result,
    emit,
    group_cpu_s,
    rate,
    redis_cpu_s,
    round_trips,
    wait_drained,
    worker_process,
)

QUEUE = "bench"
BATCH = 1000
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 300.0


def _cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())


def parse_pools(text: str) -> list[tuple[str, int, int]]:
    """``POOL:CONCURRENCY[:PREFETCH]`` items, comma-separated (prefetch: ``--prefetch``)."""
    pools = []
    for item in text.split(","):
        name, _, rest = item.strip().partition(":")
        conc, _, prefetch = rest.partition(":")
        pools.append((name, int(conc or "1"), int(prefetch or "0")))
    return pools


def config_name(pool: str, conc: int, prefetch: int) -> str:
    return f"{pool} c={conc}" + (f" prefetch={prefetch}" if prefetch else "")


def worker_argv(pool: str, concurrency: int, prefetch: int = 0) -> list[str]:
    """The command of a benchmark worker on the drain queue."""
    return [
        sys.executable,
        "-m",
        "stem.cli.main",
        "--app",
        "bench_tasks:app",
        "--log-level",
        "warning",
        "worker",
        "--pool",
        pool,
        "-c",
        str(concurrency),
        "--prefetch",
        str(prefetch),
        "-Q",
        QUEUE,
    ]


class StemBench:
    def __init__(self, broker: str, tasks: int, log_dir: Path) -> None:
        os.environ["STEM_BENCH_BROKER"] = broker
        import bench_tasks

        self.broker_url = broker
        self.mod = bench_tasks
        self.app = bench_tasks.app
        self.tasks = tasks
        self.log_dir = log_dir
        self.ready = ReadySocket()
        self.bulk_rates: list[float] = []

    # -- helpers ---------------------------------------------------------------------------

    def outstanding(self) -> int:
        for s in self.app.broker.stats([QUEUE]):
            if s.queue == QUEUE:
                return int(s.ready + s.reserved + s.delayed)
        return 0

    def task_name(self, pool: str, *, results: bool) -> str:
        # The async pool runs coroutines natively; the others run plain functions.
        prefix = "bench.anoop" if pool == "async" else "bench.noop"
        return prefix if results else f"{prefix}_quiet"

    def enqueue_single(self, pool: str) -> float:
        task = self.app.get_task(self.task_name(pool, results=False))
        n = self.tasks
        t0 = time.perf_counter()
        for _ in range(n):
            task.enqueue(queue=QUEUE)
        return rate(n, time.perf_counter() - t0)

    def enqueue_bulk(self, name: str) -> float:
        app, n = self.app, self.tasks
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            app.publish(
                [app.build_envelope(name, queue=QUEUE) for _ in range(min(BATCH, n - start))]
            )
        r = rate(n, time.perf_counter() - t0)
        self.bulk_rates.append(r)
        return r

    def worker_env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.ready.env(),
            "STEM_BENCH_BROKER": self.broker_url,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
        }

    def drain(
        self,
        pool: str,
        concurrency: int,
        prefetch: int = 0,
        then: Callable[[], Any] | None = None,
    ) -> tuple[float, dict[str, float], Any]:
        """Start a worker on the full queue; return (tasks/s, CPU µs per task of the worker
        and of Redis during the drain, then()'s value)."""
        n = self.outstanding()
        if n != self.tasks:
            raise RuntimeError(f"expected {self.tasks} queued tasks before the drain, found {n}")
        self.ready.drain_pending()
        log_path = self.log_dir / f"worker-{pool}-{concurrency}-{prefetch}.log"
        with worker_process(
            worker_argv(pool, concurrency, prefetch), self.worker_env(), log_path, cwd=ROOT
        ) as proc:
            t0 = self.ready.wait_ready(1, READY_TIMEOUT_S, alive=lambda: proc.poll() is None)
            cpu0 = group_cpu_s(proc.pid), self.server_cpu_s()
            t1 = wait_drained(self.outstanding, n, DRAIN_TIMEOUT_S)
            cpu1 = group_cpu_s(proc.pid), self.server_cpu_s()
            extra = then() if then is not None else None
        cpu = {"worker": (cpu1[0] - cpu0[0]) / n * 1e6}
        if cpu0[1] is not None and cpu1[1] is not None:
            cpu["redis"] = (cpu1[1] - cpu0[1]) / n * 1e6
        return rate(n, t1 - t0), cpu, extra

    def server_cpu_s(self) -> float | None:
        return redis_cpu_s(self.broker_url) if self.broker_url.startswith("redis") else None

    def round_trips(self, pool: str, n: int) -> tuple[float, float]:
        task = self.app.get_task(self.task_name(pool, results=True))
        return round_trips(lambda: task.enqueue(queue=QUEUE).get(timeout=30), n)

    # -- the run ---------------------------------------------------------------------------

    def run(self, label: str, pools: list[tuple[str, int, int]], rt_n: int) -> list[Result]:
        self.app.broker.purge(QUEUE)
        results: list[Result] = []
        single = self.enqueue_single(pools[0][0])
        for i, (pool, conc, prefetch) in enumerate(pools):
            res = Result("stem", label, self.tasks, config=config_name(pool, conc, prefetch))
            if i == 0:
                res.enqueue_single_per_s = single
            else:
                res.enqueue_bulk_per_s = self.enqueue_bulk(self.task_name(pool, results=False))
            res.bulk_how = f"app.publish, batches of {BATCH}"
            res.drain_per_s, cpu, (p50, p99) = self.drain(
                pool, conc, prefetch, then=functools.partial(self.round_trips, pool, rt_n)
            )
            res.extra["drain_cpu_us_per_task"] = cpu
            res.rt_p50_ms, res.rt_p99_ms, res.rt_n = p50, p99, rt_n
            results.append(res)
            print(
                f"  {label:<8} {res.config:<14} drain {res.drain_per_s:>8,.0f}/s  "
                f"rt p50 {p50:.2f} ms p99 {p99:.2f} ms  cpu µs/task {_cpu(cpu)}",
                file=sys.stderr,
                flush=True,
            )
        # With results stored: the best pool overall and the best process pool.
        best = max(results, key=lambda r: r.drain_per_s or 0)
        procs = [r for r in results if r.config.startswith("process")]
        chosen = [best]
        if procs:
            best_proc = max(procs, key=lambda r: r.drain_per_s or 0)
            if best_proc is not best:
                chosen.append(best_proc)
        for res in chosen:
            pool, conc, prefetch = pools[results.index(res)]
            self.enqueue_bulk(self.task_name(pool, results=True))
            res.drain_results_per_s, cpu, _ = self.drain(pool, conc, prefetch)
            res.extra["drain_results_cpu_us_per_task"] = cpu
            print(
                f"  {label:<8} {res.config:<14} drain with results "
                f"{res.drain_results_per_s:>8,.0f}/s  cpu µs/task {_cpu(cpu)}",
                file=sys.stderr,
                flush=True,
            )
        for res in results:
            res.extra["bulk_median_per_s"] = statistics.median(self.bulk_rates)
        return results

    def close(self) -> None:
        self.ready.close()
        self.app.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", required=True, help="broker URL")
    parser.add_argument("--label", default=None, help="name of this run in the output")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--pools", default="thread:8", help="e.g. thread:8,async:16,process:2")
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--log-dir", default=str(HERE / "results" / "logs"))
    parser.add_argument("--json", default=None, help="write results here (- for stdout)")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    label = args.label or args.broker.split(":", 1)[0]
    bench = StemBench(args.broker, args.tasks, log_dir)
    try:
        results = bench.run(label, parse_pools(args.pools), args.round_trips)
    finally:
        bench.close()
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
