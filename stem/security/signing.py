"""Message signing: HMAC-SHA256 and Ed25519 behind one immutable :class:`Keyring`.

An envelope signature covers :func:`stem.envelope.signing_bytes` -- every envelope field
(routing, ETA, expiry, retries, headers, ids) plus the signature block less its value, so the
algorithm, key id, issue time and nonce cannot be swapped either. Values are base64url without
padding, and only the canonical encoding is accepted (no second spelling of one signature).
A worker verifies the body as received, less its signature value
(:func:`stem.envelope.signed_part`), and re-encodes only a body written otherwise.

Byte payloads (result records, control messages) are signed with the same keys over a
different, domain-separated input, so no envelope signature is ever a valid byte signature or
the other way round; a ``context`` string ("result", "control", ...) separates purposes too::

    b"stem-bytes-v1\\n" + canonical_json({algorithm, key_id, issued_at_ms, nonce, context})
    + b"\\n" + payload

The sealed form (:meth:`Keyring.seal`) carries the block in front of the payload::

    b"stem-sealed-v1\\n" + canonical_json({algorithm, key_id, issued_at_ms, nonce, value})
    + b"\\n" + payload
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from hashlib import sha256
from types import MappingProxyType
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stem import envelope as codec
from stem.envelope import Envelope, SignatureBlock
from stem.errors import ConfigError, DecodeError, EncodeError, SignatureError
from stem.security.keys import (
    ALGORITHMS,
    ED25519,
    HMAC_SHA256,
    KeyMaterial,
    Kind,
    b64url,
    check_algorithm,
    check_kid,
    parse_key_entries,
)

__all__ = [
    "ALGORITHMS",
    "DEFAULT_CLOCK_SKEW_S",
    "DEFAULT_REPLAY_WINDOW_S",
    "ED25519",
    "ENV_NAMES",
    "HMAC_SHA256",
    "Keyring",
    "Signer",
    "Verifier",
]

DEFAULT_REPLAY_WINDOW_S = 3600.0
DEFAULT_CLOCK_SKEW_S = 60.0
NONCE_BYTES = 16
_SHA256_BLOCK = 64
_NONCE_MAX = 128
_SIG_LEN = {HMAC_SHA256: 32, ED25519: 64}
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]{1,200}")
_BYTES_MAGIC = b"stem-bytes-v1\n"
_SEALED_MAGIC = b"stem-sealed-v1\n"
_BLOCK_FIELDS = frozenset(f.name for f in dataclasses.fields(SignatureBlock))

# Environment variable names read by Keyring.from_env (also used in its error messages).
ENV_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "algorithm": "STEM_SIGNING_ALGORITHM",
        "keys": "STEM_SIGNING_KEYS",
        "active_key": "STEM_SIGNING_ACTIVE_KEY",
        "public_keys": "STEM_SIGNING_PUBLIC_KEYS",
        "required": "STEM_SIGNING_REQUIRED",
        "replay_window_s": "STEM_SIGNING_REPLAY_WINDOW_S",
        "results_required": "STEM_SIGNING_RESULTS_REQUIRED",
    }
)
_SETTING_NAMES: Mapping[str, str] = MappingProxyType(
    {name: f"signing.{name}" for name in ENV_NAMES}
)


class Signer(Protocol):
    """Produces raw signatures with one private key or secret."""

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    """Checks signatures for one key id, given as sent: base64url without padding, in its
    one canonical form (anything else does not match). Never raises on a bad signature."""

    def verify(self, data: bytes, value: str) -> bool: ...


class _HmacKey:
    """HMAC-SHA256 (RFC 2104) with the key's inner and outer hash states computed once: each
    message then costs two copies of a SHA-256 state, instead of the key set-up that a
    one-shot ``hmac.digest`` repeats per call (about a third of its cost on small
    messages). The same bytes as ``hmac.digest(secret, data, "sha256")``."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: bytes) -> None:
        block = sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret
        block = block.ljust(_SHA256_BLOCK, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in block))
        self._outer = sha256(bytes(b ^ 0x5C for b in block))

    def __repr__(self) -> str:
        return "<HMAC-SHA256 key>"

    def sign(self, data: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def verify(self, data: bytes, value: str) -> bool:
        # Compared in base64url: only the canonical spelling of the right MAC matches, and
        # the value is never decoded (compare_digest takes str only when it is ASCII).
        return value.isascii() and hmac.compare_digest(b64url(self.sign(data)), value)


class _Ed25519Signer:
    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)

    def __repr__(self) -> str:
        return "<Ed25519 private key>"

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)


