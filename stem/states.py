"""Task states, as stored in the result backend."""

from __future__ import annotations

PENDING = "PENDING"
RECEIVED = "RECEIVED"
STARTED = "STARTED"
RETRY = "RETRY"
SUCCESS = "SUCCESS"
FAILURE = "FAILURE"
REVOKED = "REVOKED"
EXPIRED = "EXPIRED"
DEAD = "DEAD"

ALL_STATES = frozenset(
    {PENDING, RECEIVED, STARTED, RETRY, SUCCESS, FAILURE, REVOKED, EXPIRED, DEAD}
)
#: States after which a task never runs again (unless a dead letter is replayed).
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED, EXPIRED, DEAD})
EXCEPTION_STATES = frozenset({FAILURE, REVOKED, EXPIRED, DEAD})
#: States after which nothing runs the task id again: a FAILURE may still run again (a
#: redelivery, or the replay of its dead letter), and so may a DEAD one.
DONE_STATES = frozenset({SUCCESS, REVOKED, EXPIRED})
