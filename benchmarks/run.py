"""Throughput and latency harness. Prints a table of measured numbers; never pass/fail.

    python benchmarks/run.py                      # SQLite, 10,000 tasks
    python benchmarks/run.py --broker redis://127.0.0.1:6379/15 --tasks 20000

Workloads (one producer, one worker process):
  enqueue-single   task.delay() in a loop
  enqueue-bulk     app.publish() in batches of 1,000
  drain            a worker started on a full queue, until the queue is empty
  round-trip       sequential delay() + get() pairs: p50 / p99 latency
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _env(broker: str) -> dict[str, str]:
    return {**os.environ, "STEM_BENCH_BROKER": broker,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}


def _worker(broker: str, pool: str, concurrency: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "stem.cli.main", "--app", "bench_tasks:app", "--log-level",
         "warning", "worker", "--pool", pool, "-c", str(concurrency), "-Q", "bench"],
        env=_env(broker),
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _outstanding(app: object, queue: str = "bench") -> int:
    stats = {s.queue: s for s in app.broker.stats([queue])}  # type: ignore[attr-defined]
    s = stats.get(queue)
    return 0 if s is None else s.ready + s.reserved + s.delayed


def run(broker: str, tasks: int, pool: str, concurrency: int, round_trips: int) -> list[tuple]:
    os.environ["STEM_BENCH_BROKER"] = broker
    sys.path.insert(0, str(HERE))
    from bench_tasks import app, noop, noop_quiet

    rows: list[tuple] = []
    app.broker.purge("bench")

    t0 = time.perf_counter()
    for _ in range(tasks):
        noop.enqueue(queue="bench")
    single = tasks / (time.perf_counter() - t0)
    rows.append(("enqueue-single", f"{single:,.0f} tasks/s", f"{tasks} x delay()"))

    # Drain the single-enqueued tasks (results written: the full pipeline).
    worker = _worker(broker, pool, concurrency)
    t0 = time.perf_counter()
    while _outstanding(app) > 0:
        time.sleep(0.02)
    drain = tasks / (time.perf_counter() - t0)
    rows.append(("drain (with results)", f"{drain:,.0f} tasks/s",
                 f"pool={pool} c={concurrency}, includes worker start-up"))

    for _ in range(20):  # warm-up
        noop.enqueue(queue="bench").get(timeout=30)
    lat = []
    for _ in range(round_trips):
        t = time.perf_counter()
        noop.enqueue(queue="bench").get(timeout=30)
        lat.append((time.perf_counter() - t) * 1000)
    lat.sort()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    rows.append(("round-trip latency", f"p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                 f"{round_trips} sequential delay()+get()"))
    _stop(worker)

    batch = 1000
    envs = [app.build_envelope("bench.noop_quiet", queue="bench") for _ in range(tasks)]
    t0 = time.perf_counter()
    for i in range(0, tasks, batch):
        app.publish(envs[i:i + batch])
    bulk = tasks / (time.perf_counter() - t0)
    rows.append(("enqueue-bulk", f"{bulk:,.0f} tasks/s", f"batches of {batch}"))

    worker = _worker(broker, pool, concurrency)
    t0 = time.perf_counter()
    while _outstanding(app) > 0:
        time.sleep(0.02)
    quiet = tasks / (time.perf_counter() - t0)
    rows.append(("drain (ignore_result)", f"{quiet:,.0f} tasks/s",
                 f"pool={pool} c={concurrency}, includes worker start-up"))
    _stop(worker)
    del noop_quiet
    app.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=None, help="broker URL (default: a fresh SQLite)")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--pool", default="thread")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--round-trips", type=int, default=300)
    args = parser.parse_args()
    broker = args.broker
    if broker is None:
        bench_dir = HERE / "results" / "sqlite"
        shutil.rmtree(bench_dir, ignore_errors=True)
        bench_dir.mkdir(parents=True)
        broker = f"sqlite:///{bench_dir / 'stem.db'}"
    rows = run(broker, args.tasks, args.pool, args.concurrency, args.round_trips)
    from stem.observability.redact import redact_url

    print(f"\nbroker: {redact_url(broker)}  tasks: {args.tasks}  "
          f"python {sys.version.split()[0]}  cpus: {os.cpu_count()}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:<32} {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
