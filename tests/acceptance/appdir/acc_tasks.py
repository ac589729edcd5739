"""Tasks used by the acceptance tests; the broker URL comes from STEM_TEST_BROKER."""

from __future__ import annotations

import logging
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


@app.task(name="acc.gil_hog")
def gil_hog(pid_file: str) -> int:
    """Writes its process id, then holds the GIL in one C call for minutes."""
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    return sum(range(10**11))


def _record(line: str) -> None:
    path = os.environ.get("STEM_TEST_RECORD")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


@app.task(name="acc.fan_out")
def fan_out(n: int) -> str:
    """Publishes from inside a task: the child task's id."""
    return square.delay(n).id


@app.task(name="acc.crash", max_retries=0)
def crash() -> None:
    """Ends its pool process (the worker replaces it)."""
    os._exit(3)


@app.task(name="acc.slow_square")
def slow_square(n: int) -> int:
    time.sleep(0.05)
    return n * n


@app.task(name="acc.collect")
def collect(values: list[int]) -> int:
    _record(f"collect {len(values)}")
    return sum(values)


@app.task(name="acc.limited", rate_limit="50/s")
def limited() -> None:
    _record(f"{time.time():.6f}")


@app.task(name="acc.say")
def say(words: str) -> str:
    logging.getLogger("acc.tasks").info("said %s", words)
    return words
