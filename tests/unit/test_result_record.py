"""ResultRecord.encode writes what dataclasses.asdict would, field for field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from stem.envelope import dumps
from stem.result import ErrorInfo, ResultRecord


@dataclass
class Point:
    y: tuple[int, ...]  # fields out of order, a private field and a non-field attribute
    x: int
    _seen: bool = False

    def __post_init__(self) -> None:
        self.cache = "not a field"


def _reference(record: ResultRecord) -> bytes:
    d = dataclasses.asdict(record)
    return dumps({k: v for k, v in d.items() if v is not None})


FULL = ResultRecord(
    "t1",
    "SUCCESS",
    task="a.b",
    result={"nested": [1, 2.5, ("t", None)], "p": Point((2, 3), 1)},
    error=ErrorInfo("ValueError", "bad", None),
    progress={"done": 3},
    attempt=2,
    updated_ms=1_700_000_000_000,
    worker="w1",
    group_id="g1",
)


@pytest.mark.parametrize(
    "record",
    [
        FULL,
        ResultRecord("t2", "PENDING", updated_ms=1),
        ResultRecord("t3", "FAILURE", error=ErrorInfo("E", "m", "Traceback ..."), updated_ms=2),
        dataclasses.replace(FULL, result=0, progress=None, worker=None),
    ],
)
def test_encode_matches_the_field_by_field_reference(record: ResultRecord) -> None:
    assert record.encode() == _reference(record)
    back = ResultRecord.decode(record.encode())
    assert back.task_id == record.task_id and back.state == record.state
    assert back.attempt == record.attempt


def test_every_field_is_encoded() -> None:
    encoded = FULL.encode().decode()
    for f in dataclasses.fields(ResultRecord):
        assert f'"{f.name}":' in encoded, f"ResultRecord.encode leaves out {f.name}"


@pytest.mark.parametrize(
    "body",
    [
        b'{"task_id": "t", "state": ["SUCCESS"]}',
        b'{"task_id": "t", "state": {"a": 1}}',
        b'{"task_id": "t", "state": "SUCCESS", "error": {"type": 1}}',
        b'{"task_id": "t", "state": "NOPE"}',
    ],
)
def test_a_malformed_record_is_a_decode_error(body: bytes) -> None:
    """Not a raw TypeError (unhashable state): readers report a rejected record."""
    from stem.errors import DecodeError

    with pytest.raises(DecodeError):
        ResultRecord.decode(body)
