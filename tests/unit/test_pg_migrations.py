"""Migrations produce exactly the declared schema (stem/pg/schema.sql), apply once even when
many processes start together, and refuse an edited migration. Needs a PostgreSQL server
(the named-query parser tests at the bottom do not)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from importlib import resources
from typing import Any

import psycopg
import pytest

from stem.pg import migrate, queries
from tests.fixtures.postgres_server import PostgresServer

# Catalog views that describe a schema; each row is compared, ignoring stem_migrations
# (created by the runner, not by the migrations).
_CATALOG: dict[str, bytes] = {
    "columns": b"""
        SELECT table_name, column_name, data_type, is_nullable, column_default,
               is_identity, identity_generation
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name <> 'stem_migrations'
        ORDER BY 1, 2""",
    "indexes": b"""
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename <> 'stem_migrations'
        ORDER BY 1, 2""",
    "constraints": b"""
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace
          AND conrelid::regclass::text <> 'stem_migrations'
        ORDER BY 1, 2""",
    "functions": b"""
        SELECT proname, pg_get_functiondef(oid) FROM pg_proc
        WHERE pronamespace = 'public'::regnamespace ORDER BY 1""",
    "tables": b"""
        SELECT tablename FROM pg_tables
        WHERE schemaname = 'public' AND tablename <> 'stem_migrations' ORDER BY 1""",
}


def _snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {name: conn.execute(sql).fetchall() for name, sql in _CATALOG.items()}


@pytest.fixture
def fresh_db(postgres_server: PostgresServer) -> Iterator[str]:
    """Name of a new empty database, dropped after the test."""
    name = f"stem_mig_{uuid.uuid4().hex[:8]}"
    with postgres_server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    yield name
    with postgres_server.admin() as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


@pytest.mark.postgres
def test_migrations_produce_the_declared_schema(
    postgres_server: PostgresServer, fresh_db: str
) -> None:
    with postgres_server.admin(fresh_db) as conn:
        applied = migrate.apply(conn)
        migrated = _snapshot(conn)
    assert [m.version for m in applied] == [m.version for m in migrate.load()]

    declared_db = fresh_db + "_declared"
    with postgres_server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{declared_db}"'.encode())
    try:
        schema = (resources.files("stem.pg") / "schema.sql").read_bytes()
        with postgres_server.admin(declared_db) as conn:
            conn.execute(schema)
            declared = _snapshot(conn)
    finally:
        with postgres_server.admin() as conn:
            conn.execute(f'DROP DATABASE "{declared_db}" WITH (FORCE)'.encode())

    assert migrated["tables"], "the migrations created no tables"
    for part in _CATALOG:
        assert migrated[part] == declared[part], f"{part} differ between migrations and schema.sql"


@pytest.mark.postgres
def test_apply_is_idempotent_and_status_reports(
    postgres_server: PostgresServer, fresh_db: str
) -> None:
    with postgres_server.admin(fresh_db) as conn:
        assert {s.state for s in migrate.status(conn)} == {"pending"}
        assert not migrate.is_current(conn)
        migrate.apply(conn)
        assert migrate.apply(conn) == []
        assert migrate.is_current(conn)
        assert {s.state for s in migrate.status(conn)} == {"applied"}


@pytest.mark.postgres
def test_a_schema_applied_by_a_newer_stem_is_reported(
    postgres_server: PostgresServer, fresh_db: str
) -> None:
    """After a rollback of the code the database may hold migrations this Stem does not
    ship: old code works on the newer schema, but `stem db status` said nothing of it."""
    with postgres_server.admin(fresh_db) as conn:
        migrate.apply(conn)
        conn.execute(
            "INSERT INTO stem_migrations (version, name, checksum) VALUES (9999, 'future', 'x')"
        )
        rows = migrate.status(conn)
        assert [(r.version, r.name, r.state) for r in rows if r.state != "applied"] == [
            (9999, "future", "newer")
        ]
        assert migrate.is_current(conn)


@pytest.mark.postgres
def test_concurrent_starts_apply_each_migration_once(
    postgres_server: PostgresServer, fresh_db: str
) -> None:
    applied: list[int] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        try:
            with postgres_server.admin(fresh_db) as conn:
                barrier.wait()
                applied.extend(m.version for m in migrate.apply(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(applied) == [m.version for m in migrate.load()]


@pytest.mark.postgres
def test_an_edited_migration_is_refused(postgres_server: PostgresServer, fresh_db: str) -> None:
    with postgres_server.admin(fresh_db) as conn:
        migrate.apply(conn)
        conn.execute(b"UPDATE stem_migrations SET checksum = 'edited' WHERE version = 1")
        assert migrate.status(conn)[0].state == "changed"
        with pytest.raises(migrate.MigrationError, match=r"0001_initial\.sql differs"):
            migrate.apply(conn)


# -- named queries, no server needed ----------------------------------------------------------


def test_named_query_files_parse() -> None:
    broker = queries.load("broker")
    assert {"publish", "reserve", "ack", "nack", "extend", "claim"} <= set(broker)
    assert all(sql and not sql.rstrip().endswith(b";") for sql in broker.values())
    assert "store" in queries.load("backend")


def test_named_query_parser_strips_comments_and_refuses_duplicates() -> None:
    parsed = queries.parse("-- header\n-- name: a\n-- why\nSELECT 1;\n\n-- name: b\nSELECT 2\n")
    assert parsed == {"a": b"SELECT 1", "b": b"SELECT 2"}
    with pytest.raises(ValueError, match="twice"):
        queries.parse("-- name: a\nSELECT 1\n-- name: a\nSELECT 2\n")


def test_migration_files_are_numbered_in_order() -> None:
    versions = [m.version for m in migrate.load()]
    assert versions == list(range(1, len(versions) + 1))
