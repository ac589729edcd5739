"""Versioned schema migrations for the PostgreSQL broker and backend.

Migrations are the ``NNNN_name.sql`` files in ``stem/pg/migrations/``, applied in order and
recorded in ``stem_migrations`` with a SHA-256 checksum of the file. An applied migration is
never edited: a changed checksum stops ``apply`` with an error naming the file. Concurrent
callers (many workers starting at once) serialise on a transaction-scoped advisory lock, so
exactly one applies each migration and the others find nothing to do. All pending migrations
apply in one transaction: DDL is transactional in PostgreSQL, so a failure leaves the schema
as it was.

``schema.sql`` next to this module is the declared result of all migrations; a test checks
that the two agree.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from stem.errors import ConfigError

# pg_advisory_xact_lock key: "STEM" in ASCII, so operators can spot it in pg_locks.
LOCK_KEY = 0x5354454D
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

_CREATE_TABLE = b"""
CREATE TABLE IF NOT EXISTS stem_migrations (
    version    integer PRIMARY KEY,
    name       text    NOT NULL,
    checksum   text    NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


class MigrationError(ConfigError):
    """The database schema does not match Stem's migrations."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: bytes
    checksum: str


@dataclass(frozen=True, slots=True)
class MigrationStatus:
    """``state`` is ``applied``, ``pending`` or ``changed`` (applied from a different file)."""

    version: int
    name: str
    state: str
    applied_at: str | None


def load() -> list[Migration]:
    """The migrations shipped with this Stem, in version order."""
    found: list[Migration] = []
    for entry in resources.files("stem.pg").joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        sql = entry.read_bytes()
        found.append(Migration(int(match[1]), match[2], sql, hashlib.sha256(sql).hexdigest()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version number: {versions}")
    return found


def _applied(conn: psycopg.Connection[Any]) -> dict[int, tuple[str, str, str]]:
    rows = conn.execute(
        b"SELECT version, name, checksum, applied_at::text FROM stem_migrations"
    ).fetchall()
    return {int(r[0]): (str(r[1]), str(r[2]), str(r[3])) for r in rows}


def is_current(conn: psycopg.Connection[Any]) -> bool:
    """Cheap check without the lock: is every shipped migration recorded as applied?"""
    latest = max((m.version for m in load()), default=0)
    try:
        row = conn.execute(b"SELECT max(version) FROM stem_migrations").fetchone()
    except pgerrors.UndefinedTable:
        return False
    return row is not None and row[0] is not None and int(row[0]) >= latest


def status(conn: psycopg.Connection[Any]) -> list[MigrationStatus]:
    """Each shipped migration with whether (and how) it was applied."""
    try:
        applied = _applied(conn)
    except pgerrors.UndefinedTable:
        applied = {}
    out: list[MigrationStatus] = []
    for m in load():
        if m.version not in applied:
            out.append(MigrationStatus(m.version, m.name, "pending", None))
            continue
        _, checksum, at = applied[m.version]
        state = "applied" if checksum == m.checksum else "changed"
        out.append(MigrationStatus(m.version, m.name, state, at))
    shipped = {m.version for m in load()}
    for version in sorted(set(applied) - shipped):
        # Applied by a newer Stem (after a rollback of the code, say): old code keeps
        # working on a newer schema, but an operator should know the two differ.
        name, _, at = applied[version]
        out.append(MigrationStatus(version, name, "newer", at))
    return out


def apply(conn: psycopg.Connection[Any]) -> list[Migration]:
    """Apply pending migrations under the advisory lock; return those applied."""
    migrations = load()
    done: list[Migration] = []
    with conn.transaction():
        conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(_CREATE_TABLE)
        applied = _applied(conn)
        for m in migrations:
            if m.version in applied:
                if applied[m.version][1] != m.checksum:
                    raise MigrationError(
                        f"migration {m.version:04d}_{m.name}.sql differs from the one applied "
                        "to this database; applied migrations must never be edited "
                        "(add a new migration instead)"
                    )
                continue
            conn.execute(m.sql)
            conn.execute(
                b"INSERT INTO stem_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (m.version, m.name, m.checksum),
            )
            done.append(m)
    return done
