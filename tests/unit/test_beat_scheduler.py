"""The beat loop with a fake clock: exactly-once ticks, downtime, catch-up, run-time edits."""

from __future__ import annotations

import json
import logging
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stem import Stem
from stem.beat import Beat, ScheduleStore, add_schedule, parse_entry, task_id_for
from stem.beat.schedules import jitter_ms
from stem.beat.store import ENTRY_PREFIX, LAST_PREFIX
from stem.cli.beat_cmd import config_specs
from stem.envelope import Envelope, now_ms
from stem.errors import BrokerConnectionError, ConfigError
from stem.security.signing import Keyring

S = 1000
T0 = 1_700_000_000_000  # a round tick for every interval used here


class Recorder:
    """An app whose successful publishes are recorded."""

    def __init__(self, url: str, keyring: Keyring | None = None) -> None:
        self.app = Stem("beat-test", broker=url, backend="memory://", keyring=keyring)
        self.sent: list[Envelope] = []
        self.fail_next = 0
        original = self.app.publish

        def publish(envelopes: Any) -> None:
            envs = list(envelopes)
            if self.fail_next:
                self.fail_next -= 1
                raise BrokerConnectionError("broker down (test)")
            original(envs)
            self.sent.extend(envs)

        self.app.publish = publish  # type: ignore[method-assign]

    def beat(self, **kwargs: Any) -> Beat:
        kwargs.setdefault("tick_s", 0.5)
        return Beat(self.app, **kwargs)


