from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

APPDIR = Path(__file__).parent / "appdir"
ROOT = Path(__file__).resolve().parents[2]


class StemCLI:
    """Runs the real ``stem`` CLI as subprocesses against one SQLite database."""

    def __init__(self, tmp: Path) -> None:
        self.db = tmp / "stem.db"
        self.url = f"sqlite:///{self.db}"
        self.env = {
            **os.environ,
            "STEM_TEST_BROKER": self.url,
            "PYTHONPATH": os.pathsep.join([str(APPDIR), str(ROOT)]),
            "STEM_APP": "acc_tasks:app",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs = tmp

    def run(
        self,
        *args: str,
        check: bool = False,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "stem.cli.main", *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"stem {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def start_worker(
        self, *args: str, env: dict[str, str] | None = None, name: str = "worker"
    ) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}-{len(self.procs)}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "stem.cli.main", "worker", *args],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[StemCLI]:
    c = StemCLI(tmp_path)
    yield c
    c.stop_all()
