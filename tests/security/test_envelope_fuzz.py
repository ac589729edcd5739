"""Fuzzing the envelope decoder: whatever arrives, it raises DecodeError or returns an
Envelope, and verification of what it returns raises SignatureError or passes."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem import envelope as codec
from stem.envelope import Envelope
from stem.errors import DecodeError, SignatureError
from stem.security.signing import Keyring

FUZZ = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
RING = Keyring.build("hmac-sha256", {"v1": b"k" * 32})
BASE: dict[str, Any] = orjson.loads(
    codec.encode(RING.sign(Envelope(id="t1", task="a.b", args=(1,), headers={"h": 1})))
)
FIELDS = sorted(BASE)
SIG_FIELDS = sorted(BASE["signature"])


def to_json(value: Any) -> bytes:
    # the stdlib writes what orjson refuses: huge integers, NaN and Infinity literals
    return json.dumps(value, allow_nan=True).encode()


def decode_only_raises_decode_error(data: bytes) -> Envelope | None:
    try:
        env = codec.decode(data)
    except DecodeError:
        return None
    try:
        RING.verify(env)
    except SignatureError:
        pass
    return env


hostile_scalars: st.SearchStrategy[Any] = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        2**63,
        -(2**63) - 1,
        2**64,
        10**30,
        1.5,
        -0.0,
        1e308,
        "",
        "x" * 300,
        "\u0000",
        "\ud7ff\ue000",
        [],
        {},
        [[[]]],
        {"a": {"b": {}}},
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(data: bytes) -> None:
    decode_only_raises_decode_error(data)


@FUZZ
@given(json_values)
def test_random_json(value: Any) -> None:
    decode_only_raises_decode_error(to_json(value))


@FUZZ
@given(
    field=st.sampled_from(FIELDS),
    value=hostile_scalars | json_values,
)
def test_wrong_type_in_every_field(field: str, value: Any) -> None:
    doc = {**BASE, field: value}
    decode_only_raises_decode_error(to_json(doc))


@FUZZ
@given(field=st.sampled_from(SIG_FIELDS), value=hostile_scalars | json_values)
def test_wrong_type_in_every_signature_field(field: str, value: Any) -> None:
    doc = {**BASE, "signature": {**BASE["signature"], field: value}}
    decode_only_raises_decode_error(to_json(doc))


@FUZZ
@given(
    removed=st.sets(st.sampled_from(FIELDS), min_size=1),
    extra=st.dictionaries(st.text(max_size=5), hostile_scalars, max_size=2),
)
def test_missing_and_unknown_fields(removed: set[str], extra: dict[str, Any]) -> None:
    doc = {k: v for k, v in BASE.items() if k not in removed}
    doc.update(extra)
    decode_only_raises_decode_error(to_json(doc))


def raw(field: str, literal: str) -> bytes:
    """The base message with one field's value replaced by raw JSON text."""
    doc = {**BASE, field: "@@"}
    return to_json(doc).replace(b'"@@"', literal.encode())


HOSTILE_TEXT = [
    raw("priority", "1" + "0" * 400),
    raw("priority", "-" + "9" * 40),
    raw("attempt", "18446744073709551616"),
    raw("max_retries", "1e999"),
    raw("created_ms", "NaN"),
    raw("expires_ms", "Infinity"),
    raw("not_before_ms", "-Infinity"),
    raw("args", "[NaN]"),
    raw("args", "[1e400]"),
    raw("kwargs", '{"a": 1, "a": 2}'),
    raw("headers", '{"a": "\\ud800"}'),
    raw("id", '"\\udfff"'),
    raw("task", '"' + "t" * 1_000_000 + '"'),
    raw("args", "[" * 10_000 + "]" * 10_000),
    raw("kwargs", '{"a":' * 10_000 + "1" + "}" * 10_000),
    raw("headers", '{"a":' * 65 + "1" + "}" * 65),
    raw("args", "[" * 1000 + "]" * 1000),
    raw("args", '"not a list"'),
    raw("version", "1.0"),
    raw("version", "true"),
    raw("signature", "[]"),
    raw("signature", '{"a": 1}'),
    b'{"id":"a","id":"b","task":"t","version":1}',
    b'{"version": 1, "version": 2, "id": "a", "task": "t"}',
    b"[" * 100_000,
    b"{" * 100_000,
    b'"' + b"\\" * 10_001 + b'"',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe{\x00}\x00",
    b"",
    b"null",
    b"1" * 5000,
    b" " * 10_000,
]


@pytest.mark.parametrize("data", HOSTILE_TEXT, ids=range(len(HOSTILE_TEXT)))
def test_hostile_json(data: bytes) -> None:
    decode_only_raises_decode_error(data)


def test_deep_nesting_is_refused_with_a_clear_message() -> None:
    with pytest.raises(DecodeError):
        codec.decode(raw("args", "[" * 10_000 + "]" * 10_000))
    with pytest.raises(DecodeError, match="nests deeper"):
        codec.decode(raw("headers", '{"a":' * 65 + "1" + "}" * 65))


def test_non_bytes_input_is_a_decode_error() -> None:
    for value in ("text", None, 12, ["x"]):
        with pytest.raises(DecodeError):
            codec.decode(value)  # type: ignore[arg-type]
