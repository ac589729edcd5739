"""Keyring: signing, verification, rotation, verify-only workers, configuration errors."""

from __future__ import annotations

import base64
import dataclasses
import hmac
import json
from pathlib import Path

import pytest

from stem import envelope as codec
from stem.envelope import Envelope
from stem.errors import ConfigError, EncodeError, SignatureError
from stem.security import keys
from stem.security.keys import b64url
from stem.security.signing import DEFAULT_REPLAY_WINDOW_S, Keyring

NOW = 1_800_000_000_000
SECRET_V1 = bytes(range(32))
SECRET_V2 = bytes(range(100, 140))
SEED_V1 = bytes(range(1, 33))
SEED_V2 = bytes(range(50, 82))


def env(**kw: object) -> Envelope:
    base: dict[str, object] = {
        "id": "t1",
        "task": "email.send",
        "args": (1, "x"),
        "kwargs": {"to": "a@example.com"},
        "created_ms": NOW,
    }
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def hmac_ring(**kw: object) -> Keyring:
    return Keyring.build("hmac-sha256", {"v1": SECRET_V1}, **kw)  # type: ignore[arg-type]


def ed_ring(**kw: object) -> Keyring:
    return Keyring.build("ed25519", {"v1": SEED_V1}, **kw)  # type: ignore[arg-type]


def ed_public(seed: bytes) -> bytes:
    return keys.KeyMaterial("k", "ed25519", "private", seed).public_raw()


def reason(exc: pytest.ExceptionInfo[SignatureError]) -> str:
    return exc.value.reason


RINGS = [pytest.param(hmac_ring, id="hmac"), pytest.param(ed_ring, id="ed25519")]


# -- sign and verify -------------------------------------------------------------------------


@pytest.mark.parametrize("make", RINGS)
def test_signed_envelope_survives_the_wire_and_verifies(make) -> None:  # type: ignore[no-untyped-def]
    ring = make()
    signed = ring.sign(env(), now_ms=NOW)
    sig = signed.signature
    assert sig is not None
    assert (sig.algorithm, sig.key_id, sig.issued_at_ms) == (ring.algorithm, "v1", NOW)
    assert "=" not in sig.value
    assert len(base64.urlsafe_b64decode(sig.nonce + "==")) == 16
    ring.verify(codec.decode(codec.encode(signed)), now_ms=NOW + 1000)


@pytest.mark.parametrize("make", RINGS)
def test_a_body_as_stem_writes_it_verifies_without_re_encoding(  # type: ignore[no-untyped-def]
    make, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = make()
    wire = codec.encode(ring.sign(env(), now_ms=NOW))
    decoded = codec.decode(wire)

    def no_re_encoding(env: Envelope) -> bytes:
        raise AssertionError("the body should have been checked as received")

    monkeypatch.setattr(codec, "signing_bytes", no_re_encoding)
    ring.verify(decoded, body=wire, now_ms=NOW)


@pytest.mark.parametrize("make", RINGS)
def test_a_body_written_otherwise_is_re_encoded_and_verifies(make) -> None:  # type: ignore[no-untyped-def]
    # Another writer (other key order, whitespace) signed the canonical bytes all the same.
    ring = make()
    signed = ring.sign(env(), now_ms=NOW)
    pretty = json.dumps(codec.to_dict(signed), indent=1).encode()
    assert codec.signed_part(pretty, signed.signature.value) is None  # type: ignore[union-attr]
    ring.verify(codec.decode(pretty), body=pretty, now_ms=NOW)
    tampered = pretty.replace(b'"a@example.com"', b'"b@example.com"')
    with pytest.raises(SignatureError) as exc:
        ring.verify(codec.decode(tampered), body=tampered, now_ms=NOW)
    assert reason(exc) == "signature-invalid"


@pytest.mark.parametrize("make", RINGS)
def test_a_body_with_the_value_moved_out_of_the_signature_block_is_refused(  # type: ignore[no-untyped-def]
    make,
) -> None:
    ring = make()
    signed = ring.sign(env(kwargs={"k": 1}), now_ms=NOW)
    wire = codec.encode(signed)
    member = b',"value":"' + signed.signature.value.encode() + b'"'  # type: ignore[union-attr]
    # kwargs gets the value too; the block keeps its own, so the body still decodes
    moved = wire.replace(b'"kwargs":{"k":1}', b'"kwargs":{"k":1' + member + b"}")
    assert moved != wire
    decoded = codec.decode(moved)
    assert decoded.kwargs == {"k": 1, "value": signed.signature.value}  # type: ignore[union-attr]
    with pytest.raises(SignatureError) as exc:
        ring.verify(decoded, body=moved, now_ms=NOW)
    assert reason(exc) == "signature-invalid"


@pytest.mark.parametrize("make", RINGS)
def test_every_signature_gets_a_fresh_nonce(make) -> None:  # type: ignore[no-untyped-def]
    ring = make()
    nonces = {ring.sign(env(), now_ms=NOW).signature.nonce for _ in range(50)}
    assert len(nonces) == 50


@pytest.mark.parametrize("make", RINGS)
def test_unsigned_message_is_signature_missing(make) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SignatureError) as exc:
        make().verify(env(), now_ms=NOW)
    assert reason(exc) == "signature-missing"


