"""Signing is enforced the same way on every broker: signed tasks run; unsigned, forged and
replayed messages are dead-lettered with their reason. Both algorithms."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from stem import Stem
from stem.brokers.base import Message
from stem.envelope import decode, encode
from stem.security.signing import Keyring
from stem.testing import running_worker
from tests.fixtures.stores import KINDS, store_url

SECRET = b"k" * 32


def _keyring(algorithm: str) -> Keyring:
    if algorithm == "hmac-sha256":
        return Keyring.build(algorithm, {"v1": SECRET}, active_key="v1")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    seed = Ed25519PrivateKey.generate().private_bytes(
        Encoding.Raw, PrivateFormat.Raw, NoEncryption()
    )
    return Keyring.build(algorithm, {"v1": seed}, active_key="v1")


@pytest.fixture(params=KINDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return store_url(request, request.param, tmp_path)


@pytest.fixture(params=["hmac-sha256", "ed25519"])
def app(request: pytest.FixtureRequest, url: str) -> Iterator[Stem]:
    a = Stem("signed", broker=url, backend=url, keyring=_keyring(request.param))

    @a.task(name="sq")
    def sq(n: int) -> int:
        return n * n

    yield a
    a.close()


def wait_settled(app: Stem, queue: str, timeout_s: float = 20.0) -> None:
    """Until nothing on ``queue`` is ready or reserved: every delivery was acked, and with
    its ack its nonce recorded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        [stats] = app.broker.stats([queue])
        if stats.ready == stats.reserved == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"{queue}: still {stats} after {timeout_s}s")


def wait_letters(app: Stem, queue: str, n: int, timeout_s: float = 20.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    letters: list[str] = []
    while len(letters) < n and time.monotonic() < deadline:
        letters = sorted(d.reason for d in app.broker.dlq_list(queue))
        time.sleep(0.05)
    return letters


def test_enforcement_on_every_broker(app: Stem) -> None:
    queue = f"signed-{time.monotonic_ns()}"
    with running_worker(app, queues=(queue,)):
        assert app.send_task("sq", [6], queue=queue).get(timeout=20) == 36
        unsigned = app.build_envelope("sq", [1], queue=queue)
        signed = decode(app.seal(app.build_envelope("sq", [2], queue=queue)))
        replay = app.build_envelope("sq", [3], queue=queue)
        replay_body = app.seal(replay)
        app.broker.publish(
            [
                Message(unsigned.id, queue, encode(unsigned)),
                Message(signed.id, queue, encode(signed.replace(args=(99,)))),
                Message(replay.id, queue, replay_body),
            ]
        )
        assert app.AsyncResult(replay.id).get(timeout=20) == 9
        wait_settled(app, queue)
        app.broker.publish([Message(replay.id, queue, replay_body)])
        letters = wait_letters(app, queue, 3)
    assert letters == ["signature-invalid", "signature-missing", "signature-replayed"]


@pytest.mark.parametrize("ignore_result", [True, False])
def test_a_settled_task_records_its_nonce_in_its_ack_call(
    app: Stem, ignore_result: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With or without a result record, the nonce travels in the batched ack call (no
    claim call of its own): once the message is acked, a re-injected copy is refused, and
    the task ran once."""
    queue = f"quiet-{time.monotonic_ns()}"
    ran: list[int] = []
    own_claims: list[object] = []
    monkeypatch.setattr(app.broker, "claim", lambda *a, **kw: own_claims.append(a))
    monkeypatch.setattr(app.broker, "claim_many", lambda *a, **kw: own_claims.append(a))

    @app.task(name="quiet", ignore_result=ignore_result)
    def quiet(n: int) -> int:
        ran.append(n)
        return n

    env = app.build_envelope("quiet", [7], queue=queue)
    body = app.seal(env)
    with running_worker(app, queues=(queue,)):
        app.broker.publish([Message(env.id, queue, body)])
        if not ignore_result:
            assert app.AsyncResult(env.id).get(timeout=20) == 7
        wait_settled(app, queue)  # acked: its nonce was recorded in the same call
        app.broker.publish([Message(env.id, queue, body)])
        letters = wait_letters(app, queue, 1)
    assert letters == ["signature-replayed"]
    assert ran == [7]
    assert own_claims == []


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_redis_checks_nonces_while_reserving(app: Stem, monkeypatch: pytest.MonkeyPatch) -> None:
    """On Redis the reserve call reads each signed message's nonce claim itself: the worker
    makes no separate read per batch, and a replayed copy is still refused."""
    reads: list[int] = []
    real_peek_many = app.broker.peek_many

    def peek_many(keys: Sequence[str]) -> list[str | None]:
        reads.append(len(keys))
        return real_peek_many(keys)

    monkeypatch.setattr(app.broker, "peek_many", peek_many)
    queue = f"peeked-{time.monotonic_ns()}"
    env = app.build_envelope("sq", [4], queue=queue)
    body = app.seal(env)
    with running_worker(app, queues=(queue,)):
        assert [app.send_task("sq", [n], queue=queue).get(timeout=20) for n in range(3)] == [
            0,
            1,
            4,
        ]
        app.broker.publish([Message(env.id, queue, body)])
        assert app.AsyncResult(env.id).get(timeout=20) == 16
        wait_settled(app, queue)
        app.broker.publish([Message(env.id, queue, body)])
        letters = wait_letters(app, queue, 1)
    assert letters == ["signature-replayed"]
    assert reads == []


@pytest.mark.parametrize("url", ["redis"], indirect=True)
def test_prefetched_copies_are_checked_again_when_admitted(app: Stem) -> None:
    """A claim read while reserving is stale by the time a prefetched delivery is admitted:
    copies reserved in the same call as the original are refused once it settled."""
    queue = f"prefetched-{time.monotonic_ns()}"
    ran: list[int] = []

    @app.task(name="once")
    def once(n: int) -> int:
        ran.append(n)
        return n

    env = app.build_envelope("once", [5], queue=queue)
    body = app.seal(env)
    app.broker.publish([Message(env.id, queue, body) for _ in range(6)])
    with running_worker(app, queues=(queue,), concurrency=1, prefetch=8):
        letters = wait_letters(app, queue, 5)
    assert ran == [5]
    assert letters == ["signature-replayed"] * 5
