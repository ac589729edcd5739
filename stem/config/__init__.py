"""Layered YAML configuration with provenance, a typed settings model, and quality gates.

``load_settings()`` merges built-in defaults, code defaults, ``/etc/stem`` files, the
profile file, ``--config``, ``STEM_*`` variables and flags; ``enforce_gates()`` refuses
insecure configurations outside the development profile. See :mod:`stem.config.loader`.
"""

from __future__ import annotations

from stem.config.gates import (
    Gate,
    GateResult,
    GatesFailed,
    enforce_gates,
    list_gates,
    run_gates,
)
from stem.config.loader import (
    DEFAULT_CONFIG_DIR,
    DEFAULT_PROFILE,
    config_files,
    load_settings,
    resolve_profile,
)
from stem.config.model import (
    BackendSettings,
    BeatSettings,
    BrokerSettings,
    LoggingSettings,
    MetricsSettings,
    Settings,
    SigningSettings,
    TLSConfig,
    WorkerSettings,
)
from stem.config.provenance import LAYERS, ConfigIssue, Provenance, SettingsError
from stem.config.schema import SCHEMA, ScheduleSettings, env_name

__all__ = [
    "DEFAULT_CONFIG_DIR",
    "DEFAULT_PROFILE",
    "LAYERS",
    "SCHEMA",
    "BackendSettings",
    "BeatSettings",
    "BrokerSettings",
    "ConfigIssue",
    "Gate",
    "GateResult",
    "GatesFailed",
    "LoggingSettings",
    "MetricsSettings",
    "Provenance",
    "ScheduleSettings",
    "Settings",
    "SettingsError",
    "SigningSettings",
    "TLSConfig",
    "WorkerSettings",
    "config_files",
    "enforce_gates",
    "env_name",
    "list_gates",
    "load_settings",
    "resolve_profile",
    "run_gates",
]
