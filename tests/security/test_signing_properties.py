"""Property tests: no change to a signed envelope, and no flipped byte on the wire, yields a
different message that verifies. Both algorithms."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem import envelope as codec
from stem.envelope import Envelope
from stem.errors import DecodeError, EncodeError, SignatureError
from stem.security.signing import Keyring

NOW = 1_800_000_000_000
RINGS = {
    "hmac-sha256": Keyring.build(
        "hmac-sha256", {"v1": b"a" * 32, "v2": b"b" * 32}, active_key="v1"
    ),
    "ed25519": Keyring.build("ed25519", {"v1": b"c" * 32, "v2": b"d" * 32}, active_key="v1"),
}
PROPS = settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

names = st.text(
    st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="\\"),
    min_size=1,
    max_size=40,
)
small_ints = st.integers(-(2**63), 2**63 - 1)
times = st.integers(0, 2**45)
# Finite floats only: orjson writes NaN/inf as null (reported separately).
scalars = (
    st.none()
    | st.booleans()
    | small_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
objects = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    return Envelope(
        id=draw(names),
        task=draw(names),
        args=tuple(draw(st.lists(json_values, max_size=5))),
        kwargs=draw(objects),
        queue=draw(names),
        priority=draw(st.integers(0, 9)),
        not_before_ms=draw(st.none() | st.integers(0, NOW)),
        expires_ms=draw(st.none() | times),
        attempt=draw(st.integers(0, 100)),
        max_retries=draw(st.none() | st.integers(0, 100)),
        created_ms=draw(times),
        parent_id=draw(st.none() | names),
        root_id=draw(st.none() | names),
        group_id=draw(st.none() | names),
        headers=draw(objects),
    )


def other(draw: st.DrawFn, strategy: st.SearchStrategy[Any], current: Any) -> Any:
    # compare canonical bytes: 0 == 0.0 == False in Python but not on the wire
    return draw(strategy.filter(lambda v: codec.dumps(v) != codec.dumps(current)))


ENVELOPE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "id": names,
    "task": names,
    "args": st.lists(json_values, max_size=5).map(tuple),
    "kwargs": objects,
    "queue": names,
    "priority": st.integers(0, 9),
    "not_before_ms": st.none() | st.integers(0, NOW),
    "expires_ms": st.none() | times,
    "attempt": st.integers(0, 100),
    "max_retries": st.none() | st.integers(0, 100),
    "created_ms": times,
    "parent_id": st.none() | names,
    "root_id": st.none() | names,
    "group_id": st.none() | names,
    "headers": objects,
}
SIGNATURE_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "key_id": st.sampled_from(["v2", "v3", "V1", "v1 "]),
    "issued_at_ms": st.integers(NOW - 3_000_000, NOW),
    "nonce": st.text(min_size=1, max_size=30),
    "algorithm": st.sampled_from(["hmac-sha256", "ed25519", "none", "HMAC-SHA256"]),
    "value": st.text(max_size=90),
}


@pytest.mark.parametrize("algorithm", sorted(RINGS))
@pytest.mark.parametrize("field", sorted(ENVELOPE_FIELDS))
@PROPS
@given(data=st.data())
def test_changing_any_envelope_field_is_rejected(algorithm: str, field: str, data: Any) -> None:
    ring = RINGS[algorithm]
    signed = ring.sign(data.draw(envelopes()), now_ms=NOW)
    ring.verify(signed, now_ms=NOW)
    value = other(data.draw, ENVELOPE_FIELDS[field], getattr(signed, field))
    wire = codec.encode(signed.replace(**{field: value}))
    tampered = codec.decode(wire)
    with pytest.raises(SignatureError):
        ring.verify(tampered, body=wire, now_ms=NOW)
    with pytest.raises(SignatureError):
        ring.verify(tampered, now_ms=NOW)


@pytest.mark.parametrize("algorithm", sorted(RINGS))
@pytest.mark.parametrize("field", sorted(SIGNATURE_FIELDS))
@PROPS
@given(data=st.data())
def test_changing_any_signature_field_is_rejected(algorithm: str, field: str, data: Any) -> None:
    ring = RINGS[algorithm]
    signed = ring.sign(data.draw(envelopes()), now_ms=NOW)
    sig = signed.signature
    assert sig is not None
    value = other(data.draw, SIGNATURE_FIELDS[field], getattr(sig, field))
    wire = codec.encode(signed.replace(signature=dataclasses.replace(sig, **{field: value})))
    tampered = codec.decode(wire)
    with pytest.raises(SignatureError):
        ring.verify(tampered, body=wire, now_ms=NOW)
    with pytest.raises(SignatureError):
        ring.verify(tampered, now_ms=NOW)


@pytest.mark.parametrize("algorithm", sorted(RINGS))
@settings(PROPS, max_examples=150)
@given(env=envelopes(), data=st.data())
def test_a_flipped_byte_never_yields_a_different_valid_message(
    algorithm: str, env: Envelope, data: Any
) -> None:
    ring = RINGS[algorithm]
    signed = ring.sign(env, now_ms=NOW)
    wire = codec.encode(signed)
    index = data.draw(st.integers(0, len(wire) - 1))
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != wire[index]))
    flipped = wire[:index] + bytes([byte]) + wire[index + 1 :]
    # Only a second spelling of the very same JSON may pass (e.g. "1e+20" -> "1E+20", or
    # "\u001f" -> "\u001F"): the message the worker sees is then identical.
    assert_refused_or_same(ring, flipped, signed)


def assert_refused_or_same(ring: Keyring, body: bytes, signed: Envelope) -> None:
    """The worker's check of ``body`` (decode, then verify) fails, or yields ``signed``."""
    try:
        decoded = codec.decode(body)
        ring.verify(decoded, body=body, now_ms=NOW)
    except (DecodeError, SignatureError):
        return
    assert decoded == signed


