"""Celery and Dramatiq through Stem's workloads, on a Redis given by URL.

    python benchmarks/peers/run_peers.py --redis redis://127.0.0.1:PORT/0 [--tasks 20000]

The peers are installed with pip into their own virtualenv, benchmarks/.peers-venv (made
on first use, remade when requirements.txt changes), never into the project's
environment. Each library runs in its own process (bench_peer.py) with that venv's Python.
The Redis database is flushed before and after each library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".peers-venv"
REQUIREMENTS = HERE / "requirements.txt"
LIBS = ("celery", "dramatiq")


def venv_python() -> Path:
    """The peers' interpreter, creating or refreshing the virtualenv when needed."""
    python = VENV / "bin" / "python"
    stamp = VENV / ".requirements.sha256"
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    base = getattr(sys, "_base_executable", sys.executable)  # not the project's venv
    print(f"installing the peers into {VENV} ...", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    stamp.write_text(wanted + "\n")
    return python


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", required=True, help="URL of a Redis that may be flushed")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument("--log-dir", default=str(HERE.parent / "results" / "logs"))
    parser.add_argument("--json", default=None, help="write results here (- for stdout)")
    args = parser.parse_args()
    python = venv_python()
    rows: list[dict[str, Any]] = []
    for lib in args.libs.split(","):
        out = subprocess.run(
            [
                str(python),
                str(HERE / "bench_peer.py"),
                "--lib",
                lib,
                "--redis",
                args.redis,
                "--tasks",
                str(args.tasks),
                "--round-trips",
                str(args.round_trips),
                "--log-dir",
                args.log_dir,
                "--json",
                "-",
            ],
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        )
        rows += json.loads(out.stdout)
    payload = json.dumps(rows, indent=2)
    if args.json == "-" or args.json is None:
        print(payload)
    else:
        Path(args.json).write_text(payload + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
