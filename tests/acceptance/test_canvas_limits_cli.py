"""Canvas and rate limits across real worker processes (the `stem worker` CLI)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from stem import Stem, chord

from .conftest import StemCLI

pytestmark = pytest.mark.slow


def test_chord_fires_once_although_a_worker_is_killed_mid_way(cli: StemCLI, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    env = {"STEM_TEST_RECORD": str(record)}
    app = Stem("producer", broker=cli.url, backend=cli.url)
    n = 200
    members = [app.signature("acc.slow_square", (i,)) for i in range(n)]
    res = chord(members, app.signature("acc.collect")).delay()
    victim = cli.start_worker("-P", "process", "-c", "2", "--lease", "2", env=env)
    cli.start_worker("-P", "process", "-c", "2", "--lease", "2", env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if app.broker.stats(["default"])[0].ready < n * 3 // 4:
            break
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert res.get(timeout=120) == sum(i * i for i in range(n))
    time.sleep(1.0)  # a second firing, if there were one, would land now
    assert record.read_text().splitlines() == [f"collect {n}"]
    app.close()


def test_global_rate_limit_across_two_worker_processes(cli: StemCLI, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    env = {"STEM_TEST_RECORD": str(record)}
    app = Stem("producer", broker=cli.url, backend=cli.url)
    total = 200
    for _ in range(total):
        app.send_task("acc.limited")
    for _ in range(2):
        cli.start_worker("-P", "thread", "-c", "4", env=env)
    deadline = time.monotonic() + 60
    stamps: list[float] = []
    while time.monotonic() < deadline:
        stamps = [float(x) for x in record.read_text().split()] if record.exists() else []
        if len(stamps) >= total:
            break
        time.sleep(0.2)
    assert len(stamps) == total
    stamps.sort()
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    print(f"measured {rate:.1f} tasks/s against a limit of 50/s")
    assert 45.0 <= rate <= 55.0, f"rate {rate:.1f}/s is not within 10% of 50/s"
    app.close()
