"""``stem db migrate|status``: the PostgreSQL schema of the broker and result backend.

Workers apply pending migrations on their first connection unless their URL says
``?migrate=false``; these commands let a deploy step do it (or check it) first, with a
database role that may change the schema.
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import typer

from stem.cli.exitcodes import ExitCode
from stem.errors import ConfigError
from stem.observability.redact import redact_url

if TYPE_CHECKING:
    from stem.pg.client import PgClient

app = typer.Typer(help="Create and upgrade the PostgreSQL schema.", no_args_is_help=True)

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="PostgreSQL URL (postgresql://user@host:port/db?sslmode=verify-full&...); "
        "default: the configured broker URL (broker.url or broker.url_file, "
        "STEM_BROKER_URL, --broker).",
    ),
]


def _client(ctx: typer.Context, url: str | None) -> PgClient:
    """A client for ``url`` (default: the configured broker), with the configured TLS
    settings: the same verified connection a worker would open."""
    from stem.cli.context import load_app, state
    from stem.errors import BrokerConnectionError, BrokerError
    from stem.pg import conninfo
    from stem.pg.client import PgClient

    stem_app = load_app(ctx)
    url = url or stem_app.broker_url
    if urlsplit(url).scheme.lower() not in {"postgresql", "postgres"}:
        raise ConfigError(
            f"`stem db` manages PostgreSQL only; {redact_url(url)} is not a postgresql:// URL"
        )
    tls = state(ctx).settings.tls.to_tls_settings()
    # Never migrate implicitly here: `status` must only look.
    options = dataclasses.replace(conninfo.parse(url, tls), migrate=False)
    return PgClient(options, error=BrokerError, conn_error=BrokerConnectionError, role="db")


@app.command()
def migrate(ctx: typer.Context, url: UrlOption = None) -> None:
    """Apply pending migrations (safe to run from several hosts at once)."""
    from stem.pg import migrate as mig

    client = _client(ctx, url)
    try:
        applied = client.run("applying migrations", mig.apply)
    finally:
        client.close()
    target = client.options.target
    if not applied:
        typer.echo(f"{target}: schema is up to date")
    for m in applied:
        typer.echo(f"{target}: applied {m.version:04d}_{m.name}")


@app.command()
def status(
    ctx: typer.Context,
    url: UrlOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    check: Annotated[
        bool, typer.Option("--check", help="Exit 1 if any migration is pending or changed.")
    ] = False,
) -> None:
    """Which migrations are applied, pending, or changed since they were applied; and
    any applied by a newer Stem than this one ("newer")."""
    from stem.pg import migrate as mig

    client = _client(ctx, url)
    try:
        rows = client.run("reading migration status", mig.status)
    finally:
        client.close()
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "version": r.version,
                        "name": r.name,
                        "state": r.state,
                        "applied_at": r.applied_at,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
    else:
        for r in rows:
            typer.echo(f"{r.version:04d}  {r.name:<24} {r.state:<8} {r.applied_at or ''}".rstrip())
    if check and any(r.state in ("pending", "changed") for r in rows):
        raise typer.Exit(ExitCode.FAILURE)
