"""Signed messages: HMAC-SHA256 and Ed25519 keys, key rotation, and forgeries dead-lettered.

python examples/signed/run.py

For each algorithm: make a key with ``stem keys generate``, start a worker process that
requires signatures (``STEM_SIGNING_*`` variables), run a signed task, write forged messages
straight into the broker (they are dead-lettered, never run), rotate to a second key (both
accepted), retire the first (its messages are now ``signature-unknown-key``). Finally
``stem dlq list`` shows every dead letter with its reason. Broker and results: one SQLite
file under ``$STEM_DEMO_DIR`` (default ``examples/signed/var``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stem import Stem
from stem.brokers.base import Message
from stem.envelope import Envelope, encode
from stem.errors import StemError
from stem.security.signing import Keyring

HERE = Path(__file__).resolve().parent
STEM = [sys.executable, "-m", "stem.cli.main"]
WORKER_ARGS = ["worker", "--pool", "thread", "--concurrency", "2", "--shutdown-budget", "5"]
WAIT_S = 20.0  # the longest any single step may take before the example gives up


class Failed(Exception):
    """The example did not behave as its README says."""


@dataclass(frozen=True)
class Key:
    algorithm: str
    kid: str
    path: str  # the HMAC secret or the Ed25519 private key (producers)
    public: str | None  # the Ed25519 public key (verify-only workers)


# -- processes ------------------------------------------------------------------------------


def child_env(demo: Path, signing: Mapping[str, str]) -> dict[str, str]:
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PYTHONPATH": pythonpath,
        "SIGNED_EXAMPLE_DB": str(demo / "stem.db"),
        # No /etc/stem files: the example's world is exactly what this script sets.
        "STEM_CONFIG_DIR": str(demo),
        **signing,
    }


def stem_cli(demo: Path, *args: str, extra_env: Mapping[str, str] | None = None) -> str:
    proc = subprocess.run(
        [*STEM, *args],
        env={**child_env(demo, {}), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    if proc.returncode != 0:
        raise Failed(f"stem {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return proc.stdout


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the worker drains), then SIGKILL if it is still there after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextmanager
def worker(demo: Path, label: str, signing: Mapping[str, str]) -> Iterator[None]:
    """A ``stem worker`` process with these STEM_SIGNING_* variables, stopped on exit."""
    log = demo / f"worker-{label}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*STEM, "--app", "signed_tasks:app", *WORKER_ARGS],
            env=child_env(demo, signing),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    names = {k: ",".join(Path(p).name for p in v.split(",")) for k, v in signing.items()}
    shown = " ".join(f"{k}={v}" for k, v in names.items())
    print(f"  worker {label} started: {shown}")
    try:
        yield
    finally:
        code = stop(proc)
    if code != 0:
        raise Failed(f"worker {label} exited {code}:\n{log.read_text(errors='replace')[-3000:]}")


# -- keys -----------------------------------------------------------------------------------


def generate_key(demo: Path, algorithm: str, kid: str) -> Key:
    """``stem keys generate`` into ``demo/keys``; its output names the files to use."""
    keys_dir = str(demo / "keys")
    out = stem_cli(demo, "keys", "generate", "--algorithm", algorithm, "--kid", kid, "-o", keys_dir)
    groups: list[dict[str, str]] = [{}]
    for line in out.splitlines():
        if line.startswith("# verify-only"):
            groups.append({})  # Ed25519: the lines after this are for verify-only workers
        elif "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            groups[-1][name] = value
    public = groups[1]["STEM_SIGNING_PUBLIC_KEYS"] if len(groups) > 1 else None
    print(f"  stem keys generate --algorithm {algorithm} --kid {kid}")
    return Key(algorithm, kid, groups[0]["STEM_SIGNING_KEYS"], public)


def producer_signing(active: Key, *also: Key) -> dict[str, str]:
    """A producer signs with ``active`` and verifies results with every key it holds."""
    return {
        "STEM_SIGNING_ALGORITHM": active.algorithm,
        "STEM_SIGNING_KEYS": ",".join(k.path for k in (active, *also)),
        "STEM_SIGNING_ACTIVE_KEY": active.kid,
    }


def worker_signing(*accepted: Key) -> dict[str, str]:
    """HMAC workers hold the secrets (and sign results with the newest); Ed25519 workers
    hold only public keys. Either way signatures are required (the default with keys)."""
    algorithm = accepted[0].algorithm
    if algorithm == "ed25519":
        return {
            "STEM_SIGNING_ALGORITHM": algorithm,
            "STEM_SIGNING_PUBLIC_KEYS": ",".join(str(k.public) for k in accepted),
        }
    return {
        "STEM_SIGNING_ALGORITHM": algorithm,
        "STEM_SIGNING_KEYS": ",".join(k.path for k in accepted),
        "STEM_SIGNING_ACTIVE_KEY": accepted[-1].kid,
    }


# -- producing, forging, and checking what happened -----------------------------------------


def keyring(signing: Mapping[str, str]) -> Keyring:
    ring = Keyring.from_env(signing)
    if ring is None:
        raise Failed(f"no keyring from {sorted(signing)}")
    return ring


def producer(demo: Path, signing: Mapping[str, str]) -> Stem:
    url = f"sqlite:///{demo / 'stem.db'}"
    return Stem("producer", broker=url, keyring=keyring(signing))


def envelope(account: str, cents: int) -> Envelope:
    """An unsigned bank.transfer message (building one needs no broker connection)."""
    builder = Stem("builder", broker="memory://signed")
    return builder.build_envelope("bank.transfer", [account, cents])


def transfer(demo: Path, who: str, signing: Mapping[str, str], account: str, cents: int) -> None:
    app = producer(demo, signing)
    try:
        result = app.send_task("bank.transfer", [account, cents]).get(timeout=WAIT_S)
    finally:
        app.close()
    print(f"  {who}: bank.transfer({account!r}, {cents}) -> {result!r}")


def inject(demo: Path, env: Envelope) -> None:
    """Write a message straight into the broker, as someone with broker access but without
    the signing keys could."""
    app = Stem("intruder", broker=f"sqlite:///{demo / 'stem.db'}")
    try:
        app.broker.publish([Message(id=env.id, queue=env.queue, body=encode(env))])
    finally:
        app.close()


def expect_dead(demo: Path, what: str, message_id: str, reason: str, *, ran: bool = False) -> None:
    """Wait until the worker dead-letters ``message_id``; check the reason and that the
    forged task never ran (``ran=True``: a replay, whose original did run)."""
    app = Stem("checker", broker=f"sqlite:///{demo / 'stem.db'}")
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            found = [d for d in app.broker.dlq_list(None, 1000) if d.message_id == message_id]
            if found:
                break
            if time.monotonic() > deadline:
                raise Failed(f"{what}: not dead-lettered within {WAIT_S:g}s")
            time.sleep(0.1)
        result = app.backend.fetch(message_id)
    finally:
        app.close()
    dead = found[-1]
    if dead.reason != reason:
        raise Failed(f"{what}: dead-lettered as {dead.reason!r}, expected {reason!r}")
    if not ran and result is not None:
        raise Failed(f"{what}: the task left a result; it must never run")
    print(f"  {what}: dead-lettered, reason {dead.reason}")


# -- the two walkthroughs -------------------------------------------------------------------


def hmac_walkthrough(demo: Path) -> None:
    print("== HMAC-SHA256: producers and workers share the secret")
    v1 = generate_key(demo, "hmac-sha256", "v1")
    with worker(demo, "hmac-1", worker_signing(v1)):
        transfer(demo, "producer (v1)", producer_signing(v1), "alice", 500)

        unsigned = envelope("mallory", 1_000_000)
        genuine = keyring(producer_signing(v1)).sign(envelope("bob", 700))
        captured = keyring(producer_signing(v1)).sign(envelope("carol", 300))
        inject(demo, unsigned)
        expect_dead(demo, "forged: unsigned message", unsigned.id, "signature-missing")
        tampered = genuine.replace(args=("mallory", 700_000))  # signature kept, amount changed
        inject(demo, tampered)
        expect_dead(
            demo,
            "forged: signed message altered in the broker (bob 700 -> mallory 700000)",
            tampered.id,
            "signature-invalid",
        )
        inject(demo, captured)
        wait_result(demo, captured.id, producer_signing(v1))
        print("  a captured signed message (carol 300) ran once; sending the same bytes again:")
        inject(demo, captured)
        expect_dead(demo, "forged: replayed message", captured.id, "signature-replayed", ran=True)

    print("-- rotation: add v2 everywhere, sign with v2, then retire v1")
    v2 = generate_key(demo, "hmac-sha256", "v2")
    with worker(demo, "hmac-2", worker_signing(v1, v2)):
        transfer(demo, "producer still signing with v1", producer_signing(v1, v2), "dave", 100)
        transfer(demo, "producer signing with v2", producer_signing(v2, v1), "erin", 200)
    with worker(demo, "hmac-3", worker_signing(v2)):
        transfer(demo, "producer signing with v2", producer_signing(v2), "frank", 300)
        stale = keyring(producer_signing(v1, v2)).sign(envelope("grace", 400))
        inject(demo, stale)
        expect_dead(
            demo, "v1-signed message after v1 was retired", stale.id, "signature-unknown-key"
        )


def ed25519_walkthrough(demo: Path) -> None:
    print("== Ed25519: producers hold private keys, workers only public keys")
    e1 = generate_key(demo, "ed25519", "e1")
    with worker(demo, "ed-1", worker_signing(e1)):
        transfer(demo, "producer (e1)", producer_signing(e1), "heidi", 900)
        # An attacker's own Ed25519 key, claiming the key id e1.
        fake = Keyring.build("ed25519", {"e1": os.urandom(32)}, active_key="e1")
        forged = fake.sign(envelope("ivan", 90_000))
        inject(demo, forged)
        expect_dead(
            demo, "forged: signed by an attacker's key posing as e1", forged.id, "signature-invalid"
        )

    print("-- rotation: workers trust e1 and e2, then e2 only")
    e2 = generate_key(demo, "ed25519", "e2")
    with worker(demo, "ed-2", worker_signing(e1, e2)):
        transfer(demo, "producer still signing with e1", producer_signing(e1), "judy", 100)
        transfer(demo, "producer signing with e2", producer_signing(e2), "ken", 200)
    with worker(demo, "ed-3", worker_signing(e2)):
        transfer(demo, "producer signing with e2", producer_signing(e2), "leo", 300)
        stale = keyring(producer_signing(e1)).sign(envelope("mia", 400))
        inject(demo, stale)
        expect_dead(
            demo, "e1-signed message after e1 was retired", stale.id, "signature-unknown-key"
        )


def wait_result(demo: Path, task_id: str, signing: Mapping[str, str]) -> None:
    app = producer(demo, signing)
    try:
        app.AsyncResult(task_id).get(timeout=WAIT_S)
    finally:
        app.close()


EXPECTED_DEAD = sorted(
    [
        "signature-missing",
        "signature-invalid",
        "signature-replayed",
        "signature-unknown-key",
        "signature-invalid",
        "signature-unknown-key",
    ]
)


def show_dead_letters(demo: Path) -> None:
    url = f"sqlite:///{demo / 'stem.db'}"
    print("== stem dlq list")
    # A wide table: rich would squeeze the reasons into an 80-column pipe.
    print(stem_cli(demo, "--broker", url, "dlq", "list", extra_env={"COLUMNS": "160"}).rstrip())
    rows = json.loads(stem_cli(demo, "--broker", url, "dlq", "list", "--json"))
    reasons = sorted(str(r["reason"]) for r in rows)
    if reasons != EXPECTED_DEAD:
        raise Failed(f"dead letters {reasons}, expected {EXPECTED_DEAD}")
    print(f"{len(rows)} forged or stale messages dead-lettered, none of them ran")


def main() -> int:
    demo = Path(os.environ.get("STEM_DEMO_DIR") or HERE / "var")
    # Settings from the caller's shell (a STEM_BROKER_URL, signing keys) would change what
    # the example shows: every process here gets exactly the variables it sets.
    for name in [n for n in os.environ if n.startswith("STEM_")]:
        del os.environ[name]
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True)
    try:
        hmac_walkthrough(demo)
        ed25519_walkthrough(demo)
        show_dead_letters(demo)
    except (Failed, StemError, subprocess.TimeoutExpired) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        logs = sorted(demo.glob("worker-*.log"), key=lambda p: p.stat().st_mtime)
        if logs:  # the worker that was running when the step failed
            tail = logs[-1].read_text(errors="replace")[-2000:]
            print(f"last lines of {logs[-1]}:\n{tail}", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
