"""Schedule entries kept in the broker's key-value store, editable while beat runs.

Key layout (no expiry unless noted):

* ``beat:entry:<name>``: the entry's canonical spec as JSON (see :mod:`stem.beat.entry`);
* ``beat:last:<name>``: the latest tick (epoch ms) handled for the entry: fired, or passed
  over when beat first saw the entry or when the entry was enabled again;
* ``beat:firing:<name>:<tick_ms>``: one beat's claim to publish a tick (two minutes).
* ``beat:tick:<name>:<tick_ms>``: the record that a tick was published (expires).

Every write is a compare-and-set (``swap``) in a short retry loop, so two processes editing
the same entry never lose an update silently, and the last tick only moves forward.

With a signing keyring, entries are stored sealed (:meth:`Keyring.seal`, context
``schedule:<name>``), because beat signs what it enqueues: an entry written by someone who
can only write to the broker would otherwise become a signed task. While the keyring requires
signatures, an entry that is unsigned, altered, or moved under another name does not load
(it is listed as broken, and never fires).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from stem.beat.entry import ScheduleEntry, parse_entry
from stem.brokers.base import Broker
from stem.errors import BrokerError, ConfigError, SignatureError
from stem.security.signing import Keyring, is_sealed, unverified_payload

__all__ = [
    "ENTRY_PREFIX",
    "FIRING_PREFIX",
    "LAST_PREFIX",
    "TICK_PREFIX",
    "ScheduleStore",
    "StoredEntries",
]

log = logging.getLogger("stem.beat")

ENTRY_PREFIX = "beat:entry:"
LAST_PREFIX = "beat:last:"
TICK_PREFIX = "beat:tick:"
FIRING_PREFIX = "beat:firing:"
# Written by every sync: gone, the broker lost what beat stored (restarted without
# persistence, or failed over to a replica that was behind).
SYNCED_KEY = "beat:synced"
_CAS_ATTEMPTS = 20


@dataclass(frozen=True)
class StoredEntries:
    """What the store holds: parsed entries, and entries that no longer parse (name ->
    problem), for instance ones written by a newer Stem."""

    entries: dict[str, ScheduleEntry] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)


def encode_entry(entry: ScheduleEntry) -> str:
    return json.dumps(entry.to_spec(), sort_keys=True, separators=(",", ":"))


def _context(name: str) -> str:
    return f"schedule:{name}"


def _unverified_spec(raw: str) -> Any:
    """The spec a stored value holds, read without checking its seal (None if unreadable):
    only ever trusted in the direction that fails safe, or on an operator's word."""
    data = raw.encode()
    payload = unverified_payload(data) if is_sealed(data) else data
    try:
        return None if payload is None else json.loads(payload)
    except ValueError:
        return None


