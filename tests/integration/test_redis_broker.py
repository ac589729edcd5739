"""The Redis broker against real servers: restarts, kills, competing consumers, lapsed
leases, scripts lost from the cache, prefixes, and the errors an operator sees."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis

from stem.brokers.base import Delivery, Message
from stem.brokers.redis import RedisBroker
from stem.envelope import Envelope, encode, now_ms
from stem.errors import BrokerConnectionError, BrokerError, BrokerTimeoutError, ConfigError
from stem.security.replay import NONCE_PREFIX, ReplayGuard
from stem.security.signing import Keyring
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.tcp_proxy import TcpProxy

pytestmark = pytest.mark.redis

LONG_S = 30.0
RING = Keyring.build("hmac-sha256", {"v1": b"s" * 32})  # for signed bodies


def msg(queue: str, mid: str, **kw: int) -> Message:
    return Message(mid, queue, f"body-{mid}".encode(), **kw)


@pytest.fixture
def broker(redis_url: str) -> Iterator[RedisBroker]:
    b = RedisBroker(redis_url)
    yield b
    b.close()


@pytest.fixture
def private(fresh_redis_server: RedisServer) -> Iterator[tuple[RedisServer, RedisBroker]]:
    b = RedisBroker(fresh_redis_server.url)
    yield fresh_redis_server, b
    b.close()


def drain(b: RedisBroker, queue: str, *, until_n: int, timeout_s: float = 10.0) -> list[Delivery]:
    got: list[Delivery] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < until_n and time.monotonic() < deadline:
        got += b.reserve([queue], until_n - len(got), LONG_S, wait_s=0.2)
    return got


# -- restarts ------------------------------------------------------------------------------


def test_messages_survive_a_restart(private: tuple[RedisServer, RedisBroker]) -> None:
    server, b = private
    b.publish([msg("q", f"m{i}", priority=i % 3) for i in range(20)])
    b.publish([msg("q", "later", not_before_ms=now_ms() + 700)])
    [leased] = b.reserve(["q"], 1, 0.5)
    server.restart()
    # the same broker object reconnects by itself; everything is still there
    got = drain(b, "q", until_n=21)
    ids = sorted(d.message_id for d in got)
    assert ids == sorted([f"m{i}" for i in range(20)] + ["later"])
    again = next(d for d in got if d.message_id == leased.message_id)
    assert again.delivery_count == 2  # the lease taken before the restart lapsed
    assert b.ack(got) == 21
    assert b.stats(["q"])[0].ready == 0


def test_nothing_acknowledged_is_lost_on_sigkill(private: tuple[RedisServer, RedisBroker]) -> None:
    server, b = private
    b.publish([msg("q", f"m{i}") for i in range(50)])
    done = b.reserve(["q"], 10, LONG_S)
    assert b.ack(done) == 10
    b.dead_letter(b.reserve(["q"], 1, LONG_S)[0], "poison", "detail")
    server.kill()
    server.start()
    got = drain(b, "q", until_n=39)
    assert len(got) == 39
    assert {d.message_id for d in got}.isdisjoint(d.message_id for d in done)
    assert b.reserve(["q"], 10, LONG_S) == []
    [dead] = b.dlq_list(queue="q")
    assert (dead.reason, dead.detail) == ("poison", "detail")


def test_a_blocked_reserve_recovers_after_a_restart(
    private: tuple[RedisServer, RedisBroker],
) -> None:
    server, b = private
    result: list[list[Delivery]] = []
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            result.append(b.reserve(["q"], 5, LONG_S, wait_s=20.0))
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.3)  # let it block in XREAD
    server.stop()
    time.sleep(0.5)  # down for longer than one round of redis-py retries
    server.start()
    other = RedisBroker(server.url)
    try:
        other.publish([msg("q", "after-restart")])
    finally:
        other.close()
    waiter.join(20)
    assert not errors, errors
    assert [d.message_id for d in result[0]] == ["after-restart"]


def test_calls_fail_clearly_while_down_and_work_again_after(
    fresh_redis_server: RedisServer,
) -> None:
    server = fresh_redis_server
    url = server.url.replace("redis://", "redis://stem:sekrit-pw@")
    b = RedisBroker(server.url)
    try:
        server.stop()
        with pytest.raises(BrokerConnectionError) as info:
            b.publish([msg("q", "m")])
        text = str(info.value)
        assert f"127.0.0.1:{server.port}/0" in text and "publishing" in text
        with pytest.raises(BrokerConnectionError):
            b.reserve(["q"], 1, LONG_S, wait_s=0.3)  # waits out wait_s, then reports
        server.start()
        b.publish([msg("q", "m")])
        assert [d.message_id for d in b.reserve(["q"], 1, LONG_S)] == ["m"]
        with_pw = RedisBroker(url)  # this server has no such user
        try:
            with pytest.raises(BrokerConnectionError) as info:
                with_pw.ping()
            assert "sekrit-pw" not in str(info.value)
            assert "password was refused" in str(info.value)
        finally:
            with_pw.close()
    finally:
        b.close()


# -- competing consumers and leases --------------------------------------------------------


def test_two_brokers_never_share_a_live_lease(redis_url: str) -> None:
    a, b = RedisBroker(redis_url), RedisBroker(redis_url)
    try:
        a.publish([msg("q", f"m{i}") for i in range(40)])
        held_a = a.reserve(["q"], 20, 0.4)
        held_b = b.reserve(["q"], 100, 0.4)
        assert len(held_a) == 20 and len(held_b) == 20
        assert not {d.message_id for d in held_a} & {d.message_id for d in held_b}
        # a keeps renewing well past its first lease; b lets its leases lapse
        for _ in range(4):
            time.sleep(0.2)
            assert a.extend(held_a, 0.4) == [True] * 20
        redelivered = drain(a, "q", until_n=20)
        assert sorted(d.message_id for d in redelivered) == sorted(d.message_id for d in held_b)
        assert all(d.delivery_count == 2 for d in redelivered)
        assert b.ack(held_b) == 0  # those receipts are void now
        assert a.ack(held_a + redelivered) == 40
    finally:
        a.close()
        b.close()


def test_a_lapsed_lease_goes_to_a_waiting_consumer(redis_url: str) -> None:
    a, b = RedisBroker(redis_url), RedisBroker(redis_url)
    try:
        a.publish([msg("q", "m")])
        [first] = a.reserve(["q"], 1, 0.3)
        started = time.monotonic()
        # b waits; nothing is published: it must wake by itself when the lease lapses
        [second] = b.reserve(["q"], 1, LONG_S, wait_s=5.0)
        assert 0.15 < time.monotonic() - started < 3.0
        assert (second.message_id, second.delivery_count) == ("m", 2)
        assert a.extend([first], LONG_S) == [False]
        assert b.ack([second]) == 1
    finally:
        a.close()
        b.close()


def test_priorities_across_several_queues(broker: RedisBroker) -> None:
    broker.publish([msg("a", "a0"), msg("b", "b9", priority=9), msg("a", "a5", priority=5)])
    got = broker.reserve(["a", "b"], 3, LONG_S)
    assert [d.message_id for d in got] == ["b9", "a5", "a0"]
    assert broker.ack(got) == 3


def test_a_server_that_stopped_answering_costs_one_timeout_not_four(redis_url: str) -> None:
    """A black-holed link: each retry of a timed-out call would wait the whole socket
    timeout again (a producer blocked minutes in delay(), a worker silent in reserve).
    One attempt, one new connection, then a clear error."""
    from urllib.parse import urlsplit

    parts = urlsplit(redis_url)
    assert parts.hostname and parts.port
    with TcpProxy(parts.hostname, parts.port) as proxy:
        b = RedisBroker(proxy.rewrite(redis_url) + "?socket_timeout=0.3&socket_connect_timeout=0.3")
        try:
            b.ping()
            proxy.cut("drop")
            before = proxy.accepted
            with pytest.raises(BrokerConnectionError, match=r"(?i)timeout"):
                b.stats(["q"])
            assert proxy.accepted - before <= 1
            # A publish that timed out may have gone in: the app does not send it again.
            from stem import Stem

            app = Stem("blackhole", broker=b, backend="memory://")
            app.publish_retries = 3
            before = proxy.accepted
            with pytest.raises(BrokerTimeoutError, match="may or may not have been applied"):
                app.publish_messages([msg("q", "m1")])
            assert proxy.accepted - before <= 1
        finally:
            b.close()


def test_a_server_over_maxmemory_still_takes_acks_with_replay_claims(
    private: tuple[RedisServer, RedisBroker],
) -> None:
    """Signed messages are acked with their nonce claims (a SET, which needs memory): a
    full server must still drain, not refuse every ack and run every task again."""
    server, b = private
    b.publish([msg("full", f"m{i}") for i in range(50)])
    got = b.reserve(["full"], 50, LONG_S)
    client = redis.Redis.from_url(server.url)
    try:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used // 2))
        with pytest.raises(BrokerError, match="maxmemory"):
            b.publish([msg("full", "more")])  # full indeed
        claims = [(f"{NONCE_PREFIX}v1:n{i}", d.message_id, 60.0) for i, d in enumerate(got)]
        assert b.ack(got, claims) == 50
        assert b.stats(["full"])[0].reserved == 0
        assert client.get(f"stem:claim:{NONCE_PREFIX}v1:n0") == b"m0"
    finally:
        client.config_set("maxmemory", "0")
        client.close()


def test_a_large_batch_cut_short_says_how_much_went_in(
    private: tuple[RedisServer, RedisBroker],
) -> None:
    """Batches go in chunks of 500 messages, each all or nothing: when Redis refuses one,
    the error says how many went in (retrying the batch would run those twice)."""
    import re

    server, b = private
    client = redis.Redis.from_url(server.url)
    try:
        used = int(client.info("memory")["used_memory"])
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", str(used + 2_000_000))
        body = b"x" * 3000
        with pytest.raises(BrokerError, match=r"calls done: \d of 3") as info:
            b.publish([Message(f"m{i}", "big", body) for i in range(1500)])
        done = int(re.search(r"calls done: (\d)", str(info.value)).group(1))  # type: ignore[union-attr]
        assert 0 < done < 3
        assert b.stats(["big"])[0].ready == 500 * done
    finally:
        client.config_set("maxmemory", "0")
        client.close()


def test_a_dropped_queue_leaves_no_key_behind(private: tuple[RedisServer, RedisBroker]) -> None:
    server, b = private
    b.publish([msg("gone", "m0"), msg("gone", "m9", priority=9), msg("kept", "k")])
    b.publish([msg("gone", "later", not_before_ms=now_ms() + 60_000)])
    b.reserve(["gone"], 1, LONG_S)  # a leased one too
    assert b.drop("gone") == 3
    client = redis.Redis.from_url(server.url)
    try:
        assert sorted(k.decode() for k in client.keys("*gone*")) == []
        assert client.smembers("stem:queues") == {b"kept"}
    finally:
        client.close()


def test_out_of_range_priority_is_clamped_not_lost(broker: RedisBroker) -> None:
    broker.publish([msg("q", "low", priority=-3), msg("q", "high", priority=42)])
    got = broker.reserve(["q"], 2, LONG_S)
    assert [d.message_id for d in got] == ["high", "low"]


def test_storage_records_not_written_by_stem_are_dead_lettered_not_stuck(
    broker: RedisBroker, redis_url: str
) -> None:
    """Only a writer to Redis can add such records; none may stop the queue (a reserve
    that fails, a worker thread that dies on a short reply), none may vanish unlogged."""
    broker.publish([msg("q", "before")])  # creates the stream and its group
    raw = redis.Redis.from_url(redis_url)
    prefix = broker._prefix
    try:
        stream, delayed = f"{prefix}q:q:0", f"{prefix}q:q:delayed"
        raw.xadd(stream, {"m": "no-body", "n": "0"})
        raw.xadd(stream, {"b": "{}", "n": "0"})
        raw.xadd(stream, {"m": "bad-count", "b": "{}", "n": "abc"})
        raw.zadd(delayed, {"garbage-member": 0})
        raw.zadd(delayed, {"9:0:x:99:short": 0})  # claims more bytes than it holds
    finally:
        raw.close()
    broker.publish([msg("q", "after")])
    got = broker.reserve(["q"], 2, LONG_S)  # one call: junk ahead costs no extra reserve
    assert sorted(d.message_id for d in got) == ["after", "before"]
    assert broker.ack(got) == 2
    letters = broker.dlq_list("q")
    assert [d.reason for d in letters] == ["malformed"] * 5
    details = " ".join(d.detail for d in letters)
    for words in ("no body", "no message id", "not a number", "not a packed message"):
        assert words in details
    assert {d.message_id for d in letters} >= {"no-body", "bad-count", "delayed"}
    [stats] = broker.stats(["q"])
    assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 5)


def test_a_stream_written_straight_into_redis_does_not_stop_the_queue(
    broker: RedisBroker, redis_url: str
) -> None:
    """A priority stream created by someone else has no consumer group: every reserve
    failed with NOGROUP, so the messages on the other priorities waited as long as it
    stayed. A key of another type where a stream should be is skipped too."""
    broker.publish([msg("q", "valid")])
    raw = redis.Redis.from_url(redis_url)
    prefix = broker._prefix
    try:
        raw.xadd(f"{prefix}q:q:7", {"m": "stray", "b": "not an envelope", "n": "0"})
        raw.set(f"{prefix}q:q:8", "not a stream")
    finally:
        raw.close()
    got = broker.reserve(["q"], 5, LONG_S)
    assert [d.message_id for d in got] == ["stray", "valid"]  # priority 7 first
    assert broker.ack(got) == 2
    # the depths of every queue failed with WRONGTYPE (stem queues, dlq replay, gauges)
    [stats] = broker.stats(["q"])
    assert (stats.ready, stats.delayed, stats.reserved) == (0, 0, 0)
    broker.publish([msg("q", "later", priority=7)])
    assert [d.message_id for d in broker.reserve(["q"], 5, LONG_S)] == ["later"]


def test_records_whose_text_is_not_utf8_do_not_stop_the_queue_or_the_cli(
    broker: RedisBroker, redis_url: str
) -> None:
    """A message id that is not UTF-8 failed every reserve after leasing the batch (its
    good messages came back with it, and nothing was dead-lettered); a dead letter or a
    queue name written by hand broke dlq list and the depths with a traceback."""
    broker.publish([msg("q", "before")])
    raw = redis.Redis.from_url(redis_url)
    prefix = broker._prefix
    try:
        raw.xadd(f"{prefix}q:q:0", {"m": b"\xff\xfe", "b": b"{}", "n": b"0"})
        raw.xadd(f"{prefix}dead", {"q": "q", "m": "x", "b": "y", "r": "why", "d": "d", "t": "soon"})
        raw.xadd(f"{prefix}dead", {"q": b"q", "m": b"\xff", "r": b"\xffr"})
        raw.sadd(f"{prefix}queues", b"q\xff")
    finally:
        raw.close()
    got = broker.reserve(["q"], 5, LONG_S)
    assert sorted(d.message_id for d in got) == ["\\xff\\xfe", "before"]
    assert broker.ack(got) == 2
    letters = broker.dlq_list("q")
    assert [(d.message_id, d.reason, d.dead_ms) for d in letters] == [
        ("x", "why", 0),
        ("\\xff", "\\xffr", 0),
    ]
    assert letters[1].body == b"" and letters[1].detail == ""
    assert broker.dlq_get(letters[0].id) == letters[0]
    assert "q\\xff" in {s.queue for s in broker.stats()}


def test_a_stream_key_of_another_type_costs_only_its_own_messages(
    broker: RedisBroker, redis_url: str
) -> None:
    """A priority's stream key that is not a stream failed every reserve as soon as a
    delayed or lapsed message had to go into it (the script kept its earlier writes, so
    each failed reserve promoted the others again: duplicates). Its message is dead-
    lettered instead; purge skips such keys and reads streams with no group."""
    raw = redis.Redis.from_url(redis_url)
    prefix = broker._prefix
    try:
        raw.set(f"{prefix}q:q:8", "not a stream")
        broker.publish(
            [
                msg("q", "early", not_before_ms=now_ms() + 100),
                msg("q", "stuck", priority=8, not_before_ms=now_ms() + 150),
            ]
        )
        time.sleep(0.3)
        got = broker.reserve(["q"], 5, LONG_S)
        assert [d.message_id for d in got] == ["early"]
        assert broker.ack(got) == 1
        assert [(d.message_id, d.reason) for d in broker.dlq_list("q")] == [("stuck", "malformed")]
        raw.xadd(f"{prefix}q:q:3", {"m": "stray", "b": "x", "n": "0"})  # no group
    finally:
        raw.close()
    assert broker.purge("q") == 1
    assert broker.reserve(["q"], 5, LONG_S) == []


# -- scripts and keys ----------------------------------------------------------------------


def test_scripts_flushed_from_the_server_are_loaded_again(
    broker: RedisBroker, redis_server: RedisServer
) -> None:
    broker.publish([msg("q", "first")])
    for batch in (1, 1200):  # a single call and a pipelined batch
        with redis_server.admin() as admin:
            admin.script_flush()
        broker.publish([msg("q", f"{batch}-{i}") for i in range(batch)])
    with redis_server.admin() as admin:
        admin.script_flush()
    assert len(drain(broker, "q", until_n=1202)) == 1202


def test_a_pooled_connection_the_server_dropped_is_replaced_on_the_next_call(
    private: tuple[RedisServer, RedisBroker],
) -> None:
    server, b = private
    b.publish([msg("q", "before")])  # leaves a connection in the pool
    with server.admin() as admin:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    b.publish([msg("q", "after")])  # sent on the dead connection first: retried, not an error
    assert sorted(d.message_id for d in drain(b, "q", until_n=2)) == ["after", "before"]


def test_a_call_whose_connection_breaks_before_the_reply_is_retried(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The short call path (RedisConn.evalsha) hands a broken call to redis-py's full path,
    which reconnects and sends it again."""
    from redis.connection import AbstractConnection

    real = AbstractConnection.read_response
    broken: list[int] = []

    def once_broken(self: AbstractConnection, *args: object, **kw: object) -> object:
        if not broken:
            broken.append(1)
            self.disconnect()
            raise redis.ConnectionError("Connection closed by server.")
        return real(self, *args, **kw)  # type: ignore[arg-type]

    broker.stats(["q"])  # a connected connection in the pool: the break comes mid-call
    monkeypatch.setattr(AbstractConnection, "read_response", once_broken)
    broker.publish([msg("q", "sent-twice-at-most")])
    monkeypatch.undo()
    assert broken == [1]
    got = drain(broker, "q", until_n=2, timeout_s=1.0)
    # The first send reached Redis before its reply was lost: at-least-once, so 1 or 2.
    assert {d.message_id for d in got} == {"sent-twice-at-most"} and 1 <= len(got) <= 2


