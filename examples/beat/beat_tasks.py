"""The beat example's tasks and its schedule defined in code.

``stem beat`` (the scheduler) reads ``app.schedules`` from this module and the
``beat.schedules`` of ``beat.yaml``; ``stem worker`` runs what it enqueues. Each task appends
one line to ``$BEAT_EXAMPLE_RAN`` so run.py can show what ran, and when.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from stem import Stem

DB = os.environ.get("BEAT_EXAMPLE_DB", "var/stem.db")
RAN = os.environ.get("BEAT_EXAMPLE_RAN", "var/ran.jsonl")
app = Stem("beat-example", broker=f"sqlite:///{DB}")


def _record(task: str, **details: Any) -> None:
    line = json.dumps({"at": round(time.time(), 3), "task": task, **details})
    # One short append per run: lines from the pool's threads never interleave.
    with open(RAN, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


@app.task(name="beat.tick")
def tick() -> None:
    _record("beat.tick")


@app.task(name="beat.report")
def report(kind: str, recipients: list[str] | None = None) -> None:
    _record("beat.report", kind=kind, recipients=recipients or [])


# A schedule in code: every second. Schedules from the config file join it (beat.yaml).
app.schedule("tick", "beat.tick", every=1)
