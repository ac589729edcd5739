"""Periodic tasks: ``stem beat`` and ``stem worker`` on SQLite, schedules from code and config.

python examples/beat/run.py

Runs the scheduler and a worker as two processes for a few seconds, prints every task that
ran, then ``stem schedule list`` and ``stem schedule dry-run``. Scratch files go to
``$STEM_DEMO_DIR`` (default ``examples/beat/var``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEM = [sys.executable, "-m", "stem.cli.main"]
RUN_S = 5.0  # how long beat and the worker run after the first task ran
START_S = 20.0  # the longest the two processes may take to start and run a first task


class Failed(Exception):
    """The example did not behave as its README says."""


def start(demo: Path, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(demo / f"{name}.log", "wb") as log:
        return subprocess.Popen([*STEM, *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL if the process is still there after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def log_tail(demo: Path, name: str) -> str:
    return (demo / f"{name}.log").read_text(errors="replace")[-3000:]


def run_both(demo: Path, common: list[str], env: dict[str, str], ran_file: Path) -> None:
    """Beat and a worker until RUN_S seconds after the first task ran (a slow start must not
    cost ticks); both must stay up, and exit 0 on SIGTERM."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    codes: dict[str, int] = {}
    try:
        procs["worker"] = start(demo, "worker", [*common, "worker", "-P", "thread", "-c", "2"], env)
        procs["beat"] = start(demo, "beat", [*common, "beat"], env)
        print("$ stem --app beat_tasks:app --config beat.yaml beat")
        print("$ stem --app beat_tasks:app --config beat.yaml worker --pool thread -c 2")
        print(f"(both run until {RUN_S:g}s after the first task ran)")
        deadline = time.monotonic() + START_S
        first_run = False
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise Failed(f"{name} exited {proc.returncode} early:\n{log_tail(demo, name)}")
            if not first_run and ran_file.exists() and ran_file.stat().st_size:
                first_run = True
                deadline = time.monotonic() + RUN_S
            time.sleep(0.1)
        if not first_run:
            raise Failed(f"no task ran within {START_S:g}s:\n{log_tail(demo, 'beat')}")
    finally:
        # The scheduler first, so the worker is not left with ticks it will never see.
        for name in ("beat", "worker"):
            if name in procs:
                codes[name] = stop(procs[name])
    for name, code in codes.items():
        if code != 0:
            raise Failed(f"{name} exited {code} after SIGTERM:\n{log_tail(demo, name)}")


def show_runs(ran_file: Path, started: float) -> None:
    runs = []
    if ran_file.exists():
        runs = [json.loads(line) for line in ran_file.read_text().splitlines() if line]
    print("tasks that ran:")
    for run in runs:
        details = {k: v for k, v in run.items() if k not in ("at", "task")}
        print(f"  +{run['at'] - started:5.2f}s  {run['task']} {json.dumps(details)}")
    counts = Counter(str(run["task"]) for run in runs)
    print(f"beat.tick ran {counts['beat.tick']} times, beat.report {counts['beat.report']} times")
    # Startup takes a second or so; after that tick fires every second and report every 2.
    if counts["beat.tick"] < 3 or counts["beat.report"] < 1:
        raise Failed("fewer runs than the schedules promise (see beat.log and worker.log)")


def stem_cli(common: list[str], env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [*STEM, *common, *args], env=env, capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        raise Failed(f"stem {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout.rstrip()


def main() -> int:
    demo = Path(os.environ.get("STEM_DEMO_DIR") or HERE / "var")
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True)
    ran_file = demo / "ran.jsonl"
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = {
        # The caller's STEM_* settings (a broker URL, a profile) would change what runs here.
        **{k: v for k, v in os.environ.items() if not k.startswith("STEM_")},
        "PYTHONPATH": pythonpath,
        "BEAT_EXAMPLE_DB": str(demo / "stem.db"),
        "BEAT_EXAMPLE_RAN": str(ran_file),
        "STEM_CONFIG_DIR": str(demo),  # no /etc/stem files: only beat.yaml
        "COLUMNS": "160",  # wide tables from `stem schedule list`
    }
    common = ["--app", "beat_tasks:app", "--config", str(HERE / "beat.yaml")]
    started = time.time()
    try:
        run_both(demo, common, env, ran_file)
        show_runs(ran_file, started)
        print("\n$ stem --app beat_tasks:app --config beat.yaml schedule list")
        print(stem_cli(common, env, "schedule", "list"))
        rows = json.loads(stem_cli(common, env, "schedule", "list", "--json"))
        origins = {r["name"]: r["origin"] for r in rows}
        if origins != {"tick": "code", "report": "config", "nightly": "config"}:
            raise Failed(f"stored schedules {origins}, expected tick (code), report and nightly")
        for name in ("nightly", "tick"):
            print(f"\n$ stem --app beat_tasks:app --config beat.yaml schedule dry-run {name} -n 3")
            print(stem_cli(common, env, "schedule", "dry-run", name, "-n", "3"))
    except (Failed, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"(logs are in {demo})", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