def test_an_error_reply_is_a_clear_error_and_the_connection_stays_usable(
    broker: RedisBroker,
) -> None:
    with pytest.raises(BrokerError, match="unknown Stem broker command"):
        broker._call("testing", "no-such-command")
    broker.publish([msg("q", "next")])
    assert [d.message_id for d in drain(broker, "q", until_n=1)] == ["next"]


def test_prefixes_keep_apps_apart(redis_url: str) -> None:
    one = RedisBroker(redis_url + "?prefix=one:")
    two = RedisBroker(redis_url + "?prefix=two:")
    try:
        one.publish([msg("q", "for-one")])
        one.claim("k", "v1", LONG_S)
        assert two.reserve(["q"], 10, LONG_S) == []
        assert two.peek("k") is None
        assert two.stats() == []
        assert [d.message_id for d in one.reserve(["q"], 10, LONG_S)] == ["for-one"]
    finally:
        one.close()
        two.close()


def test_scan_treats_glob_characters_literally(broker: RedisBroker) -> None:
    broker.claim("a*[x]?\\:1", "1", LONG_S)
    broker.claim("ab[x]?\\:1", "no", LONG_S)
    assert broker.scan("a*[x]?\\:") == {"a*[x]?\\:1": "1"}


def test_unknown_url_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="prefx"):
        RedisBroker("redis://127.0.0.1:6379/0?prefx=typo:")
    with pytest.raises(ConfigError, match="number"):
        RedisBroker("redis://127.0.0.1:6379/0?socket_timeout=soon")


