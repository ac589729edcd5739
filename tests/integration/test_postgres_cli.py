"""``stem db migrate`` and ``stem db status`` against a real server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stem.cli.db_cmd import app
from stem.errors import BrokerConnectionError, ConfigError
from tests.fixtures.postgres_server import PostgresServer

pytestmark = pytest.mark.postgres


@pytest.fixture
def empty_url(postgres_server: PostgresServer) -> Iterator[str]:
    name = f"stem_cli_{uuid.uuid4().hex[:8]}"
    with postgres_server.admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"'.encode())
    yield postgres_server.url_for(name)
    with postgres_server.admin() as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)'.encode())


def test_status_then_migrate_then_status(empty_url: str) -> None:
    runner = CliRunner()
    pending = runner.invoke(app, ["status", "--url", empty_url, "--check"])
    assert pending.exit_code == 1, pending.output
    assert "pending" in pending.output

    # status only looks: it must not have migrated anything
    again = runner.invoke(app, ["status", "--json"], env={"STEM_BROKER_URL": empty_url})
    assert {row["state"] for row in json.loads(again.output)} == {"pending"}

    migrated = runner.invoke(app, ["migrate", "--url", empty_url])
    assert migrated.exit_code == 0, migrated.output
    assert "applied 0001_initial" in migrated.output

    assert "up to date" in runner.invoke(app, ["migrate", "--url", empty_url]).output
    done = runner.invoke(app, ["status", "--url", empty_url, "--check"])
    assert done.exit_code == 0, done.output
    assert "applied" in done.output


def test_refuses_a_non_postgres_url() -> None:
    result = CliRunner().invoke(app, ["status", "--url", "redis://localhost/0"])
    assert isinstance(result.exception, ConfigError)


def test_unreachable_server_is_a_connection_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(
        app, ["status", "--url", f"postgresql://u:s3cretpw@127.0.0.1:{port}/x?connect_timeout=2"]
    )
    assert isinstance(result.exception, BrokerConnectionError)
    assert "s3cretpw" not in str(result.exception)


def test_the_configured_tls_settings_apply(empty_url: str) -> None:
    """`stem db` opens the connection a worker would: with a CA configured it insists on a
    verified TLS connection, and this throwaway server speaks no TLS, so it is refused
    instead of sending the password in the clear."""
    from pathlib import Path

    ca = Path(__file__).resolve().parents[2] / "certs" / "dev" / "ca.pem"
    runner = CliRunner()
    plain = runner.invoke(app, ["status", "--url", empty_url])
    assert plain.exit_code == 0, plain.output
    result = runner.invoke(app, ["status", "--url", empty_url], env={"STEM_TLS_CA_FILE": str(ca)})
    assert isinstance(result.exception, BrokerConnectionError)
    assert "SSL" in str(result.exception)


def test_the_url_defaults_to_the_configured_broker(empty_url: str, tmp_path: Path) -> None:
    config = tmp_path / "stem.yaml"
    config.write_text(f"broker:\n  url: {empty_url}\n")
    result = CliRunner().invoke(app, ["status", "--json"], env={"STEM_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert {row["state"] for row in json.loads(result.output)} == {"pending"}
