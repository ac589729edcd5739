"""What happens to a delivery after it runs (see ``admission`` for before).

:class:`Settler` writes the result first and acks second; retries go back to the broker with
a delay and a fresh signature; exhausted retries are dead-lettered.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from stem import states
from stem.brokers.base import Claim, Delivery, PeeksOnReserve
from stem.envelope import Envelope, now_ms
from stem.errors import BackendError, BrokerError, ConfigError, StemError
from stem.observability import signals
from stem.observability.logs import task_log_fields
from stem.result import ErrorInfo
from stem.security.replay import NONCE_PREFIX, ReplayGuard
from stem.worker.canvas_hooks import CanvasHooks
from stem.worker.cpu import CpuGauge
from stem.worker.job import Job, Outcome
from stem.worker.limit_gate import RATE_SLOT_HEADER, LimitGate

if TYPE_CHECKING:
    from stem.app import Stem

log = logging.getLogger("stem.worker")

Done = Callable[[], None]


class AckBatcher:
    """Acks sent in batches by one background thread.

    Settling threads hand their acks in and go on (a pool slot is never held while an ack
    is in flight); the thread sends everything handed in since its last call in one
    ``Broker.ack``, so under load many acks share a round trip and with one task it is sent
    at once. An ack may carry the claim that consumes its message's replay nonce: the batch
    records its nonces in the same atomic ``Broker.ack`` call.

    Lingering: when the process is short of CPU (``busy()``) and other tasks are still
    running (``running()`` counts the tasks whose ack is not sent yet, these included), the
    sender waits up to ``linger_s`` for their acks before it sends, so that they share one
    call. Short tasks on a small pool (four process-pool children, say) otherwise finish one
    at a time and each ack is a round trip of its own. A lone task's ack, or any ack on a
    process with CPU to spare, goes at once: lingering holds slots a little longer, which
    only pays when the CPU, not the slots, is what limits the worker.

    The result of a task is always written before its ack is handed in. An ack not yet sent
    when the process dies, or one that fails, is lost: the lease lapses and the message is
    delivered again (at-least-once), as when an unbatched ack fails. With
    ``background=False`` (single-threaded use such as :func:`stem.worker.consumer.drain`)
    each ack is sent before :meth:`add` returns."""

    def __init__(
        self,
        ack: Callable[[list[Delivery], list[Claim]], object],
        *,
        background: bool = False,
        linger_s: float = 0.0,
        running: Callable[[], int] | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self._ack = ack
        self._background = background
        self._linger_s = linger_s if running is not None and busy is not None else 0.0
        self._running = running or (lambda: 0)
        self._busy = busy or (lambda: False)
        lock = threading.Lock()
        self._wakeup = threading.Condition(lock)  # the sender waits here for acks
        self._idle = threading.Condition(lock)  # wait_idle waits here for the sender
        self._pending: list[tuple[Delivery, Claim | None, Done | None]] = []
        self._sending = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.acked = 0

    @property
    def background(self) -> bool:
        return self._background

    def add(self, delivery: Delivery, claim: Claim | None = None, done: Done | None = None) -> None:
        """Hand in an ack (and the nonce claim to record first). ``done`` is called once
        the ack was sent, or failed to be."""
        with self._wakeup:
            inline = not self._background or self._stopping
            if not inline:
                self._pending.append((delivery, claim, done))
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="stem-acks", daemon=True)
                    self._thread.start()
                elif not self._sending:
                    self._wakeup.notify()
        if inline:  # single-threaded use, or an ack arriving after stop(): send it now
            self._send([(delivery, claim, done)])

    def _run(self) -> None:
        while True:
            with self._wakeup:
                while not self._pending and not self._stopping:
                    self._wakeup.wait()
                if not self._pending:
                    return  # stopping, and everything was sent
                if self._linger_s and self._busy():
                    self._linger()
                batch, self._pending = self._pending, []
                self._sending = True
            try:
                self._send(batch)
            except BaseException:  # the sender must outlive anything one batch does
                log.exception("ack of %d message(s) failed", len(batch))
            finally:
                with self._idle:
                    self._sending = False
                    self._idle.notify_all()

    def _linger(self) -> None:
        """Wait (lock held by the caller) until every running task's ack is in, at most
        ``linger_s``."""
        deadline = time.monotonic() + self._linger_s
        while not self._stopping and len(self._pending) < self._running():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wakeup.wait(left)

    def _send(self, batch: list[tuple[Delivery, Claim | None, Done | None]]) -> None:
        try:
            self._send_batch(batch)
        finally:
            for _, _, done in batch:
                if done is not None:
                    try:
                        done()
                    except Exception:
                        log.exception("after-ack callback failed")

    def _send_batch(self, batch: list[tuple[Delivery, Claim | None, Done | None]]) -> None:
        claims = [c for _, c, _ in batch if c is not None]
        try:
            self._ack([d for d, _, _ in batch], claims)
        except BrokerError as exc:
            log.error(
                "ack of %d message(s) failed; they will be delivered again "
                "(their replay nonces were not recorded either): %s",
                len(batch),
                exc,
                extra={"event": "broker-call-failed"},
            )
        except Exception:
            log.exception("ack of %d message(s) failed", len(batch))
        self.batches += 1
        self.acked += len(batch)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every ack handed in was sent. False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending or self._sending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Send what is left, then end the sender. False if acks were left unsent."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        with self._idle:
            return not self._pending and not self._sending


_LATER_MAX_S = 30.0  # the longest a delivery is given back for while a store is down
ACK_LINGER_S = 0.001  # how long a busy worker's ack sender waits for running tasks' acks


def _require_ack_with_claims(broker: Any) -> None:
    """Fail at startup, not on the first signed task, when a broker of the user's own has
    an ``ack`` written before it took claims (replay protection passes them)."""
    try:
        inspect.signature(broker.ack).bind([], [])
    except TypeError:
        raise ConfigError(
            f"{type(broker).__name__}.ack() takes no claims: replay protection needs "
            "ack(deliveries, claims=()) (see stem.brokers.base.Broker.ack)"
        ) from None
    except ValueError:
        pass  # no signature to read (a C function): take it on trust


class Settler:
    def __init__(
        self,
        app: Stem,
        worker_name: str,
        max_deliveries: int,
        *,
        batch_acks: bool = False,
        running: Callable[[], int] | None = None,
    ) -> None:
        """``running``: how many tasks hold a slot (for :class:`AckBatcher`'s lingering)."""
        self.app = app
        self.acks = AckBatcher(
            self._send_acks,
            background=batch_acks,
            linger_s=ACK_LINGER_S,
            running=running,
            busy=CpuGauge().busy,
        )
        self.worker_name = worker_name
        self.max_deliveries = max_deliveries
        self.canvas = CanvasHooks(app)
        self.limits = LimitGate(app, self)
        self.replay = (
            ReplayGuard.for_keyring(app.broker, app.keyring) if app.keyring is not None else None
        )
        if self.replay is not None:
            _require_ack_with_claims(app.broker)
            if isinstance(app.broker, PeeksOnReserve):
                app.broker.peek_on_reserve(NONCE_PREFIX)
        self.counts: dict[str, int] = {
            "succeeded": 0,
            "failed": 0,
            "retried": 0,
            "dead_lettered": 0,
            "expired": 0,
        }
        # When a store this worker needs (results, or the broker's for follow-ups) was
        # first and last found down: see later().
        self._down_lock = threading.Lock()
        self._down_since: float | None = None
        self._down_last = 0.0
        self._clock = time.monotonic

    def _send_acks(self, batch: Sequence[Delivery], claims: Sequence[Claim]) -> int:
        # claims only when there are some: a broker of the user's own written before
        # ack took claims still works for every task that records no nonce with its ack
        return self.app.broker.ack(batch, claims) if claims else self.app.broker.ack(batch)

    # -- results ---------------------------------------------------------------------------

    def store(self, env: Envelope, state: str, *, attempts: int = 3, **fields: Any) -> bool:
        """Write a result record, retrying briefly; False if the backend stayed down."""
        delay = 0.1
        for attempt in range(attempts):
            try:
                self.app.result_store.write_state(
                    env.id,
                    state,
                    task=env.task,
                    attempt=env.attempt,
                    worker=self.worker_name,
                    group_id=env.group_id,
                    **fields,
                )
                self.mark_up()
                return True
            except BackendError as exc:
                log.warning(
                    "result write for %s failed (%s)",
                    env.id,
                    exc,
                    extra={"event": "result-write-failed", **self.fields(env)},
                )
                if attempt + 1 < attempts:
                    time.sleep(delay)
                    delay *= 2
        self.mark_down()
        return False

    def mark_down(self) -> None:
        """A store this worker needs did not answer (see later())."""
        now = self._clock()
        with self._down_lock:
            if self._down_since is None or now - self._down_last > _LATER_MAX_S:
                self._down_since = now
            self._down_last = now

    def mark_up(self) -> None:
        with self._down_lock:
            self._down_since = None

    def later(self) -> float:
        """How long to give a delivery back for when a store it needs is down (its result
        not written, its follow-ups not published, its admission checks not made): as
        long as the store has been down so far, from 1 s up to 30 s. A task is then not
        run again every second for as long as the result store stays down (its result
        lost each time), while a blip of a second costs a second. Without a failure for
        30 s the store counts as back."""
        now = self._clock()
        with self._down_lock:
            since, last = self._down_since, self._down_last
        if since is None or now - last > _LATER_MAX_S:
            return 1.0
        return min(_LATER_MAX_S, max(1.0, now - since))

    def fields(self, env: Envelope) -> dict[str, Any]:
        """Structured log fields for a task (argument values only if the task opts in)."""
        task = self.app.tasks.get(env.task)
        return task_log_fields(
            env, worker=self.worker_name, log_args=bool(task and task.options.log_args)
        )

    def progress(self, job: Job, data: dict[str, Any]) -> None:
        if not job.envelope.headers.get("ignore_result"):
            # (A task that ignores its result writes no record at all: a STARTED one
            # would never be followed by the final state.)
            self.store(job.envelope, states.STARTED, progress=data, attempts=1)

    # -- broker ----------------------------------------------------------------------------

    def _broker_call(self, what: str, fn: Callable[[], object]) -> bool:
        try:
            fn()
        except BrokerError as exc:
            # The lease lapses and the message is delivered again: at-least-once, not lost.
            log.error("%s failed: %s", what, exc, extra={"event": "broker-call-failed"})
            return False
        return True

    def ack(
        self,
        delivery: Delivery,
        *,
        nonce_of: Envelope | None = None,
        job: Job | None = None,
    ) -> None:
        """Ack (batched); with ``nonce_of``, record that message's replay nonce in the same
        atomic broker call as the ack, so the two happen together or not at all, and cost no
        round trip of their own. A task's result, when it has one, is written before this
        call: a copy re-injected by someone who saw the result runs only if a worker checks
        it before the ack is sent (at once, or within the batcher's linger when the worker
        is short of CPU). With ``job`` (whose ``on_acked`` frees its slot), the slot stays
        taken until the ack was sent, so a slot never holds more than one unacknowledged
        task."""
        claim = None
        if nonce_of is not None and self.replay is not None:
            claim = self.replay.claim_of(nonce_of)
        done = None
        if job is not None and job.on_acked is not None and self.acks.background:
            job.ack_deferred = True
            done = job.on_acked
        self.acks.add(delivery, claim, done)

    def release(self, delivery: Delivery, delay_s: float = 0.0) -> bool:
        return self._broker_call("nack", lambda: self.app.broker.nack(delivery, delay_s=delay_s))

    def release_later(self, delivery: Delivery, *, found_down: bool = False) -> bool:
        """Give a delivery back for :meth:`later` because a store it needs is down.
        ``found_down``: the caller's own call failed (else :meth:`store` already said so)."""
        if found_down:
            self.mark_down()
        return self.release(delivery, delay_s=self.later())

    def nack(self, delivery: Delivery, *, delay_s: float, body: bytes | None) -> bool:
        return self._broker_call(
            "nack", lambda: self.app.broker.nack(delivery, delay_s=delay_s, body=body)
        )

    def put_back(self, delivery: Delivery, env: Envelope, *, delay_s: float, body: bytes) -> None:
        """Put back a copy of ``env`` signed afresh (``body``: a retry, a deferred
        rate-limited run) in place of its delivery, then consume the nonce of the message
        it replaces: the bytes first delivered must not run again. In that order: if the
        copy did not go in, the first delivery comes back after its lease and must still
        pass."""
        if self.nack(delivery, delay_s=delay_s, body=body):
            self.consume_nonce(env)

    def consume_nonce(self, env: Envelope) -> None:
        """Mark a signed message as settled, so a copy of it can never run again."""
        if self.replay is None or env.signature is None:
            return
        try:
            self.replay.consume(env)
        except BrokerError as exc:
            log.warning(
                "could not record nonce of %s: %s",
                env.id,
                exc,
                extra={"event": "nonce-record-failed", "task_id": env.id},
            )

    def finished(self, job: Job, *, final: bool) -> None:
        """Release what a run held: its concurrency slot; its unique key once final."""
        self.limits.finished(job.task, job.envelope)
        if final and "unique_key" in job.envelope.headers:
            self.release_unique(job.envelope)

    def hold_unique(self, env: Envelope, ttl_s: float) -> None:
        """A unique task with an expiry starts: its key (set to lapse soon after the
        expiry) is held for the whole window again, for as long as it may now run."""
        key = env.headers.get("unique_key")
        if not isinstance(key, str):
            return

        def hold() -> None:
            broker = self.app.broker
            if not broker.swap(key, env.id, env.id, ttl_s) and not broker.swap(
                key, None, env.id, ttl_s
            ):
                log.warning(
                    "unique key of task %s is held by another task; running it anyway",
                    env.id,
                    extra={"event": "unique-key-taken", **self.fields(env)},
                )

        self._broker_call("unique hold", hold)

    def release_unique(self, env: Envelope) -> None:
        """Let a new task with the same unique key be enqueued (this one ended for good)."""
        key = env.headers.get("unique_key")
        if isinstance(key, str):
            self._broker_call("unique release", lambda: self.app.broker.release(key, env.id))

    def ended(self, env: Envelope, error: ErrorInfo) -> bool:
        """A task ended for good without a result (expired, revoked): fail the chain steps
        and chord callback that wait on it, send its errback, and release its unique key.
        False if the follow-up could not be published now; the caller then gives the
        delivery back, to try again when it returns (and the key stays held)."""
        if not self._fail_waiters(env, error):
            return False
        self.release_unique(env)
        return True

    def _fail_waiters(self, env: Envelope, error: ErrorInfo, *, errback: bool = True) -> bool:
        """The canvas follow-up of a task that ended for good without a result (or whose
        follow-up cannot be published: ``errback`` false); False (logged) if it could not
        be done now. An errback that can never be published (too large, no key to sign
        it with) is logged and dropped: what waits on the task was failed before it."""
        done = self._follow(
            "failure follow-up", env, lambda: self.canvas.after_failure(env, error, errback=errback)
        )
        return done is not False

    def _follow(self, what: str, env: Envelope, step: Callable[[], None]) -> bool | StemError:
        """Run a canvas follow-up ``step``: True once done; False (logged) when the broker
        or result store failed, to be tried again; the error (logged) when trying again
        cannot help."""
        try:
            step()
        except (BrokerError, BackendError) as exc:
            log.warning(
                "%s of task %s not done (%s); it will be tried again",
                what,
                env.id,
                exc,
                extra={"event": "canvas-publish-failed", **self.fields(env)},
            )
            return False
        except StemError as exc:
            log.error(
                "%s of task %s cannot be published: %s",
                what,
                env.id,
                exc,
                extra={"event": "canvas-follow-up-refused", **self.fields(env)},
            )
            return exc
        return True

    def dead_letter(
        self, delivery: Delivery, reason: str, detail: str = "", env: Envelope | None = None
    ) -> None:
        self.counts["dead_lettered"] += 1
        log.warning(
            "dead-lettered message %s: %s %s",
            delivery.message_id,
            reason,
            detail,
            extra={
                "event": "task-dead-lettered",
                "reason": reason,
                **(
                    self.fields(env)
                    if env
                    else {"task_id": delivery.message_id, "queue": delivery.queue}
                ),
            },
        )
        signals.task_rejected.send(delivery=delivery, reason=reason, detail=detail, envelope=env)
        self._broker_call(
            "dead-letter", lambda: self.app.broker.dead_letter(delivery, reason, detail[:2000])
        )

    def renew(
        self, jobs: Sequence[Job], lease_s: float, *, waiting: Sequence[Delivery] = ()
    ) -> None:
        """Renew the leases of running jobs and of prefetched deliveries (``waiting``)."""
        try:
            held = self.app.broker.extend([j.delivery for j in jobs] + list(waiting), lease_s)
        except BrokerError as exc:
            log.warning("lease renewal failed: %s", exc, extra={"event": "lease-renew-failed"})
            return
        signals.lease_renewed.send(count=sum(1 for ok in held if ok))
        for job, ok in zip(jobs, held[: len(jobs)], strict=True):
            if not ok and not job.settled:
                log.warning(
                    "lease of task %s was lost; it may run twice",
                    job.envelope.id,
                    extra={"event": "lease-lost", **self.fields(job.envelope)},
                )
                signals.lease_lost.send(envelope=job.envelope)

    @staticmethod
    def claim_all(jobs: Sequence[Job]) -> list[Job]:
        """Claim the settlement of each job not settled yet: an outcome that arrives
        later (a pool process killed at shutdown reporting WorkerLost) is dropped."""
        return [job for job in jobs if job.claim_settlement()]

    def give_back(self, claimed: Sequence[Job]) -> int:
        """Give unfinished jobs (their settlement claimed) back to the broker at shutdown,
        and their concurrency slots: the copy that comes back may never run (expired,
        revoked by then). The number the broker took back."""
        n = 0
        for job in claimed:
            # The slot first: released first, the copy could be taken elsewhere and pass
            # the cap as this holder, then lose its place when this one freed it.
            self.limits.finished(job.task, job.envelope)
            n += self.release(job.delivery)
        return n

    # -- outcomes --------------------------------------------------------------------------

    def revoked(self, env: Envelope, delivery: Delivery, job: Job | None = None) -> None:
        error = ErrorInfo("TaskRevoked", "the task was revoked")
        self.store(env, states.REVOKED, error=error)
        signals.task_revoked.send(envelope=env)
        log.info("task %s revoked", env.id, extra={"event": "task-revoked", **self.fields(env)})
        if self.ended(env, error):
            self.ack(delivery, nonce_of=env, job=job)
        else:
            self.release_later(delivery)

    def follow_up(self, env: Envelope, delivery: Delivery, value: Any) -> bool:
        """Publish what a task's success sets in motion (its chain's next step, its link,
        its chord's callback). False if the delivery was given back to try again (a copy
        that comes back finds the task's SUCCESS and, the follow-ups not having gone out,
        publishes them then)."""
        done = self._follow("follow-up", env, lambda: self.canvas.after_success(env, value))
        if done is False:
            self.release_later(delivery, found_down=True)
            return False
        # Trying again cannot help (a next step too large to publish, or no key to sign
        # it with): the task stays a success; what waits on it fails, saying why.
        if isinstance(done, StemError) and not self._fail_waiters(
            env, ErrorInfo.from_exception(done), errback=False
        ):
            self.release_later(delivery)
            return False
        return True

    def settle(self, job: Job, outcome: Outcome) -> None:
        env, delivery = job.envelope, job.delivery
        if job.revoked:
            self.revoked(env, delivery, job)
            signals.task_postrun.send(
                envelope=env, state=states.REVOKED, runtime_s=outcome.runtime_s
            )
            self.finished(job, final=False)  # revoked() released the unique key if it ended
            return
        if outcome.status == "success":
            stores_result = not env.headers.get("ignore_result")
            if stores_result and not self.store(env, states.SUCCESS, result=outcome.value):
                self.release_later(delivery)  # result not written: run again
                return
            if not self.follow_up(env, delivery, outcome.value):
                return
            self.counts["succeeded"] += 1
            signals.task_success.send(envelope=env, result=outcome.value)
            signals.task_postrun.send(
                envelope=env, state=states.SUCCESS, runtime_s=outcome.runtime_s
            )
            self.ack(delivery, nonce_of=env, job=job)
            self.finished(job, final=True)
            return
        if outcome.status == "retry" or outcome.autoretry:
            self._retry(job, outcome)
            return
        self._fail(job, outcome)

    def _fail(self, job: Job, outcome: Outcome, *, reason: str | None = None) -> None:
        env = job.envelope
        error = outcome.error or ErrorInfo("Error", "task failed")
        if not self.store(env, states.FAILURE, error=error):
            self.release_later(job.delivery)
            return
        if not self._fail_waiters(env, error):
            self.release_later(job.delivery)
            return
        self.counts["failed"] += 1
        log.info(
            "task %s (%s) failed: %s: %s",
            env.id,
            env.task,
            error.type,
            error.message,
            extra={"event": "task-failed", **self.fields(env)},
        )
        signals.task_failure.send(envelope=env, error=error)
        signals.task_postrun.send(envelope=env, state=states.FAILURE, runtime_s=outcome.runtime_s)
        if reason:
            self.consume_nonce(env)
            self.dead_letter(job.delivery, reason, f"{error.type}: {error.message}", env)
        else:
            self.ack(job.delivery, nonce_of=env, job=job)
        # A dead letter keeps its unique key: `stem dlq replay` may still run it (purge
        # frees it).
        self.finished(job, final=not reason)

    def _retry(self, job: Job, outcome: Outcome) -> None:
        env = job.envelope
        policy = job.task.options.retry_policy()
        limit = outcome.retry_max_retries
        if limit is None:
            limit = env.max_retries if env.max_retries is not None else policy.max_retries
        decision = policy.decide(
            env.attempt, countdown_s=outcome.retry_countdown_s, max_retries=limit
        )
        if not decision.retry:
            error = _noted(outcome.error, "MaxRetriesExceeded", decision.reason)
            self._fail(job, Outcome("failure", error=error), reason="retries-exhausted")
            return
        due_ms = now_ms() + int(decision.delay_s * 1000)
        if env.expires_ms is not None and due_ms >= env.expires_ms:
            # The retry keeps the task's expiry: it would only be recorded EXPIRED, "before
            # a worker could start it". Fail now, saying why.
            note = f"not retried: the retry, due in {decision.delay_s:g}s, is past the expiry"
            error = _noted(outcome.error, "TaskExpired", note)
            self._fail(job, Outcome("failure", error=error, runtime_s=outcome.runtime_s))
            return
        keyring = self.app.keyring
        if keyring is not None and keyring.must_sign_but_cannot:
            self._fail(
                job,
                Outcome(
                    "failure",
                    error=ErrorInfo(
                        "SignatureError",
                        "this worker holds no signing key and cannot re-sign a retry",
                    ),
                ),
                reason="retry-needs-signing-key",
            )
            return
        # not_before is signed too, so the replay window counts from when the retry is due.
        retried = env.replace(
            attempt=env.attempt + 1,
            signature=None,
            not_before_ms=due_ms,
            # A rate-limit slot was booked for this attempt; the retry books its own.
            headers={k: v for k, v in env.headers.items() if k != RATE_SLOT_HEADER},
        )
        try:
            body = self.app.seal(retried)
        except StemError as exc:
            self._fail(job, Outcome("failure", error=ErrorInfo.from_exception(exc)))
            return
        if not env.headers.get("ignore_result"):  # else RETRY would stay once it succeeds
            self.store(env, states.RETRY, error=outcome.error, attempts=1)
        self.counts["retried"] += 1
        signals.task_retry.send(envelope=env, delay_s=decision.delay_s, error=outcome.error)
        signals.task_postrun.send(envelope=env, state=states.RETRY, runtime_s=outcome.runtime_s)
        log.info(
            "task %s (%s) retry %d in %.2fs",
            env.id,
            env.task,
            env.attempt + 1,
            decision.delay_s,
            extra={"event": "task-retried", **self.fields(env)},
        )
        self.put_back(job.delivery, env, delay_s=decision.delay_s, body=body)
        self.finished(job, final=False)


def _noted(error: ErrorInfo | None, kind: str, note: str) -> ErrorInfo:
    """The task's error with why it was not retried added (or an error of ``kind``)."""
    if error is None:
        return ErrorInfo(kind, note)
    return ErrorInfo(error.type, f"{error.message} ({note})", error.traceback)
