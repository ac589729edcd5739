"""Remote control: the client side (``stem control ...``) and the wire format.

Each worker consumes its own control queue (``stem.control.<node>``) through the ordinary
broker contract, so control works on every broker and reaches every worker (a broadcast is
one message per live node, not one message that a single worker picks up). Requests and
replies are envelopes sealed like task messages: with signing on, only key holders can
steer workers, and replies are verified too. Revocations are written to the broker's store
(``revoked:<task id>``) before any worker is told, so they survive restarts and reach
workers that start later.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stem import envelope as codec
from stem.brokers.base import Message
from stem.envelope import Envelope, new_id
from stem.errors import DecodeError, SignatureError, StemError

if TYPE_CHECKING:
    from stem.app import Stem

CONTROL_TASK = "stem.control"
REPLY_TASK = "stem.control.reply"
REVOKE_TTL_S = 7 * 86400.0
COMMANDS = (
    "ping",
    "stats",
    "active",
    "reserved",
    "registered",
    "revoke",
    "shutdown",
    "rate-limit",
    "pool-grow",
    "pool-shrink",
    "pause",
    "resume",
    "queue-status",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.@-]")


def control_queue(node: str) -> str:
    return f"stem.control.{_UNSAFE.sub('_', node)}"


def revoked_key(task_id: str) -> str:
    return f"revoked:{task_id}"


def live_nodes(app: Stem) -> list[str]:
    """Names of workers whose heartbeat is fresh (neither offline nor lost)."""
    from stem.observability.heartbeats import list_workers

    return [r["worker"] for r in list_workers(app.broker) if r["status"] == "online"]


class Misdirected(DecodeError):
    """A control message read from a queue other than the one it was addressed to."""

    reason = "misdirected"


def open_envelope(app: Stem, body: bytes, queue: str) -> Envelope:
    """Decode and verify a control request or reply read from ``queue``. With keys
    configured a signed message is always verified (an unsigned one passes only while
    signing is not required), and a message signed for another queue is refused: a request
    captured on its way to one node must not act on another."""
    env = codec.decode(body, max_bytes=app.max_message_bytes)
    keyring = app.keyring
    if keyring is not None and (keyring.required or env.signature is not None):
        keyring.verify(env, body=body)
    if env.queue != queue:
        raise Misdirected(f"addressed to queue {env.queue[:80]!r}, read from {queue!r}")
    return env


@dataclass(frozen=True)
class Reply:
    worker: str
    ok: bool
    result: Any
    answered: bool = True  # False: the node was asked and said nothing in time


def revoke(app: Stem, task_ids: Sequence[str]) -> None:
    for task_id in task_ids:
        app.broker.swap(
            revoked_key(task_id), app.broker.peek(revoked_key(task_id)), "1", REVOKE_TTL_S
        )


def resolve_nodes(app: Stem, names: Sequence[str]) -> list[str]:
    """Full node names (``alpha@host``) for ``names``: a name without ``@`` stands for the
    live node of that name on any host, if there is exactly one; names that match no live
    node are kept as given (a node may answer before its first heartbeat)."""
    live = live_nodes(app)
    out: list[str] = []
    for name in names:
        exact = "@" in name or name in live  # a full name, or a node named without a host
        matches = [] if exact else [n for n in live if n.partition("@")[0] == name]
        if len(matches) > 1:
            raise StemError(f"node name {name!r} matches {', '.join(matches)}: give the full name")
        out.append(matches[0] if matches else name)
    return out


def broadcast(
    app: Stem,
    command: str,
    args: dict[str, Any] | None = None,
    *,
    destination: Sequence[str] | None = None,
    timeout_s: float = 2.0,
    report_silent: bool = False,
) -> list[Reply]:
    """Send ``command`` to the named workers (default: every live one) and collect the
    replies that arrive within ``timeout_s``. With ``report_silent``, each node asked that
    did not answer in time gets a failed reply saying so."""
    if command not in COMMANDS:
        raise StemError(f"unknown control command {command!r}; known: {', '.join(COMMANDS)}")
    nodes = resolve_nodes(app, destination) if destination else live_nodes(app)
    if not nodes:
        return []
    request_id = new_id()
    reply_queue = f"stem.reply.{request_id}"
    envs = [
        Envelope(
            id=new_id(),
            task=CONTROL_TASK,
            queue=control_queue(node),
            kwargs={
                "command": command,
                "args": args or {},
                "reply_to": reply_queue,
                "request_id": request_id,
            },
            created_ms=codec.now_ms(),
            expires_ms=codec.now_ms() + int(timeout_s * 1000),
        )
        for node in nodes
    ]
    app.publish_messages([Message(id=e.id, queue=e.queue, body=app.seal(e)) for e in envs])
    replies: list[Reply] = []
    unsigned = 0  # replies refused for want of a signature
    deadline = time.monotonic() + timeout_s
    try:
        while len(replies) < len(nodes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for d in app.broker.reserve([reply_queue], len(nodes), 30.0, min(remaining, 0.5)):
                app.broker.ack([d])
                try:
                    env = open_envelope(app, d.body, reply_queue)
                except SignatureError as exc:
                    unsigned += exc.reason == "signature-missing"
                    continue  # a forged reply is ignored, never shown
                except DecodeError:
                    continue
                kw = env.kwargs
                if env.task == REPLY_TASK and kw.get("request_id") == request_id:
                    replies.append(
                        Reply(str(kw.get("worker")), bool(kw.get("ok")), kw.get("result"))
                    )
    finally:
        # Requests nobody took (a node that died) expire; the reply queue goes now (nodes
        # do not answer a request past its expiry, which is this deadline).
        app.broker.drop(reply_queue)
    if report_silent:
        answered = {r.worker for r in replies}
        why = f"no reply within {timeout_s:g}s"
        if unsigned:
            # Which node sent it cannot be trusted: the reply is unsigned.
            why += (
                f" ({unsigned} unsigned reply(ies) refused: a worker with public keys only "
                "(verify-only) cannot sign its replies, and may have carried out the command)"
            )
        replies += [
            Reply(node, False, why, answered=False) for node in nodes if node not in answered
        ]
    return sorted(replies, key=lambda r: r.worker)
