"""Where a draining worker spends its time: py-spy samples the worker (and its pool
processes) from READY until the queue is empty, then prints the hottest functions.

    .venv/bin/pip install py-spy        # a profiling tool, not a project dependency
    python benchmarks/profile_drain.py --broker redis --pool thread -c 8 [--signing hmac]

Only threads holding the GIL are sampled (py-spy --gil): a worker process runs Python on
one core at a time, so this is where its CPU goes. "self" is time in the function's own
code; "total" includes what it calls. Percentages are of GIL-holding samples.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run  # noqa: E402
from common import wait_drained, worker_process  # noqa: E402
from stem_bench import QUEUE, StemBench, worker_argv  # noqa: E402


def summarize(raw: Path, top: int) -> str:
    """Top functions by self and by total time from py-spy's collapsed stacks."""
    self_n: collections.Counter[str] = collections.Counter()
    total_n: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if f]
        samples += n
        # frames look like "function (path/file.py:line)"; drop the line for grouping
        names = [f.rsplit(":", 1)[0] + ")" if f.endswith(")") else f for f in frames]
        self_n[names[-1]] += n
        for name in set(names):
            total_n[name] += n
    out = [f"{samples} samples holding the GIL", "", "self %  function"]
    out += [f"{100 * c / samples:6.1f}  {name}" for name, c in self_n.most_common(top)]
    out += ["", "total %  function (stem/ and the drivers only)"]
    shown = 0
    for name, c in total_n.most_common():
        if "stem/" in name or "redis/" in name or "psycopg/" in name or "sqlite" in name:
            out.append(f"{100 * c / samples:6.1f}  {name}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", default="redis", help="sqlite, redis, postgres or a URL")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--pool", default="thread")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--signing", choices=["none", *run.SIGNING], default="none")
    parser.add_argument("--results", action="store_true", help="tasks store their results")
    parser.add_argument("--url-options", default="", help="query options for the broker URL")
    parser.add_argument(
        "--parent-only",
        action="store_true",
        help="sample the worker process alone, not its pool processes",
    )
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", default=str(HERE / "results" / "profile.txt"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(py_spy, os.X_OK):
        sys.exit("py-spy is not installed: .venv/bin/pip install py-spy")
    os.environ.update(run.signing_env(args.signing))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".raw")
    with run.broker_url(args.broker, "profile") as (url, _):
        if args.url_options:
            url += ("&" if "?" in url else "?") + args.url_options
        bench = StemBench(url, args.tasks, out.parent)
        try:
            bench.app.broker.purge(QUEUE)
            bench.enqueue_bulk(bench.task_name(args.pool, results=args.results))
            argv = worker_argv(args.pool, args.concurrency)
            log_path = out.parent / "profile-worker.log"
            with worker_process(argv, bench.worker_env(), log_path) as proc:
                t0 = bench.ready.wait_ready(1, 60, alive=lambda: proc.poll() is None)
                spy = subprocess.Popen(
                    [
                        py_spy,
                        "record",
                        "-p",
                        str(proc.pid),
                        *([] if args.parent_only else ["--subprocesses"]),
                        "-r",
                        "1000",
                        "--gil",
                        "--nonblocking",
                        "-f",
                        "raw",
                        "-o",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                t1 = wait_drained(bench.outstanding, args.tasks, 300)
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
                time.sleep(0.1)
            print(f"drain under the profiler: {args.tasks / (t1 - t0):,.0f} tasks/s")
        finally:
            bench.close()
    text = summarize(raw, args.top)
    out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