@pytest.mark.parametrize("algorithm", sorted(RINGS))
def test_second_spellings_of_the_same_json_are_the_same_message(algorithm: str) -> None:
    ring = RINGS[algorithm]
    signed = ring.sign(Envelope(id="t", task="x", args=(1e20, "\x1f")), now_ms=NOW)
    wire = codec.encode(signed)
    assert b"1e+20" in wire and b"\\u001f" in wire
    for old, new in ((b"1e+20", b"1E+20"), (b"\\u001f", b"\\u001F")):
        respelled = wire.replace(old, new)
        decoded = codec.decode(respelled)
        ring.verify(decoded, body=respelled, now_ms=NOW)
        assert decoded == signed


@pytest.mark.parametrize("algorithm", sorted(RINGS))
@settings(PROPS, max_examples=100)
@given(env=envelopes(), data=st.data())
def test_the_signature_value_moved_anywhere_never_yields_a_different_valid_message(
    algorithm: str, env: Envelope, data: Any
) -> None:
    # The worker checks the received bytes less the signature's value member. Cut out and
    # put back before any other closing brace (another object, or a brace inside a string),
    # or put in twice, that member never makes a message that decodes as something else
    # and verifies.
    ring = RINGS[algorithm]
    signed = ring.sign(env, now_ms=NOW)
    assert signed.signature is not None
    wire = codec.encode(signed)
    member = b',"value":"' + signed.signature.value.encode() + b'"'
    bare = wire.replace(member, b"")
    assert len(bare) == len(wire) - len(member)
    braces = [i for i, b in enumerate(bare) if b == ord("}")]
    at = data.draw(st.sampled_from(braces))
    moved = bare[:at] + member + bare[at:]
    if data.draw(st.booleans()):
        again = data.draw(st.sampled_from(braces))
        again += len(member) if again >= at else 0
        moved = moved[:again] + member + moved[again:]
    assert_refused_or_same(ring, moved, signed)


# Producer-side values whose dicts may have keys that are not strings: JSON writes them as
# strings, so 1, True and None can collide with "1", "true" and "null".
loose_keys = st.one_of(
    st.sampled_from(["1", "true", "null", "a"]), st.integers(0, 2), st.booleans(), st.none()
)
loose_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(loose_keys, inner, max_size=4),
    max_leaves=10,
)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), f"duplicate keys on the wire: {keys}"
    return dict(pairs)


@pytest.mark.parametrize("algorithm", sorted(RINGS))
@settings(PROPS, max_examples=100)
@given(args=st.lists(loose_values, max_size=3), kwargs=st.dictionaries(names, loose_values))
def test_non_string_keys_are_refused_or_signed_without_duplicate_keys(
    algorithm: str, args: list[Any], kwargs: dict[str, Any]
) -> None:
    # A body with a duplicate key verifies as bytes but runs with whichever value the
    # reader keeps: encoding must refuse such a value, never write it.
    ring = RINGS[algorithm]
    try:
        wire = codec.encode(ring.sign(Envelope(id="t", task="x", args=tuple(args), kwargs=kwargs)))
    except EncodeError:
        return
    json.loads(wire, object_pairs_hook=_no_duplicate_keys)
    ring.verify(codec.decode(wire), body=wire)


@pytest.mark.parametrize("algorithm", sorted(RINGS))
@PROPS
@given(env=envelopes(), planted=st.booleans())
def test_seal_envelope_writes_what_encode_of_sign_writes(
    algorithm: str, env: Envelope, planted: bool
) -> None:
    """The producer's fast path splices the signature value into the signed bytes; the body
    must be exactly the canonical encoding of the signed envelope, and verify on the
    worker's fast path (signed_part), even when the arguments or headers hold a "nonce"
    member with the very nonce of the signature."""
    from unittest import mock

    from stem.security import signing

    ring = RINGS[algorithm]
    if planted:
        env = env.replace(
            kwargs={**env.kwargs, "nonce": "PLANTED"},
            headers={**env.headers, "x": {"nonce": "PLANTED"}},
        )
    with mock.patch.object(signing.secrets, "token_urlsafe", return_value="PLANTED"):
        body = ring.seal_envelope(env, now_ms=NOW)
    decoded = codec.decode(body)
    assert decoded.signature is not None and decoded.signature.nonce == "PLANTED"
    assert codec.encode(decoded) == body
    assert codec.signing_bytes(decoded) == codec.signing_bytes(env, decoded.signature)
    assert codec.signed_part(body, decoded.signature.value) == codec.signing_bytes(decoded)
    ring.verify(decoded, body=body, now_ms=NOW)
