"""TLS to PostgreSQL: verify-full succeeds; a wrong CA, a wrong host name, a missing client
certificate and plaintext to a TLS-only server all fail with a clear error. The mapping
from URL and TLSSettings to libpq's sslmode is checked without a server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from stem.backends.postgres import PostgresBackend
from stem.brokers.postgres import PostgresBroker
from stem.errors import BackendConnectionError, BrokerConnectionError, ConfigError
from stem.pg import conninfo
from stem.security.tls import TLSSettings
from tests.fixtures.certs import TestCerts
from tests.fixtures.postgres_server import PostgresServer


def _certs(server: PostgresServer) -> TestCerts:
    assert server.certs is not None
    return server.certs


def _tls(certs: TestCerts, **changes: object) -> TLSSettings:
    fields: dict[str, object] = {
        "ca_file": str(certs.ca),
        "cert_file": str(certs.client_cert),
        "key_file": str(certs.client_key),
    }
    fields.update(changes)
    return TLSSettings(**fields)  # type: ignore[arg-type]


def _ping(url: str, tls: TLSSettings | None) -> None:
    broker = PostgresBroker(url, tls=tls)
    try:
        broker.ping()
    finally:
        broker.close()


@pytest.mark.postgres
def test_verify_full_with_tls_settings(postgres_tls_server: PostgresServer) -> None:
    certs = _certs(postgres_tls_server)
    broker = PostgresBroker(postgres_tls_server.url, tls=_tls(certs))
    try:
        assert broker.options.sslmode == "verify-full"
        broker.ping()
        with broker._client.connection() as conn:
            row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
    finally:
        broker.close()


@pytest.mark.postgres
def test_verify_full_with_url_parameters(postgres_tls_server: PostgresServer) -> None:
    certs = _certs(postgres_tls_server)
    url = (
        f"{postgres_tls_server.url}?sslrootcert={certs.ca}"
        f"&sslcert={certs.client_cert}&sslkey={certs.client_key}"
    )
    backend = PostgresBackend(url)
    try:
        assert backend.options.sslmode == "verify-full"  # a CA given means verify-full
        backend.ping()
    finally:
        backend.close()


@pytest.mark.postgres
def test_wrong_ca_is_refused(postgres_tls_server: PostgresServer) -> None:
    certs = _certs(postgres_tls_server)
    with pytest.raises(
        BrokerConnectionError, match=r"cannot connect to PostgreSQL at 127\.0\.0\.1"
    ):
        _ping(postgres_tls_server.url, _tls(certs, ca_file=str(certs.wrong_ca)))


@pytest.mark.postgres
def test_wrong_host_name_is_refused(postgres_tls_server: PostgresServer) -> None:
    certs = _certs(postgres_tls_server)
    # Connect to 127.0.0.1 but expect the certificate to name wrong.example.
    url = (
        f"postgresql://postgres@wrong.example:{postgres_tls_server.port}/postgres"
        "?hostaddr=127.0.0.1"
    )
    with pytest.raises(BrokerConnectionError) as info:
        _ping(url, _tls(certs))
    assert "wrong.example" in str(info.value)
    assert "does not match host name" in str(info.value)


@pytest.mark.postgres
def test_missing_client_certificate_is_refused(postgres_tls_server: PostgresServer) -> None:
    certs = _certs(postgres_tls_server)
    with pytest.raises(BrokerConnectionError, match="certificate"):
        _ping(postgres_tls_server.url, TLSSettings(ca_file=str(certs.ca)))


@pytest.mark.postgres
def test_client_certificate_from_another_ca_is_refused(
    postgres_tls_server: PostgresServer,
) -> None:
    certs = _certs(postgres_tls_server)
    tls = _tls(certs, cert_file=str(certs.wrong_client_cert), key_file=str(certs.wrong_client_key))
    with pytest.raises(BrokerConnectionError, match="cannot connect to PostgreSQL"):
        _ping(postgres_tls_server.url, tls)


@pytest.mark.postgres
def test_plaintext_to_a_tls_only_server_is_refused(postgres_tls_server: PostgresServer) -> None:
    with pytest.raises(BackendConnectionError) as info:
        backend = PostgresBackend(postgres_tls_server.url + "?sslmode=disable")
        try:
            backend.ping()
        finally:
            backend.close()
    message = str(info.value)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{postgres_tls_server.port}" in message
    assert "no encryption" in message


@pytest.mark.postgres
def test_allow_insecure_connects_unverified_and_warns(
    postgres_tls_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    certs = _certs(postgres_tls_server)
    caplog.set_level(logging.WARNING, logger="stem.postgres")
    # The CA is deliberately wrong: with allow_insecure nothing is verified.
    tls = _tls(certs, ca_file=str(certs.wrong_ca), allow_insecure=True)
    for _ in range(2):
        broker = PostgresBroker(postgres_tls_server.url, tls=tls)
        assert broker.options.sslmode == "require"
        broker.ping()
        broker.close()
    warnings = [r for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert len(warnings) == 2  # one per start, never silenced


# -- URL and TLSSettings -> libpq, no server needed -------------------------------------------

Parse = Callable[..., conninfo.PgOptions]


@pytest.fixture
def files_unchecked(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of the keywords alone: the files they name (/ca.pem) do not exist."""
    monkeypatch.setattr(conninfo, "check_tls_files", lambda *args: None)


