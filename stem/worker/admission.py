"""Admission: what happens to a delivery before it runs.

Decode, verify the signature (before anything in the message is acted on), check replay,
poison, registration, revocation, expiry and limits; return a job to run, or settle the
delivery without running it (dead letter, EXPIRED, REVOKED, or back to the broker).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from stem import envelope as codec
from stem import states
from stem.brokers.base import Delivery
from stem.canvas import CANVAS_HEADERS, check_headers
from stem.envelope import Envelope
from stem.errors import BrokerError, DecodeError, SignatureError
from stem.observability import signals
from stem.result import ErrorInfo, ResultRecord
from stem.worker.job import Job

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.worker.settle import Settler

log = logging.getLogger("stem.worker")

# How early a delivery may arrive before the ETA in its body (clocks of different hosts
# differ a little) before it is put back until then.
ETA_TOLERANCE_S = 1.0
# Helper threads for Ed25519 verification: the other cores (none on one core).
_HELPERS = min(3, (os.cpu_count() or 1) - 1)


class _Refusal(NamedTuple):
    """Why a delivery must not run: its dead letter's reason and detail."""

    reason: str
    detail: str
    env: Envelope | None


class Admission:
    """Decode, verify and classify a delivery; return a Job to run, or None if settled."""

    def __init__(
        self,
        app: Stem,
        settler: Settler,
        max_deliveries: int,
        is_revoked: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.settler = settler
        self.max_deliveries = max_deliveries
        self.is_revoked = is_revoked or (lambda task_id: False)
        self._verifier: ThreadPoolExecutor | None = None

    def _decode_verified(self, delivery: Delivery) -> Envelope | _Refusal:
        """The delivery's envelope, or why it must not run. Settles nothing: it may run on
        a helper thread, and the caller dead-letters refusals on its own thread."""
        try:
            env = codec.decode(delivery.body, max_bytes=self.app.max_message_bytes)
        except DecodeError as exc:
            return _Refusal("malformed", str(exc), None)
        keyring = self.app.keyring
        # With keys configured, a signed message is always verified; an unsigned one passes
        # only while signing is not required (a rollout).
        if keyring is not None and (keyring.required or env.signature is not None):
            try:
                keyring.verify(env, body=delivery.body)
            except SignatureError as exc:
                return _Refusal(exc.reason, str(exc), env)
        if env.headers and not CANVAS_HEADERS.isdisjoint(env.headers):
            try:
                check_headers(env.headers)
            except DecodeError as exc:
                return _Refusal("malformed", str(exc), env)
        return env

    def _verify_all(self, deliveries: Sequence[Delivery]) -> list[Envelope | _Refusal]:
        """:meth:`_decode_verified` for each delivery, in order. With Ed25519, whose
        verification (about 100 µs, in OpenSSL) runs without the GIL, a batch is split
        with a helper thread so both halves verify at once on a machine with cores to
        spare; HMAC is too cheap to gain from it."""
        keyring = self.app.keyring
        if (
            keyring is None
            or keyring.algorithm != "ed25519"
            or len(deliveries) < 2
            or _HELPERS == 0
        ):
            return self._decode_chunk(deliveries)
        if self._verifier is None:
            self._verifier = ThreadPoolExecutor(_HELPERS, thread_name_prefix="stem-verify")
        step = -(-len(deliveries) // (_HELPERS + 1))
        chunks = [deliveries[i : i + step] for i in range(0, len(deliveries), step)]
        futures = [self._verifier.submit(self._decode_chunk, chunk) for chunk in chunks[1:]]
        out = self._decode_chunk(chunks[0])
        for future in futures:
            out += future.result()
        return out

    def _decode_chunk(self, chunk: Sequence[Delivery]) -> list[Envelope | _Refusal]:
        return [self._decode_verified(d) for d in chunk]

    def close(self) -> None:
        """End the verification helpers (after the consumer loop stopped). Chunks already
        queued still run: a consumer thread that outlived its join at shutdown may be
        waiting on them, and a cancelled chunk would end it with an error instead."""
        if self._verifier is not None:
            self._verifier.shutdown(wait=False)

    def decode_many(self, deliveries: Sequence[Delivery]) -> list[tuple[Delivery, Envelope]]:
        """Decode and verify each delivery, then check the replay guard for all the signed
        ones in one broker call. Those that fail are settled here, on this thread (never on
        a verification helper); the rest are returned."""
        decoded: list[tuple[Delivery, Envelope]] = []
        for delivery, item in zip(deliveries, self._verify_all(deliveries), strict=True):
            if isinstance(item, _Refusal):
                self.settler.dead_letter(delivery, item.reason, item.detail, item.env)
            else:
                decoded.append((delivery, item))
        replay = self.settler.replay
        signed = [(d, env) for d, env in decoded if env.signature is not None]
        if replay is None or not signed:
            return decoded
        try:
            verdicts = replay.replayed([env for _, env in signed], [d.peeked for d, _ in signed])
        except BrokerError as exc:
            log.warning(
                "replay check unavailable, retrying later: %s",
                exc,
                extra={"event": "replay-check-failed"},
            )
            for delivery, _ in signed:
                self.settler.release_later(delivery, found_down=True)
            return [(d, env) for d, env in decoded if env.signature is None]
        rejected = set()
        for (delivery, env), err in zip(signed, verdicts, strict=True):
            if err is not None:
                rejected.add(delivery.receipt)
                self.settler.dead_letter(delivery, err.reason, str(err), env)
        return [(d, env) for d, env in decoded if d.receipt not in rejected]

    def decode(self, delivery: Delivery) -> Envelope | None:
        decoded = self.decode_many([delivery])
        return decoded[0][1] if decoded else None

    def _dead(
        self, delivery: Delivery, env: Envelope, error: ErrorInfo, reason: str, detail: str
    ) -> None:
        """A task that will not run here: DEAD, and its message dead-lettered. Unlike an
        expired or revoked task it is not over: `stem dlq replay` may run it later (once the
        task is deployed, or its crash fixed), so its chain or chord is left waiting and its
        unique key held."""
        self.settler.store(env, states.DEAD, error=error, attempts=1)
        self._free_slot_of(env)
        self.settler.consume_nonce(env)
        self.settler.dead_letter(delivery, reason, detail, env)

    def _free_slot_of(self, env: Envelope) -> None:
        """A task that will not run here gives up the concurrency slot an earlier delivery
        of it took (a worker killed mid-run, or one that handed it back, held it)."""
        task = self.app.tasks.get(env.task)
        if task is not None:
            self.settler.limits.finished(task, env)

    def refuse(self, delivery: Delivery, env: Envelope, exc: Exception) -> None:
        """A delivery whose admission raised something waiting will not fix: DEAD and
        dead-lettered as ``admission-failed`` (replayable once the cause is fixed)."""
        detail = f"{type(exc).__name__}: {exc}"
        error = ErrorInfo(type(exc).__name__, str(exc))
        try:
            self._dead(delivery, env, error, "admission-failed", detail)
        except Exception:
            log.exception("recording task %s as DEAD failed", env.id)
            self.settler.dead_letter(delivery, "admission-failed", detail, env)

    def _copy_of_ended(
        self, delivery: Delivery, env: Envelope, ended: ResultRecord, *, ending: bool
    ) -> None:
        """Settle a copy of a task whose record says it ended: it is not run, and the
        record stays. ``ending``: the copy would have been recorded dead, revoked or
        expired."""
        log.info(
            "task %s already ended (%s); this copy of it is not run",
            env.id,
            ended.state,
            extra={
                "event": "task-already-done",
                "state": ended.state,
                **self.settler.fields(env),
            },
        )
        if ending:
            self._free_slot_of(env)
        # Its follow-ups may never have gone out (that publish failed, and this copy
        # came back to try again): then publish them, from the stored result. On the
        # ending path a task that ended otherwise has its waiters failed (again: their
        # publish may be what failed), as the copy would have without the record, unless
        # that went out (its errback is sent once).
        if ended.state == states.SUCCESS:
            canvas = self.settler.canvas
            if CANVAS_HEADERS.isdisjoint(env.headers) or canvas.followed(env):
                done = True  # nothing follows it, or that went out
            else:
                # On the ending path the record was read as any is: the value passed
                # on is read again as signed (None: not published from it, logged).
                source = canvas.trusted(env) if ending else ended
                done = source is None or self.settler.follow_up(env, delivery, source.result)
        elif ending and self.settler.canvas.followed(env, failure=True):
            self.settler.release_unique(env)  # its errback went out: not a second one
            done = True
        elif ending:
            error = ended.error or ErrorInfo("TaskFailed", f"the task ended {ended.state}")
            done = self.settler.ended(env, error)
            if not done:
                self.settler.release_later(delivery)
        else:
            done = True
        if done:
            self.settler.ack(delivery)

    def admit(
        self, delivery: Delivery, set_limits: Callable[[Job], None], env: Envelope | None = None
    ) -> Job | None:
        """Admit one delivery; ``env`` when :meth:`decode_many` already decoded it."""
        if env is None:
            env = self.decode(delivery)
            if env is None:
                return None
        if env.queue != delivery.queue:
            # The body names its queue (signed, where signing is on); the broker's copy is
            # bookkeeping. Not consumed: the genuine copy may still be on its own queue.
            detail = f"the message names queue {env.queue!r} but came from {delivery.queue!r}"
            self.settler.dead_letter(delivery, "misrouted", detail, env)
            return None
        # A copy of a task that already ended is not run, nor recorded dead, revoked or
        # expired (its ack was lost, and it came back to a worker without the task, say).
        poisoned = delivery.delivery_count > self.max_deliveries
        task = self.app.tasks.get(env.task)
        revoked = self.is_revoked(env.id)
        expired = not revoked and env.is_expired()
        ending = poisoned or task is None or revoked or expired
        if (ended := self.settler.canvas.already_done(env, ending=ending)) is not None:
            self._copy_of_ended(delivery, env, ended, ending=ending)
            return None
        if poisoned:
            error = ErrorInfo(
                "PoisonMessage", f"delivered {delivery.delivery_count} times without finishing"
            )
            detail = f"delivered {delivery.delivery_count} times (limit {self.max_deliveries})"
            self._dead(delivery, env, error, "max-deliveries-exceeded", detail)
            return None
        if task is None:
            signals.task_unknown.send(envelope=env)
            error = ErrorInfo(
                "TaskNotRegistered", f"no task registered as {env.task!r} on this worker"
            )
            self._dead(delivery, env, error, "unknown-task", env.task)
            return None
        if revoked:
            self._free_slot_of(env)
            self.settler.revoked(env, delivery)
            return None
        if expired:
            self._free_slot_of(env)
            self.settler.counts["expired"] += 1
            signals.task_expired.send(envelope=env)
            error = ErrorInfo("TaskExpired", "the task expired before a worker could start it")
            self.settler.store(env, states.EXPIRED, error=error)
            if self.settler.ended(env, error):
                self.settler.ack(delivery)
            else:
                self.settler.release_later(delivery)
            return None
        if env.not_before_ms is not None:
            early_s = (env.not_before_ms - codec.now_ms()) / 1000
            if early_s > ETA_TOLERANCE_S:
                # The broker's schedule is bookkeeping; the ETA in the body counts.
                log.warning(
                    "task %s arrived %.1fs before its ETA; put back until then",
                    env.id,
                    early_s,
                    extra={"event": "task-early", **self.settler.fields(env)},
                )
                self.settler.release(delivery, delay_s=early_s)
                return None
        if not self.settler.limits.admit(task, env, delivery):
            return None
        if env.expires_ms is not None and "unique_key" in env.headers:
            self.settler.hold_unique(env, task.options.unique_window_s)
        signals.task_received.send(envelope=env, delivery=delivery)
        job = Job(delivery=delivery, envelope=env, task=task)
        set_limits(job)
        if task.options.track_started and not env.headers.get("ignore_result"):
            self.settler.store(env, states.STARTED, attempts=1)
        signals.task_prerun.send(envelope=env)
        return job
