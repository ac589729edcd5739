"""Each example under examples/ runs with its one-line command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *, timeout: float = 120) -> str:
    env = {**os.environ, "STEM_DEMO_DIR": str(tmp_path / "demo"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_quickstart(tmp_path: Path) -> None:
    out = _run("examples/quickstart/quickstart.py", tmp_path)
    assert "hello, world" in out and "sums: [0, 2, 4, 6, 8]" in out


def test_monolith_demo(tmp_path: Path) -> None:
    out = _run("examples/monolith/run.py", tmp_path)
    assert "demo.add(4, 40) = 44" in out
    assert "demo.flaky -> 'ok after 2 retries'" in out
    assert "worker stopped (exit 0)" in out
    delay = float(out.split("ran ")[1].split("s after")[0])
    assert delay >= 2.0


def test_canvas(tmp_path: Path) -> None:
    out = _run("examples/canvas/canvas.py", tmp_path)
    assert "chain (1 + 2) * 10 + 5 = 35" in out
    assert "group of squares: [0, 1, 4, 9, 16, 25]" in out
    assert "chord sum of squares: 55" in out
