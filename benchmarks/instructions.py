"""Instructions a worker executes per task, counted by valgrind: a cost that the load and
clock speed of a shared machine do not move, to compare changes and signing modes.

    python benchmarks/instructions.py [--signing none,hmac,ed25519] [--tasks 400,2000]
                                      [--pool thread -c 16] [--json PATH]

For each signing mode, a worker running under ``valgrind --tool=callgrind`` drains the
no-op task of the drain workload (``bench.noop_quiet``) from a throwaway Redis, once for
each of two batch sizes. The difference of the two counts divided by the difference of the
sizes is the cost of one task, without start-up and shutdown. Only the worker's
instructions are counted (every process of its pool), not Redis's; HMAC and Ed25519 run in
OpenSSL and are counted like the rest. Drain *rates* stay the job of ``run.py``: this
number says how much work a task is, not how fast a machine gets through it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path[:0] = [str(HERE), str(ROOT)]

import run  # noqa: E402
import servers  # noqa: E402
from common import ReadySocket, wait_drained, worker_process  # noqa: E402
from stem_bench import QUEUE, worker_argv  # noqa: E402

_COLLECTED = re.compile(rb"Collected\s*:\s*(\d+)")
TASK = "bench.noop_quiet"


def count_one(url: str, pool: str, concurrency: int, n: int) -> int:
    """Instructions of one worker process group draining ``n`` queued tasks (this process
    holds the signing keys of its mode in its environment)."""
    import bench_tasks  # reads STEM_BENCH_BROKER and STEM_SIGNING_* at import

    app = bench_tasks.app
    run.flush_redis(url)
    for start in range(0, n, 500):
        app.publish([app.build_envelope(TASK, queue=QUEUE) for _ in range(min(500, n - start))])
    ready = ReadySocket()
    log_path = RESULTS / "logs" / f"callgrind-{pool}-{n}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    argv += worker_argv(pool, concurrency)
    env = {
        **os.environ,
        **ready.env(),
        "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)]),
    }

    def outstanding() -> int:
        return sum(s.ready + s.reserved + s.delayed for s in app.broker.stats([QUEUE]))

    with worker_process(argv, env, log_path, cwd=ROOT) as proc:
        ready.wait_ready(1, 900, alive=lambda: proc.poll() is None)
        wait_drained(outstanding, n, 3600)
    counts = [int(c) for c in _COLLECTED.findall(log_path.read_bytes())]
    if not counts:
        raise RuntimeError(f"valgrind reported no count; see {log_path}")
    return sum(counts)


def one_mode(url: str, pool: str, concurrency: int, sizes: tuple[int, int]) -> dict[str, Any]:
    small, large = (count_one(url, pool, concurrency, n) for n in sizes)
    return {
        "instructions_per_task": (large - small) / (sizes[1] - sizes[0]),
        "counts": {str(sizes[0]): small, str(sizes[1]): large},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--signing", default="none,hmac,ed25519")
    parser.add_argument("--tasks", default="400,2000", help="the two batch sizes")
    parser.add_argument("--pool", default="thread")
    parser.add_argument("-c", "--concurrency", type=int, default=16)
    parser.add_argument("--json", default=None, help="write the numbers here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one mode
    parser.add_argument("--broker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    small, large = (int(x) for x in args.tasks.split(","))
    if small >= large:
        parser.error("--tasks takes two batch sizes, the smaller first")
    if args.one is not None:
        out = one_mode(args.broker, args.pool, args.concurrency, (small, large))
        print(json.dumps(out))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with servers.redis_server() as url:
        for mode in args.signing.split(","):
            env = {**os.environ, **run.signing_env(mode), "STEM_BENCH_BROKER": url}
            cmd = [sys.executable, __file__, "--one", mode, "--broker", url, "--tasks"]
            cmd += [args.tasks, "--pool", args.pool, "-c", str(args.concurrency)]
            done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
            per = results[mode]["instructions_per_task"]
            print(f"{mode:<8} {per / 1000:8.1f} thousand instructions per task", flush=True)
    base = results.get("none", {}).get("instructions_per_task")
    if base:
        for mode, row in results.items():
            row["vs_unsigned"] = row["instructions_per_task"] / base - 1
            print(f"{mode:<8} {row['vs_unsigned'] * 100:+6.1f} % vs unsigned")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
