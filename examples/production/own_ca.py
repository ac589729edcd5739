"""A throwaway private CA for the production example, standing in for your organisation's.

Unlike ``stem certs dev`` these certificates carry no development marker, so the production
gates treat them like real ones: they are exactly what an internal CA would issue (a CA, a
server certificate for the Redis host, a client certificate for Stem). Keys are EC P-256,
written 0600. In production, get these from your CA and never keep its key on a worker.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ORGANIZATION = "Example Corp"
VALID_DAYS = 7


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    usage: x509.ObjectIdentifier | None,
    hosts: tuple[str, ...] = (),
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
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, data: bytes, mode: int) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
    return path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def issue_certificates(server_dir: Path, client_dir: Path, hosts: tuple[str, ...]) -> None:
    """``ca.pem`` in both directories; ``server.pem``/``server-key.pem`` (for ``hosts``) in
    ``server_dir``; ``client.pem``/``client-key.pem`` in ``client_dir``."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{ORGANIZATION} Internal CA")
    ca = _issue(ca_name, ca_key, ca_name, ca_key, usage=None)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _issue(
        _name(hosts[0]),
        server_key,
        ca_name,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        hosts=hosts,
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(
        _name("stem"), client_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH
    )
    pem = serialization.Encoding.PEM
    for directory in (server_dir, client_dir):
        _write(directory / "ca.pem", ca.public_bytes(pem), 0o644)
    _write(server_dir / "server.pem", server.public_bytes(pem), 0o644)
    _write(server_dir / "server-key.pem", _key_pem(server_key), 0o600)
    _write(client_dir / "client.pem", client.public_bytes(pem), 0o644)
    _write(client_dir / "client-key.pem", _key_pem(client_key), 0o600)
