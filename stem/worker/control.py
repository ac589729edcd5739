"""The worker's side of remote control: a thread consuming this node's control queue."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from stem.brokers.base import Message
from stem.control import CONTROL_TASK, REPLY_TASK, control_queue, open_envelope
from stem.envelope import Envelope, new_id, now_ms
from stem.errors import BrokerError, DecodeError, SignatureError, StemError
from stem.limits import parse_rate
from stem.observability import signals

if TYPE_CHECKING:
    from stem.worker.consumer import Worker

log = logging.getLogger("stem.control")

# How long the control thread waits in the broker for a request before it looks at the
# stop flag again (a stopping worker waits for it, up to this long, before the goodbye).
REQUEST_WAIT_S = 0.5


class ControlServer:
    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.queue = control_queue(worker.name)
        self._thread = threading.Thread(target=self._run, name="stem-control", daemon=True)

    def start(self) -> None:
        # Requests sent to an earlier incarnation of this node are stale.
        self.worker.app.broker.purge(self.queue)
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the control thread, then delete this node's control queue: a request
        sent to a stopped node waits in storage for nobody (a caller gets no reply either
        way, and one sent after this makes the queue again, to be purged at the next start
        of a node with this name)."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return
        try:
            self.worker.app.broker.drop(self.queue)
        except BrokerError as exc:
            log.warning(
                "control queue %s left behind: %s",
                self.queue,
                exc,
                extra={"event": "control-drop-failed"},
            )

    def _run(self) -> None:
        broker = self.worker.app.broker
        while not self.worker.stopped:
            try:
                deliveries = broker.reserve([self.queue], 10, 30.0, REQUEST_WAIT_S)
            except BrokerError as exc:
                log.warning(
                    "control queue unavailable: %s", exc, extra={"event": "control-reserve-failed"}
                )
                time.sleep(1.0)
                continue
            for d in deliveries:
                try:
                    broker.ack([d])
                    self._handle(d.body)
                except StemError as exc:
                    log.warning(
                        "control request failed: %s", exc, extra={"event": "control-failed"}
                    )
                except Exception:
                    # Never end this thread: the node would stop answering for good.
                    log.exception("control request failed", extra={"event": "control-failed"})

    def _handle(self, body: bytes) -> None:
        app = self.worker.app
        try:
            env = open_envelope(app, body, self.queue)
        except (DecodeError, SignatureError) as exc:
            reason = getattr(exc, "reason", "malformed")
            log.warning(
                "control request rejected (%s): %s",
                reason,
                exc,
                extra={"event": "control-rejected", "reason": reason},
            )
            signals.control_rejected.send(reason=reason)
            return
        if env.task != CONTROL_TASK or env.is_expired():
            return
        replay = self.worker.settler.replay
        if replay is not None and env.signature is not None:
            # A captured control message must not be replayable (e.g. a second shutdown).
            try:
                replay.check(env)
                replay.consume(env)
            except SignatureError as exc:
                log.warning(
                    "control request rejected (%s)",
                    exc.reason,
                    extra={"event": "control-rejected", "reason": exc.reason},
                )
                signals.control_rejected.send(reason=exc.reason)
                return
        kw = env.kwargs
        command, args = str(kw.get("command")), kw.get("args") or {}
        try:
            result: Any = self.dispatch(command, args)
            ok = True
        except (StemError, ValueError, TypeError, KeyError) as exc:
            result, ok = f"{type(exc).__name__}: {exc}", False
        log.info(
            "control %s -> %s",
            command,
            "ok" if ok else result,
            extra={"event": "control-command", "command": command},
        )
        reply_to = kw.get("reply_to")
        if env.is_expired():
            # The caller stopped waiting and dropped its reply queue; a reply now would
            # only make that queue again, for nobody to read or delete.
            log.info(
                "control %s answered after its caller's timeout; no reply sent",
                command,
                extra={"event": "control-reply-late", "command": command},
            )
            return
        if isinstance(reply_to, str) and reply_to.startswith("stem.reply."):
            reply = Envelope(
                id=new_id(),
                task=REPLY_TASK,
                queue=reply_to,
                created_ms=now_ms(),
                kwargs={
                    "worker": self.worker.name,
                    "ok": ok,
                    "result": result,
                    "request_id": kw.get("request_id"),
                },
            )
            # A verify-only worker cannot sign its reply: sent unsigned, the caller refuses
            # it and can say why, rather than report no reply to a command that ran.
            body = app.seal(reply, unsigned_ok=True)
            app.publish_messages([Message(id=reply.id, queue=reply_to, body=body)])

    def dispatch(self, command: str, args: dict[str, Any]) -> Any:
        w = self.worker
        if command == "ping":
            return "pong"
        if command == "stats":
            return w.health()
        if command == "active":
            now = time.monotonic()
            return [
                {
                    "id": j.envelope.id,
                    "task": j.envelope.task,
                    "attempt": j.envelope.attempt,
                    "queue": j.envelope.queue,
                    "runtime_s": round(now - j.started, 3),
                }
                for j in list(w.inflight.values())
            ]
        if command == "reserved":
            # Prefetched deliveries waiting for a slot (always empty with prefetch 0).
            return [
                {"message_id": d.message_id, "queue": d.queue, "deliveries": d.delivery_count}
                for d in list(w.buffered)
            ]
        if command == "registered":
            return sorted(w.app.tasks)
        if command == "revoke":
            ids = [str(i) for i in args.get("ids", [])]
            w.note_revoked(ids)
            return {"revoked": ids, "terminated": w.terminate(ids) if args.get("terminate") else []}
        if command == "shutdown":
            mode = str(args.get("mode", "warm"))
            if mode not in ("warm", "soft", "hard"):
                raise ValueError(f"unknown shutdown mode {mode!r}: warm, soft or hard")
            threading.Thread(target=w.remote_shutdown, args=(mode,), daemon=True).start()
            return f"shutting down ({mode})"
        if command == "rate-limit":
            task, rate = str(args["task"]), str(args["rate"])
            if task not in w.app.tasks:
                raise KeyError(f"no task {task!r} on this worker")
            parse_rate(rate)
            w.settler.limits.overrides[task] = rate
            return {task: rate}
        if command in ("pool-grow", "pool-shrink"):
            n = int(args.get("n", 1))
            if n < 1:
                raise ValueError("n must be at least 1")
            if w.config.pool == "solo":
                raise ValueError("the solo pool has one slot; run the thread or process pool")
            w.resize(w.pool.size + (n if command == "pool-grow" else -n))
            return {"pool_size": w.pool.size}
        if command in ("pause", "resume"):
            queue = str(args["queue"])
            if queue not in w.config.queues:
                raise KeyError(f"this worker does not consume {queue!r}")
            (w.paused.add if command == "pause" else w.paused.discard)(queue)
            return {"paused": sorted(w.paused)}
        if command == "queue-status":
            stats = {s.queue: s for s in w.app.broker.stats(list(w.config.queues))}
            return [
                {
                    "queue": q,
                    "paused": q in w.paused,
                    "ready": stats[q].ready if q in stats else 0,
                    "reserved": stats[q].reserved if q in stats else 0,
                }
                for q in w.config.queues
            ]
        raise ValueError(f"unknown command {command!r}")