@pytest.mark.parametrize(
    ("policy", "lost"), [("allkeys-lru", "queued messages"), ("volatile-lru", "results")]
)
def test_ping_warns_when_the_server_may_evict_stem_keys(
    fresh_redis_server: RedisServer, caplog: pytest.LogCaptureFixture, policy: str, lost: str
) -> None:
    """Queues (no expiry) go under allkeys-*; results, nonces, unique and beat claims
    (all set to expire) under volatile-* too: the broker and the result store warn."""
    from stem.backends.redis import RedisBackend

    with fresh_redis_server.admin() as admin:
        admin.config_set("maxmemory-policy", policy)
    for store in (RedisBroker(fresh_redis_server.url), RedisBackend(fresh_redis_server.url)):
        caplog.clear()
        try:
            store.ping()
            store.ping()
        finally:
            store.close()
        warned = [r for r in caplog.records if policy in r.getMessage()]
        assert len(warned) == 1 and warned[0].name == "stem.redis"
        assert lost in warned[0].getMessage()


def test_no_published_message_is_lost_when_redis_is_killed_mid_flow(
    private: tuple[RedisServer, RedisBroker],
) -> None:
    server, consumer = private
    producer = RedisBroker(server.url)
    published: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def produce() -> None:
        for i in range(300):
            batch = [msg("q", f"m{i}-{j}") for j in range(5)]
            try:
                producer.publish(batch)
            except BrokerConnectionError:
                continue  # refused while down: not published, nothing promised
            published.extend(m.id for m in batch)
            time.sleep(0.002)

    def consume() -> None:
        try:
            while not stop.is_set():
                try:
                    got = consumer.reserve(["q"], 50, 1.0, wait_s=0.2)
                    seen.update(d.message_id for d in got)
                    consumer.ack(got)
                except BrokerConnectionError:
                    time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    try:
        for t in threads:
            t.start()
        time.sleep(0.3)
        server.kill()
        time.sleep(0.3)
        server.start()
        threads[0].join(30)
        deadline = time.monotonic() + 15
        while not set(published) <= seen and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        producer.close()
    assert not errors, errors
    assert 0 < len(published)
    assert set(published) <= seen  # at least once: duplicates allowed, losses not


