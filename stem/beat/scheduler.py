"""The beat loop: enqueue each due tick of each enabled entry exactly once.

Several ``stem beat`` processes may run against one broker (for availability); there is no
leader. Every process computes the same tick times, and a tick is enqueued only by the
process that claims ``beat:firing:<name>:<tick_ms>`` in the broker, a short claim (two
minutes) that says "being published". The winner publishes with the task id
``beat-<name>-<tick_ms>``, then records the tick as fired (``beat:tick:<name>:<tick_ms>``,
kept until no process can see the tick as due any more) and moves ``beat:last:<name>``
forward, so the others skip it. If publishing fails it releases its claim and another
process (or its own next pass) tries again; if the winner dies before publishing, its
claim lapses and another process publishes the tick then (the others keep trying a tick
they saw claimed until it is recorded, even once later ticks went out). A winner whose broker fails
just after publishing records the tick on its next pass. Only a winner that dies after
publishing and before recording the tick (a window of one broker call), or stays cut off
longer than its claim, leaves the tick to be published twice, under the same task id.

After downtime an entry fires its latest missed tick once, not a burst of them, unless it
asks to ``catch_up`` (then every missed tick fires, oldest first, at most
``max_catch_up``). An entry beat has never handled fires only a tick that is recent (within
a couple of loop intervals): starting beat never fires a stale tick. A one-off entry is the
exception: it fires once even when late, and is disabled after it fires.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from stem.beat.entry import ScheduleEntry, parse_entry
from stem.beat.schedules import jitter_ms
from stem.beat.store import FIRING_PREFIX, TICK_PREFIX, ScheduleStore
from stem.envelope import now_ms
from stem.errors import BrokerError, BrokerTimeoutError, ConfigError, StemError

if TYPE_CHECKING:
    from stem.app import Stem

__all__ = ["Beat", "TickReport", "task_id_for"]

log = logging.getLogger("stem.beat")

_MIN_CLAIM_TTL_S = 600.0
_MAX_CLAIM_TTL_S = 90 * 86400.0
# How long a claim to publish a tick holds: above a publish with its retries (each may
# wait out a socket timeout), and the delay before another beat takes over from one that
# died while publishing.
FIRING_TTL_S = 120.0
_MIN_SLEEP_S = 0.005
_ERROR_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


def _tick_keys(name: str, tick_ms: int) -> tuple[str, str]:
    """(the claim to publish an entry's tick, the record that it was published)."""
    return f"{FIRING_PREFIX}{name}:{tick_ms}", f"{TICK_PREFIX}{name}:{tick_ms}"


def task_id_for(name: str, tick_ms: int) -> str:
    """The task id of an entry's tick: the same in every beat process."""
    return f"beat-{name}-{tick_ms}"


@dataclass
class TickReport:
    """What one pass did: ticks enqueued by this process, and the earliest next tick."""

    fired: list[tuple[str, int]] = field(default_factory=list)
    next_ms: int | None = None


def unknown_task(app: Stem, entry: ScheduleEntry) -> str | None:
    """What is wrong with an entry whose task this app does not register (None when it
    does, or when the app registers none: a producer-only app sends tasks by name)."""
    if not app.tasks or entry.task in app.tasks:
        return None
    return (
        f"schedule {entry.name!r}: task {entry.task!r} is not registered in this app; "
        "workers without it dead-letter every run (unknown-task)"
    )


_MAX_TICK_S = 3600.0  # between passes; a longer one is a typo (and overflows a wait)


class Beat:
    """The scheduler loop (see module docstring).

    ``specs`` adds entries (name -> dict spec, e.g. from config ``beat.schedules``) to the
    app's own ``app.schedules``; a name in both takes the ``specs`` version. They are
    written to the store by :meth:`sync`, which :meth:`run` calls first.
    """

    def __init__(
        self,
        app: Stem,
        *,
        tick_s: float = 0.5,
        beat_id: str | None = None,
        specs: Mapping[str, Mapping[str, Any]] | None = None,
        store: ScheduleStore | None = None,
        max_catch_up: int = 100,
        prune: bool = False,
    ) -> None:
        if not 0 < tick_s <= _MAX_TICK_S:  # NaN too
            raise ConfigError(
                f"beat tick must be a number of seconds above 0 and at most {_MAX_TICK_S:g}, "
                f"got {tick_s}"
            )
        keyring = app.keyring
        if keyring is not None and keyring.must_sign_but_cannot:
            # Every tick would fail to be sent: refuse to start (exit 78) rather than run
            # and log an error each pass.
            raise ConfigError(
                "beat sends tasks, and this keyring holds public keys only (verify-only) "
                "while signatures are required: give beat STEM_SIGNING_KEYS and "
                "STEM_SIGNING_ACTIVE_KEY (signing.keys, signing.active_key)"
            )
        self.app = app
        self.tick_s = tick_s
        self.beat_id = beat_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.specs = dict(specs or {})
        self.store = store or ScheduleStore(app.broker, app.keyring)
        self.max_catch_up = max_catch_up
        self.prune = prune
        self.recent_ms = max(int(2 * tick_s * 1000), 1000)
        self._stop = threading.Event()
        self._warned: set[tuple[str, str]] = set()
        # Ticks this process published but could not record (the broker failed just
        # then): (entry, tick) -> token. Recorded before anything else is tried for them.
        self._unrecorded: dict[tuple[str, int], str] = {}
        # Ticks another process claimed and has not recorded yet: tried again each pass
        # until recorded, so one whose claimant died (its claim lapses) is published even
        # after later ticks moved the last tick past it.
        self._contested: set[tuple[str, int]] = set()

    # -- entries defined in code and config --------------------------------------------------

    def defined_entries(self) -> list[ScheduleEntry]:
        """Entries from ``app.schedules`` (origin code) and ``specs`` (origin config)."""
        entries: dict[str, ScheduleEntry] = {}
        for origin, source in (("code", self.app.schedules), ("config", self.specs)):
            for name, spec in source.items():
                entries[name] = parse_entry(name, spec, origin=origin)
        return list(entries.values())

    def sync(self) -> None:
        """Write the code and config entries to the store (see :meth:`ScheduleStore.sync`).

        With ``prune``, stored code and config entries no longer defined here are removed.
        It is off by default: beats of other apps, or with other configuration (a rolling
        deploy), may share the broker, and a beat started without the app would remove
        every entry it defines. Without it, such entries are named in a warning: they keep
        firing until removed (``stem schedule remove``)."""
        entries = self.defined_entries()
        self.store.sync(entries, prune=("config", "code") if self.prune else ())
        defined = {e.name for e in entries}
        stored = self.store.load().entries
        stale = sorted(
            name
            for name, entry in stored.items()
            if entry.origin in ("code", "config") and name not in defined and entry.enabled
        )
        if stale:
            log.warning(
                "stored schedule(s) of origin code or config that this beat's app and "
                "configuration do not define keep firing: %s (remove them with `stem "
                "schedule remove NAME`, or start beat with --prune, if nothing defines them)",
                ", ".join(stale),
                extra={"event": "beat-undefined-entries", "entries": stale},
            )
        for entry in stored.values():
            if problem := unknown_task(self.app, entry):
                log.warning(problem, extra={"event": "beat-unknown-task", "entry": entry.name})
        log.info(
            "beat %s: %d schedule(s) from code and config",
            self.beat_id,
            len(entries),
            extra={"event": "beat-sync", "entries": [e.name for e in entries]},
        )

    def resync(self, intact_ms: int | None) -> None:
        """Store the code and config entries again after the broker lost them (restarted
        without persistence, or failed over). A one-off (``at``) whose time came while the
        store was still intact (``intact_ms``: the last pass that found it so) had its
        chance to run: its last tick is stored first, so it does not run again. Recurring
        entries start afresh (a tick due now fires)."""
        log.warning(
            "the schedules beat stored are gone from the broker (restarted without "
            "persistence, or failed over?): storing the code and config ones again",
            extra={"event": "beat-resync"},
        )
        if intact_ms is not None:
            # Before the entries and the marker: should this fail, the next pass repeats
            # it, and no beat sees the entry without its last tick.
            for entry in self.defined_entries():
                at = entry.schedule.prev_at_or_before(intact_ms) if entry.one_off else None
                if at is not None:
                    self.store.advance_last(entry.name, at)
        self.sync()

    # -- one pass ----------------------------------------------------------------------------

    def tick(self, now: int | None = None) -> TickReport:
        """One pass over the stored entries at time ``now`` (epoch ms; default: the clock)."""
        now = now_ms() if now is None else now
        report = TickReport()
        stored = self.store.load()
        for name, problem in stored.broken.items():
            self._warn_once(name, problem)
        for (name, tick), token in list(self._unrecorded.items()):
            if name in stored.entries:
                self._record(stored.entries[name], tick, token)  # BrokerError: pass ends
            else:
                del self._unrecorded[(name, tick)]
        lasts = self.store.lasts()
        for name, tick in sorted(self._contested):
            self._contested.discard((name, tick))
            entry = stored.entries.get(name)
            if entry is None or not entry.enabled or entry.one_off:
                continue
            last = lasts.get(name)
            if not entry.catch_up and last is not None and last > tick:
                continue  # a later tick went out: without catch_up, a stale one does not
            try:
                fired = self._fire(entry, tick, now)  # (contested again if still claimed)
            except BrokerError:
                self._contested.add((name, tick))  # kept for the next pass
                raise
            if fired:
                report.fired.append((name, tick))
        for entry in stored.entries.values():
            if not entry.enabled:
                continue
            try:
                for tick in self._due(entry, lasts.get(entry.name), now):
                    if self._fire(entry, tick, now):
                        report.fired.append((entry.name, tick))
                nxt = entry.schedule.next_after(now)
            except BrokerError:
                raise  # the broker is down: end the pass, run() backs off
            except Exception:  # one bad entry must not stop the others
                log.exception(
                    "schedule %r failed", entry.name, extra={"event": "beat-entry-failed"}
                )
                continue
            if nxt is not None and (report.next_ms is None or nxt < report.next_ms):
                report.next_ms = nxt
        return report

    def _due(self, entry: ScheduleEntry, last: int | None, now: int) -> list[int]:
        schedule = entry.schedule
        latest = schedule.prev_at_or_before(now)
        if latest is None or (last is not None and latest <= last):
            return []
        if last is None:
            if entry.one_off or now - latest <= self.recent_ms:
                return [latest]
            # First sight of an entry whose latest tick is stale: mark it handled so the
            # next tick fires even if this process is late for it.
            self.store.advance_last(entry.name, latest)
            return []
        if not entry.catch_up:
            return [latest]
        ticks = [latest]
        while True:
            prev = schedule.prev_at_or_before(ticks[-1] - 1)
            if prev is None or prev <= last:
                break
            if len(ticks) >= self.max_catch_up:
                log.warning(
                    "schedule %r missed more than %d ticks; firing the latest %d",
                    entry.name,
                    self.max_catch_up,
                    self.max_catch_up,
                    extra={"event": "beat-catch-up-capped", "entry": entry.name},
                )
                break
            ticks.append(prev)
        ticks.reverse()
        return ticks

    def _claim_ttl_s(self, entry: ScheduleEntry, tick: int) -> float:
        # A claim must outlive every chance of another process still seeing the tick as
        # due: until the last tick moves past it, and through the catch-up window.
        nxt = entry.schedule.next_after(tick)
        period_s = _MAX_CLAIM_TTL_S if nxt is None else (nxt - tick) / 1000
        return min(_MAX_CLAIM_TTL_S, max(_MIN_CLAIM_TTL_S, period_s * (self.max_catch_up + 2)))

    def _fire(self, entry: ScheduleEntry, tick: int, now: int) -> bool:
        broker = self.app.broker
        key, fired_key = _tick_keys(entry.name, tick)
        # A fresh token per attempt: this process must not mistake its own earlier claim
        # (whose outcome it does not know) for a go-ahead.
        token = f"{self.beat_id}/{secrets.token_hex(4)}"
        if broker.peek(fired_key) is not None:
            return False
        if broker.claim(key, token, FIRING_TTL_S) != token:
            self._contested.add((entry.name, tick))  # being published elsewhere: see __init__
            return False
        if broker.peek(fired_key) is not None:  # fired by one whose claim lapsed since
            self._release(key, token)
            return False
        # Due at its tick plus its jitter; a tick fired late (after downtime, or caught up)
        # is due at once. Both are relative to publishing, as countdown and expires are.
        due_in_ms = tick + jitter_ms(entry.name, tick, entry.jitter_s) - now
        expires = None
        if entry.expires_s is not None:
            # A run is dropped if it has not started expires_s after it became due: one
            # past that already is not sent at all, and counts as handled.
            expires = due_in_ms / 1000 + entry.expires_s
            if expires <= 0:
                log.warning(
                    "schedule %r: the tick due %.0fs ago expired (expires_s=%g) before it "
                    "could be enqueued; skipped",
                    entry.name,
                    -due_in_ms / 1000,
                    entry.expires_s,
                    extra={"event": "beat-tick-expired", "entry": entry.name, "tick_ms": tick},
                )
                self._unrecorded[(entry.name, tick)] = token
                self._record(entry, tick, token)
                return False
        task_id = task_id_for(entry.name, tick)
        try:
            self.app.send_task(
                entry.task,
                entry.args,
                entry.kwargs,
                task_id=task_id,
                queue=entry.queue,
                priority=entry.priority,
                expires=expires,
                countdown=due_in_ms / 1000 if due_in_ms > 0 else None,
                headers={"beat_entry": entry.name, "beat_tick_ms": tick},
            )
        except BrokerTimeoutError as exc:
            # No answer in time: the tick may well have gone in. Published again by
            # another beat it would run twice; taken as published it runs at most once.
            log.warning(
                "schedule %r: enqueueing %s timed out, taken as enqueued (it may not have "
                "been): %s",
                entry.name,
                entry.task,
                exc,
                extra={"event": "beat-publish-timeout", "entry": entry.name, "tick_ms": tick},
            )
        except Exception as exc:
            log.error(
                "schedule %r: could not enqueue %s: %s",
                entry.name,
                entry.task,
                exc,
                exc_info=not isinstance(exc, StemError),
                extra={"event": "beat-publish-failed", "entry": entry.name, "tick_ms": tick},
            )
            self._release(key, token)
            return False
        log.info(
            "schedule %r: enqueued %s as %s",
            entry.name,
            entry.task,
            task_id,
            extra={"event": "beat-fire", "entry": entry.name, "tick_ms": tick, "task_id": task_id},
        )
        self._unrecorded[(entry.name, tick)] = token
        self._record(entry, tick, token)
        return True

    def _record(self, entry: ScheduleEntry, tick: int, token: str) -> None:
        """Record a published tick as fired (raises BrokerError; then a later pass of this
        process records it, while its claim to publish keeps the others off)."""
        key, fired_key = _tick_keys(entry.name, tick)
        self.app.broker.claim(fired_key, token, self._claim_ttl_s(entry, tick))
        self.store.advance_last(entry.name, tick)
        if entry.one_off:
            self.store.set_enabled(entry.name, False)
        del self._unrecorded[(entry.name, tick)]
        self._release(key, token)

    def _release(self, key: str, token: str) -> None:
        try:
            self.app.broker.release(key, token)
        except BrokerError:
            log.warning("could not release %s; it expires by itself", key)

    def _warn_once(self, name: str, problem: str) -> None:
        if (name, problem) not in self._warned:
            self._warned.add((name, problem))
            log.error(
                "skipping schedule %r: %s",
                name,
                problem,
                extra={"event": "beat-entry-broken", "entry": name},
            )

    # -- the loop ----------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("stop signal: beat stopping", extra={"event": "beat-stopping"})
        self._stop.set()

    def run(self, on_ready: Callable[[], object] | None = None) -> None:
        """Sync the defined entries, then run passes until SIGTERM/SIGINT or :meth:`stop`.
        Broker errors are logged and retried with backoff; beat keeps running.
        ``on_ready`` is called once, after the first pass that reached the broker."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        failures = 0
        synced = False
        intact_ms: int | None = None  # when a pass last found the stored schedules there
        log.info("beat %s starting", self.beat_id, extra={"event": "beat-start"})
        while not self._stop.is_set():
            try:
                if not synced:
                    self.sync()
                    synced = True
                elif not self.store.synced():
                    self.resync(intact_ms)
                intact_ms = now_ms()
                report = self.tick(intact_ms)
            except BrokerError as exc:
                wait_s = _ERROR_BACKOFF_S[min(failures, len(_ERROR_BACKOFF_S) - 1)]
                failures += 1
                log.warning(
                    "beat pass failed, retrying in %.1fs: %s",
                    wait_s,
                    exc,
                    extra={"event": "beat-pass-failed", "failures": failures},
                )
                self._stop.wait(wait_s)
                continue
            failures = 0
            if on_ready is not None:
                on_ready()
                on_ready = None
            wait_s = self.tick_s
            if report.next_ms is not None:
                wait_s = min(wait_s, (report.next_ms - now_ms()) / 1000)
            self._stop.wait(max(_MIN_SLEEP_S, wait_s))
        log.info("beat %s stopped", self.beat_id, extra={"event": "beat-stop"})
