"""Canvas, unique tasks and rate limits on the in-memory broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from stem import Stem, TaskError, chain, chord, control, group, states
from stem.brokers.base import Message
from stem.envelope import encode
from stem.errors import BackendConnectionError, BrokerError, ConfigError
from stem.limits import ConcurrencyCap, RateLimiter, parse_rate, unique_key
from stem.testing import memory_app, running_worker
from tests.fixtures.keyrings import verify_only_pair


@pytest.fixture
def app() -> Iterator[Stem]:
    a = memory_app()

    @a.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @a.task(name="mul")
    def mul(x: int, y: int) -> int:
        return x * y

    @a.task(name="total")
    def total(values: list[int], extra: int = 0) -> int:
        return sum(values) + extra

    @a.task(name="fail", max_retries=0)
    def fail(*args: Any) -> None:
        raise RuntimeError("member broke")

    @a.task(name="record")
    def record(*args: Any) -> list[Any]:
        return list(args)

    yield a
    a.close()


def dead_reasons(app: Stem, timeout_s: float = 10.0) -> list[str]:
    """The reasons of the dead letters on "default", once there is one (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    while not app.broker.dlq_list("default") and time.monotonic() < deadline:
        time.sleep(0.02)
    return [d.reason for d in app.broker.dlq_list("default")]


def t(app: Stem, name: str) -> Any:
    return app.tasks[name]


def test_chain_feeds_each_result_into_the_next(app: Stem) -> None:
    add, mul = t(app, "add"), t(app, "mul")
    with running_worker(app):
        res = chain(add.s(1, 2), mul.s(10), add.s(5)).delay()
        assert res.get(timeout=10) == 35


def test_immutable_signature_ignores_the_previous_result(app: Stem) -> None:
    add = t(app, "add")
    with running_worker(app):
        assert (add.s(1, 2) | add.si(100, 1)).delay().get(timeout=10) == 101


def test_group_results_come_back_in_member_order(app: Stem) -> None:
    add = t(app, "add")
    with running_worker(app, concurrency=4):
        res = group([add.s(i, i) for i in range(10)]).delay()
        assert res.get(timeout=10) == [i * 2 for i in range(10)]
        assert len(res) == 10 and res.ready() and res.completed_count() == 10
        # Members in a generator, as chord() takes them too.
        assert group(add.s(i, 1) for i in range(3)).delay().get(timeout=10) == [1, 2, 3]


def test_chord_callback_runs_once_with_ordered_results(app: Stem) -> None:
    add, total = t(app, "add"), t(app, "total")
    runs: list[int] = []

    @app.task(name="count_total")
    def count_total(values: list[int]) -> int:
        runs.append(1)
        return sum(values)

    with running_worker(app, concurrency=4):
        res = chord([add.s(i, 1) for i in range(8)], count_total.s()).delay()
        assert res.get(timeout=10) == sum(i + 1 for i in range(8))
        res2 = chord(group(add.s(1, 1), add.s(2, 2)), total.s(extra=100)).delay()
        assert res2.get(timeout=10) == 106
    assert runs == [1]


def test_chord_member_failure_fails_the_callback_naming_the_member(app: Stem) -> None:
    add, fail, total = t(app, "add"), t(app, "fail"), t(app, "total")
    with running_worker(app):
        res = chord([add.s(1, 1), fail.s(), add.s(2, 2)], total.s()).delay()
        with pytest.raises(TaskError, match=r"chord member fail \(.*-1\) failed: RuntimeError"):
            res.get(timeout=10)


def test_chain_step_failure_fails_the_final_result(app: Stem) -> None:
    add, fail = t(app, "add"), t(app, "fail")
    with running_worker(app):
        res = chain(add.s(1, 1), fail.s(), add.s(1)).delay()
        with pytest.raises(TaskError, match="chain step fail"):
            res.get(timeout=10)


def test_link_and_link_error_callbacks(app: Stem) -> None:
    add, fail = t(app, "add"), t(app, "fail")
    seen: list[list[Any]] = []

    @app.task(name="collect")
    def collect(*args: Any) -> None:
        seen.append(list(args))

    with running_worker(app):
        first = add.s(2, 3).set(link=collect.s("after"), link_error=collect.s("err")).delay()
        assert first.get(timeout=10) == 5
        bad = fail.s().link_error(collect.s("errback")).delay()
        with pytest.raises(TaskError):
            bad.get(timeout=10)
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert [5, "after"] in seen
    [err] = [s for s in seen if s[-1] == "errback"]
    assert err[0] == bad.id and err[1]["type"] == "RuntimeError"
    assert not [s for s in seen if s[-1] == "err"]


def test_canvas_in_flight_survives_a_restart_of_every_worker(app: Stem) -> None:
    add = t(app, "add")
    res = chain(add.s(1, 1), add.s(1), add.s(1)).delay()
    with running_worker(app, concurrency=1):
        deadline = time.monotonic() + 5
        while app.broker.stats(["default"])[0].ready and time.monotonic() < deadline:
            time.sleep(0.01)
    # the first worker is gone; the chain's state is in the broker and the backend
    with running_worker(app):
        assert res.get(timeout=10) == 4


def test_empty_and_wrong_canvas_inputs_are_clear_errors(app: Stem) -> None:
    with pytest.raises(ConfigError, match="empty chain"):
        chain().delay()
    with pytest.raises(ConfigError, match="empty group"):
        group().delay()
    with pytest.raises(ConfigError, match="takes signatures"):
        chain(42)  # type: ignore[arg-type]
    add = t(app, "add")
    with pytest.raises(ConfigError, match="a group takes signatures, not Chain"):
        group([add.s(1, 1), chain(add.s(1, 1), add.s(2))])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="callback is one signature, not Chain"):
        chord([add.s(1, 1)], chain(add.s(1), add.s(2)))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown signature option"):
        t(app, "add").s(1, 2).set(colour="red")

    @app.task(name="fire_and_forget", ignore_result=True)
    def fire_and_forget() -> int:
        return 1

    add, total = t(app, "add"), t(app, "total")
    with pytest.raises(ConfigError, match="chord member 'add' ignores its result"):
        chord([add.s(1, 1).set(ignore_result=True)], total.s()).delay()
    with pytest.raises(ConfigError, match="chord member 'fire_and_forget' ignores its result"):
        chord([fire_and_forget.s()], total.s()).delay()
    with running_worker(app):  # asked to keep it for this call: fine
        assert (
            chord([fire_and_forget.s().set(ignore_result=False)], total.s()).delay().get(timeout=10)
            == 1
        )


