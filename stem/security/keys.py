"""Signing keys: generation, the key file format, and parsing key entries.

A key entry (in ``STEM_SIGNING_KEYS`` / ``STEM_SIGNING_PUBLIC_KEYS`` or the config file) is
either ``kid:base64`` (the raw key inline) or the path of a key file or of a directory of key
files, as written by ``stem keys generate``:

* ``KID.hmac-sha256.key`` -- an HMAC secret: one line of base64url (at least 32 bytes).
* ``KID.ed25519.key``     -- an Ed25519 private key: PEM (PKCS#8, unencrypted).
* ``KID.ed25519.pub``     -- an Ed25519 public key: PEM (SubjectPublicKeyInfo).

The key id comes from the file name. Files may also hold the raw key as base64 instead of
PEM. Inline Ed25519 keys are the raw 32-byte private seed or public key, in base64.

Error messages name the entry (its position, key id or file path) and never its key material:
a mistyped ``kid:secret`` entry is reported by position only.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stem.errors import ConfigError

log = logging.getLogger("stem.security")

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGORITHMS = (HMAC_SHA256, ED25519)
HMAC_MIN_KEY_BYTES = 32
HMAC_GENERATED_KEY_BYTES = 32
ED25519_KEY_BYTES = 32
KID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FILE_RE = re.compile(
    r"(?P<kid>[A-Za-z0-9][A-Za-z0-9._-]{0,63})\.(?P<alg>hmac-sha256|ed25519)\.(?P<ext>key|pub)"
)
_B64_RE = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_MAX_KEY_FILE_BYTES = 64 * 1024

Kind = Literal["secret", "private", "public"]


@dataclass(frozen=True, slots=True)
class KeyMaterial:
    """One parsed key. ``raw`` is the HMAC secret, or the raw 32-byte Ed25519 private seed
    or public key; it is left out of ``repr`` so it never reaches a log line."""

    kid: str
    algorithm: str
    kind: Kind
    raw: bytes = field(repr=False)
    origin: str = ""

    def public_raw(self) -> bytes:
        """The raw Ed25519 public key (derived from the private key when needed)."""
        if self.kind == "public":
            return self.raw
        if self.kind == "private":
            priv = Ed25519PrivateKey.from_private_bytes(self.raw)
            return priv.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        raise ConfigError(f"key {self.kid!r} is an HMAC secret and has no public half")


def b64url(data: bytes) -> str:
    """base64url without padding: the encoding of signature values and generated keys."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode_key(text: str) -> bytes:
    """Decode standard or url-safe base64, padded or not. Raises ValueError (whose message
    never repeats the input)."""
    text = text.strip()
    if not text or not _B64_RE.fullmatch(text):
        raise ValueError("not valid base64")
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64") from None


def check_algorithm(algorithm: str, where: str) -> str:
    if algorithm not in ALGORITHMS:
        raise ConfigError(
            f"{where}: unknown signing algorithm {algorithm[:40]!r}; use one of "
            f"{', '.join(ALGORITHMS)}"
        )
    return algorithm


def check_kid(kid: str, where: str) -> str:
    if not KID_RE.fullmatch(kid):
        raise ConfigError(
            f"{where}: key id must be 1-64 characters of letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit)"
        )
    return kid


def _check_raw(material: KeyMaterial, where: str) -> KeyMaterial:
    n = len(material.raw)
    if material.algorithm == HMAC_SHA256:
        if material.kind != "secret":
            raise ConfigError(f"{where}: HMAC keys are shared secrets; public keys are for ed25519")
        if n < HMAC_MIN_KEY_BYTES:
            raise ConfigError(
                f"{where}: HMAC key {material.kid!r} is {n} bytes; at least "
                f"{HMAC_MIN_KEY_BYTES} random bytes are required (use `stem keys generate`)"
            )
    elif n != ED25519_KEY_BYTES:
        raise ConfigError(
            f"{where}: Ed25519 {material.kind} key {material.kid!r} must be "
            f"{ED25519_KEY_BYTES} raw bytes, got {n}"
        )
    return material


# -- parsing ---------------------------------------------------------------------------------


