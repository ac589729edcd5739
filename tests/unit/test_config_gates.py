"""Quality gates: each one failing and passing; production refuses, development warns."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stem.config import GatesFailed, Settings, enforce_gates, list_gates, load_settings, run_gates
from stem.config import gates as gates_mod
from stem.config import secrets as secrets_mod
from stem.config.secrets import mode_problem
from stem.errors import ConfigError

KEY32 = base64.b64encode(b"k" * 32).decode()
OTHER_GID = 54321  # a group no process of the test run is in
KEY16 = base64.b64encode(b"k" * 16).decode()
GOOD = {
    "STEM_BROKER_URL": "rediss://:pw@redis.internal:6380/0",
    "STEM_SIGNING_KEYS": f"k1:{KEY32}",
}
ALL_IDS = [g.id for g in list_gates()]


@pytest.fixture
def as_service_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """Judge secret files as an unprivileged service user would, even when tests run as
    root (root accepts a root-owned 0640 file of any group: it cannot know the service's)."""
    monkeypatch.setattr(secrets_mod, "euid", lambda: 1000)


def settings(tmp_path: Path, profile: str = "production", **env: str) -> Settings:
    merged = {**GOOD, **env}
    return load_settings(
        profile=profile,
        environ={k: v for k, v in merged.items() if v != "-"},
        config_dir=str(tmp_path / "etc"),
    )


def failing(s: Settings, euid: int = 1000, profile: str | None = None) -> dict[str, str]:
    return {r.id: r.message for r in run_gates(s, euid=euid, profile=profile) if not r.ok}


def test_gate_ids_are_unique_and_documented() -> None:
    assert len(set(ALL_IDS)) == len(ALL_IDS) == 9
    for gate in list_gates():
        assert gate.id.startswith("G") and gate.message and gate.hint


def test_a_hardened_configuration_passes_every_gate(tmp_path: Path) -> None:
    s = settings(tmp_path)
    results = run_gates(s, euid=1000)
    assert [r.id for r in results] == ALL_IDS
    assert all(r.ok and r.severity == "error" for r in results)
    assert enforce_gates(s, euid=1000) == []


@pytest.mark.parametrize(
    ("env", "gate", "words"),
    [
        ({"STEM_SIGNING_KEYS": "-"}, "G001-signing-off", "no signing keys"),
        ({"STEM_SIGNING_REQUIRED": "false"}, "G001-signing-off", "signing.required is false"),
        ({"STEM_SIGNING_KEYS": f"k1:{KEY16}"}, "G002-signing-weak-key", "'k1'"),
        ({"STEM_BROKER_URL": "redis://h:6379/0"}, "G003-tls-off", "broker.url redis://h"),
        ({"STEM_BACKEND_URL": "redis://h/1"}, "G003-tls-off", "backend.url"),
        ({"STEM_BROKER_URL": "postgresql://u:pw@db/stem"}, "G003-tls-off", "plaintext"),
        ({"STEM_BROKER_URL": "postgresql://db/s?sslmode=prefer"}, "G003-tls-off", "plaintext"),
        ({"STEM_BROKER_URL": "postgres://db/s?sslmode=disable"}, "G003-tls-off", "plaintext"),
        # libpq connects over TCP despite a socket-looking host: hostaddr, or a host list.
        (
            {"STEM_BROKER_URL": "postgresql://%2Ftmp/stem?hostaddr=10.0.0.5&user=u"},
            "G003-tls-off",
            "plaintext",
        ),
        (
            {"STEM_BROKER_URL": "postgresql://u@%2Fnonexistent:5432,10.0.0.5:5432/stem"},
            "G003-tls-off",
            "plaintext",
        ),
        ({"STEM_TLS_ALLOW_INSECURE": "true"}, "G004-tls-unverified", "unverified"),
        (
            {"STEM_BROKER_URL": "rediss://h/0?ssl_cert_reqs=none"},
            "G004-tls-unverified",
            "unverified",
        ),
        (
            {"STEM_BROKER_URL": "postgresql://db/s?sslmode=require"},
            "G004-tls-unverified",
            "unverified",
        ),
        (
            {"STEM_BROKER_URL": "postgresql://db/s?sslmode=verify-ca"},
            "G004-tls-unverified",
            "unverified",
        ),
        (
            {"STEM_BROKER_URL": "redis://h/0", "STEM_TLS_ALLOW_INSECURE": "1"},
            "G004-tls-unverified",
            "tls.allow_insecure is true",
        ),
        ({"STEM_BROKER_URL": "memory://"}, "G005-memory-transport", "broker.url is memory://"),
        ({"STEM_BACKEND_URL": "memory://"}, "G005-memory-transport", "backend.url"),
        ({"STEM_BACKEND_RESULT_TTL_S": "null"}, "G008-result-expiry", "kept forever"),
    ],
)
def test_each_gate_fails(tmp_path: Path, env: dict[str, str], gate: str, words: str) -> None:
    found = failing(settings(tmp_path, **env))
    assert gate in found, found
    assert words in found[gate]


def test_gate_messages_never_show_passwords_and_name_the_layer(tmp_path: Path) -> None:
    found = failing(settings(tmp_path, STEM_BROKER_URL="redis://:hunter2@h/0"))
    assert "hunter2" not in found["G003-tls-off"]
    assert "redis://:***@h/0" in found["G003-tls-off"]
    assert "environment variable STEM_BROKER_URL" in found["G003-tls-off"]


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////var/lib/stem/stem.db",
        "rediss://:pw@h:6380/0",
        "rediss://h/0?ssl_cert_reqs=required",
        "rediss://h/0?ssl_cert_reqs=optional",  # read as required by the client
        "postgresql://u:pw@db/stem?sslmode=verify-full",
        "postgresql:///stem",  # default Unix socket
        "postgresql://u@%2Fvar%2Frun%2Fpostgresql/stem",
        "postgresql://u@/stem?host=/var/run/postgresql",
    ],
)
def test_transports_that_pass(tmp_path: Path, url: str) -> None:
    assert failing(settings(tmp_path, STEM_BROKER_URL=url)) == {}