@pytest.fixture(params=["memory", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://beat-{uuid.uuid4().hex}"
    return f"sqlite:///{tmp_path / 'beat.db'}"


@pytest.fixture
def rec(url: str) -> Iterator[Recorder]:
    r = Recorder(url)
    yield r
    r.app.close()


@pytest.fixture
def twin(url: str) -> Iterator[Recorder]:
    r = Recorder(url)
    yield r
    r.app.close()


def put(rec: Recorder, name: str, **spec: Any) -> None:
    spec.setdefault("task", "job")
    ScheduleStore(rec.app.broker).put(parse_entry(name, spec, origin="cli"))


def ids(*recs: Recorder) -> list[str]:
    return sorted(e.id for r in recs for e in r.sent)


# -- exactly once -------------------------------------------------------------------------------


def test_two_beats_enqueue_each_tick_exactly_once(rec: Recorder, twin: Recorder) -> None:
    put(rec, "sec", every=1)
    a, b = rec.beat(beat_id="a"), twin.beat(beat_id="b")
    rng = random.Random(7)
    a.tick(T0)  # first sight: the tick at T0 is recent, so it fires
    for k in range(1, 60):
        # Each beat passes twice per second at its own moments, in a random order.
        moments = [(a, T0 + k * S + rng.randrange(0, 500)) for _ in range(2)]
        moments += [(b, T0 + k * S + rng.randrange(0, 500)) for _ in range(2)]
        for beat, t in sorted(moments, key=lambda m: m[1]):
            beat.tick(t)
    assert ids(rec, twin) == sorted(task_id_for("sec", T0 + k * S) for k in range(60))
    assert rec.sent and twin.sent, "both beats should have won some ticks"
    assert ScheduleStore(rec.app.broker).last("sec") == T0 + 59 * S


def test_concurrent_passes_at_the_same_instant_fire_once(rec: Recorder, twin: Recorder) -> None:
    put(rec, "fast", every=1)
    beats = [rec.beat(beat_id="a"), twin.beat(beat_id="b"), rec.beat(beat_id="c")]
    for k in range(15):
        barrier = threading.Barrier(len(beats))

        def run(beat: Beat, t: int = T0 + k * S) -> None:
            barrier.wait()
            beat.tick(t)

        threads = [threading.Thread(target=run, args=(b,)) for b in beats]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert ids(rec, twin) == sorted(task_id_for("fast", T0 + k * S) for k in range(15))


# -- downtime, catch-up, first sight ------------------------------------------------------------


def test_no_burst_after_downtime(rec: Recorder) -> None:
    put(rec, "ten", every=10)
    beat = rec.beat()
    assert beat.tick(T0).fired == [("ten", T0)]
    # Down for 100 s: ten ticks missed; only the latest fires.
    assert beat.tick(T0 + 100 * S + 300).fired == [("ten", T0 + 100 * S)]
    assert beat.tick(T0 + 101 * S).fired == []
    assert ids(rec) == sorted([task_id_for("ten", T0), task_id_for("ten", T0 + 100 * S)])


def test_catch_up_fires_every_missed_tick_oldest_first(rec: Recorder) -> None:
    put(rec, "ten", every=10, catch_up=True)
    beat = rec.beat()
    beat.tick(T0)
    fired = beat.tick(T0 + 100 * S).fired
    assert fired == [("ten", T0 + k * 10 * S) for k in range(1, 11)]
    assert [e.id for e in rec.sent] == [task_id_for("ten", T0 + k * 10 * S) for k in range(11)]


def test_catch_up_is_bounded(rec: Recorder, caplog: pytest.LogCaptureFixture) -> None:
    put(rec, "sec", every=1, catch_up=True)
    beat = rec.beat(max_catch_up=5)
    beat.tick(T0)
    with caplog.at_level(logging.WARNING, logger="stem.beat"):
        fired = beat.tick(T0 + 3600 * S).fired
    assert fired == [("sec", T0 + (3600 - k) * S) for k in range(4, -1, -1)]
    assert "missed more than 5 ticks" in caplog.text


def test_first_sight_never_fires_a_stale_tick(rec: Recorder) -> None:
    put(rec, "ten", every=10)
    beat = rec.beat()
    assert beat.tick(T0 + 7 * S).fired == []  # T0 passed 7 s ago: stale
    # Late for the next tick (beyond the recent window): it still fires, once.
    assert beat.tick(T0 + 15 * S).fired == [("ten", T0 + 10 * S)]


def test_one_off_fires_once_even_late_then_is_disabled(rec: Recorder, twin: Recorder) -> None:
    put(rec, "launch", at="2023-11-14T22:13:20+00:00")  # == T0
    a, b = rec.beat(), twin.beat()
    assert a.tick(T0 - S).fired == []
    assert b.tick(T0 + 3600 * S).fired == [("launch", T0)]  # late, fires anyway
    assert a.tick(T0 + 3601 * S).fired == []
    stored = ScheduleStore(rec.app.broker).get("launch")
    assert stored is not None and not stored.enabled
    assert ids(rec, twin) == [task_id_for("launch", T0)]


# -- run-time edits -----------------------------------------------------------------------------


def test_disable_and_enable_at_run_time(rec: Recorder, twin: Recorder) -> None:
    put(rec, "sec", every=1)
    beat = rec.beat()
    beat.tick(T0)
    store = ScheduleStore(twin.app.broker)  # another process edits the store
    assert store.set_enabled("sec", False)
    assert beat.tick(T0 + S).fired == []
    assert beat.tick(T0 + 5 * S).fired == []
    assert store.set_enabled("sec", True, now_ms=T0 + 5 * S + 200)
    assert beat.tick(T0 + 5 * S + 300).fired == []  # ticks missed while disabled: none
    assert beat.tick(T0 + 6 * S).fired == [("sec", T0 + 6 * S)]
    assert not store.set_enabled("nope", True)


def test_a_pass_during_enable_fires_nothing_missed_while_disabled(
    rec: Recorder, twin: Recorder
) -> None:
    """Another beat's pass may fall between the two writes of an enable: it must not
    see the entry enabled with its old last tick (and fire what was missed)."""
    put(rec, "sec", every=1, catch_up=True)
    beat = rec.beat()
    beat.tick(T0)
    store = ScheduleStore(twin.app.broker)
    assert store.set_enabled("sec", False)
    during: list[Any] = []
    advance = store.advance_last

    def pass_in_between(name: str, tick_ms: int) -> bool:
        during.extend(beat.tick(T0 + 5 * S + 250).fired)
        return advance(name, tick_ms)

    store.advance_last = pass_in_between  # type: ignore[method-assign]
    assert store.set_enabled("sec", True, now_ms=T0 + 5 * S + 200)
    assert during == []
    assert beat.tick(T0 + 5 * S + 300).fired == []
    assert beat.tick(T0 + 6 * S).fired == [("sec", T0 + 6 * S)]


def test_entries_added_and_removed_at_run_time(rec: Recorder) -> None:
    beat = rec.beat()
    assert beat.tick(T0).fired == []
    put(rec, "late", every=1, args=[1], kwargs={"k": "v"})
    assert beat.tick(T0 + S).fired == [("late", T0 + S)]
    assert (rec.sent[0].args, rec.sent[0].kwargs) == ((1,), {"k": "v"})
    assert ScheduleStore(rec.app.broker).remove("late")
    assert beat.tick(T0 + 2 * S).fired == []
    assert rec.app.broker.peek(LAST_PREFIX + "late") is None


def test_publish_failure_releases_the_tick_for_another_beat(rec: Recorder, twin: Recorder) -> None:
    put(rec, "sec", every=1)
    a, b = rec.beat(beat_id="a"), twin.beat(beat_id="b")
    a.tick(T0)
    rec.app.publish_retries = 0
    rec.fail_next = 1
    assert a.tick(T0 + S).fired == []  # claimed, publish failed, released
    assert b.tick(T0 + S + 100).fired == [("sec", T0 + S)]
    assert a.tick(T0 + S + 200).fired == []
    assert ids(rec, twin) == sorted([task_id_for("sec", T0), task_id_for("sec", T0 + S)])


def test_a_publish_that_timed_out_is_taken_as_published(rec: Recorder, twin: Recorder) -> None:
    """A timeout may hide a publish that went in (the broker answered too late): the tick
    was released and another beat published it again, so it ran twice."""
    from stem.errors import BrokerTimeoutError

    put(rec, "sec", every=1)
    a, b = rec.beat(beat_id="a"), twin.beat(beat_id="b")
    a.tick(T0)
    original = rec.app.publish

    def went_in_then_timed_out(envelopes: Any) -> None:
        original(envelopes)
        raise BrokerTimeoutError("no answer within 5s (test)")

    rec.app.publish = went_in_then_timed_out  # type: ignore[method-assign]
    assert a.tick(T0 + S).fired == [("sec", T0 + S)]
    rec.app.publish = original  # type: ignore[method-assign]
    assert b.tick(T0 + S + 100).fired == []
    assert ids(rec, twin) == sorted([task_id_for("sec", T0), task_id_for("sec", T0 + S)])


def test_a_beat_that_dies_before_publishing_leaves_the_tick_to_another(
    rec: Recorder, twin: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed between claiming a tick and publishing it, a beat used to hold the tick for
    ten minutes or more, so no beat ever enqueued it. Its claim to publish is short now."""
    import time

    from stem.beat import scheduler as scheduler_mod
    from stem.beat.store import FIRING_PREFIX

    monkeypatch.setattr(scheduler_mod, "FIRING_TTL_S", 0.3)
    put(rec, "sec", every=1)
    a, b = rec.beat(beat_id="a"), twin.beat(beat_id="b")
    a.tick(T0)
    # "a" claims the next tick and dies before publishing (its claim, as _fire makes it).
    dead = rec.app.broker.claim(f"{FIRING_PREFIX}sec:{T0 + S}", "a/dead", 0.3)
    assert dead == "a/dead"
    assert b.tick(T0 + S + 100).fired == []  # being published, as far as b can tell
    time.sleep(0.4)
    assert b.tick(T0 + S + 600).fired == [("sec", T0 + S)]
    # A pass that read beat:last before b recorded the tick does not fire it again.
    entry = ScheduleStore(rec.app.broker).load().entries["sec"]
    assert a._fire(entry, T0 + S, T0 + S + 700) is False
    assert ids(rec, twin) == sorted([task_id_for("sec", T0), task_id_for("sec", T0 + S)])


@pytest.mark.parametrize("catch_up", [True, False])
def test_a_tick_whose_claimant_died_fires_even_after_later_ticks(
    rec: Recorder, twin: Recorder, catch_up: bool
) -> None:
    """The dead beat's claim lapses only after later ticks went out and moved the last
    tick past it: the others must still publish it (with catch_up; without, a later
    tick already stood for it)."""
    from stem.beat.store import FIRING_PREFIX

    put(rec, "ten", every=10, catch_up=catch_up)
    b = twin.beat(beat_id="b")
    b.tick(T0)
    held = f"{FIRING_PREFIX}ten:{T0 + 10 * S}"
    assert rec.app.broker.claim(held, "a/dead", 600.0) == "a/dead"  # claimed, then died
    assert b.tick(T0 + 10 * S + 100).fired == []
    assert b.tick(T0 + 20 * S + 100).fired == [("ten", T0 + 20 * S)]
    assert rec.app.broker.release(held, "a/dead")  # its claim lapses
    if catch_up:  # a broker blip on the pass that retries it does not forget it
        peek = twin.app.broker.peek

        def failing_peek(key: str) -> str | None:
            raise BrokerConnectionError("broker down (test)")

        twin.app.broker.peek = failing_peek  # type: ignore[method-assign]
        with pytest.raises(BrokerConnectionError):
            b.tick(T0 + 20 * S + 150)
        twin.app.broker.peek = peek  # type: ignore[method-assign]
    late = b.tick(T0 + 20 * S + 200).fired
    assert late == ([("ten", T0 + 10 * S)] if catch_up else [])
    assert b.tick(T0 + 20 * S + 300).fired == []


def test_a_tick_published_but_not_recorded_is_recorded_not_published_again(
    rec: Recorder, twin: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker fails right after a publish, on the call that records the tick: the
    beat records it on its next pass, while its claim to publish keeps the others off."""
    put(rec, "sec", every=1)
    a, b = rec.beat(beat_id="a"), twin.beat(beat_id="b")
    a.tick(T0)
    broker = rec.app.broker
    real_claim = broker.claim
    fail = [True]

    def claim(key: str, value: str, ttl_s: float) -> str:
        if key.startswith("beat:tick:") and fail:
            fail.clear()
            raise BrokerConnectionError("broker down (test)")
        return real_claim(key, value, ttl_s)

    monkeypatch.setattr(broker, "claim", claim)
    with pytest.raises(BrokerConnectionError):
        a.tick(T0 + S)  # published, then the record failed
    assert b.tick(T0 + S + 100).fired == []  # a's claim to publish holds
    assert a.tick(T0 + S + 200).fired == []  # recorded now, not published again
    assert ScheduleStore(broker).last("sec") == T0 + S
    assert ids(rec, twin) == sorted([task_id_for("sec", T0), task_id_for("sec", T0 + S)])


def test_entry_options_reach_the_envelope(rec: Recorder) -> None:
    put(rec, "opts", every=20, queue="low", priority=7, expires=30, jitter=20)
    before = now_ms()
    rec.beat().tick(T0)
    [env] = rec.sent
    delay = jitter_ms("opts", T0, 20)
    assert (env.task, env.queue, env.priority) == ("job", "low", 7)
    assert env.headers["beat_entry"] == "opts" and env.headers["beat_tick_ms"] == T0
    if delay:
        assert env.not_before_ms is not None
        assert before + delay <= env.not_before_ms <= now_ms() + delay
    assert env.expires_ms is not None
    assert before + delay + 30 * S <= env.expires_ms <= now_ms() + delay + 30 * S


def test_a_tick_fired_late_counts_its_expiry_from_when_it_was_due(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """expires_s counted from publishing: a tick fired after downtime (or caught up) ran
    however late, a nightly 02:30 run with expires_s: 3600 at 14:00. Now one whose
    expiry has passed is not sent, and counts as handled."""
    put(rec, "slow", every=20, expires=3)
    beat = rec.beat()
    beat.tick(T0)
    # Down across the next tick; back 2 s after it: sent, with 1 s left to start.
    before = now_ms()
    assert beat.tick(T0 + 20 * S + 2 * S).fired == [("slow", T0 + 20 * S)]
    env = rec.sent[-1]
    assert env.expires_ms is not None and env.expires_ms <= now_ms() + 1 * S
    assert env.expires_ms >= before + 1 * S
    # Back 10 s after the next one: past its expiry, skipped, and not tried again.
    with caplog.at_level(logging.WARNING, logger="stem.beat"):
        assert beat.tick(T0 + 40 * S + 10 * S).fired == []
    assert "expired (expires_s=3)" in caplog.text
    assert beat.tick(T0 + 40 * S + 11 * S).fired == []
    assert ScheduleStore(rec.app.broker).last("slow") == T0 + 40 * S
    assert len(rec.sent) == 2


def test_a_broken_stored_entry_is_skipped_and_logged(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    rec.app.broker.swap(
        ENTRY_PREFIX + "bad", None, json.dumps({"task": "x", "every": "often"}), None
    )
    rec.app.broker.swap(ENTRY_PREFIX + "junk", None, "{not json", None)
    put(rec, "good", every=1)
    beat = rec.beat()
    with caplog.at_level(logging.ERROR, logger="stem.beat"):
        assert beat.tick(T0).fired == [("good", T0)]
        beat.tick(T0 + S)
    assert caplog.text.count("skipping schedule 'bad'") == 1
    assert "skipping schedule 'junk'" in caplog.text
    assert set(ScheduleStore(rec.app.broker).load().broken) == {"bad", "junk"}


# -- signed entries -----------------------------------------------------------------------------

RING = Keyring.build("hmac-sha256", {"v1": b"b" * 32})


def test_with_signing_required_only_sealed_entries_fire(url: str) -> None:
    """Beat signs what it enqueues, so an entry written by someone who can only write to
    the broker's store must not load: unsigned, altered, or moved under another name."""
    rec = Recorder(url, RING)
    try:
        broker = rec.app.broker
        store = ScheduleStore(broker, RING)
        store.put(parse_entry("good", {"task": "job", "every": 1}, origin="cli"))
        sealed = broker.peek(ENTRY_PREFIX + "good")
        assert sealed is not None and sealed.startswith("stem-sealed-v1\n")
        plain = json.dumps({"task": "transfer", "every": 1, "args": ["evil"]})
        broker.swap(ENTRY_PREFIX + "unsigned", None, plain, None)
        broker.swap(ENTRY_PREFIX + "moved", None, sealed, None)
        tampered = sealed.replace('"every_s":1.0', '"every_s":2.0')
        assert tampered != sealed
        broker.swap(ENTRY_PREFIX + "tampered", None, tampered, None)

        assert rec.beat().tick(T0).fired == [("good", T0)]
        assert [e.task for e in rec.sent] == ["job"]
        broken = store.load().broken
        assert sorted(broken) == ["moved", "tampered", "unsigned"]
        assert "signature-missing" in broken["unsigned"]
        assert "signature-invalid" in broken["moved"]
        assert "signature-invalid" in broken["tampered"]
        # An operator's edit keeps the entry sealed.
        assert store.set_enabled("good", False)
        entry = store.get("good")
        assert entry is not None and not entry.enabled
        # A store without the keyring reads nothing it can trust: sealed entries are broken.
        assert sorted(ScheduleStore(broker).load().entries) == ["unsigned"]
    finally:
        rec.app.close()


def test_a_verify_only_keyring_cannot_write_entries_that_beat_would_refuse(url: str) -> None:
    seed = b"e" * 32
    signer = Keyring.build("ed25519", {"v1": seed})
    public = signer.verifiers["v1"]._key.public_bytes_raw()  # type: ignore[attr-defined]
    verify_only = Keyring.build("ed25519", {}, public_keys={"v1": public})
    rec = Recorder(url, verify_only)
    try:
        entry = parse_entry("x", {"task": "job", "every": 1}, origin="cli")
        with pytest.raises(ConfigError, match="needs a signing key"):
            ScheduleStore(rec.app.broker, verify_only).put(entry)
        ScheduleStore(rec.app.broker, signer).put(entry)  # the beat host's key
        assert sorted(ScheduleStore(rec.app.broker, verify_only).load().entries) == ["x"]
    finally:
        rec.app.close()


# -- code and config entries --------------------------------------------------------------------


def test_sync_keeps_an_operator_disabled_flag_and_prunes_only_on_request(rec: Recorder) -> None:
    add_schedule(rec.app, "code-job", "job", every=1)
    put(rec, "cli-job", every=1)
    beat = rec.beat(specs={"cfg-job": {"task": "job", "every_s": 2}})
    beat.sync()
    store = ScheduleStore(rec.app.broker)
    assert {n: e.origin for n, e in store.load().entries.items()} == {
        "cfg-job": "config",
        "cli-job": "cli",
        "code-job": "code",
    }
    store.set_enabled("code-job", False)
    add_schedule(rec.app, "code-job", "job", every=5)  # redeployed with a new interval
    beat.sync()
    entry = store.get("code-job")
    assert entry is not None and not entry.enabled and entry.to_spec()["every_s"] == 5.0
    del rec.app.schedules["code-job"]
    beat.sync()
    assert store.get("code-job") is not None  # no pruning by default
    rec.beat(specs={}, prune=True).sync()
    assert sorted(store.load().entries) == ["cli-job"]


def test_a_schedule_taken_out_of_config_or_code_is_named_at_start(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """Set to null in a later config file (as config/conf.d/README says to), or deleted:
    the stored entry kept firing, and nothing said so. Beat names it now (removing it
    itself would remove the entries of other apps' beats sharing the broker)."""
    put(rec, "cli-job", every=1)
    add_schedule(rec.app, "code-job", "job", every=1)
    specs = {"cfg-job": {"task": "job", "every_s": 1}, "other": {"task": "job", "every_s": 1}}
    specs["paused"] = {"task": "job", "every_s": 1}
    rec.beat(specs=specs).sync()
    ScheduleStore(rec.app.broker).set_enabled("paused", False)  # does not fire: not named
    del rec.app.schedules["code-job"]
    with caplog.at_level(logging.WARNING, logger="stem.beat"):
        rec.beat(specs={"other": specs["other"]}).sync()
    assert "do not define keep firing: cfg-job, code-job (remove them" in caplog.text
    store = ScheduleStore(rec.app.broker)
    assert sorted(store.load().entries) == ["cfg-job", "cli-job", "code-job", "other", "paused"]


def test_config_settings_become_specs() -> None:
    from stem.config import ScheduleSettings

    settings = type("S", (), {})()
    settings.beat = type("B", (), {})()  # type: ignore[attr-defined]
    settings.beat.schedules = {  # type: ignore[attr-defined]
        "nightly": ScheduleSettings(
            name="nightly", task="job", cron="0 3 * * *", args=(1,), expires_s=60.0
        ),
        "often": ScheduleSettings(name="often", task="job", every_s=5.0, queue="q"),
    }
    specs = config_specs(settings)
    assert specs["nightly"] == {
        "task": "job",
        "cron": "0 3 * * *",
        "args": [1],
        "kwargs": {},
        "expires_s": 60.0,
    }
    assert parse_entry("often", specs["often"]).queue == "q"
    assert config_specs(None) == {}


def test_a_bad_code_spec_stops_sync_with_a_config_error(rec: Recorder) -> None:
    rec.app.schedules["broken"] = {"task": "job", "every": "sometimes"}
    with pytest.raises(ConfigError, match="schedule 'broken'"):
        rec.beat().sync()


# -- the loop -----------------------------------------------------------------------------------


def test_run_stores_the_schedules_again_when_the_broker_lost_them(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A Redis restarted without persistence (or a failover) loses what beat stored:
    its ticks stopped for good, silently, until beat was restarted."""
    add_schedule(rec.app, "quick", "job", every=0.1)
    add_schedule(rec.app, "once", "job", at="2020-01-01T00:00:00Z")  # fired at first sight
    beat = rec.beat(tick_s=0.05)
    thread = threading.Thread(target=beat.run)
    thread.start()
    try:

        def fired_within(seconds: float) -> bool:
            seen, deadline = len(rec.sent), now_ms() + seconds * 1000
            while len(rec.sent) == seen and now_ms() < deadline:
                threading.Event().wait(0.02)
            return len(rec.sent) > seen

        assert fired_within(5)
        with caplog.at_level(logging.WARNING, logger="stem.beat"):
            for key in rec.app.broker.scan("beat:"):  # the broker loses every key
                rec.app.broker.release(key)
            assert fired_within(5)
        assert "storing the code and config ones again" in caplog.text
    finally:
        beat.stop()
        thread.join(5)
    assert not thread.is_alive()
    once = [e for e in rec.sent if e.headers["beat_entry"] == "once"]
    assert len(once) == 1  # a one-off runs once, loss or not


def test_a_resync_keeps_one_offs_fired_and_lets_a_due_tick_fire(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the broker lost the schedules: a one-off fired before the loss does not run
    again, even if storing its last tick fails first time (then nothing is marked synced,
    so no beat sees it without it); a recurring tick due just after the loss fires."""
    add_schedule(rec.app, "once", "job", at="2023-11-14T22:13:00Z")  # T0 - 20 s
    add_schedule(rec.app, "ten", "job", every=10)
    beat = rec.beat()
    beat.sync()
    assert sorted(n for n, _ in beat.tick(T0).fired) == ["once", "ten"]
    for key in rec.app.broker.scan("beat:"):
        rec.app.broker.release(key)
    real = beat.store.advance_last

    def failing(name: str, tick_ms: int) -> bool:
        monkeypatch.setattr(beat.store, "advance_last", real)
        raise BrokerConnectionError("broker down (test)")

    monkeypatch.setattr(beat.store, "advance_last", failing)
    with pytest.raises(BrokerConnectionError):
        beat.resync(intact_ms=T0)
    assert not beat.store.synced()
    beat.resync(intact_ms=T0)
    assert beat.store.synced()
    assert beat.tick(T0 + 10 * S + 300).fired == [("ten", T0 + 10 * S)]
    assert [e.headers["beat_entry"] for e in rec.sent].count("once") == 1


def test_run_fires_on_the_real_clock_and_stops(rec: Recorder) -> None:
    add_schedule(rec.app, "quick", "job", every=0.1)
    beat = rec.beat(tick_s=0.05)
    thread = threading.Thread(target=beat.run)
    thread.start()
    deadline = now_ms() + 5000
    while len(rec.sent) < 3 and now_ms() < deadline:
        threading.Event().wait(0.05)
    beat.stop()
    thread.join(5)
    assert not thread.is_alive()
    ticks = [e.headers["beat_tick_ms"] for e in rec.sent]
    assert len(ticks) >= 3
    assert all(t % 100 == 0 for t in ticks)
    assert len(set(ticks)) == len(ticks)


def test_sync_keeps_a_disabled_flag_it_cannot_verify(url: str) -> None:
    """Entries stored before signing was on, or sealed with a key since retired, do not
    verify; a "disabled" on them is still honoured when beat re-writes the entry."""
    rec = Recorder(url, RING)
    try:
        broker = rec.app.broker
        ScheduleStore(broker).put(parse_entry("old", {"task": "job", "every": 1}, origin="code"))
        ScheduleStore(broker).set_enabled("old", False)  # unsigned, before the upgrade
        retired = Keyring.build("hmac-sha256", {"v0": b"r" * 32})
        sealed_old = ScheduleStore(broker, retired)
        sealed_old.put(parse_entry("rotated", {"task": "job", "every": 1}, origin="code"))
        sealed_old.set_enabled("rotated", False)
        for name in ("old", "rotated", "fresh"):
            add_schedule(rec.app, name, "job", every=1)
        rec.beat().sync()
        entries = ScheduleStore(broker, RING).load().entries
        assert {n: e.enabled for n, e in entries.items()} == {
            "fresh": True,
            "old": False,
            "rotated": False,
        }
    finally:
        rec.app.close()


def test_reseal_moves_entries_to_the_active_key(url: str) -> None:
    v1 = Keyring.build("hmac-sha256", {"v1": b"1" * 32})
    both = Keyring.build("hmac-sha256", {"v1": b"1" * 32, "v2": b"2" * 32}, active_key="v2")
    v2 = Keyring.build("hmac-sha256", {"v2": b"2" * 32})
    rec = Recorder(url, v1)
    try:
        broker = rec.app.broker
        ScheduleStore(broker, v1).put(parse_entry("a", {"task": "job", "every": 1}, origin="cli"))
        plain = json.dumps({"task": "job", "every_s": 2.0, "origin": "cli"})
        broker.swap(ENTRY_PREFIX + "legacy", None, plain, None)
        broker.swap(ENTRY_PREFIX + "forged", None, "stem-sealed-v1\n{}\n" + plain, None)
        done, skipped = ScheduleStore(broker, both).reseal()
        assert done == ["a"] and sorted(skipped) == ["forged", "legacy"]
        assert "signature-missing" in skipped["legacy"]
        assert sorted(ScheduleStore(broker, v2).load().entries) == ["a"]  # v1 retired: fine
        done, skipped = ScheduleStore(broker, v2).reseal(unsigned=True)
        assert done == ["a", "legacy"] and sorted(skipped) == ["forged"]  # forged stays out
        assert sorted(ScheduleStore(broker, v2).load().entries) == ["a", "legacy"]
        with pytest.raises(ConfigError, match="needs a signing key"):
            ScheduleStore(broker).reseal()
    finally:
        rec.app.close()


def test_cli_replaces_removes_and_reseals_entries_that_do_not_verify(tmp_path: Path) -> None:
    import base64

    from typer.testing import CliRunner

    from stem.cli.main import app as cli

    db = f"sqlite:///{tmp_path / 'beat.db'}"
    env = {"STEM_SIGNING_KEYS": "v1:" + base64.b64encode(b"k" * 32).decode()}
    plain = json.dumps({"task": "job", "every_s": 5.0, "origin": "cli"})
    app = Stem("beat-cli", broker=db, backend=db)
    for name in ("report", "stale", "legacy"):
        app.broker.swap(ENTRY_PREFIX + name, None, plain, None)  # written before signing
    app.close()
    runner = CliRunner()

    def stem(*args: str) -> Any:
        return runner.invoke(cli, ["--broker", db, "schedule", *args], env=env)

    replaced = stem("add", "report", "--task", "job", "--every", "10", "--replace")
    assert replaced.exit_code == 0 and "replaced report" in replaced.stdout, replaced.output
    removed = stem("remove", "stale")
    assert removed.exit_code == 0 and "removed stale" in removed.stdout, removed.output
    refused = stem("reseal")
    assert refused.exit_code == 1 and "skipped legacy" in refused.stderr
    sealed = stem("reseal", "--unsigned")
    assert sealed.exit_code == 0 and "sealed legacy" in sealed.stdout, sealed.output
    listing = json.loads(stem("list", "--json").stdout)
    assert {r["name"]: "error" in r for r in listing} == {"legacy": False, "report": False}


@pytest.mark.parametrize("tick_s", [0.0, -1.0, float("nan"), float("inf"), 1e12])
def test_a_tick_that_is_not_a_positive_finite_number_is_refused(
    rec: Recorder, tick_s: float
) -> None:
    """--tick nan, inf and 1e12 went past the check (a traceback, exit 1)."""
    with pytest.raises(ConfigError, match="beat tick must be a number of seconds above 0"):
        rec.beat(tick_s=tick_s)


def test_a_beat_that_cannot_sign_what_it_sends_does_not_start() -> None:
    """With public keys only it logged an error each pass, for good, and sent nothing."""
    from tests.fixtures.keyrings import verify_only_pair

    producer, verify_only = verify_only_pair("vo-beat")
    try:
        with pytest.raises(ConfigError, match="beat sends tasks, and this keyring holds public"):
            Beat(verify_only)
        Beat(producer)  # holds the private key
    finally:
        producer.close()
        verify_only.close()


def test_an_entry_for_a_task_the_app_does_not_register_is_warned_about(
    rec: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    """A typo in a task name: beat enqueued it every tick and workers dead-lettered each
    run, with no word at start. (An app that registers no task sends by name: no warning.)"""

    @rec.app.task(name="job")
    def job() -> None: ...

    put(rec, "typo", task="jbo", every=1)
    with caplog.at_level(logging.WARNING, logger="stem.beat"):
        rec.beat(specs={"fine": {"task": "job", "every": 1}}).sync()
    warned = [r.getMessage() for r in caplog.records if r.name == "stem.beat"]
    assert warned == [
        "schedule 'typo': task 'jbo' is not registered in this app; workers without it "
        "dead-letter every run (unknown-task)"
    ]