def test_wrong_algorithm_is_invalid() -> None:
    signed = hmac_ring().sign(env(), now_ms=NOW)
    with pytest.raises(SignatureError) as exc:
        ed_ring().verify(signed, now_ms=NOW)
    assert reason(exc) == "signature-invalid"


def test_same_key_id_with_another_secret_is_invalid() -> None:
    signed = hmac_ring().sign(env(), now_ms=NOW)
    other = Keyring.build("hmac-sha256", {"v1": SECRET_V2})
    with pytest.raises(SignatureError) as exc:
        other.verify(signed, now_ms=NOW)
    assert reason(exc) == "signature-invalid"


@pytest.mark.parametrize("make", RINGS)
@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda v: v + "=", id="padding"),
        pytest.param(lambda v: v[:-1] + ("B" if v[-1] == "A" else "A"), id="last-char"),
        pytest.param(lambda v: v[:-1], id="truncated"),
        pytest.param(lambda v: v.replace("-", "+").replace("_", "/") + "+", id="std-alphabet"),
        pytest.param(lambda v: "", id="empty"),
        pytest.param(lambda v: v + "\u00e9", id="non-ascii"),
        pytest.param(lambda v: v[:10] + "!" + v[10:], id="junk-char"),
    ],
)
def test_only_the_canonical_value_verifies(make, mangle) -> None:  # type: ignore[no-untyped-def]
    ring = make()
    signed = ring.sign(env(), now_ms=NOW)
    sig = signed.signature
    bad = signed.replace(signature=dataclasses.replace(sig, value=mangle(sig.value)))
    with pytest.raises(SignatureError) as exc:
        ring.verify(bad, now_ms=NOW)
    assert reason(exc) == "signature-invalid"


def test_non_canonical_trailing_bits_are_refused() -> None:
    # 32 bytes -> 43 chars; the last char carries 2 unused bits. Setting them must not yield
    # a second valid spelling of the same signature.
    ring = hmac_ring()
    signed = ring.sign(env(), now_ms=NOW)
    sig = signed.signature
    assert sig is not None
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig.value[-1])
    assert last % 4 == 0
    twin = sig.value[:-1] + alphabet[last + 1]
    assert base64.urlsafe_b64decode(twin + "=") == base64.urlsafe_b64decode(sig.value + "=")
    with pytest.raises(SignatureError, match="does not match"):
        ring.verify(signed.replace(signature=dataclasses.replace(sig, value=twin)), now_ms=NOW)


