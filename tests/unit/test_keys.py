"""Key generation and key files, the `stem keys` / `stem certs` commands, dev certificates."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from stem.cli.security_cmd import certs_app, keys_app
from stem.envelope import Envelope
from stem.errors import ConfigError
from stem.security import devcerts, keys
from stem.security.signing import Keyring

runner = CliRunner()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- generate_key and key files --------------------------------------------------------------


def test_generate_hmac_key_is_32_random_bytes_in_one_file() -> None:
    files = keys.generate_key("hmac-sha256", "v2")
    assert list(files) == ["v2.hmac-sha256.key"]
    raw = keys.b64decode_key(files["v2.hmac-sha256.key"].decode())
    assert len(raw) == 32
    assert files != keys.generate_key("hmac-sha256", "v2")


def test_generate_ed25519_writes_pem_private_and_public() -> None:
    files = keys.generate_key("ed25519", "v2")
    assert sorted(files) == ["v2.ed25519.key", "v2.ed25519.pub"]
    assert files["v2.ed25519.key"].startswith(b"-----BEGIN PRIVATE KEY-----")
    assert files["v2.ed25519.pub"].startswith(b"-----BEGIN PUBLIC KEY-----")


@pytest.mark.parametrize(("algorithm", "kid"), [("rsa", "v1"), ("hmac-sha256", "bad/kid")])
def test_generate_refuses_bad_algorithm_or_kid(algorithm: str, kid: str) -> None:
    with pytest.raises(ConfigError):
        keys.generate_key(algorithm, kid)


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "ed25519"])
def test_written_files_are_private_and_never_overwritten(tmp_path: Path, algorithm: str) -> None:
    out = tmp_path / "keys"
    paths = keys.write_key_files(keys.generate_key(algorithm, "v1"), out)
    assert mode(out) == 0o700
    for p in paths:
        assert mode(p) == (0o644 if p.suffix == ".pub" else 0o600)
    before = {p: p.read_bytes() for p in paths}
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        keys.write_key_files(keys.generate_key(algorithm, "v1"), out)
    assert {p: p.read_bytes() for p in paths} == before


def test_keyring_loads_files_and_directories(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    keys.write_key_files(keys.generate_key("ed25519", "p1"), out)
    keys.write_key_files(keys.generate_key("ed25519", "p2"), out)
    producer = Keyring.from_env(
        {
            "STEM_SIGNING_ALGORITHM": "ed25519",
            "STEM_SIGNING_KEYS": str(out),  # a directory: every *.key, .pub ignored
            "STEM_SIGNING_ACTIVE_KEY": "p2",
        }
    )
    worker = Keyring.from_env(
        {
            "STEM_SIGNING_ALGORITHM": "ed25519",
            "STEM_SIGNING_PUBLIC_KEYS": f"{out / 'p1.ed25519.pub'},{out / 'p2.ed25519.pub'}",
        }
    )
    assert producer is not None and worker is not None
    assert producer.key_ids == worker.key_ids == ("p1", "p2")
    assert not worker.can_sign
    worker.verify(producer.sign(Envelope(id="t", task="x")))


def test_key_file_errors_name_the_file(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    [path] = keys.write_key_files(keys.generate_key("hmac-sha256", "v1"), out)
    env = {"STEM_SIGNING_KEYS": str(path), "STEM_SIGNING_ALGORITHM": "ed25519"}
    with pytest.raises(ConfigError, match="is an hmac-sha256 key but the signing algorithm"):
        Keyring.from_env(env)
    path.chmod(0o622)
    with pytest.raises(ConfigError, match="writable by group or others"):
        Keyring.from_env({"STEM_SIGNING_KEYS": str(path)})
    odd = tmp_path / "secret.txt"
    odd.write_text("x" * 50)
    with pytest.raises(ConfigError, match=r"must look like KID\.hmac-sha256\.key"):
        Keyring.from_env({"STEM_SIGNING_KEYS": str(odd)})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"holds no KID\.ALGORITHM\.key"):
        Keyring.from_env({"STEM_SIGNING_KEYS": str(empty)})
    garbage = tmp_path / "g1.ed25519.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(ConfigError, match="cannot load the PEM key"):
        Keyring.from_env({"STEM_SIGNING_KEYS": str(garbage), "STEM_SIGNING_ALGORITHM": "ed25519"})


def test_encrypted_or_foreign_pem_keys_are_refused(tmp_path: Path) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    cases = {
        "enc": ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        ),
        "ec": ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    }
    for kid, pem in cases.items():
        path = tmp_path / f"{kid}.ed25519.key"
        path.write_bytes(pem)
        path.chmod(0o600)
        with pytest.raises(ConfigError, match=f"{kid}.ed25519.key"):
            Keyring.from_env({"STEM_SIGNING_KEYS": str(path), "STEM_SIGNING_ALGORITHM": "ed25519"})


def test_inline_entries_round_trip() -> None:
    files = keys.generate_key("ed25519", "v3")
    inline = keys.inline_entries(files)
    ring = Keyring.from_env(
        {"STEM_SIGNING_ALGORITHM": "ed25519", "STEM_SIGNING_KEYS": inline["keys"]}
    )
    verify_only = Keyring.from_env(
        {"STEM_SIGNING_ALGORITHM": "ed25519", "STEM_SIGNING_PUBLIC_KEYS": inline["public_keys"]}
    )
    assert ring is not None and verify_only is not None
    verify_only.verify(ring.sign(Envelope(id="t", task="x")))


# -- stem keys -------------------------------------------------------------------------------


def test_cli_generate_writes_files_and_prints_env_lines_but_no_secret(tmp_path: Path) -> None:
    out = tmp_path / "k"
    result = runner.invoke(keys_app, ["generate", "--kid", "v2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    key_file = out / "v2.hmac-sha256.key"
    assert mode(key_file) == 0o600 and mode(out) == 0o700
    secret = key_file.read_text().strip()
    assert secret not in result.output
    assert f"STEM_SIGNING_KEYS={key_file.resolve()}" in result.stdout
    assert "STEM_SIGNING_ACTIVE_KEY=v2" in result.stdout
    again = runner.invoke(keys_app, ["generate", "--kid", "v2", "--out", str(out)])
    assert again.exit_code != 0
    assert isinstance(again.exception, ConfigError)


def test_cli_generate_ed25519_prints_producer_and_worker_lines(tmp_path: Path) -> None:
    out = tmp_path / "k"
    result = runner.invoke(
        keys_app, ["generate", "--algorithm", "ed25519", "--kid", "p1", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert mode(out / "p1.ed25519.key") == 0o600
    assert mode(out / "p1.ed25519.pub") == 0o644
    assert "STEM_SIGNING_PUBLIC_KEYS=" in result.stdout
    assert "PRIVATE KEY" not in result.output


def test_cli_generate_to_stdout_only_when_asked() -> None:
    result = runner.invoke(keys_app, ["generate", "--kid", "v9", "--out", "-"])
    assert result.exit_code == 0, result.output
    env = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    ring = Keyring.from_env(env)
    assert ring is not None and ring.active_key_id == "v9"


def test_cli_info_shows_key_ids_not_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = keys.inline_entries(keys.generate_key("hmac-sha256", "v1"))["keys"]
    monkeypatch.setenv("STEM_SIGNING_KEYS", entry)
    result = runner.invoke(keys_app, ["info"])
    assert result.exit_code == 0, result.output
    assert "v1" in result.stdout and entry.split(":", 1)[1] not in result.stdout
    monkeypatch.delenv("STEM_SIGNING_KEYS")
    assert "signing: off" in runner.invoke(keys_app, ["info"]).stdout


def test_cli_info_shows_the_keys_the_configuration_names(tmp_path: Path) -> None:
    """The packaged layout names its keys in YAML (signing.keys_file): info said
    "signing: off" there, while the worker signed and verified with them."""
    from stem.cli.main import app as stem_cli

    key_dir = tmp_path / "keys"
    assert (
        runner.invoke(keys_app, ["generate", "--kid", "v2", "--out", str(key_dir)]).exit_code == 0
    )
    keys_file = tmp_path / "signing.keys"
    keys_file.write_text(f"{key_dir}\n")
    keys_file.chmod(0o600)
    config = tmp_path / "stem.yaml"
    config.write_text(
        f"broker:\n  url: sqlite:///{tmp_path / 'stem.db'}\n"
        f"signing:\n  keys_file: {keys_file}\n  active_key: v2\n"
    )
    result = runner.invoke(stem_cli, ["--config", str(config), "keys", "info"], env={})
    assert result.exit_code == 0, result.output
    assert "key ids:          v2" in result.stdout
    assert "active key:       v2" in result.stdout


# -- development certificates ----------------------------------------------------------------


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "dev"
    devcerts.generate_dev_certs(out)
    return out


def test_dev_certs_are_written_with_private_keys_0600(dev_dir: Path) -> None:
    assert sorted(p.name for p in dev_dir.iterdir()) == sorted(devcerts.FILES)
    for name in devcerts.FILES:
        assert mode(dev_dir / name) == (0o600 if name.endswith("-key.pem") else 0o644)


def test_dev_certs_carry_every_marker_and_are_detected(dev_dir: Path) -> None:
    for name in ("ca.pem", "server.pem", "client.pem"):
        assert devcerts.is_dev_certificate(dev_dir / name)
        cert = x509.load_pem_x509_certificate((dev_dir / name).read_bytes())
        orgs = {a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)}
        units = {
            a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        }
        assert orgs == units == {"Stem Development Only"}
        ext = cert.extensions.get_extension_for_oid(devcerts.DEV_MARKER_OID)
        assert not ext.critical
    assert not devcerts.is_dev_certificate(dev_dir / "server-key.pem")


def test_dev_certs_work_for_mutual_tls(dev_dir: Path) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(dev_dir / "server.pem", dev_dir / "server-key.pem")
    server.load_verify_locations(dev_dir / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.create_default_context(cafile=str(dev_dir / "ca.pem"))
    client.load_cert_chain(dev_dir / "client.pem", dev_dir / "client-key.pem")
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, obj in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    peer = s.getpeercert()
    assert peer is not None and ("commonName", "stem-dev-client") in peer["subject"][-1]


def _production_pair(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Acme Corp"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Platform"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Acme Root CA"),
        ]
    )
    now = dt.datetime.now(dt.UTC)

    def build(subject: x509.Name, ca: bool) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )

    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.acme.example")])
    ca_path, leaf_path = tmp_path / "prod-ca.pem", tmp_path / "prod.pem"
    ca_path.write_bytes(build(name, True).public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(build(leaf_name, False).public_bytes(serialization.Encoding.DER))
    return ca_path, leaf_path


def test_production_certificates_are_not_dev(tmp_path: Path) -> None:
    ca_path, leaf_der = _production_pair(tmp_path)
    assert not devcerts.is_dev_certificate(ca_path)
    assert not devcerts.is_dev_certificate(leaf_der)


def test_a_bundle_containing_a_dev_certificate_is_dev(tmp_path: Path, dev_dir: Path) -> None:
    ca_path, _ = _production_pair(tmp_path)
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca_path.read_bytes() + (dev_dir / "ca.pem").read_bytes())
    assert devcerts.is_dev_certificate(bundle)


def test_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read certificate file"):
        devcerts.is_dev_certificate(tmp_path / "missing.pem")


def test_cli_certs_dev_and_check(tmp_path: Path) -> None:
    out = tmp_path / "certs" / "dev"
    result = runner.invoke(certs_app, ["dev", "--out", str(out), "--hosts", "redis,10.0.0.5"])
    assert result.exit_code == 0, result.output
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["redis"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    again = runner.invoke(certs_app, ["dev", "--out", str(out)])
    assert isinstance(again.exception, ConfigError)
    assert runner.invoke(certs_app, ["dev", "--out", str(out), "--force"]).exit_code == 0
    check = runner.invoke(certs_app, ["check", str(out / "server.pem")])
    assert check.exit_code == 1 and "development certificate" in check.stdout
    prod_ca, _ = _production_pair(tmp_path)
    assert runner.invoke(certs_app, ["check", str(prod_ca)]).exit_code == 0
    # The wrong file (a key, anything else) is not "ok".
    (tmp_path / "notes.txt").write_text("not a certificate\n")
    for wrong in (out / "server-key.pem", tmp_path / "notes.txt"):
        miss = runner.invoke(certs_app, ["check", str(prod_ca), str(wrong)])
        assert miss.exit_code == 1, miss.stdout
        assert f"{wrong}: no certificate in this file" in miss.stdout


def test_umask_does_not_loosen_key_modes(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        paths = devcerts.generate_dev_certs(tmp_path / "d", ["localhost"])
        [key_path] = keys.write_key_files(keys.generate_key("hmac-sha256", "u"), tmp_path / "k")
    finally:
        os.umask(old)
    assert mode(paths["ca-key.pem"]) == 0o600
    assert mode(key_path) == 0o600
    assert mode(tmp_path / "k") == 0o700


def test_key_paths_may_contain_spaces_and_lists_may_span_lines(tmp_path: Path) -> None:
    out = tmp_path / "my keys"
    keys.write_key_files(keys.generate_key("hmac-sha256", "a"), out)
    keys.write_key_files(keys.generate_key("hmac-sha256", "b"), out)
    ring = Keyring.from_env(
        {
            "STEM_SIGNING_KEYS": f"{out / 'a.hmac-sha256.key'},\n {out / 'b.hmac-sha256.key'}\n",
            "STEM_SIGNING_ACTIVE_KEY": "b",
        }
    )
    assert ring is not None and ring.key_ids == ("a", "b")


def test_an_app_reads_its_keyring_from_the_environment_when_first_needed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not at construction: the CLI imports the app before applying its config layers, and
    the active key alone in the environment is half a keyring until then."""
    import base64

    from stem import Stem

    for name in list(os.environ):
        if name.startswith("STEM_SIGNING_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STEM_SIGNING_ACTIVE_KEY", "k1")
    app = Stem("lazy", broker="memory://")  # does not raise
    with pytest.raises(ConfigError, match="STEM_SIGNING_KEYS is empty"):
        _ = app.keyring
    ring = Keyring.build("hmac-sha256", {"k1": b"s" * 32})
    app.configure(keyring=ring)
    assert app.keyring is ring
    app.configure(keyring=None)  # explicitly off
    assert app.keyring is None
    monkeypatch.setenv("STEM_SIGNING_KEYS", "k1:" + base64.b64encode(b"s" * 32).decode())
    from_env = Stem("env", broker="memory://").keyring
    assert from_env is not None and from_env.active_key_id == "k1"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files to a group")
