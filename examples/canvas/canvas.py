"""Chains, groups and chords on SQLite with a real worker process.

python examples/canvas/canvas.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    workdir = Path(os.environ.get("STEM_DEMO_DIR", HERE / "var"))
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    os.environ["STEM_CANVAS_DB"] = str(workdir / "stem.db")
    sys.path.insert(0, str(HERE))
    from canvas_tasks import add, mul, total

    from stem import chain, chord, group

    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stem.cli.main",
            "--app",
            "canvas_tasks:app",
            "worker",
            "--pool",
            "thread",
            "-c",
            "4",
        ],
        env=env,
    )
    try:
        print(
            "chain (1 + 2) * 10 + 5 =",
            chain(add.s(1, 2), mul.s(10), add.s(5)).delay().get(timeout=30),
        )
        print("group of squares:", group([mul.s(i, i) for i in range(6)]).delay().get(timeout=30))
        print(
            "chord sum of squares:",
            chord([mul.s(i, i) for i in range(6)], total.s()).delay().get(timeout=30),
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    return code


if __name__ == "__main__":
    sys.exit(main())
