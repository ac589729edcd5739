"""TLS to Redis: verified connections work; every way of getting it wrong fails with a
message that says what is wrong; ``allow_insecure`` works but warns every time."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from stem.backends.redis import RedisBackend
from stem.brokers.base import Message
from stem.brokers.redis import RedisBroker
from stem.errors import BackendConnectionError, BrokerConnectionError, ConfigError
from stem.redis_conn import parse_url
from stem.security.tls import TLSSettings
from tests.fixtures.certs import TestCerts, make_test_certs
from tests.fixtures.redis_server import RedisServer, _new_server

# Fail fast where a handshake gets no answer (a TLS client on a plaintext port).
FAST = "socket_connect_timeout=0.5"


def verified(certs: TestCerts, *, client: bool = False) -> TLSSettings:
    if client:
        return TLSSettings(
            ca_file=str(certs.ca), cert_file=str(certs.client_cert), key_file=str(certs.client_key)
        )
    return TLSSettings(ca_file=str(certs.ca))


def connect_error(url: str, tls: TLSSettings | None = None) -> str:
    b = RedisBroker(url, tls=tls)
    try:
        with pytest.raises(BrokerConnectionError) as info:
            b.ping()
        return str(info.value)
    finally:
        b.close()


def round_trip(b: RedisBroker) -> None:
    b.publish([Message("m", "tls-q", b"secret payload")])
    [d] = b.reserve(["tls-q"], 1, 30)
    assert d.body == b"secret payload"
    assert b.ack([d]) == 1


@pytest.fixture
def tls_server(redis_tls_server: RedisServer) -> Iterator[RedisServer]:
    redis_tls_server.flush()
    yield redis_tls_server


# -- what must work --------------------------------------------------------------------------


@pytest.mark.redis
def test_verified_tls_with_settings(tls_server: RedisServer, redis_test_certs: TestCerts) -> None:
    for host in ("localhost", "127.0.0.1"):  # both are in the certificate
        b = RedisBroker(f"rediss://{host}:{tls_server.port}/0", tls=verified(redis_test_certs))
        try:
            round_trip(b)
        finally:
            b.close()


@pytest.mark.redis
def test_verified_tls_with_url_options(
    tls_server: RedisServer, redis_test_certs: TestCerts
) -> None:
    c = redis_test_certs
    url = (
        f"{tls_server.url}?ssl_ca_certs={c.ca}&ssl_certfile={c.client_cert}"
        f"&ssl_keyfile={c.client_key}&ssl_cert_reqs=required"
    )
    b = RedisBroker(url)
    try:
        round_trip(b)
    finally:
        b.close()


@pytest.mark.redis
def test_backend_over_verified_tls(tls_server: RedisServer, redis_test_certs: TestCerts) -> None:
    b = RedisBackend(tls_server.url, tls=verified(redis_test_certs))
    try:
        b.store("t", "SUCCESS", b"r", 60)
        assert b.wait("t", 1.0) == b"r"
    finally:
        b.close()


@pytest.mark.redis
def test_client_certificate_where_the_server_requires_one(
    redis_mtls_server: RedisServer, redis_test_certs: TestCerts
) -> None:
    b = RedisBroker(redis_mtls_server.url, tls=verified(redis_test_certs, client=True))
    try:
        round_trip(b)
    finally:
        b.close()
    text = connect_error(redis_mtls_server.url, verified(redis_test_certs))
    assert "client certificate" in text
    c = redis_test_certs
    wrong = TLSSettings(
        ca_file=str(c.ca), cert_file=str(c.wrong_client_cert), key_file=str(c.wrong_client_key)
    )
    assert "client certificate" in connect_error(redis_mtls_server.url, wrong)


# -- what must fail, clearly -----------------------------------------------------------------


@pytest.mark.redis
def test_wrong_ca_is_refused(tls_server: RedisServer, redis_test_certs: TestCerts) -> None:
    text = connect_error(tls_server.url, TLSSettings(ca_file=str(redis_test_certs.wrong_ca)))
    assert "could not be verified" in text and "CA file" in text
    assert f"localhost:{tls_server.port}/0" in text


@pytest.mark.redis
def test_an_expired_server_certificate_is_named_as_such(tmp_path: Path) -> None:
    certs = make_test_certs(tmp_path / "certs", expired_server=True)
    servers = _new_server("stem-redis-expired-", certs=certs)
    server = next(servers)
    try:
        text = connect_error(server.url, verified(certs))
    finally:
        servers.close()
    assert "certificate has expired" in text
    assert "validity dates" in text and "CA file" not in text


@pytest.mark.redis
def test_system_trust_store_does_not_trust_a_private_ca(tls_server: RedisServer) -> None:
    assert "could not be verified" in connect_error(tls_server.url)


@pytest.mark.redis
def test_wrong_hostname_is_refused(tls_server: RedisServer, redis_test_certs: TestCerts) -> None:
    # 127.0.0.2 reaches the same server, but the certificate names only localhost/127.0.0.1
    url = f"rediss://stem:sekrit-pw@127.0.0.2:{tls_server.port}/0"
    text = connect_error(url, verified(redis_test_certs))
    assert "not valid for the host name" in text
    assert "sekrit-pw" not in text


@pytest.mark.redis
def test_plaintext_client_on_the_tls_port_is_told_to_use_rediss(tls_server: RedisServer) -> None:
    text = connect_error(f"redis://localhost:{tls_server.port}/0?{FAST}")
    assert "rediss://" in text


@pytest.mark.redis
def test_tls_client_on_a_plaintext_port_fails_clearly(
    redis_server: RedisServer, redis_test_certs: TestCerts
) -> None:
    url = f"rediss://localhost:{redis_server.port}/0?{FAST}"
    text = connect_error(url, verified(redis_test_certs))
    assert "TLS" in text


@pytest.mark.redis
def test_backend_errors_are_backend_errors(
    tls_server: RedisServer, redis_test_certs: TestCerts
) -> None:
    b = RedisBackend(tls_server.url, tls=TLSSettings(ca_file=str(redis_test_certs.wrong_ca)))
    try:
        with pytest.raises(BackendConnectionError, match="could not be verified"):
            b.fetch("t")
    finally:
        b.close()


# -- allow_insecure --------------------------------------------------------------------------


@pytest.mark.redis
def test_allow_insecure_connects_and_warns_every_time(
    tls_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="stem.redis")
    for _ in range(2):
        b = RedisBroker(tls_server.url, tls=TLSSettings(allow_insecure=True))
        try:
            round_trip(b)
        finally:
            b.close()
    backend = RedisBackend(f"{tls_server.url}?ssl_cert_reqs=none")
    backend.close()
    warnings = [r for r in caplog.records if r.name == "stem.redis"]
    assert len(warnings) == 3
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert all("verification is OFF" in r.getMessage() for r in warnings)


# -- configuration (no server needed) --------------------------------------------------------


def test_verification_is_on_by_default_with_tls_1_2_at_least(redis_test_certs: TestCerts) -> None:
    kw = parse_url("rediss://localhost:6380/2", verified(redis_test_certs)).pool_kwargs
    assert kw["ssl_cert_reqs"] == "required"
    assert kw["ssl_check_hostname"] is True
    assert kw["ssl_min_version"] == ssl.TLSVersion.TLSv1_2
    assert kw["ssl_ca_certs"] == str(redis_test_certs.ca)
    kw13 = parse_url("rediss://h", TLSSettings(min_version="TLSv1.3")).pool_kwargs
    assert kw13["ssl_min_version"] == ssl.TLSVersion.TLSv1_3


def test_url_tls_options_win_over_settings(redis_test_certs: TestCerts) -> None:
    c = redis_test_certs
    kw = parse_url(f"rediss://h?ssl_ca_certs={c.wrong_ca}", verified(c)).pool_kwargs
    assert kw["ssl_ca_certs"] == str(c.wrong_ca)


def test_bad_tls_configuration_is_refused(tmp_path: Path, redis_test_certs: TestCerts) -> None:
    with pytest.raises(ConfigError, match=r"TLSv1\.1"):
        parse_url("rediss://h", TLSSettings(min_version="TLSv1.1"))
    with pytest.raises(ConfigError, match="does not exist"):
        parse_url("rediss://h", TLSSettings(ca_file=str(tmp_path / "missing.crt")))
    with pytest.raises(ConfigError, match="rediss://"):
        parse_url("redis://h", verified(redis_test_certs))  # TLS asked for, plaintext URL
    with pytest.raises(ConfigError, match="rediss://"):
        parse_url(f"redis://h?ssl_ca_certs={redis_test_certs.ca}")
    with pytest.raises(ConfigError, match="required or none"):
        parse_url("rediss://h?ssl_cert_reqs=maybe")
    with pytest.raises(ConfigError, match="without a certificate"):
        parse_url("rediss://h", TLSSettings(key_file=str(redis_test_certs.client_key)))


def test_tls_files_that_hold_no_certificate_are_named_at_configuration(
    tmp_path: Path, redis_test_certs: TestCerts
) -> None:
    """A CA file that is not a certificate, or a key that is not the certificate's, failed
    every connect as "cannot reach Redis" (exit 69) with an OpenSSL code for a reason."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    c = redis_test_certs
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"CA file '.*notes\.txt' holds no certificate"):
        parse_url(f"rediss://h?ssl_ca_certs={not_pem}")
    with pytest.raises(ConfigError, match=r"certificate file '.*' and key file '.*' do not hold"):
        parse_url("rediss://h", TLSSettings(cert_file=str(c.client_cert), key_file=str(c.ca)))
    with pytest.raises(ConfigError, match="do not hold a PEM certificate"):
        parse_url("rediss://h", TLSSettings(cert_file=str(c.client_key)))
    with pytest.raises(ConfigError, match="do not hold a PEM certificate"):  # not its key
        parse_url(
            "rediss://h",
            TLSSettings(cert_file=str(c.client_cert), key_file=str(c.wrong_client_key)),
        )
    encrypted = tmp_path / "encrypted.key"
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(ConfigError, match="the private key is encrypted"):
        parse_url("rediss://h", TLSSettings(cert_file=str(c.client_cert), key_file=str(encrypted)))


def test_a_tls_file_this_user_cannot_read_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch, redis_test_certs: TestCerts
) -> None:
    """Another user's 0600 key (an operator's command on the service's config) ended in
    a traceback, exit 1: a worker unit restarted it for good (78 stops it)."""

    def unreadable(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", unreadable)
    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", unreadable)
    c = redis_test_certs
    with pytest.raises(ConfigError, match=r"CA file '.*' cannot be read: Permission denied"):
        parse_url(f"rediss://h?ssl_ca_certs={c.ca}")
    with pytest.raises(ConfigError, match=r"certificate file '.*' cannot be read"):
        parse_url("rediss://h", TLSSettings(cert_file=str(c.client_cert)))