def test_oversized_nonce_is_invalid() -> None:
    ring = hmac_ring()
    signed = ring.sign(env(), now_ms=NOW)
    assert signed.signature is not None
    long_nonce = signed.replace(signature=dataclasses.replace(signed.signature, nonce="n" * 500))
    with pytest.raises(SignatureError) as exc:
        ring.verify(long_nonce, now_ms=NOW)
    assert reason(exc) == "signature-invalid"


# -- freshness -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", RINGS)
def test_replay_window_bounds_the_age_of_a_signature(make) -> None:  # type: ignore[no-untyped-def]
    ring = make(replay_window_s=60)
    signed = ring.sign(env(), now_ms=NOW)
    ring.verify(signed, now_ms=NOW + 60_000)
    with pytest.raises(SignatureError) as exc:
        ring.verify(signed, now_ms=NOW + 60_001)
    assert reason(exc) == "signature-expired"


def test_window_starts_at_the_eta_for_delayed_tasks() -> None:
    ring = hmac_ring(replay_window_s=60)
    eta = NOW + 86_400_000
    signed = ring.sign(env(not_before_ms=eta), now_ms=NOW)
    ring.verify(signed, now_ms=eta + 30_000)
    with pytest.raises(SignatureError) as exc:
        ring.verify(signed, now_ms=eta + 61_000)
    assert reason(exc) == "signature-expired"


def test_signature_from_the_future_beyond_clock_skew_is_expired() -> None:
    ring = hmac_ring(clock_skew_s=30)
    ring.verify(ring.sign(env(), now_ms=NOW + 30_000), now_ms=NOW)
    with pytest.raises(SignatureError, match="future") as exc:
        ring.verify(ring.sign(env(), now_ms=NOW + 31_000), now_ms=NOW)
    assert reason(exc) == "signature-expired"


def test_default_window_is_an_hour() -> None:
    assert hmac_ring().replay_window_s == DEFAULT_REPLAY_WINDOW_S == 3600


# -- rotation and verify-only ----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["hmac-sha256", "ed25519"])
def test_rotation_add_switch_retire(algorithm: str) -> None:
    k1, k2 = (SECRET_V1, SECRET_V2) if algorithm == "hmac-sha256" else (SEED_V1, SEED_V2)
    old_producer = Keyring.build(algorithm, {"v1": k1})
    # step 1: workers learn v2 while producers still sign with v1
    worker = Keyring.build(algorithm, {"v1": k1, "v2": k2}, active_key="v1")
    from_v1 = old_producer.sign(env(), now_ms=NOW)
    worker.verify(from_v1, now_ms=NOW)
    # step 2: producers switch to v2; both are accepted
    new_producer = Keyring.build(algorithm, {"v1": k1, "v2": k2}, active_key="v2")
    from_v2 = new_producer.sign(env(), now_ms=NOW)
    assert from_v2.signature.key_id == "v2"  # type: ignore[union-attr]
    worker.verify(from_v2, now_ms=NOW)
    worker.verify(from_v1, now_ms=NOW)
    # step 3: v1 retired
    retired = new_producer.retire("v1")
    assert retired.key_ids == ("v2",)
    retired.verify(from_v2, now_ms=NOW)
    with pytest.raises(SignatureError) as exc:
        retired.verify(from_v1, now_ms=NOW)
    assert reason(exc) == "signature-unknown-key"
    assert new_producer.key_ids == ("v1", "v2")  # immutable: retire made a copy


def test_the_active_key_cannot_be_retired() -> None:
    with pytest.raises(ConfigError, match="active key"):
        hmac_ring().retire("v1")


def test_keyring_is_immutable() -> None:
    ring = hmac_ring()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ring.required = False  # type: ignore[misc]
    with pytest.raises(TypeError):
        ring.verifiers["evil"] = ring.verifiers["v1"]  # type: ignore[index]


