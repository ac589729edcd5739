"""Turn merged assignments into :class:`Settings`: defaults, secret files, derived values
and checks that involve more than one key."""

from __future__ import annotations

import os
from types import MappingProxyType
from typing import Any

from stem.config.fields import FieldProblem
from stem.config.layers import REMOVED, Assigned, Merger, resolve_path
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
from stem.config.provenance import DEFAULT, LAYER_RANK, Provenance, SettingsError
from stem.config.schema import SCHEMA, is_key_path, url_problem
from stem.config.secrets import entry_kids, mode_problem, parse_keys_file, read_secret_file

_SECTIONS: dict[str, type] = {
    "broker": BrokerSettings,
    "backend": BackendSettings,
    "worker": WorkerSettings,
    "signing": SigningSettings,
    "tls": TLSConfig,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
}


class _Resolver:
    def __init__(self, merger: Merger, profile: str) -> None:
        self.merger = merger
        self.profile = profile
        self.values = merger.values
        # Outside development a loosely-permitted secret file stops the load; in
        # development the secret-file-mode gate warns instead.
        self.strict_modes = profile != "development"
        for section, fields in SCHEMA.items():
            for key, spec in fields.items():
                path = f"{section}.{key}"
                if path not in self.values and spec.kind != "entries":
                    self.values[path] = Assigned(spec.default, DEFAULT)
        if self.values["worker.concurrency"].value is None:
            cpus = os.cpu_count() or 1
            self.values["worker.concurrency"] = Assigned(
                cpus, Provenance("default", "built-in", note="number of CPUs")
            )

    def issue(self, key: str, message: str, origin: Provenance, hint: str | None = None) -> None:
        self.merger.issue(key, message, origin, hint)

    def get(self, path: str) -> Any:
        return self.values[path].value

    def origin(self, path: str) -> Provenance:
        return self.values[path].origin

    def secret_text(self, path: str, file_path: str) -> str | None:
        """Read a secret file named by ``path``, checking its mode."""
        try:
            text = read_secret_file(file_path)
        except FieldProblem as exc:
            self.issue(path, exc.message, self.origin(path))
            return None
        self.check_mode(path, file_path)
        return text

    def check_mode(self, path: str, file_path: str) -> None:
        problem = mode_problem(file_path)
        if problem and self.strict_modes:
            self.issue(path, problem, self.origin(path))

    def url_from_file(self, section: str) -> None:
        url_path, file_path = f"{section}.url", f"{section}.url_file"
        file_name = self.get(file_path)
        if file_name is None:
            return
        url_origin, file_origin = self.origin(url_path), self.origin(file_path)
        if LAYER_RANK[file_origin.layer] < LAYER_RANK[url_origin.layer]:
            return  # a higher layer set the URL itself
        if url_origin.layer == file_origin.layer and self.get(url_path) is not None:
            self.issue(url_path, f"set either {url_path} or {file_path}, not both", url_origin)
            return
        text = self.secret_text(file_path, file_name)
        if text is None:
            return
        url = text.strip()
        problem = url_problem(url)
        if problem:
            self.issue(
                file_path, f"the file {file_name} does not hold a URL: {problem}", file_origin
            )
            return
        note = f"read from {file_name}"
        self.values[url_path] = Assigned(
            url, Provenance(file_origin.layer, file_origin.source, file_origin.line, note)
        )

    def signing_keys(self) -> tuple[str, ...]:
        """Check key entries that name files, read ``signing.keys_file``; returns the
        entries read from it."""
        for path in ("signing.keys", "signing.public_keys"):
            for index, entry in enumerate(self.get(path), start=1):
                if is_key_path(entry) and not os.path.exists(entry):
                    # Never echo the entry: it may be a secret whose "kid:" was mistyped.
                    self.issue(
                        path,
                        f"entry {index} is neither 'kid:base64' nor an existing key file or "
                        "directory",
                        self.origin(path),
                    )
                elif is_key_path(entry) and path == "signing.keys" and os.path.isfile(entry):
                    self.check_mode(path, entry)
        file_keys = self._keys_file()
        kids = entry_kids(self.get("signing.keys") + file_keys)
        for kid in sorted({k for k in kids if kids.count(k) > 1}):
            self.issue(
                "signing.keys",
                f"key id {kid!r} is defined more than once",
                self.origin("signing.keys"),
            )
        active = self.get("signing.active_key")
        if active is not None and active not in kids:
            # Not echoed: a secret pasted here by mistake must not reach a log.
            self.issue(
                "signing.active_key",
                f"names no signing key (key ids: {', '.join(kids) or 'none'})",
                self.origin("signing.active_key"),
            )
        return file_keys

    def _keys_file(self) -> tuple[str, ...]:
        keys_file = self.get("signing.keys_file")
        if keys_file is None:
            return ()
        text = self.secret_text("signing.keys_file", keys_file)
        if text is None:
            return ()
        try:
            entries = parse_keys_file(text, keys_file)
        except FieldProblem as exc:
            self.issue("signing.keys_file", exc.message, self.origin("signing.keys_file"))
            return ()
        base = os.path.dirname(keys_file)
        return tuple(resolve_path(e, base) if is_key_path(e) else e for e in entries)

    def tls_files(self) -> None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = f"tls.{key}"
            file_name = self.get(path)
            if file_name is not None and not os.path.isfile(file_name):
                self.issue(path, f"file {file_name} does not exist", self.origin(path))
            elif file_name is not None and key == "key_file":
                self.check_mode(path, file_name)

    def cross_checks(self) -> None:
        self._less("worker.soft_time_limit_s", "worker.time_limit_s")

    def _less(self, low: str, high: str) -> None:
        a, b = self.get(low), self.get(high)
        if a is not None and b is not None and a >= b:
            self.issue(
                low,
                f"must be less than {high} ({b:g}, set by {self.origin(high)})",
                self.origin(low),
            )

    def entries(self, prefix: str) -> dict[str, Any]:
        start = prefix + "."
        return {
            path[len(start) :]: assigned.value
            for path, assigned in self.values.items()
            if path.startswith(start) and assigned.value is not REMOVED
        }


def build_settings(merger: Merger, profile: str, files: tuple[str, ...]) -> Settings:
    r = _Resolver(merger, profile)
    r.url_from_file("broker")
    r.url_from_file("backend")
    if r.get("backend.url") is None:
        origin = r.origin("broker.url")
        r.values["backend.url"] = Assigned(
            r.get("broker.url"),
            Provenance(origin.layer, origin.source, origin.line, "same as broker.url"),
        )
    file_keys = r.signing_keys()
    r.tls_files()
    r.cross_checks()
    if merger.issues:
        raise SettingsError(merger.issues)

    sections: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        sections[section] = cls(**{k: r.get(f"{section}.{k}") for k in SCHEMA[section]})
    sections["signing"] = SigningSettings(
        **{k: r.get(f"signing.{k}") for k in SCHEMA["signing"]}, file_keys=file_keys
    )
    schedules = r.entries("beat.schedules")
    sections["beat"] = BeatSettings(
        schedules=MappingProxyType(dict(sorted(schedules.items()))), tick_s=r.get("beat.tick_s")
    )
    provenance = {
        path: assigned.origin
        for path, assigned in r.values.items()
        if assigned.value is not REMOVED
    }
    provenance.setdefault("routes", DEFAULT)
    provenance.setdefault("beat.schedules", DEFAULT)
    return Settings(
        profile=profile,
        routes=MappingProxyType(r.entries("routes")),
        files=files,
        provenance_map=MappingProxyType(provenance),
        **sections,
    )
