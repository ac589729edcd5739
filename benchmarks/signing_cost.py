"""CPU cost of message signing per algorithm, in microseconds per message.

    python benchmarks/signing_cost.py [--n 5000] [--json PATH]

For the envelope of a no-op task (the one the drain workload sends), each operation is
timed over --n calls, five times; the best of the five averages is reported (the least
disturbed by other work on the machine):

sign          producer: ``Keyring.seal_envelope``, what ``publish`` pays per message: a fresh
              nonce, canonical bytes, the signature, the body (compare with encode).
verify        worker: ``Keyring.verify`` of the body as received (less its signature value:
              no re-encoding), the signature check and freshness; decoding not counted.
result seal   worker: sealing the result record (``record_sealers``, context "result").
result unseal producer: checking a sealed result record in ``get()``.
encode/decode the envelope codec alone, for scale (paid with or without signing).

The replay guard's broker work per message (reading the nonce's claim: in the reserve call
on Redis, one read per batch elsewhere; recording it: in the ack call) is not CPU here; it
shows in the drain rates of ``run.py --signing``.
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stem import envelope as codec  # noqa: E402
from stem.app import Stem  # noqa: E402
from stem.result import ResultRecord  # noqa: E402
from stem.security.signing import Keyring  # noqa: E402


def best_us(fn: Callable[[], object], n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def keyring(algorithm: str) -> Keyring:
    return Keyring.build(algorithm, {"b1": secrets.token_bytes(32)}, active_key="b1")


def measure(n: int) -> dict[str, dict[str, float]]:
    app = Stem("bench", broker="memory://", keyring=None)
    app.task(name="bench.noop_quiet", ignore_result=True)(lambda: None)
    env = app.build_envelope("bench.noop_quiet", queue="bench")
    body = codec.encode(env)
    record = ResultRecord(task_id=env.id, state="SUCCESS", task=env.task, result=None).encode()
    out: dict[str, dict[str, float]] = {
        "none": {
            "encode": best_us(lambda: codec.encode(env), n),
            "decode": best_us(lambda: codec.decode(body), n),
        }
    }
    for algorithm in ("hmac-sha256", "ed25519"):
        ring = keyring(algorithm)
        signed = ring.sign(env)
        wire = codec.encode(signed)
        seal, unseal = ring.record_sealers()
        assert seal is not None
        sealed = seal(record)
        out[algorithm] = {
            "sign": best_us(functools.partial(ring.seal_envelope, env), n),
            "verify": best_us(functools.partial(ring.verify, codec.decode(wire), body=wire), n),
            "result_seal": best_us(functools.partial(seal, record), n),
            "result_unseal": best_us(functools.partial(unseal, sealed), n),
            "signed_bytes": float(len(wire)),
        }
    out["none"]["bytes"] = float(len(body))
    app.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--json", default=None, help="write the numbers here (- for stdout)")
    args = parser.parse_args()
    costs = measure(args.n)
    if args.json == "-":
        print(json.dumps(costs, indent=2))
        return 0
    if args.json:
        Path(args.json).write_text(json.dumps(costs, indent=2) + "\n")
    for alg, ops in costs.items():
        shown: dict[str, Any] = {k: round(v, 1) for k, v in ops.items()}
        print(f"{alg:<12} {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