def test_ed25519_verify_only_keyring_verifies_but_cannot_sign() -> None:
    producer = Keyring.build("ed25519", {"v1": SEED_V1})
    worker = Keyring.build("ed25519", {}, public_keys={"v1": ed_public(SEED_V1)})
    assert producer.can_sign and not worker.can_sign
    assert worker.active_key_id is None
    worker.verify(producer.sign(env(), now_ms=NOW), now_ms=NOW)
    with pytest.raises(ConfigError, match="verify-only"):
        worker.sign(env())
    with pytest.raises(ConfigError, match="verify-only"):
        worker.sign_bytes(b"x")
    seal, unseal = worker.record_sealers()
    assert seal is None
    assert unseal(b'{"task_id": "t"}') == b'{"task_id": "t"}'  # ed25519: results not required


def test_repr_names_key_ids_but_never_secrets() -> None:
    ring = hmac_ring()
    text = repr(ring) + repr(ring.verifiers) + repr(ring.signer)
    assert "v1" in text
    for secret in (SECRET_V1, b64url(SECRET_V1).encode()):
        assert secret.decode("latin-1") not in text


# -- byte payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("make", RINGS)
def test_sign_bytes_round_trip_and_tamper(make) -> None:  # type: ignore[no-untyped-def]
    ring = make()
    block = ring.sign_bytes(b"payload", context="control", now_ms=NOW)
    assert set(block) == {"algorithm", "key_id", "issued_at_ms", "nonce", "value"}
    ring.verify_bytes(b"payload", block, context="control", now_ms=NOW)
    for payload, ctx, blk in [
        (b"payloaD", "control", block),
        (b"payload", "result", block),
        (b"payload", "control", {**block, "nonce": "other"}),
        (b"payload", "control", {**block, "issued_at_ms": NOW + 1}),
        (b"payload", "control", {**block, "extra": 1}),
        (b"payload", "control", {**block, "issued_at_ms": "1"}),
        (b"payload", "control", "not a dict"),
    ]:
        with pytest.raises(SignatureError) as exc:
            ring.verify_bytes(payload, blk, context=ctx, now_ms=NOW)
        assert reason(exc) == "signature-invalid"
    with pytest.raises(SignatureError) as exc:
        ring.verify_bytes(b"payload", None, now_ms=NOW)
    assert reason(exc) == "signature-missing"


def test_bytes_age_is_checked_only_when_asked() -> None:
    ring = hmac_ring()
    block = ring.sign_bytes(b"p", now_ms=NOW)
    ring.verify_bytes(b"p", block, now_ms=NOW + 10 * 86_400_000)
    with pytest.raises(SignatureError) as exc:
        ring.verify_bytes(b"p", block, max_age_s=60, now_ms=NOW + 61_000)
    assert reason(exc) == "signature-expired"


@pytest.mark.parametrize("make", RINGS)
def test_envelope_and_bytes_signatures_are_not_interchangeable(make) -> None:  # type: ignore[no-untyped-def]
    ring = make()
    signed = ring.sign(env(), now_ms=NOW)
    block = dataclasses.asdict(signed.signature)
    with pytest.raises(SignatureError):
        ring.verify_bytes(codec.signing_bytes(signed), block, now_ms=NOW)


@pytest.mark.parametrize("make", RINGS)
def test_seal_and_unseal(make) -> None:  # type: ignore[no-untyped-def]
    ring = make()
    payload = b'{"task_id":"t1","state":"SUCCESS",\n"x":1}'
    sealed = ring.seal(payload, context="result")
    assert sealed.startswith(b"stem-sealed-v1\n")
    assert ring.unseal(sealed, context="result") == payload
    for bad in (
        sealed[:-1] + b"2",
        sealed.replace(b'"key_id":"v1"', b'"key_id":"v9"'),
        b"stem-sealed-v1\n{broken",
        b"stem-sealed-v1\n",
    ):
        with pytest.raises(SignatureError):
            ring.unseal(bad, context="result")
    with pytest.raises(SignatureError):
        ring.unseal(sealed, context="control")
    with pytest.raises(SignatureError) as exc:
        ring.unseal(payload, required=True)
    assert reason(exc) == "signature-missing"
    assert ring.unseal(payload, required=False) == payload


