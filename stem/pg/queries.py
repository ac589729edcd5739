"""Named SQL queries, kept in ``stem/pg/sql/*.sql``.

A file holds several queries, each introduced by a ``-- name: NAME`` line and running to the
next one. Queries are returned as bytes: psycopg takes them as they are, and they never pass
through string formatting.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^-- name: ([a-z_]+)\s*$", re.MULTILINE)


def parse(text: str) -> dict[str, bytes]:
    """Split a queries file into ``{name: sql}``; comment-only lines are dropped."""
    parts = _HEADER.split(text)
    queries: dict[str, bytes] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.splitlines() if not ln.lstrip().startswith("--")]
        sql = "\n".join(lines).strip().rstrip(";").strip()
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = sql.encode()
    return queries


@cache
def load(group: str) -> dict[str, bytes]:
    """The queries of ``stem/pg/sql/<group>.sql``."""
    path = resources.files("stem.pg").joinpath("sql").joinpath(f"{group}.sql")
    return parse(path.read_text(encoding="utf-8"))
