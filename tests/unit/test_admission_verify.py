"""Ed25519 batches verify on helper threads too, and the outcome is the same as in one
thread: same deliveries returned in the same order, the same dead letters."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest

from stem import Stem
from stem.brokers.base import Message
from stem.envelope import decode, encode
from stem.observability import signals
from stem.security.signing import Keyring
from stem.worker import admission as admission_mod
from stem.worker.admission import Admission
from stem.worker.settle import Settler

SEED = bytes(range(32))


@pytest.fixture
def app() -> Iterator[Stem]:
    ring = Keyring.build("ed25519", {"v1": SEED}, active_key="v1")
    a = Stem("verify", broker=f"memory://{uuid.uuid4().hex}", keyring=ring)

    @a.task(name="t")
    def t(n: int) -> int:
        return n

    yield a
    a.close()


@pytest.mark.parametrize("helpers", [0, 1, 3])
def test_a_split_batch_keeps_order_and_dead_letters_the_bad_ones(
    app: Stem, helpers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admission_mod, "_HELPERS", helpers)
    threads: set[str] = set()
    real_verify = Keyring.verify

    def recording_verify(self: Keyring, env: object, **kw: object) -> None:
        threads.add(threading.current_thread().name)
        real_verify(self, env, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Keyring, "verify", recording_verify)
    messages, good = [], []
    for i in range(9):
        env = app.build_envelope("t", [i], queue="q")
        if i == 3:  # tampered after signing
            body = encode(decode(app.seal(env)).replace(args=(99,)))
        elif i == 6:  # not signed at all
            body = encode(env)
        else:
            body = app.seal(env)
            good.append(env.id)
        messages.append(Message(env.id, "q", body))
    app.broker.publish(messages)
    deliveries = app.broker.reserve(["q"], 9, 30.0)
    assert len(deliveries) == 9
    settler = Settler(app, "test", 5)
    admission = Admission(app, settler, 5)
    rejected_on: list[str] = []

    def on_rejected(**kw: object) -> None:
        rejected_on.append(threading.current_thread().name)

    signals.task_rejected.connect(on_rejected)
    try:
        got = admission.decode_many(deliveries)
    finally:
        signals.task_rejected.disconnect(on_rejected)
        admission.close()
    # refusals are settled by the consumer's thread, whichever thread verified them
    assert rejected_on == [threading.current_thread().name] * 2
    assert settler.counts["dead_lettered"] == 2
    assert [env.id for _, env in got] == good
    assert sorted(d.reason for d in app.broker.dlq_list("q")) == [
        "signature-invalid",
        "signature-missing",
    ]
    helper_threads = {name for name in threads if name.startswith("stem-verify")}
    assert bool(helper_threads) == (helpers > 0)