def test_record_sealers_for_hmac_require_signed_results() -> None:
    ring = hmac_ring()
    assert ring.results_required
    seal, unseal = ring.record_sealers()
    assert seal is not None
    assert unseal(seal(b"{}")) == b"{}"
    with pytest.raises(SignatureError):
        unseal(b"{}")
    assert not hmac_ring(required=False).results_required


def test_a_signed_record_read_without_keys_says_so() -> None:
    """A client without keys read a signed SUCCESS as 'not valid JSON' (and exit 65)."""
    from stem.backends.memory import MemoryBackend
    from stem.result import ResultRecord
    from stem.result_store import ResultStore

    backend = MemoryBackend("memory://signed-records")
    seal, _ = hmac_ring().record_sealers()
    ResultStore(backend, seal=seal).write(ResultRecord("t1", "SUCCESS", result=5))
    rec = ResultStore(backend).read("t1")
    assert rec is not None and rec.state == "FAILURE" and rec.error is not None
    assert "the record is signed and this process has no signing keys" in rec.error.message


# -- configuration ---------------------------------------------------------------------------


def hmac_entry(kid: str, secret: bytes = SECRET_V1) -> str:
    return f"{kid}:{base64.b64encode(secret).decode()}"


def test_from_env_off_when_no_keys() -> None:
    assert Keyring.from_env({}) is None
    assert Keyring.from_env({"STEM_SIGNING_ALGORITHM": "ed25519"}) is None


def test_from_env_inline_keys_rotation_and_defaults() -> None:
    ring = Keyring.from_env(
        {
            "STEM_SIGNING_KEYS": f"{hmac_entry('v1')}, {hmac_entry('v2', SECRET_V2)}",
            "STEM_SIGNING_ACTIVE_KEY": "v2",
        }
    )
    assert ring is not None
    assert (ring.algorithm, ring.key_ids, ring.active_key_id) == ("hmac-sha256", ("v1", "v2"), "v2")
    assert ring.required and ring.can_sign and ring.replay_window_s == 3600
    ring.verify(hmac_ring().sign(env(), now_ms=NOW), now_ms=NOW)


def test_from_env_accepts_urlsafe_unpadded_keys_and_settings() -> None:
    ring = Keyring.from_env(
        {
            "STEM_SIGNING_KEYS": f"v1:{b64url(SECRET_V1)}",
            "STEM_SIGNING_REQUIRED": "false",
            "STEM_SIGNING_REPLAY_WINDOW_S": "120",
            "STEM_SIGNING_RESULTS_REQUIRED": "yes",
        }
    )
    assert ring is not None
    assert not ring.required and ring.results_required and ring.replay_window_s == 120


def test_from_env_ed25519_producer_and_verify_only_worker() -> None:
    producer = Keyring.from_env(
        {"STEM_SIGNING_ALGORITHM": "ed25519", "STEM_SIGNING_KEYS": f"p1:{b64url(SEED_V1)}"}
    )
    worker = Keyring.from_env(
        {
            "STEM_SIGNING_ALGORITHM": "Ed25519",
            "STEM_SIGNING_PUBLIC_KEYS": f"p1:{b64url(ed_public(SEED_V1))}",
        }
    )
    assert producer is not None and worker is not None
    assert worker.required and not worker.can_sign
    worker.verify(producer.sign(env(), now_ms=NOW), now_ms=NOW)


