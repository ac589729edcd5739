"""The typed, frozen settings every part of Stem reads.

Build them with :func:`stem.config.load_settings`; constructing them by hand is for tests.
Secrets never appear in ``repr()`` or in ``as_dict()`` (unless ``redact=False``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from stem.config.provenance import Provenance
from stem.config.schema import SCHEMA, ScheduleSettings, is_key_path
from stem.observability.redact import REDACTED, redact_mapping, redact_url
from stem.security.tls import TLSSettings

if TYPE_CHECKING:
    from stem.security.signing import Keyring


def _redact_value(section: str, key: str, value: Any) -> Any:
    spec = SCHEMA[section][key]
    if not spec.secret or value is None:
        return value
    if isinstance(value, str):
        return redact_url(value) if "://" in value else REDACTED
    if isinstance(value, tuple | list):
        # Key ids and file paths are not secret; the key material is.
        return [v if is_key_path(v) else f"{v.partition(':')[0]}:{REDACTED}" for v in value]
    return REDACTED


def _section_dict(obj: Any, section: str, redact: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in SCHEMA[section]:
        value = getattr(obj, key)
        if redact:
            value = _redact_value(section, key, value)
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def _repr(obj: Any, section: str) -> str:
    body = ", ".join(f"{k}={v!r}" for k, v in _section_dict(obj, section, True).items())
    return f"{type(obj).__name__}({body})"


@dataclass(frozen=True, slots=True, repr=False)
class BrokerSettings:
    url: str
    url_file: str | None = None
    publish_retries: int = 3
    publish_retry_backoff_s: float = 0.2

    def __repr__(self) -> str:
        return _repr(self, "broker")


@dataclass(frozen=True, slots=True, repr=False)
class BackendSettings:
    """``url`` is the broker's URL when no backend URL was configured."""

    url: str
    url_file: str | None = None
    result_ttl_s: int | None = 86400  # None: results never expire

    def __repr__(self) -> str:
        return _repr(self, "backend")


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    queues: tuple[str, ...] = ("default",)
    pool: str = "process"
    concurrency: int = 1
    lease_s: float = 30.0
    max_deliveries: int = 5
    prefetch: int = 0
    shutdown_budget_s: float = 30.0
    time_limit_s: float | None = None
    soft_time_limit_s: float | None = None
    autoscale: str | None = None  # "MAX,MIN"
    node_name: str | None = None
    heartbeat_s: float = 5.0
    state_file: str | None = None

    @property
    def autoscale_bounds(self) -> tuple[int, int] | None:
        """``(max, min)`` from ``autoscale``."""
        if self.autoscale is None:
            return None
        high, _, low = self.autoscale.partition(",")
        return int(high), int(low)


@dataclass(frozen=True, slots=True, repr=False)
class SigningSettings:
    """Key entries are ``kid:BASE64`` or paths of key files or directories (the format of
    :mod:`stem.security.keys`). ``keys_file`` holds more entries, one per line;
    ``file_keys`` are the entries read from it."""

    algorithm: str = "hmac-sha256"
    keys: tuple[str, ...] = ()
    keys_file: str | None = None
    active_key: str | None = None  # None: the only key
    public_keys: tuple[str, ...] = ()
    required: bool | None = None  # None: required whenever keys are configured
    results_required: bool | None = None  # None: the keyring's default
    replay_window_s: float = 3600.0
    clock_skew_s: float = 60.0
    file_keys: tuple[str, ...] = field(default=(), compare=False)

    @property
    def key_entries(self) -> tuple[str, ...]:
        """``keys`` followed by the entries read from ``keys_file``."""
        return self.keys + self.file_keys

    @property
    def enabled(self) -> bool:
        return bool(self.key_entries or self.public_keys)

    @property
    def effective_required(self) -> bool:
        return self.enabled if self.required is None else self.required

    def to_keyring(self) -> Keyring | None:
        """The :class:`~stem.security.signing.Keyring` these settings describe, or None
        when no keys are configured (raises ``ConfigError`` for unusable keys)."""
        from stem.security.signing import Keyring

        return Keyring.from_settings(
            algorithm=self.algorithm,
            keys=self.key_entries,
            active_key=self.active_key,
            public_keys=self.public_keys,
            required=self.required,
            replay_window_s=self.replay_window_s,
            results_required=self.results_required,
            clock_skew_s=self.clock_skew_s,
        )

    def __repr__(self) -> str:
        return _repr(self, "signing")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    allow_insecure: bool = False
    min_version: str = "TLSv1.2"

    @property
    def configured(self) -> bool:
        return bool(self.ca_file or self.cert_file or self.key_file or self.allow_insecure)

    def to_tls_settings(self) -> TLSSettings | None:
        """The adapters' :class:`TLSSettings`, or None when nothing TLS-related is set."""
        if not self.configured and self.min_version == "TLSv1.2":
            return None
        return TLSSettings(
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            allow_insecure=self.allow_insecure,
            min_version=self.min_version,
        )


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 9808