class _Ed25519Verifier:
    __slots__ = ("_key",)

    def __init__(self, public: bytes) -> None:
        self._key = Ed25519PublicKey.from_public_bytes(public)

    def __repr__(self) -> str:
        return "<Ed25519 public key>"

    def verify(self, data: bytes, value: str) -> bool:
        signature = _decode_value(value, ED25519)
        if signature is None:
            return False
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


def _decode_value(value: str, algorithm: str) -> bytes | None:
    """The raw signature, or None unless ``value`` is its one canonical base64url form."""
    if not _B64URL_RE.fullmatch(value):
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    if len(raw) != _SIG_LEN[algorithm] or b64url(raw) != value:
        return None
    return raw


def _short(text: str) -> str:
    """A message-supplied string made safe to show in an error (bounded, repr-quoted)."""
    return repr(text[:64] + ("..." if len(text) > 64 else ""))


def _mismatch(sig: SignatureBlock) -> SignatureError:
    return SignatureError("signature-invalid", f"signature by key {sig.key_id!r} does not match")


def _bytes_input(block: SignatureBlock, context: str, payload: bytes) -> bytes:
    head = {
        "algorithm": block.algorithm,
        "key_id": block.key_id,
        "issued_at_ms": block.issued_at_ms,
        "nonce": block.nonce,
        "context": context,
    }
    return _BYTES_MAGIC + codec.dumps(head) + b"\n" + payload


