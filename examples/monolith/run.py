"""Run a real worker process and a producer against SQLite, and print the results.

python examples/monolith/run.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    db_dir = Path(os.environ.get("STEM_DEMO_DIR", HERE / "var" / "demo"))
    shutil.rmtree(db_dir, ignore_errors=True)
    db_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "STEM_DEMO_DB": str(db_dir / "stem.db"),
        "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    os.environ.update({"STEM_DEMO_DB": env["STEM_DEMO_DB"]})
    sys.path.insert(0, str(HERE))
    from tasks import add, flaky, report, stamp  # the producer side imports the same tasks

    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stem.cli.main",
            "--app",
            "tasks:app",
            "worker",
            "--pool",
            "process",
            "--concurrency",
            "2",
            "--shutdown-budget",
            "10",
        ],
        env=env,
    )
    try:
        print(
            "enqueueing: 5 additions, a flaky task that needs 2 retries, "
            "a task delayed by 2s, a task reporting progress"
        )
        sums = [add.delay(i, i * 10) for i in range(5)]
        retrying = flaky.delay(2)
        queued_at = time.time()
        delayed = stamp.enqueue(args=["delayed"], countdown=2)
        progress = report.delay(20)
        seen = set()
        deadline = time.time() + 30
        while not progress.ready() and time.time() < deadline:
            if progress.progress:
                seen.add(progress.progress.get("current"))
            time.sleep(0.02)
        print(
            f"  demo.report -> {progress.get(timeout=30)} "
            f"(saw progress updates {sorted(x for x in seen if x is not None)})"
        )
        for i, res in enumerate(sums):
            print(f"  demo.add({i}, {i * 10}) = {res.get(timeout=30)}")
        print(f"  demo.flaky -> {retrying.get(timeout=30)!r}")
        value = delayed.get(timeout=30)
        print(f"  demo.stamp (countdown=2) ran {value['ran_at'] - queued_at:.1f}s after enqueue")

    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    print(f"worker stopped (exit {code})")
    return code


if __name__ == "__main__":
    sys.exit(main())