def test_signature_options_are_checked_when_composed(app: Stem) -> None:
    add = t(app, "add")
    assert add.s(1, 2).set(expires=timedelta(seconds=90)).options["expires"] == 90.0
    for bad in (
        {"priority": "high"},
        {"countdown": float("nan")},
        {"expires": datetime.now()},  # naive
        {"queue": 5},
        {"ignore_result": "yes"},
        {"link": "collect"},
    ):
        with pytest.raises(ConfigError, match=r"option|timezone-aware"):
            add.s(1, 2).set(**bad)
    # A datetime is fine where the signature is sent at once, not where it travels.
    soon = datetime.now(UTC) + timedelta(minutes=5)
    with running_worker(app):
        assert add.s(1, 2).set(expires=soon).delay().get(timeout=10) == 3
        assert chain(add.s(1, 2).set(expires=soon), add.s(1)).delay().get(timeout=10) == 4
    with pytest.raises(ConfigError, match="chain step 'add': option 'expires' must be"):
        chain(add.s(1, 2), add.s(1).set(expires=soon)).delay()
    with pytest.raises(ConfigError, match="chord callback 'total'"):
        chord([add.s(1, 2)], t(app, "total").s().set(expires=soon)).delay()
    with pytest.raises(ConfigError, match="link 'add'"):
        add.s(1, 2).set(link=add.s(1).set(expires=soon)).delay()


def test_a_step_that_never_runs_ends_its_chain_and_chord(app: Stem) -> None:
    """Expired and revoked steps fail what waits on them, as a failed step does, so no
    waiter hangs on a chain or chord that can no longer finish."""
    add, total = t(app, "add"), t(app, "total")
    expired_chain = chain(add.s(1, 1).set(expires=0.2), add.s(10)).delay()
    expired_chord = chord([add.s(1, 1), add.s(2, 2).set(expires=0.2)], total.s()).delay()
    revoked_chain = chain(replace(add.s(1, 1), task_id="first-step"), add.s(10)).delay()
    control.revoke(app, ["first-step"])
    time.sleep(0.4)
    with running_worker(app):
        with pytest.raises(TaskError, match=r"chain step add .* failed: TaskExpired"):
            expired_chain.get(timeout=10)
        with pytest.raises(TaskError, match=r"chord member add .* failed: TaskExpired"):
            expired_chord.get(timeout=10)
        with pytest.raises(TaskError, match=r"chain step add .* failed: TaskRevoked"):
            revoked_chain.get(timeout=10)


def test_a_dead_lettered_step_resumes_its_chain_when_replayed(app: Stem) -> None:
    """An unknown task is not over: once it is deployed, `dlq replay` runs it and the chain
    goes on (so its waiters are not failed when it is dead-lettered)."""
    add = t(app, "add")
    res = chain(app.signature("late.step", args=(1,)), add.s(10)).delay()
    with running_worker(app):
        assert dead_reasons(app) == ["unknown-task"]
        assert res.state == states.PENDING

        @app.task(name="late.step")
        def late_step(x: int) -> int:
            return x + 1

        assert app.broker.dlq_replay() == 1
        assert res.get(timeout=10) == 12


def test_a_dead_lettered_later_step_runs_when_replayed(app: Stem) -> None:
    """A chain's later steps are published by the worker (a canvas step, which a second
    copy of must not run): the dead-lettered one's DEAD record must not pass for "ran"."""
    add = t(app, "add")
    res = chain(add.s(1, 2), app.signature("late.mul", args=(10,))).delay()
    with running_worker(app):
        assert dead_reasons(app) == ["unknown-task"]
        assert res.state == states.DEAD

        @app.task(name="late.mul")
        def late_mul(x: int, y: int) -> int:
            return x * y

        assert app.broker.dlq_replay() == 1
        deadline = time.monotonic() + 10
        while res.state == states.DEAD and time.monotonic() < deadline:
            time.sleep(0.05)  # the record says DEAD until the replayed copy runs
        assert res.get(timeout=10) == 30


def test_a_chain_step_replayed_after_its_retries_runs_and_the_chain_goes_on(app: Stem) -> None:
    """retries-exhausted is the dead letter an operator fixes and replays: the step's
    FAILURE (and the later steps', written when it failed) must not pass for "ran"."""
    calls: list[int] = []

    @app.task(name="flaky_step", autoretry_for=(RuntimeError,), max_retries=0)
    def flaky_step(x: int) -> int:
        calls.append(x)
        if len(calls) == 1:
            raise RuntimeError("dependency down")
        return x * 10

    add = t(app, "add")
    res = chain(add.s(1, 2), flaky_step.s(), add.s(5)).delay()
    with running_worker(app):
        with pytest.raises(TaskError, match="dependency down"):
            res.get(timeout=10)
        assert dead_reasons(app) == ["retries-exhausted"]
        assert app.broker.dlq_replay() == 1
        deadline = time.monotonic() + 10
        while res.state != states.SUCCESS and time.monotonic() < deadline:
            time.sleep(0.05)
        assert res.get(timeout=1) == 35
    assert calls == [3, 3]