def _block_from_dict(block: Any) -> SignatureBlock:
    if block is None:
        raise SignatureError("signature-missing", "the payload is not signed")
    if (
        not isinstance(block, Mapping)
        or set(block) != _BLOCK_FIELDS
        or type(block["issued_at_ms"]) is not int
        or not all(isinstance(block[k], str) for k in ("algorithm", "key_id", "nonce", "value"))
    ):
        raise SignatureError("signature-invalid", "the signature block is malformed")
    return SignatureBlock(**block)


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Keyring:
    """The keys one process signs and verifies with. Immutable: rotation builds a new one.

    ``verifiers`` maps every accepted key id to its verifier (HMAC secrets, or Ed25519 public
    keys); ``signer`` signs as ``active_key_id`` (None on a verify-only keyring). ``required``
    says whether unsigned messages are refused. ``results_required`` says whether unsigned
    result records are refused (default: ``required`` for HMAC, where every worker holds a
    secret and can sign; False for Ed25519, where workers usually hold only public keys).
    """

    algorithm: str
    verifiers: Mapping[str, Verifier]
    signer: Signer | None = None
    active_key_id: str | None = None
    required: bool = True
    replay_window_s: float = DEFAULT_REPLAY_WINDOW_S
    clock_skew_s: float = DEFAULT_CLOCK_SKEW_S
    results_required: bool = False
    #: The parsed keys it was built from (empty for one made of verifiers directly).
    materials: tuple[KeyMaterial, ...] = ()

    def __post_init__(self) -> None:
        check_algorithm(self.algorithm, "signing")
        if (self.signer is None) != (self.active_key_id is None):
            raise ConfigError("a keyring needs both a signer and its active key id, or neither")
        if self.active_key_id is not None and self.active_key_id not in self.verifiers:
            raise ConfigError(f"active key {self.active_key_id!r} is not among the keyring's keys")
        for name in ("replay_window_s", "clock_skew_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"signing {name} must be a positive number of seconds")
        object.__setattr__(self, "verifiers", MappingProxyType(dict(self.verifiers)))

    def __repr__(self) -> str:
        return (
            f"Keyring(algorithm={self.algorithm!r}, key_ids={list(self.key_ids)!r}, "
            f"active_key_id={self.active_key_id!r}, required={self.required}, "
            f"replay_window_s={self.replay_window_s})"
        )

    # -- construction --------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        algorithm: str,
        keys: Mapping[str, bytes],
        *,
        public_keys: Mapping[str, bytes] | None = None,
        active_key: str | None = None,
        required: bool = True,
        replay_window_s: float = DEFAULT_REPLAY_WINDOW_S,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        results_required: bool | None = None,
    ) -> Keyring:
        """A keyring from raw key bytes: ``keys`` are HMAC secrets or 32-byte Ed25519 private
        seeds by key id, ``public_keys`` raw Ed25519 public keys (verify only)."""
        check_algorithm(algorithm, "signing")
        kind: Kind = "secret" if algorithm == HMAC_SHA256 else "private"
        materials = [KeyMaterial(k, algorithm, kind, v, "build") for k, v in keys.items()]
        materials += [
            KeyMaterial(k, algorithm, "public", v, "build") for k, v in (public_keys or {}).items()
        ]
        return cls._from_materials(
            algorithm,
            materials,
            active_key=active_key,
            required=required,
            replay_window_s=replay_window_s,
            clock_skew_s=clock_skew_s,
            results_required=results_required,
            names=_SETTING_NAMES,
        )

    @classmethod
    def from_settings(
        cls,
        algorithm: str | None = None,
        keys: Sequence[str] = (),
        active_key: str | None = None,
        public_keys: Sequence[str] = (),
        required: bool | None = None,
        replay_window_s: float | None = None,
        *,
        results_required: bool | None = None,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        names: Mapping[str, str] | None = None,
    ) -> Keyring | None:
        """A keyring from configuration values, or None when no keys are configured.

        ``keys`` / ``public_keys`` are key entries (``kid:base64``, key files, directories:
        see :mod:`stem.security.keys`). ``required`` defaults to True once keys are set.
        ``names`` maps these parameter names to the setting names used in error messages
        (default ``signing.<name>``)."""
        where = {**_SETTING_NAMES, **(names or {})}
        alg = check_algorithm((algorithm or HMAC_SHA256).strip().lower(), where["algorithm"])
        entries = [e for e in keys if e.strip()]
        pub_entries = [e for e in public_keys if e.strip()]
        if not entries and not pub_entries:
            if required:
                raise ConfigError(
                    f"{where['required']} is true but no keys are configured: set "
                    f"{where['keys']} (or {where['public_keys']} on verify-only Ed25519 workers)"
                )
            if active_key:
                raise ConfigError(f"{where['active_key']} is set but {where['keys']} is empty")
            return None
        materials = parse_key_entries(entries, algorithm=alg, public=False, where=where["keys"])
        if pub_entries:
            if alg != ED25519:
                raise ConfigError(
                    f"{where['public_keys']} is for ed25519 keys; the algorithm is {alg} "
                    f"(HMAC secrets all go in {where['keys']})"
                )
            materials += parse_key_entries(
                pub_entries, algorithm=alg, public=True, where=where["public_keys"]
            )
        return cls._from_materials(
            alg,
            materials,
            active_key=active_key.strip() if active_key else None,
            required=True if required is None else required,
            replay_window_s=DEFAULT_REPLAY_WINDOW_S if replay_window_s is None else replay_window_s,
            clock_skew_s=clock_skew_s,
            results_required=results_required,
            names=where,
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Keyring | None:
        """A keyring from ``STEM_SIGNING_*`` variables (see :data:`ENV_NAMES`), or None."""

        def get(name: str) -> str | None:
            value = environ.get(ENV_NAMES[name], "").strip()
            return value or None

        def split(name: str) -> list[str]:
            return [p.strip() for p in re.split(r"[,\n]", get(name) or "") if p.strip()]

        window = get("replay_window_s")
        window_s: float | None = None
        if window is not None:
            try:
                window_s = float(window)
            except ValueError:
                raise ConfigError(
                    f"{ENV_NAMES['replay_window_s']} must be a number of seconds, got {window!r}"
                ) from None
        return cls.from_settings(
            algorithm=get("algorithm"),
            keys=split("keys"),
            active_key=get("active_key"),
            public_keys=split("public_keys"),
            required=_env_bool(get("required"), ENV_NAMES["required"]),
            replay_window_s=window_s,
            results_required=_env_bool(get("results_required"), ENV_NAMES["results_required"]),
            names=ENV_NAMES,
        )

    @classmethod
    def _from_materials(
        cls,
        algorithm: str,
        materials: Sequence[KeyMaterial],
        *,
        active_key: str | None,
        required: bool,
        replay_window_s: float,
        clock_skew_s: float,
        results_required: bool | None,
        names: Mapping[str, str],
    ) -> Keyring:
        verifiers: dict[str, Verifier] = {}
        public_raw: dict[str, bytes] = {}
        signing: dict[str, KeyMaterial] = {}
        for m in materials:
            check_kid(m.kid, names["keys"])
            if algorithm == HMAC_SHA256:
                if m.kid in signing:
                    raise ConfigError(f"{names['keys']}: key id {m.kid!r} is given twice")
                signing[m.kid] = m
                verifiers[m.kid] = _HmacKey(m.raw)
                continue
            pub = m.public_raw()
            if m.kind == "private":
                if m.kid in signing:
                    raise ConfigError(f"{names['keys']}: key id {m.kid!r} is given twice")
                signing[m.kid] = m
            if m.kid in public_raw and not hmac.compare_digest(public_raw[m.kid], pub):
                raise ConfigError(f"key id {m.kid!r} is given twice with different keys")
            public_raw[m.kid] = pub
        for kid, raw in public_raw.items():
            try:
                verifiers[kid] = _Ed25519Verifier(raw)
            except ValueError:
                raise ConfigError(f"key {kid!r} is not a valid Ed25519 public key") from None
        if active_key is None and len(signing) == 1:
            active_key = next(iter(signing))
        signer: Signer | None = None
        if active_key is not None:
            if active_key not in signing:
                known = ", ".join(sorted(signing)) or "none"
                # Not echoed: a secret pasted there by mistake must not reach a log.
                raise ConfigError(
                    f"{names['active_key']} names none of the signing keys in "
                    f"{names['keys']} ({known})"
                )
            m = signing[active_key]
            signer = _HmacKey(m.raw) if algorithm == HMAC_SHA256 else _Ed25519Signer(m.raw)
        elif signing:
            raise ConfigError(
                f"{names['keys']} holds {len(signing)} signing keys "
                f"({', '.join(sorted(signing))}): set {names['active_key']} to the one to sign with"
            )
        if results_required is None:
            results_required = required and algorithm == HMAC_SHA256
        return cls(
            algorithm=algorithm,
            verifiers=verifiers,
            signer=signer,
            active_key_id=active_key if signer is not None else None,
            required=required,
            replay_window_s=replay_window_s,
            clock_skew_s=clock_skew_s,
            results_required=results_required,
            materials=tuple(materials),
        )

    def retire(self, *kids: str) -> Keyring:
        """A copy that no longer accepts ``kids`` (the active key cannot be retired)."""
        if self.active_key_id in kids:
            raise ConfigError(f"cannot retire the active key {self.active_key_id!r}")
        kept = {k: v for k, v in self.verifiers.items() if k not in kids}
        materials = tuple(m for m in self.materials if m.kid not in kids)
        return dataclasses.replace(self, verifiers=kept, materials=materials)

    def to_settings(self) -> dict[str, Any] | None:
        """Arguments of :meth:`from_settings` that build this keyring again, keys inline:
        for a process-pool child, over its private pipe (this *is* key material). None for
        a keyring made of verifiers directly, which has no key material to hand on."""
        if not self.materials:
            return None
        keys: list[str] = []
        public: list[str] = []
        for m in self.materials:
            entry = f"{m.kid}:{base64.b64encode(m.raw).decode('ascii')}"
            (public if m.kind == "public" else keys).append(entry)
        return {
            "algorithm": self.algorithm,
            "keys": keys,
            "public_keys": public,
            "active_key": self.active_key_id,
            "required": self.required,
            "replay_window_s": self.replay_window_s,
            "results_required": self.results_required,
            "clock_skew_s": self.clock_skew_s,
        }

    # -- properties ----------------------------------------------------------------------

    @property
    def can_sign(self) -> bool:
        return self.signer is not None

    @property
    def must_sign_but_cannot(self) -> bool:
        """Signatures are required and this keyring holds public keys only: what it would
        send unsigned is refused by every reader."""
        return self.required and not self.can_sign

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.verifiers))

    def _signer(self) -> tuple[Signer, str]:
        if self.signer is None or self.active_key_id is None:
            raise ConfigError(
                "this keyring holds no signing key (verify-only): set STEM_SIGNING_KEYS and "
                "STEM_SIGNING_ACTIVE_KEY where messages must be signed"
            )
        return self.signer, self.active_key_id

    def _new_block(self, kid: str, now_ms: int | None) -> SignatureBlock:
        issued = codec.now_ms() if now_ms is None else now_ms
        return SignatureBlock(self.algorithm, kid, issued, secrets.token_urlsafe(NONCE_BYTES), "")

    # -- envelopes -----------------------------------------------------------------------

    def _signed(self, env: Envelope, now_ms: int | None) -> tuple[SignatureBlock, bytes, str]:
        """A fresh block (new nonce, issued now), the bytes it covers for ``env``, and the
        signature value."""
        signer, kid = self._signer()
        block = self._new_block(kid, now_ms)
        data = codec.signing_bytes(env, block)
        return block, data, b64url(signer.sign(data))

    def sign(self, env: Envelope, *, now_ms: int | None = None) -> Envelope:
        """The envelope with a fresh signature block (new nonce, issued now)."""
        block, _, value = self._signed(env, now_ms)
        return env.replace(signature=dataclasses.replace(block, value=value))

    def seal_envelope(
        self,
        env: Envelope,
        *,
        max_bytes: int = codec.DEFAULT_MAX_BYTES,
        headroom: int = 0,
        now_ms: int | None = None,
    ) -> bytes:
        """``encode(sign(env))`` without building the signed envelope, or encoding twice:
        the same bytes (the signature value goes into the signed bytes where it sorts)."""
        block, data, value = self._signed(env, now_ms)
        body = codec.with_signature_value(data, block.nonce, value)
        return codec.checked_size(env.task, body, max_bytes, headroom)

    def verify(
        self,
        env: Envelope,
        *,
        body: bytes | None = None,
        now_ms: int | None = None,
        fresh: bool = True,
    ) -> None:
        """Return if the envelope is signed by a key of this keyring and fresh; otherwise
        raise :class:`SignatureError` with reason ``signature-missing``, ``-invalid``,
        ``-unknown-key`` or ``-expired``. Replays are :class:`ReplayGuard`'s job.

        ``body``: the bytes ``env`` was decoded from. As Stem writes them, they are the
        signed bytes plus the signature value (:func:`stem.envelope.signed_part`), so the
        check needs no re-encoding; a body written any other way is re-encoded.
        ``fresh=False`` skips the time checks: only whether the signature is genuine (for
        an operator re-signing an old dead letter)."""
        sig = env.signature
        if sig is None:
            raise SignatureError("signature-missing", "the message is not signed")
        verifier = self._verifier(sig)
        sent = None if body is None else codec.signed_part(body, sig.value)
        if sent is None or not verifier.verify(sent, sig.value):
            try:
                data = codec.signing_bytes(env)
            except (EncodeError, DecodeError):
                raise SignatureError(
                    "signature-invalid", "the message cannot be re-encoded"
                ) from None
            if data == sent or not verifier.verify(data, sig.value):
                raise _mismatch(sig)
        if fresh:
            self._check_time(sig, now_ms, self.replay_window_s, env.not_before_ms)

    def _verifier(self, sig: SignatureBlock) -> Verifier:
        """The verifier for the block's key, once its algorithm, key id and nonce pass."""
        if sig.algorithm != self.algorithm:
            raise SignatureError(
                "signature-invalid",
                f"signed with {_short(sig.algorithm)}; this keyring accepts {self.algorithm}",
            )
        verifier = self.verifiers.get(sig.key_id)
        if verifier is None:
            raise SignatureError(
                "signature-unknown-key",
                f"key id {_short(sig.key_id)} is not in this keyring "
                f"(known: {', '.join(self.key_ids)})",
            )
        if not 0 < len(sig.nonce) <= _NONCE_MAX:
            raise SignatureError("signature-invalid", "the signature nonce is malformed")
        return verifier

    def _check(
        self,
        sig: SignatureBlock,
        data: bytes,
        *,
        now_ms: int | None,
        max_age_s: float | None,
    ) -> None:
        if not self._verifier(sig).verify(data, sig.value):
            raise _mismatch(sig)
        self._check_time(sig, now_ms, max_age_s, None)

    def _check_time(
        self,
        sig: SignatureBlock,
        now_ms: int | None,
        max_age_s: float | None,
        not_before_ms: int | None,
    ) -> None:
        now = codec.now_ms() if now_ms is None else now_ms
        skew_ms = self.clock_skew_s * 1000
        if sig.issued_at_ms - now > skew_ms:
            raise SignatureError(
                "signature-expired",
                f"signed {(sig.issued_at_ms - now) / 1000:.0f}s in the future "
                f"(clock skew allowance {self.clock_skew_s:g}s)",
            )
        if max_age_s is not None:
            age_ms = now - max(sig.issued_at_ms, not_before_ms or 0)
            if age_ms > max_age_s * 1000:
                raise SignatureError(
                    "signature-expired",
                    f"signed {age_ms / 1000:.0f}s ago, outside the {max_age_s:g}s replay window",
                )

    # -- byte payloads (results, control messages) ----------------------------------------

    def sign_bytes(
        self, payload: bytes, *, context: str = "", now_ms: int | None = None
    ) -> dict[str, Any]:
        """A signature block (as a JSON-ready dict) over ``payload`` for ``context``."""
        signer, kid = self._signer()
        block = self._new_block(kid, now_ms)
        value = b64url(signer.sign(_bytes_input(block, context, payload)))
        return codec.signature_dict(dataclasses.replace(block, value=value))

    def verify_bytes(
        self,
        payload: bytes,
        block: Mapping[str, Any] | None,
        *,
        context: str = "",
        max_age_s: float | None = None,
        now_ms: int | None = None,
    ) -> None:
        """Check a :meth:`sign_bytes` block. Age is only checked when ``max_age_s`` is given
        (results outlive the replay window; control messages should pass it)."""
        sig = _block_from_dict(block)
        self._check(sig, _bytes_input(sig, context, payload), now_ms=now_ms, max_age_s=max_age_s)

    def seal(self, payload: bytes, *, context: str = "", now_ms: int | None = None) -> bytes:
        """``payload`` with its signature block in front (see the module docstring)."""
        block = self.sign_bytes(payload, context=context, now_ms=now_ms)
        return _SEALED_MAGIC + codec.dumps(block) + b"\n" + payload

    def unseal(
        self,
        data: bytes,
        *,
        context: str = "",
        required: bool = True,
        max_age_s: float | None = None,
        now_ms: int | None = None,
    ) -> bytes:
        """The payload of a sealed message after verifying it. Data that is not sealed is
        returned as is unless ``required`` (then ``signature-missing``)."""
        if not is_sealed(data):
            if required:
                raise SignatureError("signature-missing", "the record is not signed")
            return data
        parts = _sealed_parts(data)
        if parts is None:
            raise SignatureError("signature-invalid", "the sealed record is truncated")
        head, payload = parts
        try:
            block = codec.loads(head)
        except DecodeError:
            raise SignatureError("signature-invalid", "the signature block is malformed") from None
        self.verify_bytes(payload, block, context=context, max_age_s=max_age_s, now_ms=now_ms)
        return payload

    def record_sealers(
        self,
    ) -> tuple[Callable[[bytes], bytes] | None, Callable[[bytes], bytes]]:
        """(seal, unseal) for result records (context ``"result"``). ``seal`` is None on a
        verify-only keyring (its records are written unsigned); ``unseal`` refuses unsigned
        records when ``results_required``."""

        def seal(data: bytes) -> bytes:
            return self.seal(data, context="result")

        def unseal(data: bytes) -> bytes:
            return self.unseal(data, context="result", required=self.results_required)

        return (seal if self.can_sign else None), unseal

    def unseal_acted_on(self, data: bytes) -> bytes:
        """Unseal a result record a worker acts on and signs what follows from (see
        ResultStore.read): unsigned records are refused when signing is ``required``, even
        where results may otherwise be unsigned."""
        return self.unseal(data, context="result", required=self.results_required or self.required)


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` has the form :meth:`Keyring.seal` writes (not whether it verifies)."""
    return data.startswith(_SEALED_MAGIC)


def _sealed_parts(data: bytes) -> tuple[bytes, bytes] | None:
    """(signature block, payload) of sealed ``data``; None if it is cut short."""
    head, sep, payload = data[len(_SEALED_MAGIC) :].partition(b"\n")
    return (head, payload) if sep else None


def unverified_payload(data: bytes) -> bytes | None:
    """The payload of sealed ``data`` without checking its seal (None if cut short): only
    for decisions that fail safe, or that an operator vouches for."""
    parts = _sealed_parts(data)
    return None if parts is None else parts[1]


def _env_bool(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    lowered = value.lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name} must be true or false, got {value[:20]!r}")
