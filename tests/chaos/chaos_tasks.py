"""The app the chaos tests' workers run (``chaos_tasks:app``).

The broker (and result backend) URL comes from ``STEM_CHAOS_BROKER`` (``STEM_CHAOS_BACKEND``
when results go elsewhere). Every run of ``chaos.work`` appends one line to the file named
by ``STEM_CHAOS_RECORD`` *when it starts*, so a run cut short by a kill still counts:
``<n> <pid> <ppid> <start_s> <end_s or ->``. Lines are short and written with one
``write`` on an ``O_APPEND`` descriptor, so lines from several processes never interleave.
"""

from __future__ import annotations

import os
import time

from stem import Stem

URL = os.environ["STEM_CHAOS_BROKER"]
app = Stem("chaos", broker=URL, backend=os.environ.get("STEM_CHAOS_BACKEND", URL))


def _append(line: str) -> None:
    path = os.environ.get("STEM_CHAOS_RECORD")
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@app.task(name="chaos.work")
def work(n: int, sleep_s: float) -> int:
    started = time.time()
    _append(f"start {n} {os.getpid()} {os.getppid()} {started:.3f}\n")
    time.sleep(sleep_s)
    _append(f"end {n} {os.getpid()} {os.getppid()} {time.time():.3f}\n")
    return n * 7 + 3  # tests/chaos/conftest.py: value_for
