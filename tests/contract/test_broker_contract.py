"""The broker contract (stem/brokers/base.py), run against every broker.

Leases are short (0.3-0.5 s) so the suite stays quick; waits that depend on time passing
use generous upper bounds so a loaded machine does not make them flaky.
"""

from __future__ import annotations

import threading
import time

from stem.brokers.base import Broker, DeadLetter, Delivery, Message, QueueStats
from stem.envelope import now_ms
from tests.contract.conftest import Names

SHORT_LEASE_S = 0.3
LONG_LEASE_S = 30.0


def msg(queue: str, mid: str, *, priority: int = 0, not_before_ms: int | None = None) -> Message:
    return Message(mid, queue, mid.encode(), priority=priority, not_before_ms=not_before_ms)


def depth(broker: Broker, queue: str) -> tuple[int, int, int, int]:
    [s] = broker.stats([queue])
    assert s.queue == queue
    return (s.ready, s.delayed, s.reserved, s.dead)


def reserve_one(broker: Broker, queue: str, timeout_s: float = 5.0) -> Delivery:
    """Poll until one delivery comes (for waits whose length the test does not assert)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = broker.reserve([queue], 1, LONG_LEASE_S, wait_s=0.1)
        if got:
            assert len(got) == 1
            return got[0]
    raise AssertionError(f"nothing became reservable in {queue} within {timeout_s}s")


def lapsed_twice(broker: Broker, queue: str, mid: str = "m") -> Delivery:
    """Publish one message, let a first lease lapse, return the second delivery."""
    broker.publish([msg(queue, mid)])
    [first] = broker.reserve([queue], 1, SHORT_LEASE_S)
    second = reserve_one(broker, queue)
    assert second.message_id == mid and second.delivery_count == 2
    assert first.delivery_count == 1
    return second


# -- basics --------------------------------------------------------------------------------


def test_is_a_broker_that_answers(broker: Broker) -> None:
    assert isinstance(broker, Broker)
    assert isinstance(broker.url, str) and broker.url
    broker.ping()


def test_publish_reserve_ack(broker: Broker, q: str) -> None:
    body = b"\x00\xff binary \x80 body"
    broker.publish([Message(id="m1", queue=q, body=body)])
    before = now_ms()
    [d] = broker.reserve([q], 10, LONG_LEASE_S)
    assert (d.message_id, d.queue, d.body, d.delivery_count) == ("m1", q, body, 1)
    assert before + 29_000 <= d.lease_expires_ms <= now_ms() + 31_000
    assert broker.reserve([q], 10, LONG_LEASE_S) == []
    assert depth(broker, q) == (0, 0, 1, 0)
    assert broker.ack([d]) == 1
    assert broker.ack([d]) == 0
    assert depth(broker, q) == (0, 0, 0, 0)
    assert broker.reserve([q], 10, LONG_LEASE_S) == []


def test_ack_counts_only_held_leases(broker: Broker, q: str) -> None:
    broker.publish([msg(q, f"m{i}") for i in range(3)])
    ds = broker.reserve([q], 3, LONG_LEASE_S)
    assert len(ds) == 3
    assert broker.ack(ds[:1]) == 1
    assert broker.ack(ds) == 2
    assert broker.ack([]) == 0


def test_reserve_respects_max_n(broker: Broker, q: str) -> None:
    broker.publish([msg(q, f"m{i}") for i in range(5)])
    assert broker.reserve([q], 0, LONG_LEASE_S) == []
    first = broker.reserve([q], 2, LONG_LEASE_S)
    assert len(first) == 2
    rest = broker.reserve([q], 10, LONG_LEASE_S)
    assert len(rest) == 3
    assert sorted(d.message_id for d in first + rest) == [f"m{i}" for i in range(5)]
    assert broker.reserve([q], 10, LONG_LEASE_S) == []
    assert broker.ack(first + rest) == 5


def test_nothing_is_reservable_twice_while_leased(
    broker: Broker, other_broker: Broker, q: str
) -> None:
    broker.publish([msg(q, f"m{i}") for i in range(3)])
    held = broker.reserve([q], 3, LONG_LEASE_S)
    assert len(held) == 3
    assert other_broker.reserve([q], 10, LONG_LEASE_S) == []
    assert broker.reserve([q], 10, LONG_LEASE_S, wait_s=0.2) == []
    assert other_broker.ack(held) == 3  # a receipt settles through any instance


def test_concurrent_consumers_share_messages_exactly_once(
    broker: Broker, other_broker: Broker, q: str
) -> None:
    expected = [f"m{i:03}" for i in range(300)]
    broker.publish([msg(q, m) for m in expected])
    seen: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def consume(b: Broker) -> None:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                got = b.reserve([q], 7, LONG_LEASE_S, wait_s=0.05)
                if not got:
                    with lock:
                        if len(seen) >= len(expected):
                            return
                    continue
                assert all(d.delivery_count == 1 for d in got)
                with lock:
                    seen.extend(d.message_id for d in got)
                assert b.ack(got) == len(got)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=consume, args=(b,)) for b in (broker, broker, other_broker)]
    threads.append(threading.Thread(target=consume, args=(other_broker,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(seen) == expected
    assert depth(broker, q) == (0, 0, 0, 0)


# -- leases ----------------------------------------------------------------------------------


def test_lapsed_lease_is_redelivered_and_old_receipt_is_void(broker: Broker, q: str) -> None:
    broker.publish([msg(q, "m")])
    started = time.monotonic()
    [old] = broker.reserve([q], 1, SHORT_LEASE_S)
    assert broker.reserve([q], 1, LONG_LEASE_S) == []  # still leased
    new = reserve_one(broker, q)
    assert time.monotonic() - started >= SHORT_LEASE_S - 0.05
    assert (new.message_id, new.delivery_count, new.body) == ("m", 2, b"m")
    assert new.receipt != old.receipt
    assert broker.ack([old]) == 0
    assert broker.extend([old], LONG_LEASE_S) == [False]
    assert broker.nack(old) is False
    assert broker.nack(old, body=b"other") is False
    assert broker.dead_letter(old, "stale", "must not move it") is False
    assert depth(broker, q) == (0, 0, 1, 0)  # the new lease is untouched
    assert broker.extend([new], LONG_LEASE_S) == [True]
    assert broker.ack([new]) == 1
    assert broker.dlq_list(queue=q) == []


def test_a_lapsed_lease_nobody_took_can_still_be_renewed(broker: Broker, q: str) -> None:
    """A worker whose renewal came late (the server paused past the lease) still holds
    the message if nobody reserved it meanwhile: renewing it spares a second run."""
    broker.publish([msg(q, "m")])
    [d] = broker.reserve([q], 1, 0.2)
    time.sleep(0.4)
    assert broker.extend([d], LONG_LEASE_S) == [True]
    assert broker.reserve([q], 1, LONG_LEASE_S) == []  # still leased to the first
    assert broker.ack([d]) == 1


def test_extend_keeps_a_message_leased_past_its_first_lease(broker: Broker, q: str) -> None:
    broker.publish([msg(q, "m"), msg(q, "gone")])
    started = time.monotonic()
    ds = {d.message_id: d for d in broker.reserve([q], 2, 0.5)}
    assert broker.ack([ds["gone"]]) == 1
    assert broker.extend([ds["gone"], ds["m"]], 2.0) == [False, True]
    time.sleep(max(0.0, started + 0.9 - time.monotonic()))
    assert broker.reserve([q], 1, LONG_LEASE_S) == []
    assert depth(broker, q) == (0, 0, 1, 0)
    assert broker.ack([ds["m"]]) == 1


# -- nack ------------------------------------------------------------------------------------


def test_nack_without_delay_makes_it_available_again(broker: Broker, q: str) -> None:
    broker.publish([msg(q, "m")])
    [d] = broker.reserve([q], 1, LONG_LEASE_S)
    assert broker.nack(d) is True
    [again] = broker.reserve([q], 1, LONG_LEASE_S)
    assert (again.message_id, again.delivery_count, again.body) == ("m", 1, b"m")
    assert broker.ack([d]) == 0  # the nack ended that lease
    assert broker.nack(d) is False
    assert broker.ack([again]) == 1


def test_nack_with_delay_holds_it_back(broker: Broker, q: str) -> None:
    broker.publish([msg(q, "m")])
    [d] = broker.reserve([q], 1, LONG_LEASE_S)
    started = time.monotonic()
    assert broker.nack(d, delay_s=0.5) is True
    assert broker.reserve([q], 1, LONG_LEASE_S) == []
    assert depth(broker, q) == (0, 1, 0, 0)
    again = reserve_one(broker, q)
    assert time.monotonic() - started >= 0.45
    assert (again.message_id, again.delivery_count) == ("m", 1)
    assert broker.ack([again]) == 1


def test_nack_restores_the_delivery_count(broker: Broker, q: str) -> None:
    second = lapsed_twice(broker, q)
    assert broker.nack(second) is True
    third = reserve_one(broker, q)
    assert third.delivery_count == 2  # back to 1, then this delivery
    assert broker.ack([third]) == 1


def test_nack_with_a_new_body_restarts_the_count(broker: Broker, q: str) -> None:
    second = lapsed_twice(broker, q)
    assert broker.nack(second, body=b"retry body") is True
    third = reserve_one(broker, q)
    assert (third.message_id, third.body, third.delivery_count) == ("m", b"retry body", 1)
    assert broker.ack([third]) == 1


# -- delays, priority, queues -------------------------------------------------------------


def test_delayed_publish_waits_until_not_before(broker: Broker, q: str) -> None:
    not_before = now_ms() + 600
    broker.publish([msg(q, "later", not_before_ms=not_before)])
    broker.publish([msg(q, "overdue", not_before_ms=now_ms() - 5_000)])
    [d] = broker.reserve([q], 10, LONG_LEASE_S)
    assert d.message_id == "overdue"
    assert broker.ack([d]) == 1
    assert depth(broker, q) == (0, 1, 0, 0)
    got = broker.reserve([q], 10, LONG_LEASE_S, wait_s=5.0)
    assert [g.message_id for g in got] == ["later"]
    assert now_ms() >= not_before
    assert broker.ack(got) == 1


def test_priority_first_then_fifo_within_a_priority(broker: Broker, q: str) -> None:
    for mid, prio in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", 9), ("f", 0), ("g", 1)]:
        broker.publish([msg(q, mid, priority=prio)])
    order = []
    for _ in range(7):
        [d] = broker.reserve([q], 1, LONG_LEASE_S)
        order.append(d.message_id)
        assert broker.ack([d]) == 1
    assert order == ["e", "b", "d", "g", "a", "c", "f"]


def test_a_batch_is_delivered_in_publish_order(broker: Broker, q: str) -> None:
    ids = [f"m{i}" for i in (3, 1, 4, 15, 9, 2, 6, 5, 35, 8)]
    broker.publish([msg(q, m) for m in ids])
    order = []
    for _ in ids:
        [d] = broker.reserve([q], 1, LONG_LEASE_S)
        order.append(d.message_id)
    assert order == ids


def test_queues_are_separate(broker: Broker, names: Names) -> None:
    q1, q2, q3 = names.queue("one"), names.queue("two"), names.queue("none")
    broker.publish([msg(q1, "a"), msg(q2, "b"), msg(q1, "c")])
    [b] = broker.reserve([q2], 10, LONG_LEASE_S)
    assert (b.message_id, b.queue) == ("b", q2)
    assert broker.reserve([q2, q3], 10, LONG_LEASE_S) == []
    broker.publish([msg(q2, "d")])
    got = broker.reserve([q1, q2], 10, LONG_LEASE_S)
    assert sorted((d.message_id, d.queue) for d in got) == [("a", q1), ("c", q1), ("d", q2)]
    assert depth(broker, q1) == (0, 0, 2, 0)
    assert depth(broker, q2) == (0, 0, 2, 0)
    assert broker.ack([*got, b]) == 4


# -- dead letters ----------------------------------------------------------------------------


def test_dead_letter_get_and_replay(broker: Broker, q: str) -> None:
    second = lapsed_twice(broker, q, "m")
    before = now_ms()
    assert broker.dead_letter(second, "boom", "ValueError: bad input") is True
    assert broker.reserve([q], 1, LONG_LEASE_S) == []
    assert depth(broker, q) == (0, 0, 0, 1)
    [dl] = broker.dlq_list(queue=q)
    assert isinstance(dl, DeadLetter)
    assert (dl.message_id, dl.queue, dl.body) == ("m", q, b"m")
    assert (dl.reason, dl.detail, dl.delivery_count) == ("boom", "ValueError: bad input", 2)
    assert before - 1_000 <= dl.dead_ms <= now_ms() + 1_000
    assert broker.dlq_get(dl.id) == dl
    assert broker.dlq_get("no-such-dead-letter") is None
    assert broker.ack([second]) == 0
    assert broker.nack(second) is False
    assert broker.dead_letter(second, "again") is False

    assert broker.dlq_replay(ids=[dl.id]) == 1
    assert broker.dlq_list(queue=q) == []
    assert broker.dlq_get(dl.id) is None
    [back] = broker.reserve([q], 1, LONG_LEASE_S)
    assert (back.message_id, back.queue, back.body, back.delivery_count) == ("m", q, b"m", 1)
    assert broker.ack([back]) == 1


def test_dead_letter_listing_selection_and_purge(broker: Broker, names: Names) -> None:
    q1, q2 = names.queue("one"), names.queue("two")
    broker.publish([msg(q1, "m1"), msg(q1, "m2"), msg(q1, "m3"), msg(q2, "n1")])
    for queue, mid in [(q1, "m1"), (q1, "m2"), (q1, "m3"), (q2, "n1")]:
        [d] = broker.reserve([queue], 1, LONG_LEASE_S)
        assert d.message_id == mid
        assert broker.dead_letter(d, f"reason-{mid}") is True
    assert [d.message_id for d in broker.dlq_list(queue=q1)] == ["m1", "m2", "m3"]
    assert [d.message_id for d in broker.dlq_list(queue=q1, limit=2)] == ["m1", "m2"]
    everything = [d.message_id for d in broker.dlq_list(limit=100_000) if d.queue in (q1, q2)]
    assert everything == ["m1", "m2", "m3", "n1"]
    by_id = {d.message_id: d.id for d in broker.dlq_list(queue=q1)}

    assert broker.dlq_purge(ids=[]) == 0
    assert broker.dlq_replay(ids=["no-such-dead-letter"]) == 0
    assert broker.dlq_replay(ids=[by_id["m1"]], queue=q2) == 0  # both filters apply
    assert broker.dlq_purge(ids=[by_id["m2"]]) == 1
    assert [d.message_id for d in broker.dlq_list(queue=q1)] == ["m1", "m3"]
    assert broker.dlq_replay(queue=q2) == 1
    assert broker.dlq_list(queue=q2) == []
    assert [d.message_id for d in broker.reserve([q2], 10, LONG_LEASE_S)] == ["n1"]
    assert broker.dlq_purge(queue=q1) == 2
    assert broker.dlq_list(queue=q1) == []
    assert depth(broker, q1) == (0, 0, 0, 0)


def test_dead_letter_ids_and_limits_out_of_range_find_nothing(broker: Broker, q: str) -> None:
    """What an operator types (`stem dlq show ID`, `--limit N`) reaches the broker as is."""
    broker.publish([msg(q, "m1")])
    [d] = broker.reserve([q], 1, LONG_LEASE_S)
    assert broker.dead_letter(d, "boom") is True
    for bad in ("99999999999999999999", "99999999999999999999-0", "\u00b2", "-1", ""):
        assert broker.dlq_get(bad) is None
        assert broker.dlq_replay(ids=[bad]) == 0
        assert broker.dlq_purge(ids=[bad]) == 0
    assert [x.message_id for x in broker.dlq_list(q, limit=10**20)] == ["m1"]


# -- depths and purge ------------------------------------------------------------------------


def _one_of_each(broker: Broker, q: str) -> Delivery:
    """Fill ``q`` with one ready, one delayed, one leased (returned) and one dead message."""
    broker.publish([msg(q, "a"), msg(q, "b"), msg(q, "c")])
    broker.publish([msg(q, "d", not_before_ms=now_ms() + 60_000)])
    [a] = broker.reserve([q], 1, LONG_LEASE_S)
    [b] = broker.reserve([q], 1, LONG_LEASE_S)
    assert broker.dead_letter(b, "boom") is True
    return a


def test_stats_counts_ready_delayed_reserved_and_dead(broker: Broker, names: Names) -> None:
    q, empty = names.queue(), names.queue("empty")
    a = _one_of_each(broker, q)
    assert broker.stats([q, empty]) == [QueueStats(q, 1, 1, 1, 1), QueueStats(empty, 0, 0, 0, 0)]
    known = {s.queue: s for s in broker.stats()}
    assert known[q] == QueueStats(q, 1, 1, 1, 1)
    assert broker.ack([a]) == 1
    assert depth(broker, q) == (1, 1, 0, 1)


def test_stats_keeps_listing_a_drained_queue(broker: Broker, q: str) -> None:
    broker.publish([msg(q, "m")])
    assert broker.ack(broker.reserve([q], 1, LONG_LEASE_S)) == 1
    known = {s.queue: s for s in broker.stats()}
    assert known[q] == QueueStats(q, 0, 0, 0, 0)  # "the queues the broker knows"


def test_purge_drops_ready_and_delayed_but_not_leased(broker: Broker, names: Names) -> None:
    q, bystander = names.queue(), names.queue("bystander")
    broker.publish([msg(q, f"m{i}") for i in range(3)] + [msg(bystander, "x")])
    broker.publish([msg(q, "later", not_before_ms=now_ms() + 60_000)])
    [held] = broker.reserve([q], 1, LONG_LEASE_S)
    assert broker.purge(q) == 3
    assert depth(broker, q) == (0, 0, 1, 0)
    assert depth(broker, bystander) == (1, 0, 0, 0)
    assert broker.reserve([q], 10, LONG_LEASE_S) == []
    assert broker.ack([held]) == 1
    assert broker.purge(names.queue("never-used")) == 0


def test_drop_deletes_a_queue_and_its_name(broker: Broker, names: Names) -> None:
    q, bystander = names.queue(), names.queue("bystander")
    broker.publish([msg(bystander, "x")])
    held = _one_of_each(broker, q)
    assert broker.drop(q) == 3  # the leased one too
    listed = {s.queue: (s.ready, s.delayed, s.reserved, s.dead) for s in broker.stats()}
    assert listed.get(q) == (0, 0, 0, 1)  # only its dead letter keeps the name listed
    assert listed[bystander] == (1, 0, 0, 0)
    assert broker.reserve([q], 10, LONG_LEASE_S) == []
    assert broker.ack([held]) == 0  # its lease went with it
    assert broker.dlq_purge(queue=q) == 1
    assert q not in {s.queue for s in broker.stats()}
    # A queue dropped is made again by the next publish.
    broker.publish([msg(q, "again")])
    assert q in {s.queue for s in broker.stats()}
    assert [d.message_id for d in broker.reserve([q], 10, LONG_LEASE_S)] == ["again"]
    assert broker.drop(names.queue("never-used")) == 0


# -- waiting ---------------------------------------------------------------------------------


def _publish_later(broker: Broker, queue: str, delay_s: float) -> threading.Timer:
    timer = threading.Timer(delay_s, lambda: broker.publish([msg(queue, "late")]))
    timer.start()
    return timer


def test_reserve_wait_returns_when_this_instance_publishes(broker: Broker, q: str) -> None:
    started = time.monotonic()
    timer = _publish_later(broker, q, 0.3)
    got = broker.reserve([q], 5, LONG_LEASE_S, wait_s=10.0)
    elapsed = time.monotonic() - started
    timer.join()
    assert [d.message_id for d in got] == ["late"]
    assert 0.25 <= elapsed < 5.0
    assert broker.ack(got) == 1


def test_reserve_wait_returns_when_another_instance_publishes(
    broker: Broker, other_broker: Broker, q: str
) -> None:
    started = time.monotonic()
    timer = _publish_later(other_broker, q, 0.3)
    got = broker.reserve([q], 5, LONG_LEASE_S, wait_s=10.0)
    elapsed = time.monotonic() - started
    timer.join()
    assert [d.message_id for d in got] == ["late"]
    assert elapsed < 5.0
    assert broker.ack(got) == 1


def test_reserve_wait_times_out_empty(broker: Broker, q: str) -> None:
    started = time.monotonic()
    assert broker.reserve([q], 5, LONG_LEASE_S, wait_s=0.3) == []
    assert 0.25 <= time.monotonic() - started < 5.0


# -- bulk ------------------------------------------------------------------------------------


def test_batch_of_1000_is_drained_exactly_once(broker: Broker, q: str) -> None:
    expected = [f"m{i:04}" for i in range(1000)]
    broker.publish([msg(q, m) for m in expected])
    assert depth(broker, q) == (1000, 0, 0, 0)
    seen: list[str] = []
    while got := broker.reserve([q], 100, LONG_LEASE_S):
        assert len(got) <= 100
        seen.extend(d.message_id for d in got)
        assert broker.ack(got) == len(got)
    assert seen == expected  # one priority, one batch: publish order
    assert depth(broker, q) == (0, 0, 0, 0)


# -- claims ----------------------------------------------------------------------------------


def test_claim_release_peek(broker: Broker, other_broker: Broker, names: Names) -> None:
    k = names.key("claim")
    assert broker.peek(k) is None
    assert broker.claim(k, "a", LONG_LEASE_S) == "a"
    assert broker.claim(k, "b", LONG_LEASE_S) == "a"
    assert other_broker.peek(k) == "a"
    assert broker.release(k, "b") is False
    assert broker.peek(k) == "a"
    assert other_broker.release(k, "a") is True
    assert broker.peek(k) is None
    assert broker.release(k) is False
    assert broker.claim(k, "c", LONG_LEASE_S) == "c"
    assert broker.release(k) is True
    assert broker.peek(k) is None


def test_claims_expire(broker: Broker, names: Names) -> None:
    k = names.key("claim")
    assert broker.claim(k, "a", SHORT_LEASE_S) == "a"
    assert broker.peek(k) == "a"
    time.sleep(SHORT_LEASE_S + 0.2)
    assert broker.peek(k) is None
    assert broker.release(k, "a") is False
    assert broker.claim(k, "b", LONG_LEASE_S) == "b"
    assert broker.peek(k) == "b"


def test_only_one_concurrent_claim_wins(broker: Broker, other_broker: Broker, names: Names) -> None:
    k = names.key("claim")
    results: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        b = broker if i % 2 else other_broker
        barrier.wait()
        results.append(b.claim(k, f"v{i}", LONG_LEASE_S))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert len(set(results)) == 1
    assert broker.peek(k) == results[0]


def test_claim_many_and_peek_many(broker: Broker, other_broker: Broker, names: Names) -> None:
    held, fresh, short = names.key("held"), names.key("fresh"), names.key("short")
    absent = names.key("absent")
    assert broker.claim_many([]) == [] and broker.peek_many([]) == []
    assert other_broker.claim(held, "theirs", LONG_LEASE_S) == "theirs"
    assert broker.claim_many(
        [
            (held, "ours", LONG_LEASE_S),
            (fresh, "ours", LONG_LEASE_S),
            (fresh, "again", LONG_LEASE_S),  # the same key later in the call: first wins
            (short, "s", SHORT_LEASE_S),
        ]
    ) == ["theirs", "ours", "ours", "s"]
    assert other_broker.peek_many([fresh, absent, held, short]) == ["ours", None, "theirs", "s"]
    time.sleep(SHORT_LEASE_S + 0.2)
    assert broker.peek_many([short, fresh]) == [None, "ours"]
    assert broker.claim_many([(short, "s2", LONG_LEASE_S)]) == ["s2"]  # expired is free
    assert other_broker.peek(short) == "s2"


def test_ack_records_its_claims_in_the_same_call(
    broker: Broker, other_broker: Broker, q: str, names: Names
) -> None:
    held, first, late, alone = (names.key(k) for k in ("held", "first", "late", "alone"))
    assert other_broker.claim(held, "theirs", LONG_LEASE_S) == "theirs"
    broker.publish([msg(q, "a"), msg(q, "b")])
    ds = broker.reserve([q], 2, LONG_LEASE_S)
    claims = [(first, "a", LONG_LEASE_S), (held, "ours", LONG_LEASE_S)]
    assert broker.ack(ds, claims) == 2
    assert depth(broker, q) == (0, 0, 0, 0)
    assert other_broker.peek_many([first, held]) == ["a", "theirs"]  # a live claim stays
    # An ack whose lease lapsed acks nothing, but its claims are still recorded: the task ran.
    broker.publish([msg(q, "c")])
    [stale] = broker.reserve([q], 1, SHORT_LEASE_S)
    again = reserve_one(broker, q)
    assert broker.ack([stale], [(late, "c", LONG_LEASE_S)]) == 0
    assert other_broker.peek(late) == "c"
    assert broker.ack([again]) == 1
    assert broker.ack([], [(alone, "x", LONG_LEASE_S)]) == 0
    assert other_broker.peek(alone) == "x"


def test_concurrent_claim_many_calls_agree(
    broker: Broker, other_broker: Broker, names: Names
) -> None:
    keys = [names.key(f"k{i}") for i in range(20)]
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(4)

    def run(i: int) -> None:
        b = broker if i % 2 else other_broker
        order = keys if i % 2 else list(reversed(keys))  # opposite orders must not deadlock
        barrier.wait()
        got = b.claim_many([(k, f"v{i}", LONG_LEASE_S) for k in order])
        results[i] = got if i % 2 else list(reversed(got))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 4
    for pos, key in enumerate(keys):
        winners = {results[i][pos] for i in range(4)}
        assert len(winners) == 1  # everyone saw the one value the key holds
        assert broker.peek(key) == winners.pop()


def test_swap_is_compare_and_set(broker: Broker, other_broker: Broker, names: Names) -> None:
    k = names.key("swap")
    assert broker.swap(k, None, "a", None) is True  # absent matches None
    assert other_broker.peek(k) == "a"
    assert broker.swap(k, None, "b", LONG_LEASE_S) is False
    assert broker.swap(k, "x", "b", LONG_LEASE_S) is False
    assert broker.peek(k) == "a"
    assert broker.swap(k, "a", "b", SHORT_LEASE_S) is True
    assert broker.peek(k) == "b"
    time.sleep(SHORT_LEASE_S + 0.2)
    assert broker.peek(k) is None
    assert broker.swap(k, "b", "c", None) is False  # expired is absent
    assert broker.swap(k, None, "c", None) is True
    assert broker.claim(k, "d", LONG_LEASE_S) == "c"  # the same keys as claims
    assert broker.swap(k, "c", None, None) is True  # None deletes
    assert broker.peek(k) is None
    assert broker.swap(k, "c", None, None) is False


def test_swap_without_ttl_does_not_expire(broker: Broker, names: Names) -> None:
    k = names.key("swap")
    assert broker.claim(k, "a", SHORT_LEASE_S) == "a"
    assert broker.swap(k, "a", "b", None) is True
    time.sleep(SHORT_LEASE_S + 0.2)
    assert broker.peek(k) == "b"


def test_concurrent_swaps_lose_no_update(
    broker: Broker, other_broker: Broker, names: Names
) -> None:
    k = names.key("counter")
    errors: list[BaseException] = []

    def bump(b: Broker) -> None:
        try:
            done = 0
            while done < 10:
                current = b.peek(k)
                if b.swap(k, current, str(int(current or 0) + 1), LONG_LEASE_S):
                    done += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump, args=(b,)) for b in [broker, other_broker] * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert broker.peek(k) == "60"


def test_scan_returns_live_keys_with_the_prefix(broker: Broker, names: Names) -> None:
    prefix = names.key("scan") + "%_:"  # LIKE wildcards must match literally
    assert broker.scan(prefix) == {}
    broker.claim(prefix + "a", "1", LONG_LEASE_S)
    broker.claim(prefix + "b", "2", LONG_LEASE_S)
    broker.swap(prefix + "c", None, "3", None)
    broker.claim(prefix + "short", "4", SHORT_LEASE_S)
    broker.claim(prefix[:-1] + "Xa", "no", LONG_LEASE_S)  # differs in the last character
    broker.claim(prefix[:-3] + "xx:a", "no", LONG_LEASE_S)  # a wildcard would match this
    found = broker.scan(prefix)
    assert found == {prefix + "a": "1", prefix + "b": "2", prefix + "c": "3", prefix + "short": "4"}
    time.sleep(SHORT_LEASE_S + 0.2)
    assert broker.scan(prefix) == {prefix + "a": "1", prefix + "b": "2", prefix + "c": "3"}
    assert broker.scan(prefix + "a") == {prefix + "a": "1"}
