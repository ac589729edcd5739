"""The settings schema: every section, key, type, default and check.

``SCHEMA`` maps a section name to its fields; ``routes`` is a top-level mapping. The
loader uses it to validate every layer, the environment mapping is derived from it
(``STEM_<SECTION>_<KEY>``), and ``stem config show`` uses its ``secret`` marks.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from stem.config.fields import Field, FieldProblem
from stem.config.yamlsafe import Node
from stem.envelope import queue_problem
from stem.errors import ConfigError

# Slots one worker process may run (threads, or pool processes); more is a typo.
MAX_POOL_SIZE = 4096
MIN_LEASE_S = 0.2  # leases are renewed every third of one: shorter ones lapse under load

URL_SCHEMES = ("memory", "sqlite", "redis", "rediss", "postgresql", "postgres")
DEFAULT_BROKER_URL = "sqlite:///stem.db"
# The key-entry rules of stem.security.keys, repeated so the loader can point at the file
# and line of a bad entry without loading key material.
_KID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_B64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")


def is_key_path(entry: str) -> bool:
    """A key entry naming a key file or directory rather than holding ``kid:BASE64``."""
    kid, sep, _ = entry.partition(":")
    return not (sep and _KID.match(kid))


def decode_key(text: str) -> bytes | None:
    """Standard or URL-safe base64, padded or not; None when it is neither."""
    text = text.strip()
    if not _B64.match(text):
        return None
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


def key_entry_problem(entry: str) -> str | None:
    """Why an inline ``kid:BASE64`` entry is malformed (never quoting the secret)."""
    kid, _, material = entry.partition(":")
    if decode_key(material) is None:
        return f"key {kid!r}: the part after ':' is not valid base64"
    return None


# -- checks ---------------------------------------------------------------------------------


def url_problem(value: Any) -> str | None:
    scheme, sep, _ = str(value).partition("://")
    if not sep or scheme.lower() not in URL_SCHEMES:
        known = ", ".join(f"{s}://" for s in URL_SCHEMES)
        return f"expected a URL starting with one of {known}"
    try:
        urlsplit(str(value))
    except ValueError as exc:  # its message does not repeat the URL (which may hold secrets)
        return f"not a valid URL: {exc}"
    return None


def _queues(value: Any) -> str | None:
    if not value:
        return "expected at least one queue"
    for name in value:
        if problem := queue_problem(name):
            return problem
    return None


def _autoscale(value: Any) -> str | None:
    high, sep, low = str(value).partition(",")
    try:
        hi, lo = int(high), int(low)
    except ValueError:
        return f"expected 'MAX,MIN' (two integers), got {value!r}"
    if not sep:
        return f"expected 'MAX,MIN' (two integers), got {value!r}"
    return autoscale_problem(hi, lo)


def autoscale_problem(hi: int, lo: int) -> str | None:
    """What is wrong with an autoscale range of ``hi`` and ``lo`` slots, if anything."""
    if not 1 <= lo <= hi <= MAX_POOL_SIZE:
        return f"MAX,MIN needs 1 <= MIN <= MAX <= {MAX_POOL_SIZE}, got {hi},{lo}"
    return None


def _name(value: Any) -> str | None:
    if not str(value).strip() or any(c.isspace() for c in str(value)):
        return "expected a non-empty name without spaces"
    return None


def _kid(value: Any) -> str | None:
    if _KID.match(str(value)):
        return None
    return "expected a key id (1-64 letters, digits, '.', '_' or '-', starting alphanumeric)"


def _key_list(value: Any) -> str | None:
    for entry in value:
        if not entry.strip():
            return "key entries must not be empty"
        if not is_key_path(entry):
            problem = key_entry_problem(entry)
            if problem:
                return problem
    return None


def _nonempty(value: Any) -> str | None:
    return None if str(value).strip() else "expected a non-empty string"


# -- beat schedule entries ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduleSettings:
    """One beat entry: run ``task`` every ``every_s`` seconds or on ``cron``; ``options``
    holds the entry's other fields (``tz``, ``jitter_s``, ``catch_up``, ``start``/``end``,
    or a ``solar``, ``calendar`` or ``at`` schedule). Not ``enabled``: that flag is the
    operator's (``stem schedule disable``).

    YAML takes what ``app.schedule`` and ``stem schedule add`` take but ``enabled`` (see
    :mod:`stem.beat.entry`): the interval is written ``every`` (seconds, or ``"5m"``) or
    ``every_s``. Each entry is checked as beat checks it, so ``stem config check`` refuses
    what beat would.
    """

    name: str
    task: str
    every_s: float | None = None
    cron: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    expires_s: float | None = None
    options: dict[str, Any] = field(default_factory=dict)


def parse_schedule(name: str, node: Node) -> ScheduleSettings:
    """Validate one ``beat.schedules`` entry as beat does; problems name the sub-key and
    its line."""
    from stem.beat.entry import EntryError, parse_entry

    entry_line = node.key_line or node.line
    if not isinstance(node.value, dict):
        raise FieldProblem("expected a mapping with task and every or cron", line=entry_line)
    if "origin" in node.value:
        child = node.value["origin"]
        raise FieldProblem(
            "unknown key (entries here are of origin config)", subkey="origin", line=child.key_line
        )
    if "enabled" in node.value:
        # The stored flag is the operator's, kept when beat writes the entry again: one
        # here would be ignored for an entry already stored.
        child = node.value["enabled"]
        raise FieldProblem(
            "not set here: use `stem schedule disable NAME` (or enable); the flag is kept "
            "across restarts",
            subkey="enabled",
            line=child.key_line,
        )
    try:
        spec = parse_entry(name, node.plain(), origin="config").to_spec()
    except EntryError as exc:
        child = node.value.get(exc.field) if exc.field else None
        line = entry_line if child is None else (child.key_line or child.line)
        raise FieldProblem(exc.problem, subkey=exc.field, line=line, hint=exc.hint) from None
    except ConfigError as exc:  # the name itself
        raise FieldProblem(str(exc), line=entry_line) from None
    spec.pop("origin")
    if spec.get("enabled") is True:
        spec.pop("enabled")
    return ScheduleSettings(
        name=name,
        task=spec.pop("task"),
        every_s=spec.pop("every_s", None),
        cron=spec.pop("cron", None),
        args=tuple(spec.pop("args", ())),
        kwargs=spec.pop("kwargs", {}),
        queue=spec.pop("queue", None),
        priority=spec.pop("priority", None),
        expires_s=spec.pop("expires_s", None),
        options=spec,
    )


# -- the schema -----------------------------------------------------------------------------

SCHEMA: dict[str, dict[str, Field]] = {
    "broker": {
        "url": Field("str", DEFAULT_BROKER_URL, secret=True, check=url_problem),
        "url_file": Field("str", optional=True, secret_file=True, path=True),
        "publish_retries": Field("int", 3, min=0),
        "publish_retry_backoff_s": Field("float", 0.2, min=0),
    },
    "backend": {
        "url": Field("str", None, optional=True, secret=True, check=url_problem),
        "url_file": Field("str", optional=True, secret_file=True, path=True),
        "result_ttl_s": Field("int", 86400, optional=True, min=1),
    },
    "worker": {
        "queues": Field("list", ("default",), check=_queues),
        "pool": Field("choice", "process", choices=("process", "thread", "async", "solo")),
        "concurrency": Field("int", None, min=1, max=MAX_POOL_SIZE),  # default: the CPUs
        "lease_s": Field("float", 30.0, above=MIN_LEASE_S),
        "max_deliveries": Field("int", 5, min=1),
        "prefetch": Field("int", 0, min=0, max=64),
        "shutdown_budget_s": Field("float", 30.0, min=0),
        "time_limit_s": Field("float", None, optional=True, above=0),
        "soft_time_limit_s": Field("float", None, optional=True, above=0),
        "autoscale": Field("str", None, optional=True, check=_autoscale),
        "node_name": Field("str", None, optional=True, check=_name),
        "heartbeat_s": Field("float", 5.0, above=0),
        "state_file": Field("str", None, optional=True, path=True),
    },
    "signing": {
        "algorithm": Field("choice", "hmac-sha256", choices=("hmac-sha256", "ed25519")),
        "keys": Field("list", (), secret=True, check=_key_list),
        "keys_file": Field("str", optional=True, secret_file=True, path=True),
        "active_key": Field("str", optional=True, check=_kid),
        "public_keys": Field("list", (), check=_key_list),
        "required": Field("bool", None, optional=True),
        "results_required": Field("bool", None, optional=True),
        "replay_window_s": Field("float", 3600.0, above=0),
        "clock_skew_s": Field("float", 60.0, above=0),
    },
    "tls": {
        "ca_file": Field("str", optional=True, path=True),
        "cert_file": Field("str", optional=True, path=True),
        "key_file": Field("str", optional=True, secret_file=True, path=True),
        "allow_insecure": Field("bool", False),
        "min_version": Field("choice", "TLSv1.2", choices=("TLSv1.2", "TLSv1.3")),
    },
    "logging": {
        "level": Field("choice", "info", choices=("debug", "info", "warning", "error", "critical")),
        "format": Field("choice", "text", choices=("text", "json")),
    },
    "metrics": {
        "enabled": Field("bool", False),
        "host": Field("str", "127.0.0.1", check=_nonempty),
        "port": Field("int", 9808, min=1, max=65535),
    },
    "beat": {
        "schedules": Field("entries", {}, entry=parse_schedule),
        "tick_s": Field("float", 1.0, above=0, max=3600),
    },
}
# Top-level keys that are not sections.
TOP_FIELDS: dict[str, Field] = {"routes": Field("map", {})}

# Environment aliases kept for the CLI's historical names.
ENV_ALIASES: dict[str, str] = {
    "STEM_LOG_LEVEL": "logging.level",
    "STEM_LOG_FORMAT": "logging.format",
}
# STEM_* variables that select how configuration is loaded, never settings themselves.
# Variables that are not settings although their names start like a section's: the
# loader's own, and command-line options of `stem` that only that command reads.
ENV_RESERVED = frozenset(
    {
        "STEM_PROFILE",
        "STEM_CONFIG_DIR",
        "STEM_CONFIG",
        "STEM_APP",
        "STEM_WORKER_EVENTS",  # stem worker --events
        "STEM_BEAT_ID",  # stem beat --id
        "STEM_BEAT_PRUNE",  # stem beat --prune
    }
)


def env_name(path: str) -> str:
    """``worker.lease_s`` -> ``STEM_WORKER_LEASE_S``."""
    return "STEM_" + path.replace(".", "_").upper()


def all_paths() -> Iterable[str]:
    for section, fields in SCHEMA.items():
        for key in fields:
            yield f"{section}.{key}"
    yield from TOP_FIELDS


def spec_for(path: str) -> Field | None:
    if path in TOP_FIELDS:
        return TOP_FIELDS[path]
    section, _, key = path.partition(".")
    return SCHEMA.get(section, {}).get(key)


def did_you_mean(word: str, candidates: Iterable[str]) -> str | None:
    """``did you mean 'x'?`` for the closest candidate, or None."""
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"did you mean {matches[0]!r}?" if matches else None


def suggest_key(section: str | None, key: str) -> str | None:
    """A hint for an unknown key: a sibling first, then any path with that key name."""
    siblings = list(SCHEMA[section]) if section in SCHEMA else [*SCHEMA, *TOP_FIELDS]
    hint = did_you_mean(key, siblings)
    if hint:
        return hint
    by_leaf = {path.rpartition(".")[2]: path for path in all_paths()}
    match = difflib.get_close_matches(key, list(by_leaf), n=1, cutoff=0.8)
    return f"did you mean {by_leaf[match[0]]!r}?" if match else None
