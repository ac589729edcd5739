"""A worker that requires signatures (the real CLI) runs only what a key holder signed;
everything else is dead-lettered with its reason. Key rotation loses nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stem import Stem, states
from stem.brokers.base import Message
from stem.envelope import decode, encode
from stem.security.signing import Keyring

from .conftest import StemCLI

pytestmark = pytest.mark.slow


def _keys(tmp: Path, algorithm: str, kid: str, where: str) -> Path:
    out = tmp / where
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stem.cli.main",
            "keys",
            "generate",
            "--algorithm",
            algorithm,
            "--kid",
            kid,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def _producer_env(algorithm: str, keys: list[Path], active: str) -> dict[str, str]:
    return {
        "STEM_SIGNING_ALGORITHM": algorithm,
        "STEM_SIGNING_KEYS": ",".join(str(k) for k in keys),
        "STEM_SIGNING_ACTIVE_KEY": active,
    }


def _worker_env(algorithm: str, keys: list[Path]) -> dict[str, str]:
    if algorithm == "ed25519":  # workers hold public keys only
        pubs = [k.with_suffix(".pub") for k in keys]
        return {
            "STEM_SIGNING_ALGORITHM": algorithm,
            "STEM_SIGNING_PUBLIC_KEYS": ",".join(str(p) for p in pubs),
        }
    return {
        "STEM_SIGNING_ALGORITHM": algorithm,
        "STEM_SIGNING_KEYS": ",".join(str(k) for k in keys),
        "STEM_SIGNING_ACTIVE_KEY": keys[0].name.split(".")[0],
    }


def _app(cli: StemCLI, env: dict[str, str] | None) -> Stem:
    return Stem(
        "producer", broker=cli.url, backend=cli.url, keyring=Keyring.from_env(env) if env else None
    )


def _letters(cli: StemCLI, n: int) -> list[dict[str, object]]:
    deadline = time.monotonic() + 30
    while True:
        rows = json.loads(cli.run("dlq", "list", "--json", check=True).stdout)
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "ed25519"])
def test_required_signing_runs_only_signed_tasks(
    cli: StemCLI, tmp_path: Path, algorithm: str
) -> None:
    ext = "hmac-sha256" if algorithm == "hmac-sha256" else "ed25519"
    good_dir = _keys(tmp_path, algorithm, "v1", "good")
    evil_dir = _keys(tmp_path, algorithm, "v1", "evil")  # same key id, different secret
    good = good_dir / f"v1.{ext}.key"
    evil = evil_dir / f"v1.{ext}.key"
    worker = cli.start_worker("-P", "thread", "-c", "2", env=_worker_env(algorithm, [good]))

    honest = _app(cli, _producer_env(algorithm, [good], "v1"))
    ok = honest.send_task("acc.square", [7])
    assert ok.get(timeout=30) == 49

    wrong_key = _app(cli, _producer_env(algorithm, [evil], "v1")).send_task("acc.square", [1])
    unsigned = _app(cli, None).send_task("acc.square", [2])
    # A message written straight into the broker: a signed one with its arguments changed.
    signed = decode(honest.seal(honest.build_envelope("acc.square", [3])))
    tampered = encode(signed.replace(args=(1000,)))
    honest.broker.publish([Message(id=signed.id, queue="default", body=tampered)])
    # A replay: the bytes of a message that already ran, published again.
    replay_env = honest.build_envelope("acc.square", [4])
    body = honest.seal(replay_env)
    honest.broker.publish([Message(id=replay_env.id, queue="default", body=body)])
    assert honest.AsyncResult(replay_env.id).get(timeout=30) == 16
    honest.broker.publish([Message(id=replay_env.id, queue="default", body=body)])

    letters = _letters(cli, 4)
    reasons = sorted(str(d["reason"]) for d in letters)
    assert reasons == [
        "signature-invalid",
        "signature-invalid",
        "signature-missing",
        "signature-replayed",
    ], letters
    for res in (wrong_key, unsigned):
        assert res.state == states.PENDING  # never ran, no result was written for it
    assert honest.AsyncResult(signed.id).state == states.PENDING
    log = cli.log_text()
    assert "signature-missing" in log and "signature-replayed" in log
    # An unsigned control command is ignored too: the CLI says why nobody answered.
    ping = cli.run("control", "ping", "-t", "1")
    assert ping.returncode == 69, ping.stderr
    assert "this command has no signing key" in ping.stderr
    _stop(worker)


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "ed25519"])
def test_rotation_loses_no_task_and_retiring_a_key_rejects_it(
    cli: StemCLI, tmp_path: Path, algorithm: str
) -> None:
    ext = "hmac-sha256" if algorithm == "hmac-sha256" else "ed25519"
    v1 = _keys(tmp_path, algorithm, "v1", "k1") / f"v1.{ext}.key"
    v2 = _keys(tmp_path, algorithm, "v2", "k2") / f"v2.{ext}.key"
    old_producer = _app(cli, _producer_env(algorithm, [v1], "v1"))
    queued_v1 = [old_producer.send_task("acc.square", [i]) for i in range(5)]

    # 1. workers learn v2 first (and still accept v1): the queued v1 tasks run.
    worker = cli.start_worker("-P", "thread", "-c", "2", env=_worker_env(algorithm, [v1, v2]))
    assert [r.get(timeout=30) for r in queued_v1] == [i * i for i in range(5)]
    # 2. producers switch to v2.
    new_producer = _app(cli, _producer_env(algorithm, [v1, v2], "v2"))
    assert new_producer.send_task("acc.square", [9]).get(timeout=30) == 81
    late_v1 = old_producer.send_task("acc.square", [10])  # a producer not yet switched
    assert late_v1.get(timeout=30) == 100
    _stop(worker)

    # 3. v1 is retired on the workers: a v1 message is refused as unknown-key.
    stale = old_producer.send_task("acc.square", [11])
    worker = cli.start_worker("-P", "thread", "-c", "2", env=_worker_env(algorithm, [v2]))
    assert new_producer.send_task("acc.square", [12]).get(timeout=30) == 144
    letters = _letters(cli, 1)
    assert [d["reason"] for d in letters] == ["signature-unknown-key"]
    assert stale.state == states.PENDING
    _stop(worker)


def test_dlq_replay_resigns_genuine_letters_but_not_forged_ones(
    cli: StemCLI, tmp_path: Path
) -> None:
    key = _keys(tmp_path, "hmac-sha256", "v1", "k") / "v1.hmac-sha256.key"
    env = {**_producer_env("hmac-sha256", [key], "v1"), "STEM_SIGNING_REPLAY_WINDOW_S": "2"}
    app = _app(cli, env)
    sent = time.monotonic()
    genuine = app.send_task("acc.square", [5])
    [d] = app.broker.reserve(["default"], 1, 30.0)
    app.broker.dead_letter(d, "retries-exhausted", "upstream down")
    forged = decode(app.seal(app.build_envelope("acc.square", [6])))
    app.broker.publish([Message(forged.id, "default", encode(forged.replace(args=(7,))))])
    worker = cli.start_worker("-P", "thread", "-c", "1", env=env)
    assert [x["reason"] for x in _letters(cli, 2)] == ["retries-exhausted", "signature-invalid"]
    # The genuine letter's signature is then older than the window (the worker's start
    # and the listing above took some of that already).
    time.sleep(max(0.0, sent + 2.5 - time.monotonic()))
    out = cli.run("dlq", "replay", "--all", "--json", env=env, check=True)
    assert json.loads(out.stdout) == {"replayed": 2}
    assert genuine.get(timeout=30) == 25
    letters = _letters(cli, 1)
    assert [
        (
            x["reason"],
            json.loads(cli.run("dlq", "show", str(x["id"]), check=True).stdout)["message_id"],
        )
        for x in letters
    ] == [("signature-invalid", forged.id)]
    _stop(worker)


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_keys_from_a_config_file_sign_what_tasks_publish_in_every_pool(
    cli: StemCLI, tmp_path: Path, pool: str
) -> None:
    """Keys in a YAML file and the active key in the environment (the rotation runbook's
    step 1) are one keyring, for the worker and for its process-pool children: a task that
    publishes from a child signs with it, so nothing it publishes is refused."""
    keys = _keys(tmp_path, "hmac-sha256", "k1", "keys")
    conf = tmp_path / "site.yaml"
    conf.write_text(f"signing:\n  keys: [{keys}]\n")
    env = {"STEM_CONFIG": str(conf), "STEM_SIGNING_ACTIVE_KEY": "k1"}
    worker = cli.start_worker("-P", pool, "-c", "1", env=env)
    out = cli.run("enqueue", "acc.fan_out", "--args", "[4]", "--wait", "30", env=env)
    assert out.returncode == 0, out.stderr + cli.log_text()
    _, state, value = out.stdout.splitlines()[-1].split(None, 2)  # "ID STATE RESULT"
    assert state == "SUCCESS"
    got = cli.run("result", json.loads(value), "--wait", "30", env=env)
    assert got.returncode == 0, got.stderr + cli.log_text()
    assert got.stdout.splitlines()[-1].split(None, 2)[1:] == ["SUCCESS", "16"]
    assert json.loads(cli.run("dlq", "list", "--json", env=env, check=True).stdout) == []
    if pool == "process":
        # The file is edited badly while the worker runs; a pool process that dies is
        # replaced all the same: children take the worker's configuration, not the file's.
        conf.write_text("signing:\n  keys: [\n")
        producer = {"STEM_CONFIG": "", "STEM_SIGNING_KEYS": str(keys), **env}
        producer["STEM_CONFIG"] = ""  # the broken file is the worker's to survive
        crashed = cli.run("enqueue", "acc.crash", "--wait", "30", env=producer)
        assert "WorkerLost" in crashed.stdout + crashed.stderr, crashed.stdout + crashed.stderr
        again = cli.run("enqueue", "acc.fan_out", "--args", "[5]", "--wait", "30", env=producer)
        assert again.returncode == 0, again.stderr + cli.log_text()
        _, _, value = again.stdout.splitlines()[-1].split(None, 2)
        sub = cli.run("result", json.loads(value), "--wait", "30", env=producer)
        assert sub.stdout.splitlines()[-1].split(None, 2)[1:] == ["SUCCESS", "25"], sub.stderr
    _stop(worker)