def _fail_one_publish(app: Stem, matches: Any) -> list[int]:
    """Make the first publish holding an envelope that ``matches`` fail like a dropped
    connection (later ones go through); returns a list that gets a 1 when it did."""
    publish, failed = app.publish, []

    def publish_failing_once(envs: Any, *args: Any, **kwargs: Any) -> Any:
        envs = list(envs)
        if not failed and any(matches(e) for e in envs):
            failed.append(1)
            raise BrokerError("connection reset")
        return publish(envs, *args, **kwargs)

    app.publish = publish_failing_once  # type: ignore[method-assign]
    return failed


def test_a_chain_goes_on_when_publishing_its_next_step_failed_once(app: Stem) -> None:
    """The step's SUCCESS is stored, its next step's publish fails, the delivery comes
    back: that copy must publish the next step (not skip it as done, stalling the chain)."""
    add = t(app, "add")
    failed = _fail_one_publish(app, lambda e: e.task == "add" and e.args[:1] == (13,))
    res = chain(add.s(1, 2), add.s(10), add.s(100)).delay()  # 3 -> 13 -> 113
    with running_worker(app):
        assert res.get(timeout=15) == 113
    assert failed == [1]


def test_a_copy_of_a_finished_step_does_not_publish_its_next_step_again(app: Stem) -> None:
    """A worker that dies after publishing a step's follow-up and before its ack sends the
    step back: that copy must not send the next step (still running) a second time."""
    from stem.observability import signals

    add = t(app, "add")
    started, release, runs = threading.Event(), threading.Event(), []

    @app.task(name="slow_last")
    def slow_last(x: int) -> int:
        runs.append(x)
        started.set()
        release.wait(10)
        return x

    seen: dict[str, Any] = {}

    def keep(envelope: Any, **_: Any) -> None:
        if envelope.task == "add" and envelope.headers.get("canvas"):
            seen["middle"] = envelope

    signals.task_prerun.connect(keep)
    try:
        res = chain(add.s(1, 1), add.s(10), slow_last.s()).delay()
        with running_worker(app, concurrency=3):
            assert started.wait(10)
            app.publish([seen["middle"]])  # the middle step's message comes back
            time.sleep(0.5)  # its copy is handled meanwhile
            release.set()
            assert res.get(timeout=10) == 12
            time.sleep(0.3)
    finally:
        signals.task_prerun.disconnect(keep)
    assert runs == [12]


def _settled(app: Stem) -> None:
    """Wait until the broker holds nothing ready or reserved."""
    deadline = time.monotonic() + 10
    while any(q.ready or q.reserved for q in app.broker.stats()):
        assert time.monotonic() < deadline, app.broker.stats()
        time.sleep(0.02)


def _copies_of(app: Stem, task: str) -> tuple[list[Any], Any]:
    """Capture the messages of ``task`` as a worker starts them (to send a copy later, as
    a redelivery after a lost ack would); returns (the list, a disconnect function)."""
    from stem.observability import signals

    seen: list[Any] = []

    def keep(envelope: Any, **_: Any) -> None:
        if envelope.task == task:
            seen.append(envelope)

    signals.task_prerun.connect(keep)
    return seen, lambda: signals.task_prerun.disconnect(keep)


@pytest.mark.parametrize("how", ["expired", "revoked", "unknown"])
def test_a_late_copy_of_a_finished_task_leaves_its_result_alone(app: Stem, how: str) -> None:
    """A task ran and succeeded but its ack was lost: its message comes back once its
    lease lapses, by then expired (or the task revoked since, or to a worker of an older
    release without the task). The copy is not run, and the stored SUCCESS stays: it is
    not turned into EXPIRED, REVOKED or DEAD."""
    seen, stop = _copies_of(app, "add")
    try:
        with running_worker(app) as worker:
            res = t(app, "add").enqueue(args=[3, 4], expires=0.5)
            assert res.get(timeout=5) == 7
            if how == "revoked":
                control.revoke(app, [res.id])
                worker.note_revoked([res.id])  # as the control request would tell it
            elif how == "unknown":
                del app.tasks["add"]
            else:
                time.sleep(0.6)
            app.publish([seen[0]])  # the copy
            _settled(app)
    finally:
        stop()
    assert len(seen) == 1  # not run again
    assert (res.state, res.result) == (states.SUCCESS, 7)
    assert app.broker.dlq_list() == []


def test_an_expired_task_whose_errback_failed_to_publish_sends_it_when_it_comes_back(
    app: Stem,
) -> None:
    """The copy given back because the errback's publish failed finds the EXPIRED record
    its first delivery wrote: that is no reason to drop the errback."""
    from stem.worker.consumer import drain

    ran: list[Any] = []

    @app.task(name="on_err")
    def on_err(*args: Any) -> None:
        ran.append(args)

    res = t(app, "add").s(1, 2).link_error(on_err.s()).set(expires=0.1).delay()
    time.sleep(0.2)
    _fail_one_publish(app, lambda e: e.task == "on_err")
    assert drain(app) == 0  # expired, errback not sent: the delivery is given back
    assert res.state == states.EXPIRED and not ran
    deadline = time.monotonic() + 10
    while not ran:
        assert time.monotonic() < deadline, "the errback was never sent"
        drain(app)
        time.sleep(0.1)
    assert len(ran) == 1 and res.state == states.EXPIRED