@dataclass(frozen=True, slots=True)
class BeatSettings:
    schedules: Mapping[str, ScheduleSettings] = field(default_factory=lambda: MappingProxyType({}))
    tick_s: float = 1.0


def _schedule_dict(entry: ScheduleSettings, redact: bool) -> dict[str, Any]:
    data = dataclasses.asdict(entry)
    data.pop("name")
    data.update(data.pop("options"))
    data["args"] = list(entry.args)
    result: dict[str, Any] = redact_mapping(data) if redact else data
    return result


@dataclass(frozen=True)
class Settings:
    """Effective settings of one profile, with the provenance of every value."""

    profile: str
    broker: BrokerSettings
    backend: BackendSettings
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    signing: SigningSettings = field(default_factory=SigningSettings)
    tls: TLSConfig = field(default_factory=TLSConfig)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    beat: BeatSettings = field(default_factory=BeatSettings)
    routes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    files: tuple[str, ...] = ()  # config files read, lowest layer first
    provenance_map: Mapping[str, Provenance] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    def provenance(self, key_path: str) -> Provenance:
        """Where the effective value of ``key_path`` came from.

        Entries of ``routes`` and ``beat.schedules`` have their own provenance
        (``routes.tasks.email.*``); a sub-key of a schedule reports its entry's.
        """
        found = self.provenance_map.get(key_path)
        if found is not None:
            return found
        prefix = "beat.schedules."
        path = key_path
        while path.startswith(prefix) and "." in path[len(prefix) :]:
            path = path.rpartition(".")[0]
            found = self.provenance_map.get(path)
            if found is not None:
                return found
        raise KeyError(f"no setting {key_path!r}")

    def as_dict(self, redact: bool = True) -> dict[str, Any]:
        """Nested plain data (lists, dicts, scalars); secrets replaced by ``***``."""
        out: dict[str, Any] = {"profile": self.profile}
        for section in SCHEMA:
            if section == "beat":
                out["beat"] = {
                    "schedules": {
                        name: _schedule_dict(entry, redact)
                        for name, entry in self.beat.schedules.items()
                    },
                    "tick_s": self.beat.tick_s,
                }
            else:
                out[section] = _section_dict(getattr(self, section), section, redact)
        out["routes"] = dict(self.routes)
        return out

    def flat(self, redact: bool = True) -> dict[str, Any]:
        """``{"broker.url": ..., "routes.<pattern>": ..., "beat.schedules.<name>": {...}}``."""
        data = self.as_dict(redact=redact)
        out: dict[str, Any] = {}
        for section in SCHEMA:
            for key, value in data[section].items():
                if section == "beat" and key == "schedules":
                    out.update({f"beat.schedules.{n}": entry for n, entry in value.items()})
                else:
                    out[f"{section}.{key}"] = value
        out.update({f"routes.{pattern}": queue for pattern, queue in data["routes"].items()})
        return out

    def secret_files(self) -> list[tuple[str, str]]:
        """``(key path, file path)`` of every configured file that holds a secret
        (the ``*.key`` files of a key directory included)."""
        found = [
            (f"{section}.{key}", getattr(getattr(self, section), key))
            for section, fields in SCHEMA.items()
            for key, spec in fields.items()
            if spec.secret_file
        ]
        for entry in self.signing.key_entries:
            if is_key_path(entry) and os.path.isdir(entry):
                try:
                    names = sorted(n for n in os.listdir(entry) if n.endswith(".key"))
                except OSError:
                    names = []
                found += [("signing.keys", os.path.join(entry, n)) for n in names]
            elif is_key_path(entry):
                found.append(("signing.keys", entry))
        return [(key, path) for key, path in found if path]
