"""Test helpers for users' own tasks, and a pytest plugin (registered automatically).

Fixtures:

``stem_app``
    A fresh in-memory app (``memory://`` broker and backend, private to the test). Override
    it in your ``conftest.py`` to return your own app configured for tests::

        @pytest.fixture
        def stem_app():
            from myproject.tasks import app
            app.configure(broker="memory://", backend="memory://")
            return app

``stem_worker``
    An embedded worker for ``stem_app``: ``stem_worker.drain()`` runs every ready task in
    this thread until the queues are empty (tasks enqueued by tasks included), so a test can
    enqueue, drain, then assert on results.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence

import pytest

from stem.app import Stem
from stem.worker.consumer import drain
from stem.worker.embedded import running_worker

__all__ = ["EmbeddedWorker", "memory_app", "running_worker", "stem_app", "stem_worker"]


class EmbeddedWorker:
    def __init__(self, app: Stem, queues: Sequence[str] | None = None) -> None:
        self.app = app
        self.queues = list(queues) if queues else None

    def _queues(self) -> list[str]:
        if self.queues:
            return self.queues
        known = {s.queue for s in self.app.broker.stats()}
        known.add(self.app.default_queue)
        known.update(t.options.queue for t in self.app.tasks.values() if t.options.queue)
        known.update(self.app.routes.values())
        return sorted(known)

    def drain(self, max_tasks: int = 10_000) -> int:
        """Run ready tasks until none is left; return how many ran."""
        return drain(self.app, self._queues(), max_tasks=max_tasks)


def memory_app(name: str = "test") -> Stem:
    url = f"memory://{name}-{uuid.uuid4().hex}"
    return Stem(name, broker=url, backend=url)


@pytest.fixture
def stem_app() -> Iterator[Stem]:
    app = memory_app()
    yield app
    app.close()


@pytest.fixture
def stem_worker(stem_app: Stem) -> EmbeddedWorker:
    return EmbeddedWorker(stem_app)
