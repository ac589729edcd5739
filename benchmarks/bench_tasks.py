"""Tasks for the benchmark harness; the broker URL comes from STEM_BENCH_BROKER.

Signing keys, when a run asks for them, come from the usual STEM_SIGNING_* variables
(read by ``Stem()`` through ``Keyring.from_env``), for the producer and the worker alike.
"""

from __future__ import annotations

import os

from stem import Stem

app = Stem(
    "bench",
    broker=os.environ.get("STEM_BENCH_BROKER", "sqlite:///var/bench/stem.db"),
    backend=os.environ.get("STEM_BENCH_BACKEND") or None,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.noop_quiet", ignore_result=True)
def noop_quiet() -> None:
    return None


@app.task(name="bench.anoop")
async def anoop() -> None:
    return None


@app.task(name="bench.anoop_quiet", ignore_result=True)
async def anoop_quiet() -> None:
    return None
