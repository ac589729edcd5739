"""The Dramatiq side of the comparison: the module the worker loads and the producer uses.

Dramatiq's default middleware plus ``Results`` (Redis backend) for the round trips; the
drain actor stores no result. The worker runs 2 processes x 8 threads.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import dramatiq
from dramatiq import group
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import Middleware
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import notify_ready

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = "bench"
NAME = "dramatiq"


class _Ready(Middleware):  # type: ignore[misc]
    def after_worker_boot(self, broker: Any, worker: Any) -> None:
        notify_ready()


broker = RedisBroker(url=URL)
broker.add_middleware(Results(backend=RedisBackend(url=URL)))
broker.add_middleware(_Ready())
dramatiq.set_broker(broker)


@dramatiq.actor(actor_name="bench.noop", queue_name=QUEUE, store_results=True, max_retries=0)
def noop() -> None:
    return None


@dramatiq.actor(actor_name="bench.noop_quiet", queue_name=QUEUE, max_retries=0)
def noop_quiet() -> None:
    return None


CONFIG = "2 processes x 8 threads"
READY_COUNT = 2  # after_worker_boot runs once in each worker process
BULK_HOW = "group(...).run(), 1,000 per group"


def version() -> str:
    return str(dramatiq.__version__)


def worker_argv(python: str) -> list[str]:
    return [python, "-m", "dramatiq", "dramatiq_app", "-p", "2", "-t", "8", "-Q", QUEUE]


def enqueue_one() -> None:
    noop_quiet.send()


def enqueue_bulk(n: int) -> None:
    group(noop_quiet.message() for _ in range(n)).run()


def round_trip() -> None:
    noop.send().get_result(block=True, timeout=30_000)


def outstanding(client: Any) -> int:
    """Messages not yet acknowledged: Dramatiq deletes a message's body from the
    ``.msgs`` hash when it acks it, after the actor ran."""
    return int(client.hlen(f"dramatiq:{QUEUE}.msgs"))


def close() -> None:
    broker.close()