@pytest.mark.parametrize(
    ("url", "tls", "mode", "rootcert"),
    [
        ("postgresql://h/db", None, "prefer", None),
        ("postgresql://h/db", TLSSettings(ca_file="/ca.pem"), "verify-full", "/ca.pem"),
        ("postgresql://h/db", TLSSettings(), "verify-full", "system"),
        ("postgresql://h/db?sslrootcert=/u.pem", None, "verify-full", None),
        (
            "postgresql://h/db?sslmode=verify-ca",
            TLSSettings(ca_file="/ca.pem"),
            "verify-ca",
            "/ca.pem",
        ),
        ("postgresql://h/db", TLSSettings(ca_file="/ca.pem", allow_insecure=True), "require", None),
    ],
)
@pytest.mark.usefixtures("files_unchecked")
def test_sslmode_mapping(
    url: str, tls: TLSSettings | None, mode: str, rootcert: str | None
) -> None:
    options = conninfo.parse(url, tls)
    assert options.sslmode == mode
    assert options.params.get("sslrootcert") == rootcert
    assert conninfo.is_verified(options) == (mode in {"verify-ca", "verify-full"})


@pytest.mark.usefixtures("files_unchecked")
def test_tls_settings_fill_in_client_certificate_and_min_version() -> None:
    tls = TLSSettings(ca_file="/ca", cert_file="/c.crt", key_file="/c.key", min_version="TLSv1.3")
    params = conninfo.parse("postgres://h/db", tls).params
    assert params["sslcert"] == "/c.crt"
    assert params["sslkey"] == "/c.key"
    assert params["ssl_min_protocol_version"] == "TLSv1.3"


def test_stem_options_never_reach_libpq_and_password_stays_out_of_target() -> None:
    options = conninfo.parse(
        "postgresql://u:s3cret@db.example:6543/app?listen=false&poll_interval_s=0.2"
        "&migrate=no&pool_size=2&prepare=off&application_name=x"
    )
    assert (options.listen, options.migrate, options.pool_size, options.prepare) == (
        False,
        False,
        2,
        False,
    )
    assert options.poll_interval_s == pytest.approx(0.2)
    assert "listen" not in options.conninfo and "application_name=x" in options.conninfo
    assert options.target == "db.example:6543/app"
    assert "s3cret" not in options.target


def test_tls_files_that_hold_no_certificate_are_named_at_configuration(tmp_path: Path) -> None:
    """They failed every connect, as "cannot reach PostgreSQL" (exit 69); a missing CA
    file too. A key protected by sslpassword is libpq's to open."""
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"PostgreSQL TLS CA file '.*notes\.txt' holds no"):
        conninfo.parse("postgresql://h/db", TLSSettings(ca_file=str(not_pem)))
    with pytest.raises(ConfigError, match=r"CA file '.*missing\.pem' cannot be read"):
        conninfo.parse(f"postgresql://h/db?sslrootcert={tmp_path / 'missing.pem'}")
    with pytest.raises(ConfigError, match="do not hold a PEM certificate"):
        conninfo.parse(f"postgresql://h/db?sslmode=require&sslcert={not_pem}&sslkey={not_pem}")
    conninfo.parse(f"postgresql://h/db?sslcert={not_pem}&sslkey={not_pem}&sslpassword=x")
    conninfo.parse(f"postgresql://h/db?sslmode=disable&sslrootcert={not_pem}")