class ScheduleStore:
    """Schedule entries and their last ticks in a broker (see module docstring); entries
    are sealed and checked with ``keyring`` when one is given (the app's, normally)."""

    def __init__(self, broker: Broker, keyring: Keyring | None = None) -> None:
        self.broker = broker
        self.keyring = keyring
        self._parsed: dict[str, tuple[str, ScheduleEntry]] = {}  # name -> (raw, entry)

    # -- reading ---------------------------------------------------------------------------

    def _unseal(self, name: str, raw: str) -> str:
        if self.keyring is None:
            return raw
        try:
            payload = self.keyring.unseal(
                raw.encode(), context=_context(name), required=self.keyring.required
            )
        except SignatureError as exc:
            raise ConfigError(f"schedule {name!r}: refused, {exc.reason}: {exc}") from None
        return payload.decode()

    def _parse(self, name: str, raw: str) -> ScheduleEntry:
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == raw:
            return cached[1]
        try:
            spec = json.loads(self._unseal(name, raw))
        except ValueError as exc:
            raise ConfigError(f"schedule {name!r}: stored value is not JSON: {exc}") from None
        entry = parse_entry(name, spec)
        self._parsed[name] = (raw, entry)
        return entry

    def load(self) -> StoredEntries:
        out = StoredEntries()
        for key, raw in sorted(self.broker.scan(ENTRY_PREFIX).items()):
            name = key[len(ENTRY_PREFIX) :]
            try:
                out.entries[name] = self._parse(name, raw)
            except ConfigError as exc:
                out.broken[name] = str(exc)
        return out

    def get(self, name: str) -> ScheduleEntry | None:
        """The entry, None if there is none; ConfigError if it does not load."""
        raw = self.broker.peek(ENTRY_PREFIX + name)
        return None if raw is None else self._parse(name, raw)

    def synced(self) -> bool:
        """Whether a sync's marker is stored (see SYNCED_KEY)."""
        return self.broker.peek(SYNCED_KEY) is not None

    def exists(self, name: str) -> bool:
        """Whether an entry is stored under ``name``, loadable or not."""
        return self.broker.peek(ENTRY_PREFIX + name) is not None

    def lasts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, raw in self.broker.scan(LAST_PREFIX).items():
            try:
                out[key[len(LAST_PREFIX) :]] = int(raw)
            except ValueError:
                log.warning("ignoring a bad last tick %r under %s", raw, key)
        return out

    def last(self, name: str) -> int | None:
        raw = self.broker.peek(LAST_PREFIX + name)
        try:
            return None if raw is None else int(raw)
        except ValueError:
            return None

    # -- writing ---------------------------------------------------------------------------

    def _encode(self, entry: ScheduleEntry) -> str:
        raw = encode_entry(entry)
        if self.keyring is None:
            return raw
        if self.keyring.must_sign_but_cannot:
            raise ConfigError(
                f"schedule {entry.name!r}: writing schedules needs a signing key (this "
                "keyring is verify-only, and beat refuses unsigned entries): set "
                "STEM_SIGNING_KEYS and STEM_SIGNING_ACTIVE_KEY"
            )
        if not self.keyring.can_sign:
            return raw
        return self.keyring.seal(raw.encode(), context=_context(entry.name)).decode()

    def _update(self, key: str, change: Callable[[str | None], str | None]) -> str | None:
        """Apply ``change`` to the value of ``key`` with compare-and-set; returns the value
        written (or kept)."""
        for _ in range(_CAS_ATTEMPTS):
            current = self.broker.peek(key)
            new = change(current)
            if new == current or self.broker.swap(key, current, new, None):
                return new
        raise BrokerError(f"could not update {key!r}: it kept changing under us")

    def put(self, entry: ScheduleEntry, *, replace: bool = True) -> bool:
        """Write an entry. With ``replace=False`` an existing entry is left alone and this
        returns False."""
        raw = self._encode(entry)
        wrote = True

        def change(current: str | None) -> str | None:
            nonlocal wrote
            wrote = current is None or replace
            return raw if wrote else current

        self._update(ENTRY_PREFIX + entry.name, change)
        return wrote

    def remove(self, name: str) -> bool:
        """Delete an entry and its last tick. False if there was no such entry."""
        existed = self.broker.peek(ENTRY_PREFIX + name) is not None
        self._update(ENTRY_PREFIX + name, lambda _: None)
        self._update(LAST_PREFIX + name, lambda _: None)
        self._parsed.pop(name, None)
        return existed

    def set_enabled(self, name: str, enabled: bool, *, now_ms: int | None = None) -> bool:
        """Enable or disable an entry; False if there is no such entry. Enabling a disabled
        entry with ``now_ms`` marks every tick up to then as handled, so ticks missed while
        it was disabled do not fire."""
        found = False
        if enabled and now_ms is not None:
            # Before the entry is enabled: a beat pass in between would otherwise see it
            # enabled with its old last tick, and fire what was missed while disabled.
            entry = self.get(name)
            if entry is not None and not entry.enabled:
                tick = entry.schedule.prev_at_or_before(now_ms)
                if tick is not None:
                    self.advance_last(name, tick)

        def change(current: str | None) -> str | None:
            nonlocal found
            found = current is not None
            if current is None:
                return None
            entry = self._parse(name, current)
            return (
                current if entry.enabled == enabled else self._encode(entry.with_enabled(enabled))
            )

        self._update(ENTRY_PREFIX + name, change)
        return found

    def advance_last(self, name: str, tick_ms: int) -> bool:
        """Move the last tick forward to ``tick_ms``; False if it was already there or past."""
        moved = False

        def change(current: str | None) -> str | None:
            nonlocal moved
            try:
                moved = current is None or int(current) < tick_ms
            except ValueError:
                moved = True
            return str(tick_ms) if moved else current

        self._update(LAST_PREFIX + name, change)
        return moved

    def reseal(self, *, unsigned: bool = False) -> tuple[list[str], dict[str, str]]:
        """Write every entry again, sealed with the keyring's active key: after a key
        rotation, before the old key is retired. Entries that do not verify are left alone
        (name -> why), except, with ``unsigned``, entries that carry no seal at all (written
        before signing was turned on), which the operator vouches for. Returns (resealed
        names, skipped names with the reason)."""
        if self.keyring is None or not self.keyring.can_sign:
            raise ConfigError("resealing schedules needs a signing key (STEM_SIGNING_KEYS)")
        done: list[str] = []
        skipped: dict[str, str] = {}
        for key, raw in sorted(self.broker.scan(ENTRY_PREFIX).items()):
            name = key[len(ENTRY_PREFIX) :]
            try:
                entry = self._parse(name, raw)
            except ConfigError as exc:
                spec = _unverified_spec(raw)
                if not (unsigned and not is_sealed(raw.encode()) and isinstance(spec, dict)):
                    skipped[name] = str(exc)
                    continue
                try:
                    entry = parse_entry(name, spec)
                except ConfigError as bad:
                    skipped[name] = str(bad)
                    continue
            self.put(entry)
            done.append(name)
        return done, skipped

    def sync(
        self, entries: Iterable[ScheduleEntry], *, prune: Collection[str] = ("code", "config")
    ) -> list[str]:
        """Upsert entries defined in code or config, keeping the stored ``enabled`` flag of
        an entry that already exists (an operator may have disabled it). Stored entries of
        the origins in ``prune`` that are no longer defined are removed (entries added
        with ``stem schedule add`` are always kept). Returns the names removed."""
        wanted = {e.name: e for e in entries}
        for entry in wanted.values():

            def change(current: str | None, entry: ScheduleEntry = entry) -> str | None:
                if current is not None:
                    # A broken stored entry is replaced by the defined one, keeping an
                    # operator's "disabled" even when the stored copy no longer verifies
                    # (written before signing, or sealed with a retired key): trusting
                    # an unverified "disabled" can only stop an entry, never start one.
                    try:
                        enabled = self._parse(entry.name, current).enabled
                    except ConfigError:
                        spec = _unverified_spec(current)
                        enabled = not (isinstance(spec, dict) and spec.get("enabled") is False)
                    entry = entry.with_enabled(enabled)
                return self._encode(entry)

            self._update(ENTRY_PREFIX + entry.name, change)
        self._update(SYNCED_KEY, lambda current: "1")
        removed: list[str] = []
        if prune:
            stored = self.load()
            for name, entry in stored.entries.items():
                if name not in wanted and entry.origin in prune and entry.origin != "cli":
                    self.remove(name)
                    removed.append(name)
            if removed:
                log.info(
                    "removed %d schedule(s) no longer defined in code or config: %s",
                    len(removed),
                    ", ".join(removed),
                    extra={"event": "beat-prune", "entries": removed},
                )
        return removed
