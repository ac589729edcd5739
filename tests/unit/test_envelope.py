from __future__ import annotations

import dataclasses
import enum

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stem import envelope as codec
from stem.envelope import Envelope, SignatureBlock
from stem.errors import DecodeError, EncodeError, EnvelopeTooLarge


def make(**kw: object) -> Envelope:
    base: dict[str, object] = {
        "id": "t1",
        "task": "email.send",
        "args": (1, "x"),
        "kwargs": {"a": [1, 2]},
        "created_ms": 1_700_000_000_000,
    }
    base.update(kw)
    return Envelope(**base)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    env = make(
        queue="mail",
        priority=7,
        not_before_ms=5,
        expires_ms=9,
        attempt=2,
        max_retries=4,
        parent_id="p",
        root_id="r",
        group_id="g",
        headers={"trace": "abc"},
        signature=SignatureBlock("hmac-sha256", "v1", 3, "n", "sig"),
    )
    assert codec.decode(codec.encode(env)) == env


def test_encoding_is_canonical_sorted_and_compact() -> None:
    data = codec.encode(make(kwargs={"b": 1, "a": 2}))
    assert b" " not in data
    decoded = orjson.loads(data)
    assert list(decoded) == sorted(decoded)
    assert list(decoded["kwargs"]) == ["a", "b"]
    assert codec.encode(make(kwargs={"a": 2, "b": 1})) == data


def test_envelope_is_frozen() -> None:
    env = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        env.task = "other"  # type: ignore[misc]
    assert env.replace(task="other").task == "other"


def test_oversized_message_is_refused_at_encode_with_task_name() -> None:
    with pytest.raises(EnvelopeTooLarge, match=r"email\.send.*over the 100-byte limit"):
        codec.encode(make(args=("x" * 200,)), max_bytes=100)


