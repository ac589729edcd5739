"""The microservice, signed, beat and production examples run with their one-line commands.

Each test runs the example's ``run.py`` as a subprocess, exactly as its README says, and
checks the output the README promises: an example that stops working fails CI.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.redis_server import redis_binary
from tests.fixtures.require import service_missing

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(script: str, tmp_path: Path, *, env: dict[str, str] | None = None) -> str:
    # The caller's STEM_* variables must not leak into an example (the scripts drop them
    # too; this keeps the test independent of that).
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STEM_", "REDIS_URL"))}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script)],
        env={
            **base,
            "STEM_DEMO_DIR": str(tmp_path / "demo"),
            "PYTHONPATH": str(ROOT),
            **(env or {}),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        start_new_session=True,  # a hung example is killed with every process it started
    )
    try:
        stdout, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            time.sleep(2)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script} did not finish within 90s:\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"{script} failed:\n{stdout}\n{stderr}"
    assert stdout.rstrip().endswith(("ok", "stopped (exit 0)")), stdout
    return stdout


@pytest.mark.redis
def test_microservice(tmp_path: Path, redis_url: str) -> None:
    out = _run("examples/microservice/run.py", tmp_path, env={"STEM_BROKER_URL": redis_url})
    assert "started a throwaway redis-server" not in out  # it used the fixture's server
    assert "fleet: worker-1, worker-2 answered ping" in out
    # 20 orders: sum(50 * (n % 4) + 75 * (1 + n % 3) for n in 1..20) = 4575 cents.
    shares = re.search(r"4575 cents in all \(worker-1 ran (\d+), worker-2 ran (\d+)\)", out)
    assert shares is not None, out
    assert int(shares[1]) + int(shares[2]) == 20 and min(int(shares[1]), int(shares[2])) > 0
    assert out.count("(ran on worker-2)") == 3, out  # only worker-2 consumes 'shipping'
    assert "the producer got KeyError: 'durian'" in out
    assert "worker-1 stopped (exit 0)" in out and "worker-2 stopped (exit 0)" in out


def test_signed(tmp_path: Path) -> None:
    out = _run("examples/signed/run.py", tmp_path)
    for line in (
        "producer (v1): bank.transfer('alice', 500) -> 'moved 500 cents to alice'",
        "forged: unsigned message: dead-lettered, reason signature-missing",
        "(bob 700 -> mallory 700000): dead-lettered, reason signature-invalid",
        "forged: replayed message: dead-lettered, reason signature-replayed",
        "producer still signing with v1: bank.transfer('dave', 100) -> 'moved 100",
        "producer signing with v2: bank.transfer('erin', 200) -> 'moved 200",
        "v1-signed message after v1 was retired: dead-lettered, reason signature-unknown-key",
        "producer (e1): bank.transfer('heidi', 900) -> 'moved 900",
        "posing as e1: dead-lettered, reason signature-invalid",
        "producer still signing with e1: bank.transfer('judy', 100) -> 'moved 100",
        "e1-signed message after e1 was retired: dead-lettered, reason signature-unknown-key",
        "6 forged or stale messages dead-lettered, none of them ran",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    table = out.split("== stem dlq list")[1]
    assert table.count("signature-unknown-key") == 2 and "signature-missing" in table


def test_beat(tmp_path: Path) -> None:
    out = _run("examples/beat/run.py", tmp_path)
    ran = re.search(r"beat\.tick ran (\d+) times, beat\.report (\d+) times", out)
    assert ran is not None, out
    assert int(ran[1]) >= 3 and int(ran[2]) >= 1, out
    assert 'beat.report {"kind": "hourly", "recipients": ["ops@example.com"]}' in out
    listing = out.split("schedule list")[1].split("schedule dry-run")[0]
    assert re.search(r"nightly\s*│\s*beat\.report\s*│\s*cron 30 2 \* \* \*", listing), listing
    assert re.search(r"tick\s*│\s*beat\.tick\s*│\s*every 1s\s*│\s*yes\s*│\s*code", listing)
    assert re.search(r"report\s*│\s*beat\.report\s*│\s*every 2s\s*│\s*yes\s*│\s*config", listing)
    assert len(re.findall(r"^\d{4}-\d\d-\d\dT02:30:00\+00:00$", out, re.M)) == 3, out


@pytest.mark.redis
def test_production(tmp_path: Path) -> None:
    # The example starts its own TLS-only redis-server: its certificate must come from the
    # private CA the example creates, which is what the example is about.
    if redis_binary() is None:
        service_missing("redis-server not found: the production example starts one with TLS")
    out = _run("examples/production/run.py", tmp_path)
    refused, accepted = out.split("== 3.")
    assert "FAIL G006-dev-certificate" in refused and "configuration refused" in refused
    assert "etc/tls/ca.pem: development certificate" in refused
    assert "FAIL G006" not in accepted and "ok   G006-dev-certificate" in accepted
    if os.geteuid() == 0:
        # Nothing waives G009: the example says so and runs on the development profile.
        assert "FAIL G009-run-as-root" in accepted and "Only G009 is left" in accepted
        assert "--profile development --config" in accepted
    else:
        assert "profile production: configuration accepted" in accepted
        assert "$ stem --app prod_tasks:app --profile production worker &" in accepted
    assert re.search(r'broker\.url = "rediss://:\*\*\*@localhost:\d+/0"', accepted), accepted
    assert re.search(r"^  [0-9a-f]{32} SUCCESS 7499$", accepted, re.M), accepted
    assert 'stem_tasks_total{state="success",task="invoices.total"} 1.0' in accepted
    assert "worker stopped on SIGTERM (exit 0)" in accepted
    assert "no problems reported" in accepted or "systemd-analyze is not installed" in accepted
