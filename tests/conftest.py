"""Shared test configuration: throwaway Redis and PostgreSQL servers (started on demand on
free ports by the fixture plugins below) and a clean in-memory broker registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.postgres_server",
]


@pytest.fixture(autouse=True, scope="session")
def _quick_control_thread() -> Iterator[None]:
    """Each in-process worker's stop waited for its control thread to come back from a
    0.5 s wait in reserve (0.45 s a stop, a few hundred stops in the suite): 0.1 s here.
    Workers started as subprocesses keep the default."""
    from stem.worker import control

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(control, "REQUEST_WAIT_S", 0.1)
        yield
