"""Run the whole test suite with branch coverage of stem/ and report it per module.

Used by ``make test`` (and so by CI). Fails if any test fails or coverage of ``stem/``
is below the floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COVERAGE_FLOOR = int(os.environ.get("STEM_COVERAGE_FLOOR", "85"))


def main() -> int:
    env = dict(os.environ)
    py = sys.executable
    subprocess.run([py, "-m", "coverage", "erase"], cwd=ROOT, check=True)
    tests = subprocess.run(
        [py, "-m", "coverage", "run", "-m", "pytest", *sys.argv[1:]], cwd=ROOT, env=env
    )
    subprocess.run([py, "-m", "coverage", "combine", "-q"], cwd=ROOT, check=False)
    report = subprocess.run(
        [py, "-m", "coverage", "report", f"--fail-under={COVERAGE_FLOOR}"], cwd=ROOT
    )
    if tests.returncode != 0:
        return tests.returncode
    if report.returncode != 0:
        print(f"coverage of stem/ is below {COVERAGE_FLOOR}%", file=sys.stderr)
    return report.returncode


if __name__ == "__main__":
    sys.exit(main())
