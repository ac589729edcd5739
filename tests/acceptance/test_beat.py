"""``stem beat`` and ``stem schedule`` as real subprocesses on one SQLite database."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stem import Stem
from stem.envelope import Envelope, decode

from .conftest import StemCLI

pytestmark = pytest.mark.slow

# The real ``stem`` entry point, with ``beat`` and ``schedule`` registered if the CLI does not
# register them yet (it is a no-op once stem/cli/main.py does).
WRAPPER = """
import sys
from stem.cli import beat_cmd, main as m
names = {c.name for c in m.app.registered_commands} | {g.name for g in m.app.registered_groups}
if "beat" not in names:
    m.app.command("beat")(beat_cmd.beat)
if "schedule" not in names:
    m.app.add_typer(beat_cmd.app, name="schedule")
m.main(sys.argv[1:])
"""
RUN_S = 60  # the issue asks for a minute of one-second ticks


def stem(cli: StemCLI, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if ok and proc.returncode != 0:
        raise AssertionError(
            f"stem {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def start_beat(cli: StemCLI, beat_id: str) -> subprocess.Popen[bytes]:
    log = open(cli.logs / f"beat-{beat_id}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, "beat", "--id", beat_id, "--tick", "0.5"],
        env=cli.env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    cli.procs.append(proc)
    return proc


def queued(cli: StemCLI, queue: str = "default") -> list[Envelope]:
    app = Stem("reader", broker=cli.url, backend=cli.url)
    try:
        deliveries = app.broker.reserve([queue], 10_000, lease_s=300)
        return [decode(d.body) for d in deliveries]
    finally:
        app.close()


def listing(cli: StemCLI) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in json.loads(stem(cli, "schedule", "list", "--json").stdout)}


def iso(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat()


def test_two_beats_enqueue_each_tick_exactly_once(cli: StemCLI) -> None:
    at = datetime.now(UTC) + timedelta(seconds=6)
    stem(cli, "schedule", "add", "sec", "--task", "acc.square", "--every", "1", "--args", "[3]",
         "--catch-up")  # fmt: skip
    stem(cli, "schedule", "add", "paused", "--task", "acc.square", "--every", "1s")
    stem(cli, "schedule", "add", "once", "--task", "acc.pid", "--at", iso(at))
    beats = [start_beat(cli, "a"), start_beat(cli, "b")]
    started = time.time()
    time.sleep(RUN_S / 2)
    stem(cli, "schedule", "disable", "paused")  # a run-time edit, seen by both beats
    disabled_ms = int(time.time() * 1000)
    time.sleep(max(0.0, started + RUN_S - time.time()))
    assert [b.poll() for b in beats] == [None, None], cli.log_text()[-3000:]
    cli.stop_all()
    assert [b.returncode for b in beats] == [0, 0], cli.log_text()[-3000:]

    envs = queued(cli)
    by_entry: dict[str, list[int]] = {}
    for env in envs:
        by_entry.setdefault(env.headers["beat_entry"], []).append(env.headers["beat_tick_ms"])
        assert env.id == f"beat-{env.headers['beat_entry']}-{env.headers['beat_tick_ms']}"
    ticks = sorted(by_entry["sec"])
    assert len(ticks) == len(set(ticks)), f"a tick was enqueued twice: {ticks}"
    assert ticks == list(range(ticks[0], ticks[-1] + 1000, 1000)), f"gaps: {ticks}"
    assert len(ticks) >= RUN_S - 5, f"too few ticks: {ticks}\n{cli.log_text()[-3000:]}"
    assert all(
        e.args == (3,) and e.task == "acc.square" for e in envs if e.id.startswith("beat-sec")
    )

    paused = sorted(by_entry["paused"])
    assert len(paused) == len(set(paused)) and paused
    assert paused[-1] <= disabled_ms + 1000, "ticks fired after the entry was disabled"
    at_ms = int(at.timestamp() * 1000)
    assert by_entry["once"] == [at_ms]
    rows = listing(cli)
    assert rows["once"]["enabled"] is False
    assert rows["paused"]["enabled"] is False
    # Both processes raced for the ticks (each won some), and neither saw an error.
    for beat_id in ("a", "b"):
        log = (cli.logs / f"beat-{beat_id}.log").read_text()
        assert "'sec': enqueued" in log, f"beat {beat_id} never won a tick:\n{log[-2000:]}"
        assert "Traceback" not in log


def test_schedule_commands_end_to_end(cli: StemCLI) -> None:
    stem(cli, "schedule", "add", "nightly", "--task", "acc.square", "--cron", "30 2 * * *",
         "--tz", "Europe/Berlin", "--args", "[2]", "--queue", "low", "--priority", "3")  # fmt: skip
    stem(cli, "schedule", "add", "dawn", "--task", "acc.square", "--solar", "sunrise",
         "--lat", "51.5074", "--lon", "-0.1278", "--offset", "-10m")  # fmt: skip
    stem(cli, "schedule", "add", "mondays", "--task", "acc.square",
         "--calendar", '{"weekdays": ["mon"], "hours": [9]}')  # fmt: skip
    dup = stem(cli, "schedule", "add", "nightly", "--task", "x", "--every", "5", ok=False)
    assert dup.returncode == 1 and "--replace" in dup.stderr
    bad = stem(cli, "schedule", "add", "oops", "--task", "x", "--every", "soon", ok=False)
    assert bad.returncode == 78 and "schedule 'oops', field 'every'" in bad.stderr
    typo = stem(cli, "schedule", "add", "typo", "--task", "acc.sqaure", "--every", "60")
    assert "task 'acc.sqaure' is not registered in this app" in typo.stderr  # added, warned
    stem(cli, "schedule", "remove", "typo")
    assert "mon" in stem(cli, "schedule", "list").stdout

    rows = listing(cli)
    assert sorted(rows) == ["dawn", "mondays", "nightly"]
    assert rows["nightly"]["spec"] == {
        "task": "acc.square",
        "cron": "30 2 * * *",
        "tz": "Europe/Berlin",
        "args": [2],
        "queue": "low",
        "priority": 3,
        "enabled": True,
        "origin": "cli",
    }

    dry = json.loads(
        stem(
            cli,
            "schedule",
            "dry-run",
            "nightly",
            "-n",
            "3",
            "--after",
            "2024-03-29T12:00",
            "--json",
        ).stdout
    )
    assert [t["local"] for t in dry["ticks"]] == [
        "2024-03-30T02:30:00+01:00",
        "2024-03-31T03:30:00+02:00",  # spring forward: 02:30 does not exist
        "2024-04-01T02:30:00+02:00",
    ]
    dawn = stem(cli, "schedule", "dry-run", "dawn", "-n", "1", "--after", "2024-06-21T00:00Z")
    assert "2024-06-21T03:3" in dawn.stdout  # 04:43 BST sunrise, less 10 minutes

    stem(cli, "schedule", "disable", "nightly")
    assert listing(cli)["nightly"]["enabled"] is False
    stem(cli, "schedule", "enable", "nightly")
    assert listing(cli)["nightly"]["enabled"] is True

    task_id = stem(cli, "schedule", "run-now", "nightly").stdout.strip()
    [env] = queued(cli, "low")
    assert (env.id, env.task, env.args, env.priority) == (task_id, "acc.square", (2,), 3)

    stem(cli, "schedule", "remove", "nightly")
    assert "nightly" not in listing(cli)
    missing = stem(cli, "schedule", "remove", "nightly", ok=False)
    assert missing.returncode == 66
    assert stem(cli, "schedule", "enable", "nightly", ok=False).returncode == 66