def parse_key_entries(
    entries: Sequence[str], *, algorithm: str, public: bool, where: str
) -> list[KeyMaterial]:
    """Parse key entries (``kid:base64``, a key file, or a directory of key files).

    ``public`` selects what the entries hold: signing keys (HMAC secrets or Ed25519 private
    keys) or Ed25519 public keys. ``where`` names the setting in error messages."""
    out: list[KeyMaterial] = []
    for index, entry in enumerate(entries, start=1):
        entry = entry.strip()
        if not entry:
            continue
        label = f"{where} entry {index}"
        kid, sep, value = entry.partition(":")
        if sep and KID_RE.fullmatch(kid):
            out.append(_inline(kid, value, algorithm=algorithm, public=public, where=label))
            continue
        path = Path(entry).expanduser()
        if path.is_dir():
            out.extend(_load_dir(path, algorithm=algorithm, public=public, where=where))
        elif path.is_file():
            out.append(load_key_file(path, algorithm=algorithm, public=public, where=where))
        else:
            # Never echo the entry: it may be a secret whose "kid:" prefix was mistyped.
            raise ConfigError(
                f"{label} is neither 'kid:base64' nor an existing key file or directory"
            )
    return out


def _inline(kid: str, value: str, *, algorithm: str, public: bool, where: str) -> KeyMaterial:
    try:
        raw = b64decode_key(value)
    except ValueError:
        raise ConfigError(f"{where} (key id {kid!r}): the key is not valid base64") from None
    kind: Kind = "public" if public else ("secret" if algorithm == HMAC_SHA256 else "private")
    return _check_raw(KeyMaterial(kid, algorithm, kind, raw, f"{where} (inline)"), where)


def _load_dir(path: Path, *, algorithm: str, public: bool, where: str) -> list[KeyMaterial]:
    ext = ".pub" if public else ".key"
    try:
        names = sorted(p for p in path.iterdir() if p.name.endswith(ext) and p.is_file())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read key directory {path}: {exc.strerror}") from None
    found = [p for p in names if not p.name.startswith(".")]
    if not found:
        raise ConfigError(f"{where}: directory {path} holds no KID.ALGORITHM{ext} key files")
    return [load_key_file(p, algorithm=algorithm, public=public, where=where) for p in found]


def _read_key_file(path: Path, where: str, *, secret: bool) -> str:
    try:
        st = path.stat()
        if stat.S_IMODE(st.st_mode) & 0o022:
            raise ConfigError(
                f"{where}: key file {path} is writable by group or others; "
                f"run `chmod {'600' if secret else '644'} {path}`"
            )
        if secret and stat.S_IMODE(st.st_mode) & 0o004:
            log.warning(
                "secret key file %s is readable by every user; chmod 600 it",
                path,
                extra={"event": "key-file-world-readable"},
            )
        if st.st_size > _MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{where}: {path} is too large to be a key file")
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read key file {path}: {exc.strerror}") from None
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: key file {path} is not a text key file") from None


def load_key_file(path: Path, *, algorithm: str, public: bool, where: str) -> KeyMaterial:
    """Load one ``KID.ALGORITHM.key`` / ``KID.ed25519.pub`` file."""
    m = _FILE_RE.fullmatch(path.name)
    if m is None:
        raise ConfigError(
            f"{where}: key file name {path.name!r} must look like KID.hmac-sha256.key, "
            "KID.ed25519.key or KID.ed25519.pub"
        )
    kid, file_alg, ext = m["kid"], m["alg"], m["ext"]
    if file_alg != algorithm:
        raise ConfigError(
            f"{where}: {path} is an {file_alg} key but the signing algorithm is {algorithm}"
        )
    if (ext == "pub") != public:
        want = "public keys (.pub)" if public else "signing keys (.key)"
        raise ConfigError(f"{where}: {path} is not among the expected {want}")
    text = _read_key_file(path, where, secret=not public)
    material = load_key_text(text, kid=kid, algorithm=algorithm, public=public, origin=str(path))
    return _check_raw(material, f"{where} ({path})")


def load_key_text(text: str, *, kid: str, algorithm: str, public: bool, origin: str) -> KeyMaterial:
    """Parse the content of a key file: PEM or one line of base64."""
    kind: Kind = "public" if public else ("secret" if algorithm == HMAC_SHA256 else "private")
    if "-----BEGIN" not in text:
        try:
            raw = b64decode_key(text)
        except ValueError:
            raise ConfigError(f"{origin}: key file is neither PEM nor base64") from None
        return KeyMaterial(kid, algorithm, kind, raw, origin)
    if algorithm != ED25519:
        raise ConfigError(f"{origin}: HMAC key files hold base64, not PEM")
    data = text.encode("ascii")
    try:
        if public:
            pub = serialization.load_pem_public_key(data)
            if not isinstance(pub, Ed25519PublicKey):
                raise ConfigError(f"{origin}: not an Ed25519 public key")
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            priv = serialization.load_pem_private_key(data, password=None)
            if not isinstance(priv, Ed25519PrivateKey):
                raise ConfigError(f"{origin}: not an Ed25519 private key")
            raw = priv.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
    except (ValueError, TypeError):
        # TypeError: the key is encrypted. cryptography's messages never include key bytes,
        # but say it in our own words anyway.
        raise ConfigError(
            f"{origin}: cannot load the PEM key (it must be an unencrypted Ed25519 key)"
        ) from None
    return KeyMaterial(kid, algorithm, kind, raw, origin)


