"""The worker: reserve what free slots can run, run it in a pool, write the result, ack.

Threads: the consumer (reserve + admit), the maintainer (lease renewal, time limits), the
pool's own threads (which settle their outcomes), and the caller's thread (signals and
shutdown). Leases of running tasks are renewed while they run, so a live task is never
redelivered because of its age; a worker that dies stops renewing and its messages come
back after ``lease_s``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from stem.brokers.base import Delivery
from stem.config.schema import MAX_POOL_SIZE, MIN_LEASE_S, autoscale_problem
from stem.envelope import now_ms as _now_ms
from stem.errors import BackendError, BrokerError, StemError
from stem.observability import signals
from stem.observability.logs import current_setup
from stem.worker.admission import Admission
from stem.worker.control import ControlServer
from stem.worker.job import Job, Outcome, execute
from stem.worker.pools import AsyncPool, Pool, SoloPool, ThreadPool
from stem.worker.settle import Settler

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.observability.heartbeats import HeartbeatWriter

T = TypeVar("T")

RESULT_CLEANUP_S = 60.0  # how often a worker deletes expired results
AUTOSCALE_EVERY_S = 1.0  # how often autoscaling looks at the backlog and the idle time
_RECENT_REVOKE_S = 120.0  # a revocation told by control outlives a scan for this long
log = logging.getLogger("stem.worker")

POOLS = ("process", "thread", "async", "solo")


@dataclass(frozen=True)
class WorkerConfig:
    queues: tuple[str, ...] = ("default",)
    pool: str = "thread"
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 2)
    lease_s: float = 30.0
    max_deliveries: int = 5
    shutdown_budget_s: float = 30.0
    poll_wait_s: float = 1.0
    time_limit_s: float | None = None
    soft_time_limit_s: float | None = None
    node_name: str | None = None
    heartbeat_s: float = 5.0
    autoscale: tuple[int, int] | None = None  # (max, min) pool size
    autoscale_idle_s: float = 10.0
    stall_s: float = 120.0  # exit if the consumer loop has not turned for this long
    control: bool = True
    # Deliveries reserved per pool slot beyond the slots themselves, waiting in the worker
    # (leases renewed) until a slot frees. 0: reserve only what free slots start at once.
    prefetch: int = 0

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise StemError(f"unknown pool {self.pool!r}; use one of {', '.join(POOLS)}")
        if not 1 <= self.concurrency <= MAX_POOL_SIZE:
            raise StemError(f"concurrency must be 1..{MAX_POOL_SIZE}, got {self.concurrency}")
        if self.lease_s <= MIN_LEASE_S:
            raise StemError(f"lease_s must be more than {MIN_LEASE_S:g} seconds")
        if not self.queues:
            raise StemError("a worker needs at least one queue")
        if not 0 <= self.prefetch <= 64:
            raise StemError(f"prefetch must be 0..64 deliveries per slot, got {self.prefetch}")
        if self.autoscale is not None:
            if self.pool == "solo":
                raise StemError(
                    "--autoscale needs a pool that can grow (the solo pool has one slot)"
                )
            if problem := autoscale_problem(*self.autoscale):
                raise StemError(f"--autoscale {problem}")


class Worker:
    def __init__(self, app: Stem, config: WorkerConfig | None = None) -> None:
        self.app = app
        self.config = config or WorkerConfig()
        self.name = self.config.node_name or f"stem-{os.getpid()}@{socket.gethostname()}"
        self.inflight: dict[str, Job] = {}
        self.buffered: collections.deque[Delivery] = collections.deque()  # prefetched
        self._slots = threading.Condition()
        self._stop_reserving = threading.Event()
        self._stop_now = threading.Event()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self.paused: set[str] = set()
        self.revoked: set[str] = set()
        self._revoked_at: dict[str, float] = {}  # added by control requests: when
        self.settler = Settler(
            app,
            self.name,
            self.config.max_deliveries,
            batch_acks=True,
            running=lambda: len(self.inflight),
        )
        self.admission = Admission(
            app, self.settler, self.config.max_deliveries, is_revoked=self.revoked.__contains__
        )
        if self.config.autoscale is not None:
            self.config = replace(self.config, concurrency=self.config.autoscale[1])
        self.pool: Pool = self._make_pool()
        self._control: ControlServer | None = None
        self._heartbeats: HeartbeatWriter | None = None
        self._idle_since = time.monotonic()
        self.stalled = False
        self.last_consume_ms = 0  # last successful reserve (the broker answered)
        self.last_loop_ms = 0  # last turn of the consumer loop (also while slots are full)
        self.started_at = time.time()

    def _make_pool(self) -> Pool:
        cfg = self.config
        if cfg.pool == "process":
            from stem.worker.process_pool import ProcessPool

            return ProcessPool(
                cfg.concurrency,
                self._done,
                self._progress,
                # The worker's configuration as resolved (keys, TLS, routes), so tasks that
                # publish from a child sign and connect alike.
                bootstrap={
                    "app": self.app.import_spec,
                    "config": self.app.child_config(),
                    "logging": current_setup(),
                },
            )
        if cfg.pool == "async":
            return AsyncPool(cfg.concurrency, self._done, self._progress)
        if cfg.pool == "solo":
            return SoloPool(cfg.concurrency, self._done, self._progress)
        return ThreadPool(cfg.concurrency, self._done, self._progress)

    # -- running ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool and the worker's threads, and return."""
        from stem.observability.heartbeats import attach_heartbeats

        signals.worker_init.send(worker=self)
        self.app.broker.ping()
        try:
            self.app.backend.ping()  # (a Redis store that evicts keys is warned about here)
        except BackendError as exc:
            # Not fatal: tasks wait in the broker until results can be written again.
            log.warning(
                "result backend unreachable at start: %s", exc, extra={"event": "backend-down"}
            )
        # The broker just answered: count that as contact, so the first heartbeat (sent
        # before the consumer's first reserve returns) reports a consuming worker.
        self.last_consume_ms = self.last_loop_ms = _now_ms()
        self._heartbeats = attach_heartbeats(self)
        self._load_revoked()
        self.pool.start()
        if self.config.control:
            self._control = ControlServer(self)
            self._control.start()
        loops: list[tuple[Callable[[], None], str]] = [
            (self._consume, "stem-consumer"),
            (self._maintain, "stem-lease"),
            (self._housekeep, "stem-housekeeping"),
            (self._watchdog, "stem-watchdog"),
            (self._clean_results, "stem-cleanup"),
        ]
        if self.config.autoscale is not None:
            loops.append((self._scale, "stem-autoscale"))
        for target, name in loops:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "worker %s ready: queues=%s pool=%s concurrency=%d",
            self.name,
            ",".join(self.config.queues),
            self.config.pool,
            self.pool.size,
            extra={"event": "worker-ready", "worker": self.name},
        )
        signals.worker_ready.send(worker=self)

    def run(self) -> None:
        """Run until SIGTERM/SIGINT (or :meth:`request_stop`), then drain and return."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        self.start()
        while not self._stop_reserving.is_set():
            self._stop_reserving.wait(0.5)
        self.shutdown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_reserving.is_set():
            log.warning("second stop signal: stopping now", extra={"event": "worker-stop-now"})
            self._stop_now.set()
        else:
            log.info(
                "stop signal: draining for up to %.0fs",
                self.config.shutdown_budget_s,
                extra={"event": "worker-draining"},
            )
        self._stop_reserving.set()
        with self._slots:
            self._slots.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def remote_shutdown(self, mode: str) -> None:
        """warm: drain within the budget; soft: drain for at most 10 s; hard: now."""
        if mode == "soft":
            self.config = replace(
                self.config, shutdown_budget_s=min(self.config.shutdown_budget_s, 10.0)
            )
        self.request_stop(now=mode == "hard")

    def resize(self, size: int) -> None:
        if size > MAX_POOL_SIZE:
            raise StemError(f"a pool holds at most {MAX_POOL_SIZE} slots, asked for {size}")
        size, before = max(1, size), self.pool.size
        if size != before:
            self.pool.resize(size)
        if self.pool.size != before:
            log.info(
                "pool size %d -> %d",
                before,
                self.pool.size,
                extra={"event": "pool-resized", "worker": self.name},
            )
        with self._slots:
            self._slots.notify_all()

    def terminate(self, task_ids: list[str]) -> list[str]:
        """Stop running tasks (revoke --terminate); they are recorded as REVOKED."""
        wanted = set(task_ids)
        with self._slots:
            jobs = [j for j in self.inflight.values() if j.envelope.id in wanted]
        for job in jobs:
            job.revoked = True
            job.hard_fired = True
            self.pool.on_hard_limit(job)
        return [j.envelope.id for j in jobs]

    def _load_revoked(self) -> None:
        try:
            keys = self.app.broker.scan("revoked:")
        except BrokerError as exc:
            log.warning("could not load revocations: %s", exc)
            return
        scanned = {k.removeprefix("revoked:") for k in keys}
        # In place (admission holds self.revoked.__contains__), and only what is still
        # revoked: ids whose keys expired (REVOKE_TTL_S) leave, or the set would only grow.
        # Ids a control request just added stay a while (their key may not have been in
        # this scan's view yet).
        horizon = time.monotonic() - _RECENT_REVOKE_S
        for task_id in [i for i, at in self._revoked_at.items() if at < horizon]:
            del self._revoked_at[task_id]
        self.revoked.intersection_update(scanned | self._revoked_at.keys())
        self.revoked.update(scanned)

    def note_revoked(self, ids: Sequence[str]) -> None:
        """Revocations a control request brought (their keys were written before)."""
        now = time.monotonic()
        self._revoked_at.update(dict.fromkeys(ids, now))
        self.revoked.update(ids)

    def request_stop(self, *, now: bool = False) -> None:
        self._stop_reserving.set()
        if now:
            self._stop_now.set()
        with self._slots:
            self._slots.notify_all()

    def shutdown(self) -> None:
        """Stop reserving, wait for running tasks up to the drain budget, stop the pool,
        hand the rest back to the broker. What follows the drain shares one deadline
        (STOP_TAIL_S, 2 s on a stop now), each step that calls the broker running for
        at most its share: an unresponsive broker must not hold the exit past what a
        supervisor allows (systemd's TimeoutStopSec); leases bring back whatever those
        steps did not do."""
        drain_until = time.monotonic() + self.config.shutdown_budget_s
        self._stop_reserving.set()
        with self._slots:
            self._slots.notify_all()
        # The consumer may be admitting what its last reserve brought: let it finish, so
        # that every job is in the list below (one added after it would be neither
        # waited for nor handed back).
        grace = 1.0 if self._stop_now.is_set() else self.config.poll_wait_s + 2.0
        for t in self._threads:
            if t.name == "stem-consumer":
                t.join(grace)
        release_until = drain_until
        if self._stop_now.is_set():
            release_until = min(drain_until, time.monotonic() + STOP_TAIL_NOW_S)
        self._bounded("releasing prefetched messages", self._release_buffered, release_until)
        signals.worker_shutting_down.send(worker=self)
        with self._slots:
            while self.inflight and not self._stop_now.is_set():
                remaining = drain_until - time.monotonic()
                if remaining <= 0:
                    break
                self._slots.wait(min(remaining, 0.2))
            leftover = list(self.inflight.values())
        until = time.monotonic() + (STOP_TAIL_NOW_S if self._stop_now.is_set() else STOP_TAIL_S)
        claimed = self.settler.claim_all(leftover)
        # Before they go back: a pool process still running one must be gone by the time
        # another worker may take it (threads cannot be stopped; they end with the process).
        self.pool.stop(kill=bool(leftover) or self._stop_now.is_set())
        handed = 0
        if claimed:
            handed = (
                self._bounded("handing tasks back", lambda: self.settler.give_back(claimed), until)
                or 0
            )
        if handed:
            log.warning(
                "handed %d unfinished task(s) back to the broker",
                handed,
                extra={"event": "worker-handed-back", "count": handed},
            )
        if handed < len(claimed):
            log.warning(
                "%d unfinished task(s) not handed back: they come back after their lease",
                len(claimed) - handed,
                extra={"event": "worker-hand-back-failed"},
            )
        # Every outcome is settled now: send the acks still queued, then end the sender.
        if not self.settler.acks.stop(_share(until)):
            log.warning(
                "acks still unsent at shutdown; those tasks will be delivered again",
                extra={"event": "acks-unsent"},
            )
        self._stopped.set()
        # Threads stuck in a broker call are not waited for past the deadline (they are
        # daemon threads and end with the process).
        for t in self._threads:
            t.join(timeout=max(0.0, until - time.monotonic()))
        self.admission.close()
        if self._control is not None:
            self._control.join(timeout=max(0.0, until - time.monotonic()))
        self._bounded("saying goodbye", self._goodbye, until)
        log.info(
            "worker %s stopped", self.name, extra={"event": "worker-stopped", "worker": self.name}
        )

    def _goodbye(self) -> None:
        signals.worker_shutdown.send(worker=self)  # the last heartbeat and event say offline
        if self._heartbeats is not None:
            self._heartbeats.detach()

    def _bounded(self, what: str, step: Callable[[], T], until: float) -> T | None:
        """Run a shutdown step that calls the broker for its share of the time left; its
        value, or None if it failed or did not finish in time."""
        budget_s = _share(until)
        done: list[T | None] = []
        t = threading.Thread(
            target=lambda: done.append(self._guarded(what, step)),
            name="stem-stopping",
            daemon=True,
        )
        t.start()
        t.join(budget_s)
        if t.is_alive():
            log.warning(
                "%s did not finish within %.1fs (the broker is slow to answer); going on",
                what,
                budget_s,
                extra={"event": "shutdown-step-timeout"},
            )
            return None
        return done[0] if done else None

    def free_slots(self) -> int:
        return max(0, self.pool.size - len(self.inflight))

    def _release_buffered(self) -> None:
        with self._slots:
            left = list(self.buffered)
            self.buffered.clear()
        for delivery in left:
            self.settler.release(delivery)

    def _wants_refill(self, dry: bool) -> bool:
        """Reserve more for the buffer while every slot is busy, once it is at most half
        full, unless the last reserve found the queues dry (then not until a slot frees and
        reserves again: no polling loop while every slot is busy)."""
        cap = self._prefetch_cap()
        return cap > 0 and len(self.buffered) <= cap // 2 and not dry

    def _prefetch_cap(self) -> int:
        """How many deliveries the worker may hold beyond its slots."""
        return self.pool.size * self.config.prefetch

    def _consume(self) -> None:
        backoff = 0.1
        failing_since: float | None = None  # monotonic time of the first failed reserve
        dry = False
        while not self._stop_reserving.is_set():
            with self._slots:
                while (
                    not self.free_slots()
                    and not self._wants_refill(dry)
                    and not self._stop_reserving.is_set()
                ):
                    self.last_loop_ms = _now_ms()
                    self._slots.wait(0.5)
                free = self.free_slots()
                take = [self.buffered.popleft() for _ in range(min(free, len(self.buffered)))]
            self.last_loop_ms = _now_ms()
            if take:
                self._admit(take)  # prefetched deliveries first, before reserving more
                continue
            if self._stop_reserving.is_set():
                break
            queues = [q for q in self.config.queues if q not in self.paused]
            if not queues:
                self._stop_reserving.wait(self.config.poll_wait_s)
                continue
            want = free + self._prefetch_cap() - len(self.buffered)
            # Wait for messages only when a slot is idle; a refill for the buffer just looks.
            wait_s = self.config.poll_wait_s if free else 0.0
            try:
                deliveries = self.app.broker.reserve(queues, want, self.config.lease_s, wait_s)
            except Exception as exc:
                # Any error, not only BrokerError: this thread must not end while the
                # process lives on (a worker that heartbeats but consumes nothing).
                log.warning(
                    "reserve failed, retrying in %.1fs: %s",
                    backoff,
                    exc,
                    exc_info=not isinstance(exc, BrokerError),
                    extra={"event": "reserve-failed"},
                )
                failing_since = failing_since or time.monotonic()
                self._stop_reserving.wait(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if failing_since is not None:
                log.info(
                    "reserving again after %.1fs of failures",
                    time.monotonic() - failing_since,
                    extra={"event": "reserve-recovered"},
                )
                failing_since = None
            backoff = 0.1
            self.last_consume_ms = self.last_loop_ms = _now_ms()
            dry = len(deliveries) < want
            with self._slots:
                # A pool shrunk while this thread waited in reserve has fewer slots now.
                free = min(free, self.free_slots())
                now_ready = deliveries[:free]
                if self._stop_reserving.is_set():
                    later: list[Delivery] = list(deliveries[free:])
                else:
                    # A claim read while reserving is stale by the time a buffered delivery
                    # is admitted (the original may have settled since): read it again then.
                    self.buffered.extend(
                        d if d.peeked is None else dataclasses.replace(d, peeked=None)
                        for d in deliveries[free:]
                    )
                    later = []
            for delivery in later:
                self.settler.release(delivery)  # stopping: shutdown already emptied the buffer
            self._admit(now_ready)

    def _adopt(self, delivery: Delivery) -> bool:
        """Whether ``delivery`` is of a message running here already, now taken over by
        its run: the run's lease lapsed (renewals held up by a paused server, say) and
        the message came back to this worker under a new lease. The run renews and acks
        the new lease from now on, so it neither runs beside itself nor again after."""
        with self._slots:
            for receipt, job in list(self.inflight.items()):
                if job.delivery.message_id != delivery.message_id:
                    continue
                if not job.adopt(delivery):
                    return False  # over (a retry put back, say): a copy to run
                del self.inflight[receipt]
                self.inflight[delivery.receipt] = job
                log.warning(
                    "task %s came back while running here (its lease lapsed); the run "
                    "carries on under the new lease",
                    job.envelope.id,
                    extra={"event": "lease-adopted", "task_id": job.envelope.id},
                )
                return True
        return False

    def _admit(self, deliveries: Sequence[Delivery]) -> None:
        wanted = []
        for delivery in deliveries:
            # Reserved while a stop or a pause arrived: hand it straight back.
            if self._stop_reserving.is_set() or delivery.queue in self.paused:
                self.settler.release(delivery)
            elif not self._adopt(delivery):
                wanted.append(delivery)
        try:
            decoded = self.admission.decode_many(wanted)
        except Exception:
            log.exception(
                "admission of %d deliveries failed; handing them back",
                len(wanted),
                extra={"event": "admission-failed"},
            )
            for delivery in wanted:
                self.settler.release(delivery, delay_s=1.0)
            return
        for delivery, env in decoded:
            if self._stop_reserving.is_set():
                self.settler.release(delivery)
                continue
            try:
                job = self.admission.admit(delivery, self._limits, env)
            except (BrokerError, BackendError) as exc:
                # A result or limit store that is down (a canvas step's check): the
                # delivery comes back later (Settler.later), and this thread keeps consuming.
                log.warning(
                    "could not admit task %s, handing it back: %s",
                    env.id,
                    exc,
                    extra={"event": "admission-failed", "task_id": env.id},
                )
                self.settler.release_later(delivery, found_down=True)
                continue
            except Exception as exc:  # waiting will not fix it (a bad key template, a bug)
                log.exception(
                    "could not admit task %s", env.id, extra={"event": "admission-failed"}
                )
                self.admission.refuse(delivery, env, exc)
                continue
            if job is None:
                continue
            job.on_acked = functools.partial(self._free_slot, job)
            with self._slots:
                self.inflight[delivery.receipt] = job
            self.pool.submit(job)

    def _limits(self, job: Job) -> None:
        opts = job.task.options
        job.hard_limit_s = opts.time_limit or self.config.time_limit_s
        job.soft_limit_s = opts.soft_time_limit or self.config.soft_time_limit_s

    def _done(self, job: Job, outcome: Outcome) -> None:
        if not job.claim_settlement():
            return
        try:
            self.settler.settle(job, outcome)
        except Exception:
            log.exception(
                "settling task %s failed",
                job.envelope.id,
                extra={"event": "settle-failed", "task_id": job.envelope.id},
            )
        finally:
            if not job.ack_deferred:
                self._free_slot(job)

    def _free_slot(self, job: Job) -> None:
        with self._slots:
            self.inflight.pop(job.delivery.receipt, None)
            self._slots.notify_all()

    def _progress(self, job: Job, data: dict[str, Any]) -> None:
        self.settler.progress(job, data)

    def _watchdog(self) -> None:
        """No I/O here: the other threads may all be blocked in broker calls."""
        while not self._stopped.wait(0.5):
            if self._consumer_stalled():
                # A consumer stuck in a broker call that never returns cannot be freed
                # from here: exit so the supervisor (systemd Restart=, stem-multi) restarts.
                log.critical(
                    "consumer loop stalled for %.0fs: exiting for a restart",
                    (_now_ms() - self.last_loop_ms) / 1000,
                    extra={"event": "worker-stalled", "worker": self.name},
                )
                self.stalled = True
                self.request_stop(now=True)
                return

    def _consumer_stalled(self) -> bool:
        if self._stop_reserving.is_set() or not self.last_loop_ms:
            return False
        limit_ms = int(max(self.config.stall_s, self.config.poll_wait_s * 4) * 1000)
        return _now_ms() - self.last_loop_ms > limit_ms

    def health(self) -> dict[str, Any]:
        """A snapshot for heartbeats, health checks and watchdogs. ``consuming`` is true
        while the consumer loop turns and the broker answered recently (or every slot is
        busy, when not reserving is the right thing to do)."""
        now = _now_ms()
        stale_ms = int((self.config.poll_wait_s * 2 + 10) * 1000)
        loop_alive = any(t.name == "stem-consumer" and t.is_alive() for t in self._threads)
        busy = self.free_slots() == 0
        # Every queue paused by an operator: not reserving is right too, not a stall (a
        # watchdog restart would also drop the pause, which lives in this process).
        idle = busy or all(q in self.paused for q in self.config.queues)
        consuming = (
            loop_alive
            and now - self.last_loop_ms < stale_ms
            and (idle or now - self.last_consume_ms < stale_ms)
        ) or self._stop_reserving.is_set()
        return {
            "worker": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pool": self.config.pool,
            "concurrency": self.pool.size,
            "queues": list(self.config.queues),
            "paused": sorted(self.paused),
            "running": len(self.inflight),
            "prefetched": len(self.buffered),
            "processed": dict(self.settler.counts),
            "last_consume_ms": self.last_consume_ms,
            "started_ms": int(self.started_at * 1000),
            "at_ms": now,
            "draining": self._stop_reserving.is_set(),
            "consuming": consuming,
        }

    def _clean_results(self) -> None:
        """Delete expired results now and then (SQL stores keep them until asked; Redis
        expires its own): every worker does, on its own thread, off the lease path."""
        while not self._stopped.wait(RESULT_CLEANUP_S):
            try:
                deleted = self.app.backend.cleanup()
            except Exception as exc:
                log.warning(
                    "expired results not deleted: %s", exc, extra={"event": "cleanup-failed"}
                )
                continue
            if deleted:
                log.debug("deleted %d expired results", deleted)

    def _maintain(self) -> None:
        """Leases and time limits, and nothing slow: a lease not renewed in time lets
        another worker run a task that is running here. Each step is guarded, since a
        dead lease thread leaves the worker consuming with nothing renewed or enforced."""
        renew_every = self.config.lease_s / 3
        next_renew = time.monotonic() + renew_every
        while not self._stopped.is_set():
            self._stopped.wait(0.05)
            now = time.monotonic()
            with self._slots:
                jobs = list(self.inflight.values())
            for job in jobs:
                if not job.settled:  # else finished: its ack is on its way (lease renewed)
                    self._guarded("enforcing time limits", self._check_limits, job, now)
            if now >= next_renew:
                next_renew = now + renew_every
                with self._slots:
                    waiting = list(self.buffered)
                if jobs or waiting:
                    self._guarded(
                        "renewing leases",
                        self.settler.renew,
                        jobs,
                        self.config.lease_s,
                        waiting=waiting,
                    )

    def _check_limits(self, job: Job, now: float) -> None:
        elapsed = now - job.started
        if job.soft_limit_s and not job.soft_fired and elapsed > job.soft_limit_s:
            job.soft_fired = True
            self.pool.on_soft_limit(job)
        if job.hard_limit_s and not job.hard_fired and elapsed > job.hard_limit_s:
            job.hard_fired = True
            log.warning(
                "task %s hit its hard time limit (%.1fs)",
                job.envelope.id,
                job.hard_limit_s,
                extra={"event": "task-hard-limit"},
            )
            self.pool.on_hard_limit(job)

    def _housekeep(self) -> None:
        """Heartbeats and revocations, off the lease thread: they call the broker, and a
        broker slow to answer once held up lease renewal long enough for tasks running
        here to be delivered to another worker."""
        next_beat = time.monotonic()
        while not self._stopped.wait(0.05):
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + self.config.heartbeat_s
                self._guarded("loading revocations", self._load_revoked)
                self._guarded("sending a heartbeat", self._heartbeat)

    def _scale(self) -> None:
        """Autoscaling, on a thread of its own: growing a process pool starts processes,
        seconds each where the app is slow to import, which would hold up heartbeats
        (and with them systemd's watchdog) or lease renewal."""
        while not self._stopped.wait(AUTOSCALE_EVERY_S):
            if not self._stop_reserving.is_set():
                self._guarded("autoscaling", self._autoscale, time.monotonic())

    def _heartbeat(self) -> None:
        signals.heartbeat.send(worker=self, health=self.health())

    @staticmethod
    def _guarded(what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn``'s value; None (logged) if it raised."""
        try:
            return fn(*args, **kwargs)
        except Exception:
            log.exception("%s failed", what, extra={"event": "maintenance-failed"})
            return None

    def _autoscale(self, now: float) -> None:
        """Grow under backlog when every slot is busy; shrink by one after idling."""
        assert self.config.autoscale is not None
        hi, lo = self.config.autoscale
        size = self.pool.size
        if self.inflight:
            self._idle_since = now
        if self.free_slots() == 0 and size < hi:
            try:
                stats = self.app.broker.stats(list(self.config.queues))
            except BrokerError:
                return
            backlog = sum(s.ready for s in stats if s.queue not in self.paused)
            if backlog:
                self.resize(min(hi, size + backlog))
        elif (
            not self.inflight
            and size > lo
            and now - self._idle_since >= (self.config.autoscale_idle_s)
        ):
            self.resize(size - 1)
            self._idle_since = now


# What a stop may take after the drain budget: handing back, acks, goodbyes, joins.
STOP_TAIL_S = 15.0
STOP_TAIL_NOW_S = 2.0


def _share(until: float) -> float:
    """The time a shutdown step may take: at most 5 s, and what is left before ``until``
    (a step about to run with no time left still gets a moment)."""
    return max(0.1, min(5.0, until - time.monotonic()))


def drain(
    app: Stem,
    queues: Sequence[str] = ("default",),
    *,
    max_tasks: int = 10_000,
    lease_s: float = 60.0,
) -> int:
    """Run ready tasks in this thread until the queues have nothing ready; return how many
    ran. For tests and scripts (``stem.testing``); delayed tasks stay in the broker."""
    from stem.control import revoked_key

    settler = Settler(app, "embedded", max_deliveries=5)
    admission = Admission(
        app,
        settler,
        max_deliveries=5,
        is_revoked=lambda task_id: app.broker.peek(revoked_key(task_id)) is not None,
    )
    ran = 0
    while ran < max_tasks:
        deliveries = app.broker.reserve(list(queues), 1, lease_s, 0.0)
        if not deliveries:
            return ran
        job = admission.admit(deliveries[0], lambda job: None)
        if job is None:
            continue
        outcome = execute(job.task, job.envelope, functools.partial(settler.progress, job))
        job.claim_settlement()
        settler.settle(job, outcome)
        ran += 1
    return ran