def test_generate_into_the_packaged_key_directory_keeps_its_layout(tmp_path: Path) -> None:
    """deploy/ keeps keys 0640 root:stem in a 0750 root:stem directory, and the rotation
    runbook generates the new key there as root: the service must be able to read it."""
    service_gid = 54321
    out = tmp_path / "keys"
    out.mkdir()
    os.chown(out, 0, service_gid)
    out.chmod(0o750)
    hmac_key = keys.write_key_files(keys.generate_key("hmac-sha256", "v2"), out)[0]
    st = hmac_key.stat()
    assert (mode(hmac_key), st.st_uid, st.st_gid) == (0o640, 0, service_gid)
    # An Ed25519 private key is the producers' alone: workers get the public half only.
    ed_files = keys.write_key_files(keys.generate_key("ed25519", "e2"), out)
    [private] = [p for p in ed_files if p.suffix == ".key"]
    assert (mode(private), private.stat().st_gid) == (0o600, 0)
    [pub] = [p for p in ed_files if p.suffix == ".pub"]
    assert mode(pub) == 0o644
    # a directory others may enter is not the packaged layout: owner-only keys
    loose = tmp_path / "loose"
    loose.mkdir()
    os.chown(loose, 0, service_gid)
    loose.chmod(0o755)
    [written] = keys.write_key_files(keys.generate_key("hmac-sha256", "v3"), loose)
    assert (mode(written), written.stat().st_gid) == (0o600, 0)


