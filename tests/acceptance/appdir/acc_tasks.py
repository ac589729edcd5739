"""Tasks used by the acceptance tests; the broker URL comes from STEM_TEST_BROKER."""

from __future__ import annotations

import os
import time

from stem import Stem

URL = os.environ["STEM_TEST_BROKER"]
app = Stem("acceptance", broker=URL, backend=os.environ.get("STEM_TEST_BACKEND", URL))


@app.task(name="acc.square")
def square(n: int) -> int:
    time.sleep(float(os.environ.get("STEM_TEST_TASK_SLEEP", "0.005")))
    return n * n


@app.task(name="acc.stuck", time_limit=1.0, max_retries=0)
def stuck() -> str:
    time.sleep(60)
    return "never"


@app.task(name="acc.sleep")
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@app.task(name="acc.pid")
def pid() -> int:
    return os.getpid()
