"""Fixtures for the one contract suite every broker and result backend passes.

``broker`` / ``backend`` are parametrized over memory, sqlite, redis and postgres. Memory and
SQLite get a fresh store per test. Redis and PostgreSQL take their URL from the ``redis_url``
/ ``postgres_url`` fixtures (tests/fixtures/, registered in tests/conftest.py); a missing
fixture or an adapter that does not exist yet calls ``service_missing`` (skip on a laptop,
fail under CI=true). Those servers may be shared between tests, so the suite names every
queue, key and task id uniquely (``names``) and never touches what it did not create.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stem.backends import backend_from_url
from stem.backends.base import ResultBackend
from stem.brokers import broker_from_url
from stem.brokers.base import Broker
from stem.errors import StemError, UnsupportedURL
from tests.fixtures.require import service_missing
from tests.fixtures.stores import KINDS, store_url


class Names:
    """Unique queue names, keys and ids for one test; remembers the queues it handed out."""

    def __init__(self) -> None:
        self.queues: list[str] = []

    def queue(self, label: str = "q") -> str:
        name = self.key(label)
        self.queues.append(name)
        return name

    def key(self, label: str = "k") -> str:
        return f"contract-{label}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def names() -> Names:
    return Names()


@pytest.fixture
def q(names: Names) -> str:
    """A fresh queue name."""
    return names.queue()


@pytest.fixture(params=KINDS)
def broker(request: pytest.FixtureRequest, tmp_path: Path, names: Names) -> Iterator[Broker]:
    kind: str = request.param
    try:
        b = broker_from_url(store_url(request, kind, tmp_path))
    except UnsupportedURL as exc:
        service_missing(f"{kind} broker: {exc}")
    yield b
    try:  # leave a shared server as we found it (leased messages lapse on their own)
        for queue in names.queues:
            b.purge(queue)
            b.dlq_purge(queue=queue)
    except StemError:
        pass
    finally:
        b.close()


@pytest.fixture
def other_broker(broker: Broker) -> Iterator[Broker]:
    """A second instance on the same store (another connection where there are any)."""
    b = broker_from_url(broker.url)
    yield b
    b.close()


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultBackend]:
    kind: str = request.param
    try:
        b = backend_from_url(store_url(request, kind, tmp_path))
    except UnsupportedURL as exc:
        service_missing(f"{kind} result backend: {exc}")
    yield b
    b.close()


@pytest.fixture
def other_backend(backend: ResultBackend) -> Iterator[ResultBackend]:
    b = backend_from_url(backend.url)
    yield b
    b.close()


@pytest.fixture
def kind(request: pytest.FixtureRequest) -> str:
    """The id of the broker/backend under test (``memory``, ``sqlite``, ...)."""
    params = request.node.callspec.params
    return str(params.get("broker", params.get("backend")))