def test_a_large_ack_with_claims_is_one_atomic_call(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 1500  # more than one chunk of settles
    broker.publish([msg("bigack", f"m{i}") for i in range(n)])
    got = drain(broker, "bigack", until_n=n)
    assert len(got) == n
    calls: list[int] = []
    eval_many = broker._conn.eval_many

    def counted(doing: str, script: object, arg_lists: list[list[object]]) -> list[object]:
        calls.append(len(arg_lists))
        return eval_many(doing, script, arg_lists)  # type: ignore[arg-type]

    monkeypatch.setattr(broker._conn, "eval_many", counted)
    claims = [(f"nonce:{i}", "1", 60.0) for i in range(n)]
    assert broker.ack(got[:n], claims) == n
    assert calls == [1]  # claims and acks in one script call: both or neither
    assert broker.claim("nonce:1499", "other", 60) == "1"
    assert broker.ack(got[:n]) == 0  # already gone; without claims it may be cut in chunks
    assert calls == [1, 2]


def test_short_calls_from_many_threads_each_get_their_own_reply(broker: RedisBroker) -> None:
    errors: list[BaseException] = []

    def publish(t: int) -> None:
        try:
            for i in range(200):
                broker.publish([msg(f"mt{t}", f"{t}-{i}")])
                assert broker.stats([f"mt{t}"])[0].ready == i + 1  # this thread's own count
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert 1 <= len(broker._conn._spares) <= 8  # connections kept between calls, bounded


def test_a_forked_child_opens_its_own_connections(broker: RedisBroker) -> None:
    import os

    broker.publish([msg("fork", "parent-1")])
    kept = list(broker._conn._spares)
    assert kept  # the parent keeps a connection between calls
    pid = os.fork()
    if pid == 0:
        ok = False
        try:
            broker.publish([msg("fork", "child")])
            mine = broker._conn._spares  # the child's own connection, kept for its next call
            ok = bool(mine) and all(c.pid == os.getpid() and c not in kept for c in mine)
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    broker.publish([msg("fork", "parent-2")])  # the parent's connection was not disturbed
    assert broker._conn._spares == kept
    got = sorted(d.message_id for d in drain(broker, "fork", until_n=3))
    assert got == ["child", "parent-1", "parent-2"]


def test_with_a_pool_size_limit_no_connection_is_kept_aside(redis_url: str) -> None:
    b = RedisBroker(redis_url + "?max_connections=2")
    try:
        for i in range(5):
            b.publish([msg("lim", f"m{i}")])
        assert b._conn._spares == []
        assert len(drain(b, "lim", until_n=5)) == 5
    finally:
        b.close()


def test_a_call_interrupted_mid_reply_never_reuses_its_connection(
    broker: RedisBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.connection import AbstractConnection

    broker.stats(["q"])
    (conn,) = broker._conn._spares

    def interrupted(self: AbstractConnection, *args: object, **kw: object) -> object:
        raise KeyboardInterrupt  # as a soft time limit would, between send and reply

    monkeypatch.setattr(AbstractConnection, "read_response", interrupted)
    with pytest.raises(KeyboardInterrupt):
        broker.stats(["q"])
    monkeypatch.undo()
    assert conn not in broker._conn._spares and conn._sock is None  # dropped, not kept
    broker.publish([msg("q", "after")])  # a fresh connection
    assert [d.message_id for d in drain(broker, "q", until_n=1)] == ["after"]


def test_a_kept_connection_marked_for_reconnect_goes_back_to_the_pool(
    broker: RedisBroker,
) -> None:
    before = broker._conn.command("CLIENT", "ID")  # on the one kept connection
    (conn,) = broker._conn._spares
    conn.mark_for_reconnect()  # what a server maintenance notice does to idle connections
    broker.publish([msg("q", "moved")])
    assert not conn.should_reconnect()
    assert broker._conn.command("CLIENT", "ID") != before  # a new server-side connection
    assert [d.message_id for d in drain(broker, "q", until_n=1)] == ["moved"]


def test_reserve_reads_the_replay_claim_off_each_signed_body(broker: RedisBroker) -> None:
    used = RING.sign(Envelope(id="used", task="x"))
    fresh = RING.sign(Envelope(id="fresh", task="x"))
    # a key_id/nonce pair in the caller's data comes before the signature block: the
    # block's pair, the last one, is the one read
    decoy = RING.sign(Envelope(id="decoy", task="x", kwargs={"key_id": "v1", "nonce": "n"}))
    assert b'{"key_id":"v1","nonce":"n"}' in encode(decoy)
    q = f"peek-{time.monotonic_ns()}"
    broker.publish(
        [Message(e.id, q, encode(e)) for e in (used, fresh, decoy)]
        + [Message("plain", q, b"not a signed body")]
    )
    broker.claim(ReplayGuard.key(used.signature), "used", 60)  # type: ignore[arg-type]
    assert {d.message_id: d.peeked for d in broker.reserve([q], 10, LONG_S)} == {
        "used": None,
        "fresh": None,
        "decoy": None,
        "plain": None,
    }  # not asked to: nothing read
    broker.purge(q)
    broker.publish([Message(e.id, q, encode(e)) for e in (used, fresh, decoy)])
    broker.publish([Message("plain", q, b"not a signed body")])
    broker.peek_on_reserve(NONCE_PREFIX)
    got = {d.message_id: d.peeked for d in broker.reserve([q], 10, LONG_S)}
    key = ReplayGuard.key
    assert got == {
        "used": (key(used.signature), "used"),  # type: ignore[arg-type]
        "fresh": (key(fresh.signature), None),  # type: ignore[arg-type]
        "decoy": (key(decoy.signature), None),  # type: ignore[arg-type]
        "plain": None,
    }


def test_ack_keeps_each_claim_at_least_its_ttl_and_a_live_one_untouched(
    broker: RedisBroker, redis_url: str
) -> None:
    broker.publish([msg("ttlack", f"m{i}") for i in range(3)])
    got = drain(broker, "ttlack", until_n=3)
    assert broker.claim("nonce:live", "first", 5) == "first"
    claims = [("nonce:short", "a", 10.0), ("nonce:long", "b", 300.0), ("nonce:live", "c", 300.0)]
    assert broker.ack(got, claims) == 3
    with redis.Redis.from_url(redis_url) as r:
        ttl = {k: r.pttl(f"stem:claim:nonce:{k}") for k in ("short", "long", "live")}
    assert 10_000 <= ttl["short"] <= 300_000  # the batch's longest ttl: never shorter
    assert 299_000 <= ttl["long"] <= 300_000
    assert ttl["live"] <= 5_000  # a live claim keeps its value and its expiry
    assert broker.peek("nonce:live") == "first"
    assert broker.peek("nonce:short") == "a"


def test_a_body_whose_nonce_pair_is_not_utf8_is_reserved_with_nothing_read(
    broker: RedisBroker,
) -> None:
    # the pair is read off an unverified body: junk bytes must not break the reserve
    q = f"junkpeek-{time.monotonic_ns()}"
    broker.publish([Message("junk", q, b'{"key_id":"\xff","nonce":"a"}')])
    broker.peek_on_reserve(NONCE_PREFIX)
    [d] = broker.reserve([q], 10, LONG_S)
    assert (d.message_id, d.peeked) == ("junk", None)


def test_reserve_reads_the_pair_only_near_the_end_of_the_body(broker: RedisBroker) -> None:
    # Stem's longest tail after the pair: a 255-character task name of 4-byte characters
    long_name = RING.sign(Envelope(id="long", task="\U0001f600" * 255, args=("x" * 50_000,)))
    q = f"tailpeek-{time.monotonic_ns()}"
    far = b'{"key_id":"v1","nonce":"far"}' + b" " * 4096 + b"{}"
    broker.publish([Message("long", q, encode(long_name)), Message("far", q, far)])
    broker.peek_on_reserve(NONCE_PREFIX)
    got = {d.message_id: d.peeked for d in broker.reserve([q], 10, LONG_S)}
    assert got == {"long": (ReplayGuard.key(long_name.signature), None), "far": None}  # type: ignore[arg-type]


def test_a_claim_key_that_holds_no_string_reads_as_nothing_and_every_message_is_reserved(
    broker: RedisBroker, redis_url: str
) -> None:
    envs = [RING.sign(Envelope(id=f"m{i}", task="x")) for i in range(3)]
    q = f"wrongtype-{time.monotonic_ns()}"
    broker.publish([Message(e.id, q, encode(e)) for e in envs])
    with redis.Redis.from_url(redis_url) as r:  # only a writer to the store can do this
        r.hset(f"stem:claim:{ReplayGuard.key(envs[1].signature)}", "x", "y")  # type: ignore[arg-type]
    broker.peek_on_reserve(NONCE_PREFIX)
    got = {d.message_id: d.peeked for d in broker.reserve([q], 10, LONG_S)}
    assert got == {
        "m0": (ReplayGuard.key(envs[0].signature), None),  # type: ignore[arg-type]
        "m1": None,  # read again by the worker, whose MGET sees no claim there
        "m2": (ReplayGuard.key(envs[2].signature), None),  # type: ignore[arg-type]
    }
    assert broker.peek_many([ReplayGuard.key(envs[1].signature)]) == [None]  # type: ignore[arg-type]