# -- generation ------------------------------------------------------------------------------


def key_file_names(algorithm: str, kid: str) -> tuple[str, str | None]:
    """(signing key file name, public key file name or None) for a key id."""
    return f"{kid}.{algorithm}.key", (f"{kid}.{algorithm}.pub" if algorithm == ED25519 else None)


def generate_key(algorithm: str, kid: str) -> dict[str, bytes]:
    """A new random key as ``{file name: file content}`` in the key file format."""
    check_algorithm(algorithm, "generate_key")
    check_kid(kid, "generate_key")
    key_name, pub_name = key_file_names(algorithm, kid)
    if algorithm == HMAC_SHA256:
        return {key_name: (b64url(secrets.token_bytes(HMAC_GENERATED_KEY_BYTES)) + "\n").encode()}
    priv = Ed25519PrivateKey.generate()
    assert pub_name is not None
    return {
        key_name: priv.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        pub_name: priv.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }


def inline_entries(files: dict[str, bytes]) -> dict[str, str]:
    """The generated files as inline ``kid:base64`` entries: ``{"keys": ..., "public_keys":
    ...}`` (the second only for Ed25519). This *is* key material: print it only on request."""
    out: dict[str, str] = {}
    for name, content in files.items():
        m = _FILE_RE.fullmatch(name)
        if m is None:
            raise ConfigError(f"not a key file name: {name!r}")
        public = m["ext"] == "pub"
        material = load_key_text(
            content.decode("ascii"), kid=m["kid"], algorithm=m["alg"], public=public, origin=name
        )
        out["public_keys" if public else "keys"] = f"{material.kid}:{b64url(material.raw)}"
    return out


def _packaged_group(out_dir: Path) -> int | None:
    """The service group of a key directory laid out as deploy/ says (``0750 root:stem``),
    when this process is root and can give files that group; else None."""
    st = out_dir.stat()
    mode = stat.S_IMODE(st.st_mode)
    packaged = st.st_uid == 0 and not mode & 0o027 and mode & 0o050
    return st.st_gid if packaged and st.st_gid != 0 and os.geteuid() == 0 else None


def write_key_files(files: dict[str, bytes], out_dir: Path) -> list[Path]:
    """Write key files into ``out_dir`` (created 0700): secrets 0600, public keys 0644.
    Into a directory with the packaged layout (``0750 root:<service group>``, written by
    root), HMAC secrets are ``0640 root:<service group>`` like the keys already there, so
    the service's workers can read them; an Ed25519 private key stays ``0600``: workers
    need only its public half, and a worker that could read it could forge tasks. Refuses
    to overwrite any existing file (nothing is written)."""
    targets = [out_dir / name for name in files]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise ConfigError(f"refusing to overwrite existing key file(s): {', '.join(existing)}")
    group = None
    if not out_dir.exists():
        try:
            out_dir.mkdir(mode=0o700, parents=True)
            os.chmod(out_dir, 0o700)  # mkdir's mode is filtered by the umask
        except OSError as exc:
            raise ConfigError(f"cannot create key directory {out_dir}: {exc.strerror}") from None
    elif (group := _packaged_group(out_dir)) is None and out_dir.stat().st_mode & 0o077:
        log.warning(
            "key directory %s is accessible by group or others; chmod 700 it, or use the "
            "packaged layout (0750 root:<service group>, keys 0640)",
            out_dir,
            extra={"event": "key-dir-permissive"},
        )
    written: list[Path] = []
    for path, content in zip(targets, files.values(), strict=True):
        # The service group reads HMAC secrets (workers need them); nothing else gets it.
        share_gid = group if path.name.endswith(f".{HMAC_SHA256}.key") else None
        mode = 0o644 if path.name.endswith(".pub") else (0o600 if share_gid is None else 0o640)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except OSError as exc:
            raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as fh:
            if share_gid is not None:
                os.fchown(fh.fileno(), 0, share_gid)
            os.fchmod(fh.fileno(), mode)  # exact mode whatever the umask
            fh.write(content)
        written.append(path)
    return written
