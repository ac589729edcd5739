"""The worker's side of the canvas: what a finished task sets in motion.

Called after the task's own result is written and before its message is acked, so a crash
in between re-runs the task and these steps again; every id involved is fixed in advance,
which makes the repeat harmless (see ``stem.canvas``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from stem import states
from stem.canvas import envelope_from_wire
from stem.envelope import Envelope
from stem.result import ErrorInfo, ResultRecord
from stem.result_store import rejected

if TYPE_CHECKING:
    from stem.app import Stem

log = logging.getLogger("stem.canvas")
_WEEK_S = 7 * 86400.0
# Records a copy recorded revoked or expired must not replace (DEAD is not over: a replay).
_ENDED = states.DONE_STATES | {states.FAILURE}


def _followed_key(task_id: str, *, failure: bool = False) -> str:
    return f"canvas:{'failure-' if failure else ''}followed:{task_id}"


class CanvasHooks:
    def __init__(self, app: Stem) -> None:
        self.app = app

    def _ttl(self) -> float:
        return float(self.app.result_ttl_s or _WEEK_S)

    def _count_ttl(self) -> float:
        """How long a chord's member count lasts after its latest member: at least a week,
        and twice the result TTL. Tied to the result TTL, a member that finished more than
        a TTL after the one before (retried, or behind a backlog) started the count again,
        and the callback never ran nor failed."""
        return max(_WEEK_S, 2 * float(self.app.result_ttl_s or 0))

    def already_done(self, env: Envelope, *, ending: bool = False) -> ResultRecord | None:
        """The record of a canvas step that already ran to success, or was revoked or
        expired (a copy published twice, by a crash between publish and ack, runs once);
        None if it should run. A failed or dead step runs again: a redelivery, or a
        replay of its dead letter (a chain step's pre-failed record, written when an
        earlier step failed, is no run either).

        ``ending``: the copy is about to be recorded dead, revoked or expired, unrun. Then
        any task, canvas step or not, that already ended (failures too) keeps its record:
        a copy of a task that succeeded, redelivered after its expiry because its ack was
        lost, must not turn SUCCESS into EXPIRED. Read as any record is (an Ed25519
        worker's are unsigned); a record that cannot be read counts as none. Before a
        follow-up is published from it, :meth:`trusted` reads it as signed."""
        if ending:
            rec = self.app.result_store.read(env.id)
            ok = rec is not None and rec.state in _ENDED and not rejected(rec)
            return rec if ok else None
        if not env.headers.get("canvas"):
            return None
        rec = self.app.result_store.read(env.id, signed=True)
        return rec if rec is not None and rec.state in states.DONE_STATES else None

    def trusted(self, env: Envelope) -> ResultRecord | None:
        """The task's SUCCESS record as a worker may act on it (signed, where signing is
        required), or None (logged) if it is not such a record."""
        rec = self.app.result_store.read(env.id, signed=True)
        if rec is None or rec.state != states.SUCCESS or rejected(rec):
            log.warning(
                "the stored result of %s cannot be used for its follow-ups (%s)",
                env.id,
                rec.error.message if rec is not None and rec.error else "no success",
                extra={"event": "canvas-result-untrusted", "task_id": env.id},
            )
            return None
        return rec

    def after_success(self, env: Envelope, value: Any) -> None:
        hdrs = env.headers
        out: list[Envelope] = []
        rest = list(hdrs.get("chain") or [])
        if rest:
            nxt_headers: dict[str, Any] = {"canvas": True}
            if rest[1:]:
                nxt_headers["chain"] = rest[1:]
            out.append(
                envelope_from_wire(
                    self.app,
                    rest[0],
                    prepend=[value],
                    headers=nxt_headers,
                    parent_id=env.id,
                    root_id=env.root_id,
                )
            )
        if hdrs.get("link"):
            out.append(
                envelope_from_wire(
                    self.app,
                    hdrs["link"],
                    prepend=[value],
                    headers={"canvas": True},
                    parent_id=env.id,
                    root_id=env.root_id,
                )
            )
        if hdrs.get("chord") and env.group_id:
            cb = self._chord_member_done(env)
            if cb is not None:
                out.append(cb)
        if out:
            self.app.publish(out)
            # Said once the follow-ups are out: a copy of this step that comes back (a
            # redelivery) publishes them only if they never went (see followed()).
            self.app.broker.claim(_followed_key(env.id), "1", self._ttl())

    def followed(self, env: Envelope, *, failure: bool = False) -> bool:
        """Whether this task's follow-ups (next step, link, chord callback) were published;
        with ``failure``, those of its failure (waiters failed, errback sent)."""
        return self.app.broker.peek(_followed_key(env.id, failure=failure)) is not None

    def _chord_member_done(self, env: Envelope) -> Envelope | None:
        spec = env.headers["chord"]
        gid, size = env.group_id, int(spec["size"])
        count = self.app.backend.add_member(f"chord:{gid}", str(spec["index"]), self._count_ttl())
        if count < size:
            return None
        # Several members may see the set complete (or one may run twice): one fires.
        owner = self.app.broker.claim(f"chord-fire:{gid}", env.id, self._ttl())
        if owner != env.id:
            return None
        ids = [f"{gid}-{i}" for i in range(size)]
        records = self.app.result_store.read_many(ids, signed=True)
        for task_id, rec in zip(ids, records, strict=True):
            if rec is None or rec.state != states.SUCCESS:
                self._fail_ids(
                    [spec["callback"]["id"]],
                    spec["callback"]["task"],
                    ErrorInfo(
                        "ChordError",
                        f"chord member {task_id} has no successful result "
                        f"({rec.state if rec else 'missing'})",
                    ),
                )
                return None
        return envelope_from_wire(
            self.app,
            spec["callback"],
            prepend=[[r.result for r in records if r]],
            headers={"canvas": True},
            parent_id=env.id,
            root_id=env.root_id,
        )

    def after_failure(self, env: Envelope, error: ErrorInfo, *, errback: bool = True) -> None:
        """The task failed for good: fail what waits on it, and run its errback (unless
        ``errback`` is false: the task itself did not fail, only its follow-up)."""
        hdrs = env.headers
        why = f"{env.task} ({env.id}) failed: {error.type}: {error.message}"
        rest = list(hdrs.get("chain") or [])
        if rest:
            self._fail_ids(
                [w["id"] for w in rest],
                "",
                ErrorInfo(error.type, f"chain step {why}", error.traceback),
            )
        chord = hdrs.get("chord")
        if chord and env.group_id:
            cb = chord["callback"]
            owner = self.app.broker.claim(
                f"chord-fire:{env.group_id}", f"failed:{env.id}", self._ttl()
            )
            # This member's own claim (env.id): it fired the chord, and the callback was
            # never published (too large to, or the publish failed and this member then
            # failed on its next run): the callback fails, not waits. Once published, a
            # later failure of the member must not turn a callback that ran into one.
            if owner == f"failed:{env.id}" or (owner == env.id and not self.followed(env)):
                self._fail_ids(
                    [cb["id"]],
                    cb["task"],
                    ErrorInfo(error.type, f"chord member {why}", error.traceback),
                )
        if errback and hdrs.get("link_error"):
            self.app.publish(
                [
                    envelope_from_wire(
                        self.app,
                        hdrs["link_error"],
                        prepend=[env.id, {"type": error.type, "message": error.message}],
                        headers={"canvas": True},
                        parent_id=env.id,
                        root_id=env.root_id,
                    )
                ]
            )
            # A copy of this task that comes back unrun (its ack lost) sends no second
            # errback (see followed()). A run that fails again, a replay, sends its own.
            self.app.broker.claim(_followed_key(env.id, failure=True), "1", self._ttl())

    def _fail_ids(self, ids: list[str], task: str, error: ErrorInfo) -> None:
        for task_id in ids:
            self.app.result_store.write_state(task_id, states.FAILURE, task=task, error=error)