def test_from_settings_uses_setting_names() -> None:
    ring = Keyring.from_settings(algorithm="hmac-sha256", keys=[hmac_entry("v1")])
    assert ring is not None and ring.can_sign
    with pytest.raises(ConfigError, match=r"signing\.active_key"):
        Keyring.from_settings(keys=[hmac_entry("v1")], active_key="v3")
    with pytest.raises(ConfigError, match=r"tls\.signing_keys"):
        Keyring.from_settings(keys=["v1:@@@"], names={"keys": "tls.signing_keys"})


SECRET_TEXT = base64.b64encode(b"TOPSECRET" * 2).decode()  # 18 bytes: too short


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"STEM_SIGNING_KEYS": "v1:not*base64"}, "entry 1 .*'v1'.*not valid base64"),
        ({"STEM_SIGNING_KEYS": f"v1:{SECRET_TEXT}"}, "18 bytes; at least 32"),
        (
            {"STEM_SIGNING_KEYS": hmac_entry("v1"), "STEM_SIGNING_ALGORITHM": "rsa"},
            "STEM_SIGNING_ALGORITHM: unknown signing algorithm 'rsa'",
        ),
        (
            {"STEM_SIGNING_KEYS": hmac_entry("v1"), "STEM_SIGNING_ACTIVE_KEY": "v2"},
            "STEM_SIGNING_ACTIVE_KEY names none of the signing keys .*v1",
        ),
        (
            {"STEM_SIGNING_KEYS": f"{hmac_entry('a')},{hmac_entry('b')}"},
            "2 signing keys .*set STEM_SIGNING_ACTIVE_KEY",
        ),
        (
            {"STEM_SIGNING_KEYS": f"{hmac_entry('a')},{hmac_entry('a')}"},
            "'a' is given twice",
        ),
        ({"STEM_SIGNING_KEYS": SECRET_TEXT}, "entry 1 is neither 'kid:base64' nor an existing"),
        ({"STEM_SIGNING_KEYS": "/nonexistent/v1.hmac-sha256.key"}, "entry 1 is neither"),
        (
            {"STEM_SIGNING_KEYS": hmac_entry("v1"), "STEM_SIGNING_PUBLIC_KEYS": hmac_entry("p")},
            "STEM_SIGNING_PUBLIC_KEYS is for ed25519",
        ),
        ({"STEM_SIGNING_REQUIRED": "true"}, "no keys are configured"),
        (
            {"STEM_SIGNING_KEYS": hmac_entry("v1"), "STEM_SIGNING_REQUIRED": "maybe"},
            "STEM_SIGNING_REQUIRED must be true or false",
        ),
        (
            {"STEM_SIGNING_KEYS": hmac_entry("v1"), "STEM_SIGNING_REPLAY_WINDOW_S": "soon"},
            "STEM_SIGNING_REPLAY_WINDOW_S must be a number",
        ),
        (
            {"STEM_SIGNING_KEYS": hmac_entry("v1"), "STEM_SIGNING_REPLAY_WINDOW_S": "-5"},
            "replay_window_s must be a positive",
        ),
        (
            {"STEM_SIGNING_ALGORITHM": "ed25519", "STEM_SIGNING_KEYS": f"v1:{b64url(b'x' * 31)}"},
            "must be 32 raw bytes, got 31",
        ),
        (
            {
                "STEM_SIGNING_ALGORITHM": "ed25519",
                "STEM_SIGNING_PUBLIC_KEYS": f"v1:{b64url(SEED_V2)}",
                "STEM_SIGNING_ACTIVE_KEY": "v1",
            },
            "names none of the signing keys",
        ),
    ],
)
def test_bad_configuration_is_a_clear_error_without_key_material(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        Keyring.from_env(environ)
    text = str(exc.value)
    for secret in (SECRET_TEXT, base64.b64encode(SECRET_V1).decode(), "TOPSECRET", "not*base64"):
        assert secret not in text


def test_key_file_that_cannot_be_read_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "v1.hmac-sha256.key"
    path.write_text(b64url(SECRET_V1))
    path.chmod(0o600)

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    # chmod 000 does not stop root, so simulate the refusal
    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=f"cannot read key file {path}: Permission denied"):
        Keyring.from_env({"STEM_SIGNING_KEYS": str(path)})