def test_a_late_copy_of_an_expired_task_does_not_send_its_errback_again(app: Stem) -> None:
    """The task expired, its errback went out, and its ack was lost: the copy that comes
    back finds the EXPIRED record and the errback already sent, and sends none. (An
    errback that stored a result would not run twice anyway, its copy finding its
    SUCCESS; this one records none.)"""
    from stem.worker.consumer import drain

    ran: list[Any] = []

    @app.task(name="on_err", ignore_result=True)
    def on_err(*args: Any) -> None:
        ran.append(args)

    sent: list[Any] = []
    publish = app.publish

    def keep(envs: Any, *args: Any, **kwargs: Any) -> Any:
        sent.extend(e for e in envs if e.task == "add")
        return publish(envs, *args, **kwargs)

    app.publish = keep  # type: ignore[method-assign]
    res = t(app, "add").s(1, 2).link_error(on_err.s()).set(expires=0.1).delay()
    time.sleep(0.2)
    drain(app)
    drain(app)  # the errback
    assert res.state == states.EXPIRED and len(ran) == 1
    app.publish([sent[0]])  # the copy, as its lease lapsed with the ack lost
    drain(app)
    drain(app)
    assert res.state == states.EXPIRED and len(ran) == 1
    assert app.broker.dlq_list() == []


def test_a_late_copy_keeps_a_failure_whatever_its_message_says(app: Stem) -> None:
    """A record stands for one that could not be trusted by what it is, not by what its
    message says: a task failing with a message like a rejection's keeps its FAILURE
    when a copy of it comes back past its expiry."""
    from stem.worker.consumer import drain

    @app.task(name="odd", max_retries=0)
    def odd() -> None:
        raise RuntimeError("result record rejected: says the task")

    sent, stop = _copies_of(app, "odd")
    try:
        res = odd.enqueue(expires=0.5)
        drain(app)
        assert res.state == states.FAILURE
        time.sleep(0.6)
        app.publish([sent[0]])  # the copy, as its lease lapsed with the ack lost
        drain(app)
    finally:
        stop()
    assert len(sent) == 1  # not run again
    assert res.state == states.FAILURE
    assert "says the task" in str(res.result)


def test_a_copy_whose_record_cannot_be_trusted_is_recorded_as_usual(app: Stem) -> None:
    """A stored record that does not decode (or verify) says nothing about the task: an
    expired copy is recorded EXPIRED, not acked as if the task had ended."""
    from stem.worker.consumer import drain

    res = t(app, "add").enqueue(args=[1, 2], expires=0.1)
    app.backend.store(res.id, states.SUCCESS, b"not a record", None)
    time.sleep(0.2)
    drain(app)
    assert res.state == states.EXPIRED


def test_a_late_copy_of_a_finished_chain_step_does_not_fail_the_chain(app: Stem) -> None:
    seen, stop = _copies_of(app, "mul")
    try:
        with running_worker(app):
            res = chain(t(app, "add").s(1, 2), t(app, "mul").s(10).set(expires=0.5)).delay()
            assert res.get(timeout=5) == 30
            time.sleep(0.6)
            app.publish([seen[0]])  # the middle step again, past its expiry
            _settled(app)
    finally:
        stop()
    assert len(seen) == 1
    assert (res.state, res.result) == (states.SUCCESS, 30)


def test_a_chord_whose_members_finish_a_result_ttl_apart_fails_instead_of_hanging(
    app: Stem,
) -> None:
    """The member count used to expire with the results: a member finishing more than a
    result TTL after the one before started the count again, and the callback never ran
    nor failed (get() without a timeout blocked for good). Now the count outlives the
    results, the chord fires, and finds the first member's result gone."""
    from stem.worker.consumer import drain

    app.configure(result_ttl_s=0.5)
    add = t(app, "add")
    res = chord([add.s(1, 2), add.s(3, 4).set(countdown=0.8)], t(app, "total").s()).delay()
    assert drain(app) == 1
    time.sleep(1.0)  # the first member's result expires meanwhile
    drain(app)
    with pytest.raises(TaskError, match="ChordError"):
        res.get(timeout=5)


def test_a_chord_fired_but_not_published_fails_when_its_member_then_fails(app: Stem) -> None:
    """The member that fired the chord could not publish the callback (a broker blip),
    ran again and failed: the callback fails with it instead of waiting for good."""
    add, total = t(app, "add"), t(app, "total")
    runs: list[int] = []

    @app.task(name="second_run_fails", max_retries=0)
    def second_run_fails(x: int) -> int:
        runs.append(x)
        time.sleep(0.3)  # finishes last: it fires the chord
        if len(runs) > 1:
            raise RuntimeError("dependency down on the second run")
        return x

    _fail_one_publish(app, lambda e: e.task == "total")
    res = chord([add.s(1, 1), second_run_fails.s(5)], total.s()).delay()
    with running_worker(app):
        with pytest.raises(TaskError, match="dependency down on the second run"):
            res.get(timeout=15)
    assert len(runs) == 2


def test_a_member_run_again_after_firing_its_chord_cannot_fail_the_callback(app: Stem) -> None:
    """Group members carry no canvas mark: one redelivered after it fired the chord (a
    crash before its ack) runs again; failing then must not turn the callback that ran
    into a FAILURE."""
    from stem.result import ErrorInfo
    from stem.worker.canvas_hooks import CanvasHooks

    add, total = t(app, "add"), t(app, "total")
    with running_worker(app):
        res = chord([add.s(1, 1), add.s(2, 2)], total.s()).delay()
        assert res.get(timeout=10) == 6
    [(fire_key, member_id)] = app.broker.scan("chord-fire:").items()
    spec = {"size": 2, "index": 0, "callback": {"id": res.id, "task": "total"}}
    member = app.build_envelope(
        "add",
        (1, 1),
        task_id=member_id,
        group_id=fire_key.removeprefix("chord-fire:"),
        headers={"chord": spec},
    )
    CanvasHooks(app).after_failure(member, ErrorInfo("RuntimeError", "second run broke"))
    assert res.state == states.SUCCESS


