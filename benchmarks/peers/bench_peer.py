"""One peer library (celery or dramatiq) through the same workloads as Stem.

Runs with benchmarks/.peers-venv/bin/python (run_peers.py sets that up):

    bench_peer.py --lib celery --redis redis://127.0.0.1:PORT/0 --tasks 20000 --json -

enqueue-single  the library's one-message call (``delay()`` / ``send()``) N times.
enqueue-bulk    what the library offers for many messages at once (a group of 1,000).
drain           the worker started on a queue holding the N single-enqueued tasks (no
                results stored); from its ready signal until nothing is queued or
                unacknowledged (see ../common.py).
round trip      on the same idle worker, enqueue + wait for the stored result, sequentially.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

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

READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 300.0
BATCH = 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lib", choices=["celery", "dramatiq"], required=True)
    parser.add_argument("--redis", required=True, help="URL of a Redis to use (flushed)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--log-dir", default=str(HERE.parent / "results" / "logs"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    os.environ["BENCH_REDIS_URL"] = args.redis
    import redis

    lib = importlib.import_module(f"{args.lib}_app")
    client = redis.Redis.from_url(args.redis)
    client.flushdb()
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    n = args.tasks
    res = Result(args.lib, "redis", n, config=lib.CONFIG, bulk_how=lib.BULK_HOW)
    res.extra["version"] = lib.version()
    ready = ReadySocket()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            lib.enqueue_one()
        res.enqueue_single_per_s = rate(n, time.perf_counter() - t0)
        print(
            f"  {args.lib:<8} enqueue single {res.enqueue_single_per_s:>8,.0f}/s",
            file=sys.stderr,
            flush=True,
        )
        queued = lib.outstanding(client)
        if queued != n:
            raise RuntimeError(f"expected {n} queued messages, found {queued}")
        env = {
            **os.environ,
            **ready.env(),
            "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)]),
        }
        log_path = log_dir / f"{args.lib}-worker.log"
        argv = lib.worker_argv(sys.executable)
        with worker_process(argv, env, log_path, cwd=HERE) as proc:
            t_ready = ready.wait_ready(
                lib.READY_COUNT, READY_TIMEOUT_S, alive=lambda: proc.poll() is None
            )
            cpu0 = group_cpu_s(proc.pid), redis_cpu_s(args.redis) or 0.0
            t_done = wait_drained(lambda: lib.outstanding(client), n, DRAIN_TIMEOUT_S)
            cpu1 = group_cpu_s(proc.pid), redis_cpu_s(args.redis) or 0.0
            res.drain_per_s = rate(n, t_done - t_ready)
            cpu = {"worker": (cpu1[0] - cpu0[0]) / n * 1e6, "redis": (cpu1[1] - cpu0[1]) / n * 1e6}
            res.extra["drain_cpu_us_per_task"] = cpu
            print(
                f"  {args.lib:<8} drain {res.drain_per_s:>8,.0f}/s  cpu µs/task "
                f"worker {cpu['worker']:.0f}, redis {cpu['redis']:.0f}",
                file=sys.stderr,
                flush=True,
            )
            res.rt_p50_ms, res.rt_p99_ms = round_trips(lib.round_trip, args.round_trips)
            res.rt_n = args.round_trips
            print(
                f"  {args.lib:<8} round trip p50 {res.rt_p50_ms:.2f} ms p99 {res.rt_p99_ms:.2f} ms",
                file=sys.stderr,
                flush=True,
            )
        client.flushdb()
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            lib.enqueue_bulk(min(BATCH, n - start))
        res.enqueue_bulk_per_s = rate(n, time.perf_counter() - t0)
        print(
            f"  {args.lib:<8} enqueue bulk {res.enqueue_bulk_per_s:>8,.0f}/s",
            file=sys.stderr,
            flush=True,
        )
        client.flushdb()
    finally:
        ready.close()
        lib.close()
        client.close()
    emit([res], args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