@pytest.mark.parametrize("length", [1, 16, 32, 63, 64, 65, 100, 300])
def test_hmac_keys_sign_as_the_standard_library_does(length: int) -> None:
    # the key's inner and outer states are computed once; the MAC must stay RFC 2104's
    secret = bytes((7 * i + length) % 256 for i in range(length))
    ring = Keyring.build("hmac-sha256", {"v1": secret})
    key = ring.verifiers["v1"]
    for data in (b"", b"x", bytes(range(256)) * 3):
        mac = hmac.digest(secret, data, "sha256")
        assert key.sign(data) == mac  # type: ignore[attr-defined]
        assert key.verify(data, b64url(mac)) and not key.verify(data + b".", b64url(mac))


@pytest.mark.parametrize("make", RINGS)
def test_keys_that_collide_as_strings_are_refused_when_signing(make) -> None:  # type: ignore[no-untyped-def]
    # {1: "safe", "1": "evil"} would be written with the key "1" twice, and a reader keeps
    # the last: the worker would run with a value the signer never saw
    ring = make()
    for clash in ({1: "safe", "1": "evil"}, {True: 1, "true": 2}, {None: 1, "null": 2}):
        with pytest.raises(EncodeError, match="same once written as strings"):
            codec.encode(ring.sign(env(args=([clash],)), now_ms=NOW))
    ok = ring.sign(env(args=({1: "a", 2: {True: None}},)), now_ms=NOW)
    wire = codec.encode(ok)
    ring.verify(codec.decode(wire), body=wire, now_ms=NOW)
    assert codec.decode(wire).args == ({"1": "a", "2": {"true": None}},)


# -- what a worker acts on from the result store ---------------------------------------------


def test_a_forged_unsigned_record_cannot_steer_a_chain_or_a_chord() -> None:
    """Ed25519 accepts unsigned result records by default (verify-only workers write
    them). A chain step whose record said SUCCESS was skipped and its value passed to the
    next step, which the worker signed; a chord callback was given a member's forged
    value: whoever could write to the result store chose what ran. Where the worker acts
    on a record, it must be signed when signing is enforced."""
    import time
    from typing import Any

    from stem import Stem, chain, chord
    from stem.envelope import decode
    from stem.result import ResultRecord
    from stem.testing import running_worker

    url = f"memory://forged-records-{time.monotonic_ns()}"
    app = Stem("forged", broker=url, backend=url, keyring=ed_ring())
    assert app.keyring is not None and not app.keyring.results_required
    seen: list[Any] = []
    try:

        @app.task(name="echo")
        def echo(value: Any = "real") -> Any:
            seen.append(value)
            return value

        @app.task(name="collect")
        def collect(values: list[Any]) -> list[Any]:
            return values

        def forge(task_id: str) -> None:
            record = ResultRecord(task_id=task_id, state="SUCCESS", result="EVIL")
            app.backend.store(task_id, "SUCCESS", record.encode(), 3600)

        forge("step-2")
        steps = chain(echo.s("real"), dataclasses.replace(echo.s(), task_id="step-2"), echo.s())
        last = steps.delay()
        joined = chord([echo.s("a"), echo.s("b")], collect.s()).delay()
        # The chord's member ids are its group id and index: read them off the queue.
        held = app.broker.reserve(["default"], 10, lease_s=30)
        gids = {decode(d.body).group_id for d in held} - {None}
        for d in held:
            app.broker.nack(d, delay_s=0)
        for gid in gids:
            forge(f"{gid}-1")
        with running_worker(app):
            assert last.get(timeout=10) == "real"
            assert joined.get(timeout=10) == ["a", "b"]
        assert "EVIL" not in seen and seen.count("real") == 3, seen
    finally:
        app.close()