def test_unencodable_argument_is_a_clear_error() -> None:
    with pytest.raises(EncodeError, match="cannot be encoded as JSON"):
        codec.encode(make(args=({1, 2},)))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"id": "x", "task": "t"}', "missing field"),
        (b'{"id": "x", "task": "t", "version": 2}', "unsupported message version"),
        (b'{"id": "x", "task": "t", "version": 1, "evil": 1}', "unknown field"),
        (b'{"id": "x", "task": "t", "version": 1, "args": {}}', "'args' must be a list"),
        (b'{"id": "x", "task": "t", "version": 1, "kwargs": []}', "'kwargs' must be an object"),
        (b'{"id": "x", "task": "t", "version": 1, "priority": 42}', "'priority'"),
        (b'{"id": "x", "task": "t", "version": 1, "priority": true}', "'priority'"),
        (b'{"id": "x", "task": "t", "version": 1, "attempt": -1}', "'attempt'"),
        (b'{"id": "", "task": "t", "version": 1}', "'id' is required"),
        (b'{"id": "x", "task": 5, "version": 1}', "'task'"),
        (b'{"id": "x", "task": "t", "version": 1, "expires_ms": "soon"}', "'expires_ms'"),
        (b'{"id": "x", "task": "t", "version": 1, "signature": {"value": 1}}', "'signature'"),
        (b'{"id": "x", "task": "t", "version": 1, "args": [1e999999]}', "not valid JSON"),
    ],
)
def test_malformed_input_gives_a_clear_decode_error(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        codec.decode(body)


def test_deep_nesting_is_refused() -> None:
    deep: object = 1
    for _ in range(codec.MAX_DEPTH + 5):
        deep = [deep]
    body = orjson.dumps({"id": "x", "task": "t", "version": 1, "args": [deep]})
    with pytest.raises(DecodeError, match="nests deeper"):
        codec.decode(body)


@pytest.mark.parametrize("field", ["args", "kwargs", "headers"])
def test_nesting_limit_is_exact_in_every_user_field(field: str) -> None:
    def nested(levels: int) -> object:
        value: object = "leaf"
        for i in range(levels):
            value = {"k": value} if i % 2 else [value]
        return value

    def body(levels: int) -> bytes:
        value = nested(levels)
        wrapped = {"x": value} if field != "args" else [value]
        return orjson.dumps({"id": "x", "task": "t", "version": 1, field: wrapped})

    # The field itself sits at depth 2 (under the message): MAX_DEPTH - 2 more levels fit.
    codec.decode(body(codec.MAX_DEPTH - 2))
    with pytest.raises(DecodeError, match="nests deeper"):
        codec.decode(body(codec.MAX_DEPTH - 1))


_JSON = st.recursive(
    st.none() | st.integers() | st.text(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=30,
)


def _depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


@given(value=_JSON, limit=st.integers(min_value=1, max_value=6))
def test_depth_check_agrees_with_a_recursive_count(value: object, limit: int) -> None:
    assert codec._depth_ok([value], limit) is (_depth([value]) <= limit)


def test_oversized_message_is_refused_at_decode() -> None:
    with pytest.raises(EnvelopeTooLarge):
        codec.decode(b"{" + b" " * 200 + b"}", max_bytes=100)


def test_non_bytes_body_is_refused() -> None:
    with pytest.raises(DecodeError, match="must be bytes"):
        codec.decode("text")  # type: ignore[arg-type]


def test_signing_bytes_exclude_only_the_signature_value() -> None:
    sig = SignatureBlock("hmac-sha256", "v1", 3, "nonce", "value-a")
    a = codec.signing_bytes(make(signature=sig))
    b = codec.signing_bytes(make(signature=dataclasses.replace(sig, value="value-b")))
    c = codec.signing_bytes(make(signature=dataclasses.replace(sig, nonce="other")))
    assert a == b
    assert a != c
    assert b"value-a" not in a


@dataclasses.dataclass
class _Unsorted:
    zeta: float
    alpha: int
    _private: int = 0

    def __post_init__(self) -> None:
        self.derived = "not a field"


def test_a_dataclass_argument_is_written_as_the_sorted_dict_of_its_fields() -> None:
    sig = SignatureBlock("hmac-sha256", "v1", 3, "nonce", "value")
    env = make(args=(_Unsorted(1.5, 2),), kwargs={"p": [_Unsorted(0.5, 1)]}, signature=sig)
    decoded = codec.decode(codec.encode(env))
    assert decoded.args == ({"_private": 0, "alpha": 2, "zeta": 1.5},)
    # the worker re-encodes the decoded dicts: the signed bytes must not change
    assert codec.signing_bytes(decoded) == codec.signing_bytes(env)


def test_a_non_finite_float_inside_a_dataclass_is_refused() -> None:
    with pytest.raises(EncodeError, match="NaN or infinity"):
        codec.encode(make(args=(_Unsorted(float("nan"), 1),)))


class _Reading(enum.Enum):
    MISSING = float("nan")
    NESTED = {"limit": [float("inf")]}


@pytest.mark.parametrize("member", list(_Reading))
def test_a_non_finite_float_inside_an_enum_value_is_refused(member: _Reading) -> None:
    # orjson writes an Enum as its value, NaN as null: an enum is searched like a container
    with pytest.raises(EncodeError, match="NaN or infinity"):
        codec.encode(make(args=(member,)))
    with pytest.raises(EncodeError, match="NaN or infinity"):
        codec.dumps({"reading": member})


def test_expiry() -> None:
    assert make(expires_ms=100).is_expired(at_ms=100)
    assert not make(expires_ms=100).is_expired(at_ms=99)
    assert not make().is_expired(at_ms=10**15)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_floats_are_refused_not_turned_into_null(bad: float) -> None:
    with pytest.raises(EncodeError, match="NaN or infinity"):
        codec.encode(make(args=(1, {"x": [bad]})))
    assert codec.decode(codec.encode(make(args=(None, 1.5)))).args == (None, 1.5)


@pytest.mark.parametrize(
    "field", ["max_retries", "not_before_ms", "expires_ms", "priority", "attempt", "created_ms"]
)
def test_non_finite_numbers_outside_the_arguments_are_refused_too(field: str) -> None:
    env = dataclasses.replace(make(), **{field: float("inf")})
    with pytest.raises(EncodeError, match="NaN or infinity"):
        codec.encode(env)
    with pytest.raises(EncodeError, match="NaN or infinity"):
        codec.signing_bytes(env)
