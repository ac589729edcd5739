"""Shared test configuration: throwaway Redis and PostgreSQL servers (started on demand on
free ports by the fixture plugins below) and a clean in-memory broker registry."""

from __future__ import annotations

pytest_plugins = [
    "tests.fixtures.redis_server",
    "tests.fixtures.postgres_server",
]
