"""Development certificates: a throwaway CA, a server and a client certificate.

Every certificate written here carries two development markers, so a production quality gate
can refuse them (:func:`is_dev_certificate`):

* the subject's organisation and organisational unit are ``Stem Development Only``;
* a non-critical extension under :data:`DEV_MARKER_OID` (a UUID-based OID, arc 2.25, needing
  no registration) whose value is the UTF8String ``stem-development-only``.

Leaf certificates also name the development CA as their issuer, which is a third marker.
Keys are ECDSA P-256, unencrypted PEM (PKCS#8), written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stem.errors import ConfigError

DEV_MARKER_OID = x509.ObjectIdentifier("2.25.200148148771946575979363193689045156990")
DEV_MARKER_TEXT = "stem-development-only"
DEV_ORGANIZATION = "Stem Development Only"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365
FILES = ("ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client.pem", "client-key.pem")


def _marker_value() -> bytes:
    text = DEV_MARKER_TEXT.encode()
    return bytes([0x0C, len(text)]) + text  # DER UTF8String (short form length)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEV_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, DEV_ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    usage: x509.ObjectIdentifier | None = None,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=not ca,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.UnrecognizedExtension(DEV_MARKER_OID, _marker_value()), critical=False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)


def generate_dev_certs(
    out_dir: str | os.PathLike[str],
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a development CA, server and client certificate with keys into ``out_dir``.

    Returns ``{file name: path}``. Refuses to replace existing files unless ``overwrite``.
    The server certificate covers ``hosts`` (DNS names and IP addresses)."""
    out = Path(out_dir)
    if not hosts:
        raise ConfigError("development certificates need at least one host name")
    existing = [str(out / n) for n in FILES if (out / n).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"refusing to overwrite existing file(s): {', '.join(existing)} (pass --force)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create {out}: {exc.strerror}") from None

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("Stem Development CA")
    ca_cert = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert(
        _name(hosts[0]),
        server_key,
        ca_name,
        ca_key,
        ca=False,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        hosts=hosts,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _cert(
        _name("stem-dev-client"),
        client_key,
        ca_name,
        ca_key,
        ca=False,
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    pem = serialization.Encoding.PEM
    contents = {
        "ca.pem": (ca_cert.public_bytes(pem), 0o644),
        "ca-key.pem": (_key_pem(ca_key), 0o600),
        "server.pem": (server_cert.public_bytes(pem), 0o644),
        "server-key.pem": (_key_pem(server_key), 0o600),
        "client.pem": (client_cert.public_bytes(pem), 0o644),
        "client-key.pem": (_key_pem(client_key), 0o600),
    }
    paths: dict[str, Path] = {}
    try:
        for name, (data, mode) in contents.items():
            _write(out / name, data, mode)
            paths[name] = out / name
    except OSError as exc:
        raise ConfigError(f"cannot write development certificates to {out}: {exc}") from None
    return paths


def certificate_is_dev(cert: x509.Certificate) -> bool:
    """True if the certificate carries any development marker (or was issued by a dev CA)."""
    try:
        cert.extensions.get_extension_for_oid(DEV_MARKER_OID)
        return True
    except x509.ExtensionNotFound:
        pass
    except ValueError:  # an unparsable extension elsewhere: fall back to the names
        pass
    for name in (cert.subject, cert.issuer):
        for oid in (NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME):
            for attr in name.get_attributes_for_oid(oid):
                value = attr.value if isinstance(attr.value, str) else attr.value.decode()
                if DEV_ORGANIZATION.lower() in value.lower():
                    return True
    return False


def certificates(path: str | os.PathLike[str]) -> list[x509.Certificate]:
    """The certificates in the PEM (or DER) file at ``path``; none for a file that holds
    none (a key file, say). An unreadable file raises :class:`ConfigError` naming it."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read certificate file {p}: {exc.strerror}") from None
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        return []


def is_dev_certificate(path: str | os.PathLike[str]) -> bool:
    """True if any certificate in the file at ``path`` is a development one (a file
    without certificates is not one: False)."""
    return any(certificate_is_dev(c) for c in certificates(path))