def test_a_chord_callback_too_large_to_publish_fails_instead_of_waiting(app: Stem) -> None:
    """Each member's result fits in a message; all of them in the callback's do not."""

    @app.task(name="blob")
    def blob(n: int) -> str:
        return "x" * n

    total = t(app, "record")
    with running_worker(app):
        res = chord([blob.s(400_000) for _ in range(3)], total.s()).delay()
        with pytest.raises(TaskError, match="EnvelopeTooLarge"):
            res.get(timeout=10)


def test_a_next_step_too_large_to_publish_fails_the_chain_once(app: Stem) -> None:
    """Running the step again cannot make its follow-up smaller: it must not loop."""
    runs: list[int] = []

    @app.task(name="big")
    def big(n: int) -> str:
        runs.append(n)
        return "x" * n

    @app.task(name="concat")
    def concat(a: str, b: str) -> int:
        return len(a) + len(b)

    with running_worker(app):
        res = chain(big.s(700_000), concat.s("y" * 400_000)).delay()
        with pytest.raises(TaskError, match="EnvelopeTooLarge"):
            res.get(timeout=10)
        time.sleep(1.5)  # a re-run would come back after its 1 s hand-back delay
    assert runs == [700_000]


def test_malformed_canvas_headers_are_dead_lettered_before_running(app: Stem) -> None:
    ran: list[Any] = []

    @app.task(name="mark")
    def mark(tag: str) -> str:
        ran.append(tag)
        return tag

    wire = mark.s("next").to_wire()
    bad = {
        "chain-int": {"chain": 5},
        "chain-item": {"chain": [{"nope": 1}]},
        "link-str": {"link": "oops"},
        "chord-str": {"chord": "x"},
        "chord-index": {"chord": {"size": 2, "index": 2, "callback": wire}},
        "option": {"link": {**wire, "options": {"priority": "9"}}},
    }
    envs = [
        app.build_envelope("mark", [tag], headers=headers, group_id="g")
        for tag, headers in bad.items()
    ]
    app.publish_messages([Message(id=e.id, queue=e.queue, body=encode(e)) for e in envs])
    with running_worker(app):
        assert mark.delay("fine").get(timeout=10) == "fine"
        deadline = time.monotonic() + 10
        while len(app.broker.dlq_list("default")) < len(bad) and time.monotonic() < deadline:
            time.sleep(0.05)
    letters = app.broker.dlq_list("default")
    assert sorted(d.reason for d in letters) == ["malformed"] * len(bad)
    assert any("header 'chain[0]': field 'task' must be a string" in d.detail for d in letters)
    assert ran == ["fine"]


# -- unique tasks --------------------------------------------------------------------------


def test_unique_task_returns_the_existing_id_until_it_finishes(app: Stem) -> None:
    gate = threading.Event()

    @app.task(name="sync_account", unique=True)
    def sync_account(account: int) -> int:
        gate.wait(5)
        return account

    first = sync_account.delay(7)
    assert sync_account.delay(7).id == first.id
    assert sync_account.delay(8).id != first.id
    with running_worker(app):
        assert sync_account.delay(7).id == first.id  # running: still the same
        gate.set()
        assert first.get(timeout=10) == 7
        deadline = time.monotonic() + 5
        key = unique_key("sync_account", None, (7,), {}, names=sync_account.bound_arguments)
        while app.broker.peek(key) and (time.monotonic() < deadline):
            time.sleep(0.02)
        again = sync_account.delay(7)
        assert again.id != first.id
        assert again.get(timeout=10) == 7


def test_a_unique_task_that_ends_without_running_frees_its_key(app: Stem) -> None:
    @app.task(name="sync_user", unique=True)
    def sync_user(user: int) -> int:
        return user

    expired = sync_user.enqueue(args=[1], expires=0.2)
    revoked = sync_user.enqueue(args=[2], countdown=0.2)
    control.revoke(app, [revoked.id])
    time.sleep(0.4)
    with running_worker(app):
        with pytest.raises(TaskError):
            expired.get(timeout=10)
        with pytest.raises(TaskError):
            revoked.get(timeout=10)
        assert (expired.state, revoked.state) == (states.EXPIRED, states.REVOKED)
        deadline = time.monotonic() + 5
        while app.broker.scan("unique:") and time.monotonic() < deadline:
            time.sleep(0.02)
        for user, old in ((1, expired), (2, revoked)):
            again = sync_user.delay(user)
            assert again.id != old.id
            assert again.get(timeout=10) == user