def test_a_keyring_given_in_code_survives_configuration_without_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI applies its configuration layers to every app: one that names no keys must
    not switch off the signing an app was built with in code."""
    import base64

    from stem import Stem
    from stem.config.apply import apply_layers

    for name in list(os.environ):
        if name.startswith("STEM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STEM_CONFIG_DIR", str(tmp_path / "etc"))
    ring = Keyring.build("hmac-sha256", {"code": b"c" * 32})
    app = Stem("coded", broker="memory://", keyring=ring)
    apply_layers(app)
    assert app.keyring is ring
    monkeypatch.setenv("STEM_SIGNING_KEYS", "cfg:" + base64.b64encode(b"f" * 32).decode())
    apply_layers(app)  # configured keys replace it
    assert app.keyring is not None and app.keyring.key_ids == ("cfg",)
    plain = Stem("plain", broker="memory://")
    monkeypatch.delenv("STEM_SIGNING_KEYS")
    apply_layers(plain)
    assert plain.keyring is None


def test_a_pool_child_gets_the_workers_configuration_not_the_files(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """child_config is JSON (it crosses a pipe) and rebuilds the same keyring, TLS and
    routes in a fresh app, without reading any configuration again."""
    import json

    from stem import Stem
    from stem.security.tls import TLSSettings

    ring = Keyring.build("hmac-sha256", {"a": b"a" * 32, "b": b"b" * 32}, active_key="b")
    parent = Stem("p", broker="memory://", keyring=ring, routes={"mail.*": "mail"})
    parent.configure(tls=TLSSettings(ca_file="/etc/ca.pem"), result_ttl_s=None)
    wire = json.loads(json.dumps(parent.child_config()))
    monkeypatch.setenv("STEM_SIGNING_ACTIVE_KEY", "half-a-keyring")  # must not be read
    child = Stem("p", broker="memory://")
    child.configure_child(wire)
    assert child.keyring is not None
    assert (child.keyring.key_ids, child.keyring.active_key_id) == (("a", "b"), "b")
    env = child.build_envelope("mail.send", task_id="t1")
    assert ring.verify(child.keyring.sign(env)) is None
    assert child.tls == parent.tls and child.route("mail.send") == "mail"
    assert child.result_ttl_s is None
    unsigned = Stem("u", broker="memory://", keyring=None)
    monkeypatch.delenv("STEM_SIGNING_ACTIVE_KEY")
    assert unsigned.child_config()["keyring"] is None
