"""The Celery side of the comparison: the app the worker loads and the producer uses.

Configuration is Celery's defaults except what the comparison needs: JSON only (Stem never
pickles), the Redis result backend, and ``--without-gossip --without-mingle
--without-heartbeat`` on the worker (cluster chatter that only slows a single worker down).
Acknowledgement stays early (on receipt, Celery's default) and prefetch stays 4 per process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from celery import Celery, group
from celery.signals import worker_ready

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import notify_ready

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bench"
NAME = "celery"

app = Celery("bench", broker=URL, backend=URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None


@app.task(name="bench.noop_quiet", ignore_result=True)
def noop_quiet() -> None:
    return None


@worker_ready.connect
def _ready(**_: Any) -> None:
    notify_ready()


CONFIG = "prefork c=2"
READY_COUNT = 1  # worker_ready fires once, in the main process, after the pool started
BULK_HOW = "group(...).apply_async(), 1,000 per group"


def version() -> str:
    import celery

    return str(celery.__version__)


def worker_argv(python: str) -> list[str]:
    return [
        python,
        "-m",
        "celery",
        "-A",
        "celery_app",
        "worker",
        "-P",
        "prefork",
        "-c",
        "2",
        "-Q",
        QUEUE,
        "-l",
        "warning",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]


def enqueue_one() -> None:
    noop_quiet.delay()


def enqueue_bulk(n: int) -> None:
    group(noop_quiet.s() for _ in range(n)).apply_async()


def round_trip() -> None:
    noop.delay().get(timeout=30)


def outstanding(client: Any) -> int:
    """Messages still in the queue list or delivered but not acknowledged (kombu keeps
    those in the ``unacked`` hash)."""
    pipe = client.pipeline()
    pipe.llen(QUEUE)
    pipe.hlen("unacked")
    return int(sum(pipe.execute()))


def close() -> None:
    app.close()
