"""`stem control ...`, `stem workers` and autoscaling against two real worker processes."""

from __future__ import annotations

import json
import time

import pytest

from stem import Stem, states

from .conftest import StemCLI

pytestmark = pytest.mark.slow


def _json(cli: StemCLI, *args: str) -> object:
    proc = cli.run(*args, "--json", check=True)
    return json.loads(proc.stdout)


def _two_workers(cli: StemCLI) -> None:
    for name in ("alpha", "beta"):
        cli.start_worker(
            "--pool",
            "process",
            "-c",
            "1",
            "--name",
            name,
            "--heartbeat",
            "0.5",
            "-Q",
            "default,mail",
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = cli.run("workers", "--json")
        if listed.returncode == 69:  # no database until the first worker makes it
            time.sleep(0.2)
            continue
        nodes = [w["worker"] for w in json.loads(listed.stdout) if w["status"] == "online"]
        if sorted(nodes) == ["alpha", "beta"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"workers did not come up:\n{cli.log_text()[-2000:]}")


def test_every_control_command_against_two_workers(cli: StemCLI) -> None:
    app = Stem("producer", broker=cli.url, backend=cli.url)
    _two_workers(cli)

    pings = _json(cli, "control", "ping")
    assert pings == [
        {"worker": "alpha", "ok": True, "result": "pong"},
        {"worker": "beta", "ok": True, "result": "pong"},
    ]
    one = _json(cli, "control", "ping", "-d", "beta")
    assert [r["worker"] for r in one] == ["beta"]  # type: ignore[index]

    registered = _json(cli, "control", "registered")
    assert all("acc.square" in r["result"] for r in registered)  # type: ignore[union-attr]
    stats = _json(cli, "control", "stats")
    assert {r["result"]["pool"] for r in stats} == {"process"}  # type: ignore[index]

    running = app.send_task("acc.sleep", [30])
    deadline = time.monotonic() + 30
    active: list[dict[str, object]] = []
    while not active and time.monotonic() < deadline:
        active = [
            a
            for r in _json(cli, "control", "active")  # type: ignore[union-attr]
            for a in r["result"]
        ]
        time.sleep(0.1)
    assert [a["id"] for a in active] == [running.id]
    assert all(r["result"] == [] for r in _json(cli, "control", "reserved"))  # type: ignore

    revoke = _json(cli, "control", "revoke", running.id, "--terminate")
    assert revoke["revoked"] == [running.id]  # type: ignore[index]
    rec = running.wait_record(timeout=30)
    assert rec.state == states.REVOKED

    grown = _json(cli, "control", "pool-grow", "2", "-d", "alpha")
    assert grown[0]["result"] == {"pool_size": 3}  # type: ignore[index]
    shrunk = _json(cli, "control", "pool-shrink", "1", "-d", "alpha")
    assert shrunk[0]["result"] == {"pool_size": 2}  # type: ignore[index]

    limited = _json(cli, "control", "rate-limit", "acc.square", "100/s")
    assert all(r["result"] == {"acc.square": "100/s"} for r in limited)  # type: ignore

    assert all(r["ok"] for r in _json(cli, "control", "pause", "mail"))  # type: ignore
    status = _json(cli, "control", "queue-status")
    assert all(
        {q["queue"]: q["paused"] for q in r["result"]} == {"default": False, "mail": True}
        for r in status
    )  # type: ignore[union-attr]
    held = app.send_task("acc.square", [3], queue="mail")
    time.sleep(1.0)
    assert held.state == states.PENDING
    assert all(r["ok"] for r in _json(cli, "control", "resume", "mail"))  # type: ignore
    assert held.get(timeout=30) == 9

    down = _json(cli, "control", "shutdown", "--mode", "warm", "-d", "alpha")
    assert down[0]["result"] == "shutting down (warm)"  # type: ignore[index]
    alpha = cli.procs[0]
    assert alpha.wait(timeout=30) == 0
    after = {w["worker"]: w["status"] for w in _json(cli, "workers")}  # type: ignore
    assert after.get("alpha") in ("offline", None) and after["beta"] == "online"
    # A node asked by name that does not answer is named, and the command fails.
    silent = cli.run("control", "ping", "-d", "alpha@nowhere", "-d", "beta", "-t", "1")
    assert silent.returncode == 1, silent.stdout + silent.stderr
    assert "alpha@nowhere: ERROR no reply within 1s" in silent.stdout
    assert "beta: OK pong" in silent.stdout
    app.close()


def test_control_without_workers_says_so(cli: StemCLI) -> None:
    cli.run("enqueue", "acc.square", "--args", "[1]", check=True)  # the store exists
    proc = cli.run("control", "ping", "--timeout", "0.5")
    assert proc.returncode == 69
    assert "no worker replied" in proc.stderr


def test_autoscale_grows_under_a_real_backlog_and_shrinks_when_idle(cli: StemCLI) -> None:
    app = Stem("producer", broker=cli.url, backend=cli.url)
    for i in range(40):
        app.send_task("acc.sleep", [0.2])
    cli.start_worker(
        "--pool", "thread", "--autoscale", "6,1", "--name", "auto", "--heartbeat", "0.5"
    )
    sizes = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stats = cli.run("control", "stats", "--json")
        if stats.returncode == 0:
            sizes.append(json.loads(stats.stdout)[0]["result"]["concurrency"])
            if max(sizes) == 6 and app.broker.stats(["default"])[0].ready == 0:
                break
        time.sleep(0.3)
    assert max(sizes) == 6, sizes
    app.close()