def test_postgres_with_tls_settings_and_no_sslmode_is_verify_full(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    s = settings(tmp_path, STEM_BROKER_URL="postgresql://db/stem", STEM_TLS_CA_FILE=str(ca))
    assert failing(s) == {}


def test_weak_key_in_a_key_file_and_a_key_directory(tmp_path: Path) -> None:
    keydir = tmp_path / "keys"
    keydir.mkdir()
    (keydir / "old.hmac-sha256.key").write_text(KEY16)
    (keydir / "new.hmac-sha256.key").write_text(KEY32)
    for p in keydir.iterdir():
        p.chmod(0o600)
    found = failing(settings(tmp_path, STEM_SIGNING_KEYS=str(keydir)))
    assert list(found) == ["G002-signing-weak-key"]
    assert (
        "'old'" in found["G002-signing-weak-key"] and "'new'" not in found["G002-signing-weak-key"]
    )
    found = failing(settings(tmp_path, STEM_SIGNING_KEYS=str(keydir / "old.hmac-sha256.key")))
    assert "16 bytes" in found["G002-signing-weak-key"]


def test_ed25519_keys_are_not_held_to_the_hmac_length(tmp_path: Path) -> None:
    s = settings(tmp_path, STEM_SIGNING_ALGORITHM="ed25519", STEM_SIGNING_KEYS=f"k1:{KEY16}")
    assert "G002-signing-weak-key" not in failing(s)


def _self_signed(path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prod-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_dev_certificates_by_content(tmp_path: Path) -> None:
    from stem.security.devcerts import generate_dev_certs

    files = generate_dev_certs(tmp_path / "elsewhere")
    s = settings(
        tmp_path,
        STEM_TLS_CA_FILE=str(files["ca.pem"]),
        STEM_TLS_CERT_FILE=str(files["client.pem"]),
        STEM_TLS_KEY_FILE=str(files["client-key.pem"]),
    )
    found = failing(s)
    assert list(found) == ["G006-dev-certificate"]
    assert "tls.ca_file" in found["G006-dev-certificate"]
    assert "tls.cert_file" in found["G006-dev-certificate"]
    prod = _self_signed(tmp_path / "prod-ca.pem")
    assert failing(settings(tmp_path, STEM_TLS_CA_FILE=str(prod))) == {}


def test_dev_certificates_by_path_even_without_devcerts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gates_mod, "_dev_cert_checker", lambda: None)
    ca = tmp_path / "repo" / "certs" / "dev" / "ca.pem"
    ca.parent.mkdir(parents=True)
    ca.write_text("not even a certificate")
    found = failing(settings(tmp_path, STEM_TLS_CA_FILE=str(ca)))
    assert list(found) == ["G006-dev-certificate"]
    url = f"postgresql://db/s?sslmode=verify-full&sslrootcert={ca}"
    found = failing(settings(tmp_path, STEM_BROKER_URL=url))
    assert "sslrootcert" in found["G006-dev-certificate"]


def test_loose_secret_files_fail_the_gate(tmp_path: Path, as_service_user: None) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"k1:{KEY32}\n")
    keys.chmod(0o640)
    if os.getuid() == 0:  # root's own file would be the packaged layout: another group
        os.chown(keys, 0, OTHER_GID)
    # production refuses to load it at all; development loads it and the gate reports it
    with pytest.raises(ConfigError, match="mode 0640"):
        settings(tmp_path, STEM_SIGNING_KEYS="-", STEM_SIGNING_KEYS_FILE=str(keys))
    s = settings(tmp_path, "development", STEM_SIGNING_KEYS="-", STEM_SIGNING_KEYS_FILE=str(keys))
    results = {r.id: r for r in run_gates(s, euid=1000)}
    assert not results["G007-secret-file-mode"].ok
    assert results["G007-secret-file-mode"].severity == "warning"
    assert "signing.keys_file" in results["G007-secret-file-mode"].message
    assert "mode 0640" in results["G007-secret-file-mode"].message
    keys.chmod(0o600)
    assert results["G001-signing-off"].ok
    assert run_gates(s, euid=1000)[6].ok


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:pw@redis.internal:6380/0?ssl_keyfile={key}",
        "postgresql://db/s?sslmode=verify-full&sslkey={key}",
    ],
)
def test_a_loose_client_key_named_in_a_url_fails_the_gate(tmp_path: Path, url: str) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    found = failing(settings(tmp_path, STEM_BROKER_URL=url.format(key=key)))
    assert "mode 0644" in found["G007-secret-file-mode"]
    assert "broker.url ?" in found["G007-secret-file-mode"]
    key.chmod(0o600)
    assert "G007-secret-file-mode" not in failing(
        settings(tmp_path, STEM_BROKER_URL=url.format(key=key))
    )


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand files to other owners")
def test_the_packaged_key_layout_passes_and_near_misses_fail(
    tmp_path: Path, as_service_user: None
) -> None:
    """deploy/ keeps keys root-owned, readable by the service's group: 0640 root:stem."""
    keys = tmp_path / "keys"
    keys.write_text(f"k1:{KEY32}\n")
    ours = os.getegid()
    for mode, uid, gid, ok in [
        (0o640, 0, ours, True),  # the packaged layout
        (0o600, 0, OTHER_GID, True),
        (0o640, 0, OTHER_GID, False),  # a group this process is not in
        (0o660, 0, ours, False),  # the group may write it
        (0o644, 0, ours, False),  # everyone reads it
        (0o640, 4321, ours, False),  # not root's: its owner could loosen it
    ]:
        os.chown(keys, uid, gid)
        keys.chmod(mode)
        assert (mode_problem(str(keys)) is None) is ok, (oct(mode), uid, gid)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to hand files to other owners")
