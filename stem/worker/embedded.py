"""Run a worker inside the current process (scripts, notebooks, tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from stem.worker.consumer import Worker, WorkerConfig

if TYPE_CHECKING:
    from stem.app import Stem


@contextlib.contextmanager
def running_worker(app: Stem, **config: Any) -> Iterator[Worker]:
    """A real worker (thread pool by default) running in background threads of this
    process for the duration of the ``with`` block; it drains and stops on exit."""
    config.setdefault("pool", "thread")
    config.setdefault("concurrency", 2)
    config.setdefault("lease_s", 5.0)
    config.setdefault("poll_wait_s", 0.1)
    config.setdefault("shutdown_budget_s", 5.0)
    config.setdefault("heartbeat_s", 0.5)
    worker = Worker(app, WorkerConfig(**config))
    worker.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        worker.shutdown()
