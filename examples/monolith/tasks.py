"""The monolith example's tasks: one SQLite file is both the broker and the result store."""

from __future__ import annotations

import os
import time

from stem import Stem

DB = os.environ.get("STEM_DEMO_DB", "var/demo/stem.db")
app = Stem("monolith", broker=f"sqlite:///{DB}", backend=f"sqlite:///{DB}")


@app.task(name="demo.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(
    name="demo.flaky", bind=True, max_retries=3, retry_backoff=0.2, autoretry_for=(ConnectionError,)
)
def flaky(ctx, succeed_on_attempt: int) -> str:  # type: ignore[no-untyped-def]
    """Fails with ConnectionError until its attempt number reaches ``succeed_on_attempt``;
    the worker retries it from the broker with backoff."""
    if ctx.attempt < succeed_on_attempt:
        raise ConnectionError(f"upstream unavailable (attempt {ctx.attempt})")
    return f"ok after {ctx.attempt} retries"


@app.task(name="demo.stamp")
def stamp(label: str) -> dict[str, object]:
    return {"label": label, "ran_at": round(time.time(), 3)}


@app.task(name="demo.report", bind=True)
def report(ctx, steps: int) -> int:  # type: ignore[no-untyped-def]
    for i in range(steps):
        ctx.update_progress(i + 1, steps)
        time.sleep(0.05)
    return steps
