"""Throughput and latency harness. Prints measured numbers; never pass/fail.

    python benchmarks/run.py                          # SQLite, 10,000 tasks, thread pool c=8
    python benchmarks/run.py --broker redis --tasks 20000 --pools thread:8,process:2
    python benchmarks/run.py --broker postgres --pool process -c 2 --signing hmac
    python benchmarks/run.py --broker redis://127.0.0.1:6379/15 --json out.json
    python benchmarks/run.py --all --write-readme     # everything, peers too (make bench)

--broker takes ``sqlite`` (a fresh file under benchmarks/results/), ``redis`` or
``postgres`` (a throwaway server started here, see servers.py), or any broker URL (results
then go to the same store). Workloads and what each number means: stem_bench.py and
README.md. --all runs SQLite (--sqlite-tasks), Redis and PostgreSQL (--tasks) across
--sweep pools, signing on Redis, the peers on the same Redis (peers/run_peers.py) and the
signing micro-benchmark, each phase after waiting for the machine to be quiet (--max-busy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path[:0] = [str(HERE), str(ROOT)]

import report  # noqa: E402
import servers  # noqa: E402

SWEEP = "thread:8,thread:16,async:16,process:2,process:4,process:4:8"
SIGNING = {"hmac": "hmac-sha256", "ed25519": "ed25519"}


def signing_env(mode: str) -> dict[str, str]:
    """STEM_SIGNING_* for a fresh throwaway key (inline ``kid:base64url``), for the
    producer (this harness's child) and the worker alike."""
    if mode == "none":
        return {}
    from stem.security.keys import generate_key, inline_entries

    algorithm = SIGNING[mode]
    entries = inline_entries(generate_key(algorithm, "b1"))
    return {
        "STEM_SIGNING_ALGORITHM": algorithm,
        "STEM_SIGNING_KEYS": entries["keys"],
        "STEM_SIGNING_ACTIVE_KEY": "b1",
    }


@contextlib.contextmanager
def broker_url(choice: str, label: str) -> Iterator[tuple[str, bool]]:
    """(URL, whether it is ours to wipe): a fresh store for the shortcuts, the URL as given
    otherwise (then only the benchmark's queue is purged, nothing else is touched)."""
    if choice == "sqlite":
        directory = RESULTS / f"sqlite-{label}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        try:
            yield f"sqlite:///{directory / 'stem.db'}", True
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    elif choice == "redis":
        with servers.redis_server() as url:
            yield url, True
    elif choice in ("postgres", "postgresql"):
        with servers.postgres_server() as url:
            yield url, True
    else:
        yield choice, False


def flush_redis(url: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        client.flushall()


def run_stem(
    url: str,
    label: str,
    *,
    tasks: int,
    pools: str,
    round_trips: int,
    signing: str = "none",
    owned: bool = True,
) -> list[dict[str, Any]]:
    """One stem_bench.py run in a fresh process (signing keys are read at import). On a
    Redis we started, everything from earlier runs is flushed first."""
    if owned and url.startswith("redis"):
        flush_redis(url)
    out = RESULTS / f"stem-{label}.json"
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(HERE / "stem_bench.py"),
        "--broker",
        url,
        "--label",
        label,
        "--tasks",
        str(tasks),
        "--pools",
        pools,
        "--round-trips",
        str(round_trips),
        "--json",
        str(out),
        "--log-dir",
        str(RESULTS / "logs"),
    ]
    env = {**os.environ, **signing_env(signing)}
    subprocess.run(cmd, env=env, check=True)
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    for row in rows:
        row["extra"]["signing"] = signing
    return rows


def run_peers(url: str, tasks: int, round_trips: int) -> list[dict[str, Any]]:
    out = RESULTS / "peers.json"
    out.unlink(missing_ok=True)
    flush_redis(url)
    cmd = [
        sys.executable,
        str(HERE / "peers" / "run_peers.py"),
        "--redis",
        url,
        "--tasks",
        str(tasks),
        "--round-trips",
        str(round_trips),
        "--json",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    rows: list[dict[str, Any]] = json.loads(out.read_text())
    return rows


def signing_costs() -> dict[str, Any]:
    out = RESULTS / "signing-cost.json"
    subprocess.run([sys.executable, str(HERE / "signing_cost.py"), "--json", str(out)], check=True)
    costs: dict[str, Any] = json.loads(out.read_text())
    return costs


def load_average() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def busy_cores(window_s: float = 3.0) -> float:
    """How many cores the whole machine kept busy over the last ``window_s`` seconds
    (from /proc/stat). Called between phases, while the harness itself is idle, it is
    what other people's work is using right now; the load average lags by a minute and
    would still count the phase that just ended."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    busy0, total0 = sample()
    time.sleep(window_s)
    busy1, total1 = sample()
    cores = os.cpu_count() or 1
    return round(cores * (busy1 - busy0) / max(1, total1 - total0), 2)


def wait_for_quiet(max_busy: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (at most max_wait_s) until other work uses at most ``max_busy`` cores; return
    what was seen when the phase starts (busy cores and the load average)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        busy = busy_cores()
        if busy <= max_busy or time.monotonic() > deadline:
            if busy > max_busy:
                print(f"still {busy} cores busy; measuring anyway", file=sys.stderr)
            return {"busy_cores": busy, "load": load_average()}
        print(f"{busy} cores busy with other work: waiting 20 s", file=sys.stderr, flush=True)
        time.sleep(20)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    shutil.rmtree(RESULTS / "logs", ignore_errors=True)
    load_before = load_average()
    started = time.time()
    rows: list[dict[str, Any]] = []
    rt = args.round_trips
    phases: list[dict[str, Any]] = []

    def quiet(name: str) -> None:
        seen = wait_for_quiet(args.max_busy, args.load_wait)
        phases.append({"phase": name, **seen})

    with broker_url("sqlite", "all") as (url, _):
        quiet("stem sqlite")
        rows += run_stem(url, "sqlite", tasks=args.sqlite_tasks, pools=args.sweep, round_trips=rt)
    with broker_url("postgres", "all") as (url, _):
        quiet("stem postgres")
        rows += run_stem(url, "postgres", tasks=args.tasks, pools=args.sweep, round_trips=rt)
    with broker_url("redis", "all") as (url, _):
        quiet("stem redis")
        redis_rows = run_stem(url, "redis", tasks=args.tasks, pools=args.sweep, round_trips=rt)
        rows += redis_rows
        # Signing: the best pool and the best process pool of the unsigned run.
        picked = report.signing_pools(redis_rows)
        for mode in ("hmac", "ed25519"):
            quiet(f"stem redis {mode}")
            rows += run_stem(
                url, f"redis+{mode}", tasks=args.tasks, pools=picked, round_trips=rt, signing=mode
            )
        if not args.skip_peers:
            quiet("peers")
            rows += run_peers(url, args.tasks, rt)
    quiet("signing cost")
    costs = signing_costs()
    return {
        "machine": report.machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "phases": phases,
        "started": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
        "duration_s": round(time.time() - started),
        "tasks": args.tasks,
        "sqlite_tasks": args.sqlite_tasks,
        "round_trips": rt,
        "rows": rows,
        "signing_cost_us": costs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--broker", default="sqlite", help="sqlite, redis, postgres or a URL")
    parser.add_argument(
        "--tasks", type=int, default=None, help="default 10,000 on SQLite, else 20,000"
    )
    parser.add_argument("--pools", default=None, help="comma-separated POOL:CONCURRENCY[:PREFETCH]")
    parser.add_argument("--pool", default="thread", help="with -c, when --pools is not given")
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--signing", choices=["none", *SIGNING], default="none")
    parser.add_argument(
        "--url-options", default="", help="query options added to the broker URL (pool_size=16)"
    )
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--json", default=None, help="write the raw results here (- stdout)")
    parser.add_argument("--all", action="store_true", help="the full comparison (make bench)")
    parser.add_argument("--sweep", default=SWEEP, help="pools tried by --all")
    parser.add_argument("--sqlite-tasks", type=int, default=10_000, help="--all's SQLite size")
    parser.add_argument("--skip-peers", action="store_true", help="--all without Celery/Dramatiq")
    parser.add_argument(
        "--max-busy",
        type=float,
        default=0.3,
        help="--all: before each phase, wait until other work uses at most this many cores",
    )
    parser.add_argument("--load-wait", type=float, default=1800, help="seconds to wait at most")
    parser.add_argument("--write-readme", action="store_true", help="--all: update README.md")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.all:
        args.tasks = args.tasks or 20_000
        data = run_all(args)
        (RESULTS / "latest.json").write_text(json.dumps(data, indent=2) + "\n")
        text = report.markdown(data)
        (RESULTS / "latest.md").write_text(text)
        print(text)
        if args.write_readme:
            report.update_readme(HERE / "README.md", text)
        if args.json:
            Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        return 0
    tasks = args.tasks or (10_000 if args.broker == "sqlite" else 20_000)
    pools = args.pools or f"{args.pool}:{args.concurrency}"
    label = args.broker if "://" not in args.broker else args.broker.split(":", 1)[0]
    if args.signing != "none":
        label += f"+{args.signing}"
    with broker_url(args.broker, "single") as (url, owned):
        if args.url_options:
            url += ("&" if "?" in url else "?") + args.url_options
        rows = run_stem(
            url,
            label,
            tasks=tasks,
            pools=pools,
            round_trips=args.round_trips,
            signing=args.signing,
            owned=owned,
        )
    print(report.plain(rows))
    if args.json:
        payload = json.dumps(rows, indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