def test_a_unique_task_revoked_or_expired_unseen_does_not_swallow_a_new_enqueue(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No worker reached them (which would free their keys): a new enqueue must still get
    a task that runs, not the id of one that never will."""
    import stem.app

    monkeypatch.setattr(stem.app, "_UNIQUE_GRACE_S", 0.1)

    @app.task(name="sync_team", unique=True)
    def sync_team(team: int) -> int:
        return team

    revoked = sync_team.enqueue(args=[1], countdown=30)
    control.revoke(app, [revoked.id])
    expired = sync_team.enqueue(args=[2], expires=0.2)
    time.sleep(0.5)
    fresh = [sync_team.delay(1), sync_team.delay(2)]
    assert fresh[0].id != revoked.id and fresh[1].id != expired.id
    with running_worker(app):
        assert [r.get(timeout=10) for r in fresh] == [1, 2]


def test_a_duplicate_enqueue_does_not_need_the_result_store(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    @app.task(name="sync_zone", unique=True)
    def sync_zone(zone: int) -> int:
        return zone

    first = sync_zone.delay(5)

    def down(*_: Any) -> None:
        raise BackendConnectionError("result store unreachable")

    monkeypatch.setattr(app.result_store, "read", down)
    assert sync_zone.delay(5).id == first.id


def test_an_expiring_unique_task_that_started_in_time_keeps_its_key(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    import stem.app

    monkeypatch.setattr(stem.app, "_UNIQUE_GRACE_S", 0.1)
    gate = threading.Event()

    @app.task(name="sync_site", unique=True)
    def sync_site(site: int) -> int:
        gate.wait(10)
        return site

    first = sync_site.enqueue(args=[3], expires=0.5)
    with running_worker(app):
        deadline = time.monotonic() + 5
        while app.broker.stats(["default"])[0].reserved == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.8)  # past its expiry: it runs, so its key holds
        assert sync_site.delay(3).id == first.id
        gate.set()
        assert first.get(timeout=10) == 3


def test_a_unique_task_dead_lettered_after_its_retries_keeps_its_key(app: Stem) -> None:
    """README: a dead-lettered task keeps its key (a replay may run it) until purged."""

    @app.task(name="sync_shop", unique=True, autoretry_for=(RuntimeError,), max_retries=0)
    def sync_shop(shop: int) -> int:
        raise RuntimeError("down")

    first = sync_shop.delay(4)
    with running_worker(app):
        with pytest.raises(TaskError):
            first.get(timeout=10)
    assert dead_reasons(app, timeout_s=5.0) == ["retries-exhausted"]
    assert sync_shop.delay(4).id == first.id


def test_a_unique_call_is_the_same_however_its_arguments_are_spelled(app: Stem) -> None:
    @app.task(name="resize_image", unique=True)
    def resize_image(image: int, scale: float = 1.0, *extra: int, **opts: Any) -> int:
        return image

    first = resize_image.delay(8)
    same = [
        resize_image.delay(image=8),
        resize_image.delay(8, 1.0),
        resize_image.delay(8, scale=1.0),
        resize_image.enqueue(kwargs={"scale": 1.0, "image": 8}),
    ]
    assert {r.id for r in same} == {first.id}
    others = [
        resize_image.delay(9),
        resize_image.delay(8, 2.0),
        resize_image.delay(8, 1.0, 5),
        resize_image.delay(8, crop=True),
    ]
    assert len({first.id, *(r.id for r in others)}) == 5


def test_a_unique_key_written_by_the_previous_release_still_counts(app: Stem) -> None:
    """Keys hashed the arguments as sent before they were bound by name: a task queued
    before an upgrade is still the same task for a producer after it."""
    import hashlib

    from stem.envelope import dumps

    @app.task(name="sync_org", unique=True)
    def sync_org(org: int, full: bool = False) -> int:
        return org

    old_key = "unique:sync_org:" + hashlib.sha256(dumps([[6], {}])).hexdigest()
    assert app.broker.claim(old_key, "queued-before-upgrade", 3600.0) == "queued-before-upgrade"
    # A second producer enqueueing the same call meanwhile gets that task too, never a
    # claim the first one made and gave back (an id nobody publishes).
    peek, meanwhile, entered = app.broker.peek, [], []

    def peek_with_a_producer_between(key: str) -> str | None:
        if key == old_key and not entered:
            entered.append(1)
            meanwhile.append(sync_org.delay(6).id)
        return peek(key)

    app.broker.peek = peek_with_a_producer_between  # type: ignore[method-assign]
    assert sync_org.delay(6).id == "queued-before-upgrade"
    assert meanwhile == ["queued-before-upgrade"]
    app.broker.peek = peek  # type: ignore[method-assign]
    assert app.broker.scan("unique:sync_org:") == {old_key: "queued-before-upgrade"}
    assert sync_org.delay(7).id != "queued-before-upgrade"


def test_unique_key_template_and_concurrent_producers(app: Stem) -> None:
    @app.task(name="invoice", unique_key="order:{order_id}")
    def invoice(order_id: int, attempt: int = 0) -> int:
        return order_id

    ids: list[str] = []
    lock = threading.Lock()

    def produce(i: int) -> None:
        res = invoice.enqueue(kwargs={"order_id": 42, "attempt": i})
        with lock:
            ids.append(res.id)

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(set(ids)) == 1
    assert app.broker.stats(["default"])[0].ready == 1
    with pytest.raises(ConfigError, match="names a missing argument"):
        invoice.enqueue(kwargs={"other": 1})


def test_a_unique_key_template_names_parameters_however_they_are_passed(app: Stem) -> None:
    """README: unique_key="order:{order_id}"; order.delay(7) and order.delay(order_id=7)
    are the same task, for bound tasks too (the context is not an argument)."""

    @app.task(name="order", unique_key="order:{order_id}:{region}")
    def order(order_id: int, region: str = "eu", **extra: Any) -> int:
        return order_id

    @app.task(name="bound_order", bind=True, unique_key="order:{order_id}")
    def bound_order(ctx: Any, order_id: int) -> int:
        return order_id

    first = order.delay(7)
    assert order.delay(order_id=7).id == first.id
    assert order.delay(7, "eu").id == first.id
    assert order.delay(7, "us").id != first.id
    assert order.delay(order_id=8, note="x").id != first.id
    bound = bound_order.delay(7)
    assert bound_order.delay(order_id=7).id == bound.id


# -- rate limits ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "per_s"), [("10/s", 10.0), ("30/m", 0.5), ("36/h", 0.01), ("2.5/s", 2.5)]
)
def test_parse_rate(text: str, per_s: float) -> None:
    assert parse_rate(text) == pytest.approx(per_s)


@pytest.mark.parametrize("bad", ["", "10", "10/d", "-1/s", "0/s", "fast"])
def test_bad_rates_are_clear_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match="is not like '100/s'"):
        parse_rate(bad)


def test_gcra_spaces_slots_and_refuses_beyond_the_horizon(app: Stem) -> None:
    limiter = RateLimiter(app.broker, horizon_s=1.0)
    now = 1_000_000
    slots = [limiter.take("k", 10.0, at_ms=now) for _ in range(12)]
    runs = [s.run_at_ms for s in slots if s.run_at_ms is not None]
    assert runs == [now + 100 * i for i in range(len(runs))]
    assert len(runs) == 11  # 0 .. 1000 ms ahead
    assert slots[-1].run_at_ms is None and slots[-1].retry_after_s > 0


def test_rate_limit_holds_tasks_in_the_broker_not_in_slots(app: Stem) -> None:
    stamps: list[float] = []

    @app.task(name="limited", rate_limit="20/s")
    def limited() -> None:
        stamps.append(time.monotonic())

    @app.task(name="free")
    def free() -> str:
        return "free"

    for _ in range(30):
        limited.delay()
    with running_worker(app, concurrency=4):
        assert free.delay().get(timeout=5) == "free"  # not starved by the limited backlog
        deadline = time.monotonic() + 20
        while len(stamps) < 30 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(stamps) == 30
    span = stamps[-1] - stamps[0]
    assert 29 / span <= 20 * 1.1, f"rate {29 / span:.1f}/s exceeds 20/s by more than 10%"


def test_concurrency_limit_is_cluster_wide(app: Stem) -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    @app.task(name="capped", concurrency_limit=2)
    def capped() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.1)
        with lock:
            running -= 1

    results = [capped.delay() for _ in range(8)]
    with running_worker(app, concurrency=3), running_worker(app, concurrency=3):
        for r in results:
            r.get(timeout=20)
    assert peak == 2


@pytest.mark.parametrize("ends", ["expired", "revoked"])
def test_a_task_handed_back_that_never_runs_again_frees_its_concurrency_slot(
    app: Stem, ends: str
) -> None:
    """A worker stopping hands its running task back; that copy may then end without
    running (expired, revoked). Its slot must not stay taken until the hold lapses (an
    hour without a time limit)."""
    release = threading.Event()

    @app.task(name="capped_once", concurrency_limit=1, max_retries=0)
    def capped_once(tag: str) -> str:
        if tag == "first":
            release.wait(10)
        return tag

    first = capped_once.enqueue(args=["first"], expires=1.0)
    try:
        with running_worker(app, shutdown_budget_s=0.2):
            deadline = time.monotonic() + 5
            while app.broker.stats(["default"])[0].reserved == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            time.sleep(0.1)  # admitted and running, not only reserved
        if ends == "revoked":
            control.revoke(app, [first.id])
        else:
            time.sleep(1.0)
    finally:
        release.set()
    with running_worker(app):
        assert capped_once.delay("second").get(timeout=5) == "second"
    assert first.state == (states.EXPIRED if ends == "expired" else states.REVOKED)


def test_a_copy_that_ends_without_running_frees_the_slot_a_killed_run_held(app: Stem) -> None:
    @app.task(name="capped_killed", concurrency_limit=1)
    def capped_killed(tag: str) -> str:
        return tag

    first = capped_killed.enqueue(args=["first"], expires=0.2)
    # As a worker killed while running it leaves the slot: held for an hour.
    assert ConcurrencyCap(app.broker).acquire("conc:capped_killed", first.id, 1, 3600.0)
    time.sleep(0.3)
    with running_worker(app):
        assert capped_killed.delay("second").get(timeout=5) == "second"
    assert first.state == states.EXPIRED


def test_per_key_rate_limits_are_independent(app: Stem) -> None:
    stamps: dict[str, list[float]] = {"a": [], "b": []}

    @app.task(name="tenant_job", rate_limit="5/s", rate_limit_key="{tenant}")
    def tenant_job(tenant: str) -> None:
        stamps[tenant].append(time.monotonic())

    for _ in range(6):
        tenant_job.delay(tenant="a")
        tenant_job.delay(tenant="b")
    with running_worker(app, concurrency=4):
        deadline = time.monotonic() + 10
        while sum(map(len, stamps.values())) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
    for tenant, times in stamps.items():
        assert len(times) == 6, tenant
        span = times[-1] - times[0]
        assert span >= 5 / 5 * 0.9, f"{tenant} ran faster than 5/s ({span:.2f}s for 6)"
    # The two tenants ran side by side, not one after the other (each alone takes ~1 s).
    assert abs(stamps["a"][0] - stamps["b"][0]) < 0.5


def test_a_group_of_tasks_shares_one_limit(app: Stem) -> None:
    stamps: list[float] = []

    @app.task(name="g1", rate_limit="10/s", rate_limit_group="api")
    def g1() -> None:
        stamps.append(time.monotonic())

    @app.task(name="g2", rate_limit="10/s", rate_limit_group="api")
    def g2() -> None:
        stamps.append(time.monotonic())

    for _ in range(8):
        g1.delay()
        g2.delay()
    with running_worker(app, concurrency=4):
        deadline = time.monotonic() + 10
        while len(stamps) < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert len(stamps) == 16
    stamps.sort()
    assert 15 / (stamps[-1] - stamps[0]) <= 11.0  # one shared 10/s, not two


@pytest.mark.parametrize(("mode", "runs"), [("open", True), ("closed", False)])
def test_limit_store_failure_fails_open_or_closed_as_declared(
    app: Stem, mode: str, runs: bool
) -> None:
    from stem.errors import BrokerConnectionError

    ran: list[int] = []

    @app.task(name=f"guarded_{mode}", rate_limit="100/s", limit_store_failure=mode)
    def guarded() -> None:
        ran.append(1)

    real_peek = app.broker.peek

    def broken_peek(key: str) -> str | None:
        if key.startswith("rate:"):
            raise BrokerConnectionError("limit store unreachable")
        return real_peek(key)

    app.broker.peek = broken_peek  # type: ignore[method-assign]
    res = guarded.delay()
    with running_worker(app):
        time.sleep(1.0)
        assert (res.state == states.SUCCESS) is runs
        assert bool(ran) is runs
        if not runs:
            stats = app.broker.stats(["default"])[0]
            assert stats.ready + stats.delayed + stats.reserved == 1  # held, not lost


def test_a_signature_sent_at_once_takes_what_enqueue_takes(app: Stem) -> None:
    """eta, task_id and headers are honoured, a unique task is deduplicated as through
    enqueue, and an unknown option is an error rather than silently dropped."""
    from stem import envelope as codec

    add = app.tasks["add"]
    later = datetime.now(UTC) + timedelta(hours=1)
    res = add.s(1, 2).apply_async(eta=later, task_id="my-id", headers={"origin": "test"})
    assert res.id == "my-id"
    [stats] = app.broker.stats(["default"])
    assert (stats.ready, stats.delayed) == (0, 1)
    with pytest.raises(ConfigError, match=r"unknown option.*bogus"):
        add.s(1, 2).apply_async(bogus=1)

    @app.task(name="once", unique=True)
    def once(n: int) -> int:
        return n

    first = once.s(9).delay()
    assert once.s(9).delay().id == first.id == once.delay(9).id
    assert once.s(10).delay().id != first.id
    app.broker.purge("default")  # the delayed add, to read the header of a ready one
    add.s(3).apply_async((4,), headers={"origin": "test"}, priority=7)
    [delivery] = app.broker.reserve(["default"], 1, 30.0, 1.0)
    env = codec.decode(delivery.body)
    assert (env.args, env.priority, env.headers.get("origin")) == ((3, 4), 7, "test")


def test_a_late_copy_keeps_the_unsigned_success_of_a_verify_only_worker() -> None:
    """Ed25519 workers that hold only public keys write unsigned records: the check for
    an ended task must read them as any read does, or an expired copy (its ack was lost)
    turns their SUCCESS into EXPIRED."""
    from stem.worker.consumer import drain

    producer, worker = verify_only_pair("verify-only")
    runs: list[int] = []
    for app in (producer, worker):

        @app.task(name="add")
        def add(x: int, y: int) -> int:
            runs.append(x)
            return x + y

    real_ack, dropped = worker.broker.ack, []

    def ack(deliveries: Any, claims: Any = ()) -> int:
        if not dropped:  # the worker dies before its ack goes out
            dropped.append(deliveries)
            return 0
        return real_ack(deliveries, claims)

    worker.broker.ack = ack  # type: ignore[method-assign]
    try:
        res = producer.tasks["add"].enqueue(args=[3, 4], expires=0.5)
        assert drain(worker, lease_s=0.2) == 1
        assert res.state == states.SUCCESS
        time.sleep(0.6)  # the lease lapsed and the task expired: its message comes back
        drain(worker, lease_s=0.2)
        assert (res.state, res.result, runs) == (states.SUCCESS, 7, [3])
    finally:
        producer.close()
        worker.close()


def test_a_verify_only_keyring_refuses_to_send_what_workers_would_refuse() -> None:
    """A producer given public keys only sent its tasks unsigned and said nothing: every
    worker that requires signatures dead-lettered them (signature-missing)."""
    producer, verify_only = verify_only_pair("vo-send")
    try:

        @verify_only.task(name="add")
        def add(x: int, y: int) -> int:
            return x + y

        with pytest.raises(ConfigError, match=r"cannot send 'add'.*public keys only"):
            add.delay(1, 2)
        with pytest.raises(ConfigError, match="verify-only"):
            control.broadcast(verify_only, "ping", destination=["w1@host"])
        assert all(s.ready == 0 for s in verify_only.broker.stats())
    finally:
        producer.close()
        verify_only.close()


def test_a_verify_only_worker_fails_what_follows_a_task_instead_of_sending_it_unsigned() -> None:
    """A chain continued by a worker holding public keys only: its next step went out
    unsigned, to be dead-lettered by the next worker (the chain never ended). Now the
    step fails, saying why; an errback that cannot be signed is logged, and the failed
    task is settled (it was given back again and again, to try once more)."""
    from stem.worker.consumer import drain

    producer, worker = verify_only_pair("vo-canvas")
    try:
        for app in (producer, worker):

            @app.task(name="add")
            def add(x: int, y: int) -> int:
                return x + y

            @app.task(name="boom", max_retries=0)
            def boom() -> None:
                raise RuntimeError("broke")

            @app.task(name="on_err")
            def on_err(*args: Any) -> None: ...

        res = chain(producer.tasks["add"].s(1, 2), producer.tasks["add"].s(10)).delay()
        failed = producer.tasks["boom"].s().link_error(producer.tasks["on_err"].s()).delay()
        drain(worker, lease_s=0.5)
        with pytest.raises(TaskError, match="public keys only"):
            res.get(timeout=5)
        assert failed.state == states.FAILURE
        assert all(s.ready == s.reserved == s.delayed == 0 for s in worker.broker.stats())
        assert worker.broker.dlq_list() == []
    finally:
        producer.close()
        worker.close()