def test_root_cannot_know_the_service_group_and_says_so(tmp_path: Path) -> None:
    """An operator checking the installation as root: 0640 root:<group> is right only if
    the group is the service's, which root cannot know; the message says how to check,
    instead of telling the operator to do what is already done."""
    keys = tmp_path / "keys"
    keys.write_text(f"k1:{KEY32}\n")
    os.chown(keys, 0, OTHER_GID)
    keys.chmod(0o640)
    problem = mode_problem(str(keys))
    assert problem is not None and "run this check as the service user" in problem
    assert "chmod 600" not in problem
    keys.chmod(0o644)
    assert "chmod 600" in (mode_problem(str(keys)) or "")


def test_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings(tmp_path)
    assert "G009-run-as-root" in failing(s, euid=0)
    monkeypatch.setattr(gates_mod, "current_euid", lambda: 0)
    assert "G009-run-as-root" in {r.id for r in run_gates(s) if not r.ok}
    monkeypatch.setattr(gates_mod, "current_euid", lambda: 1000)
    assert all(r.ok for r in run_gates(s))


def test_production_refuses_with_every_failing_id(tmp_path: Path) -> None:
    s = settings(tmp_path, STEM_BROKER_URL="memory://", STEM_SIGNING_KEYS="-")
    with pytest.raises(GatesFailed) as info:
        enforce_gates(s, euid=0)
    text = str(info.value)
    for gate in ("G001-signing-off", "G005-memory-transport", "G009-run-as-root"):
        assert gate in text
    assert isinstance(info.value, ConfigError)
    assert {r.id for r in info.value.results} == {
        "G001-signing-off",
        "G005-memory-transport",
        "G009-run-as-root",
    }
    assert "fix:" in text


def test_every_profile_but_development_is_strict(tmp_path: Path) -> None:
    s = settings(tmp_path, "staging", STEM_BROKER_URL="memory://")
    with pytest.raises(GatesFailed):
        enforce_gates(s, euid=1000)


def test_development_turns_failures_into_logged_warnings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings(tmp_path, "development", STEM_BROKER_URL="memory://", STEM_SIGNING_KEYS="-")
    with caplog.at_level(logging.WARNING, logger="stem.config"):
        warnings = enforce_gates(s, euid=0)
    assert {w.id for w in warnings} == {
        "G001-signing-off",
        "G005-memory-transport",
        "G009-run-as-root",
    }
    assert all(w.severity == "warning" and not w.ok for w in warnings)
    events = [getattr(r, "event", None) for r in caplog.records]
    assert events.count("config.gate_warning") == 3
    # the same settings judged as production
    with pytest.raises(GatesFailed):
        enforce_gates(s, profile="production", euid=0)


def test_gate_results_serialize(tmp_path: Path) -> None:
    result: dict[str, Any] = run_gates(settings(tmp_path), euid=1000)[0].as_dict()
    assert set(result) == {"id", "ok", "severity", "message", "hint"}
