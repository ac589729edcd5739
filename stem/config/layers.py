"""Validate one configuration layer at a time and merge it over the layers below.

Every layer becomes a :class:`Node` tree first (YAML files keep their lines; the
environment, code defaults and flags become trees without lines), so one walker checks
keys and types for all of them and every problem names its layer and location.

Merging: a later layer replaces a scalar or list value whole. ``routes`` and
``beat.schedules`` merge entry by entry (an entry set to null removes it); a schedule
entry is replaced whole, never mixed across layers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from stem.config.fields import Field, FieldProblem, coerce, parse_text
from stem.config.provenance import ConfigIssue, Provenance
from stem.config.schema import (
    ENV_ALIASES,
    ENV_RESERVED,
    SCHEMA,
    TOP_FIELDS,
    did_you_mean,
    env_name,
    is_key_path,
    spec_for,
    suggest_key,
)
from stem.config.yamlsafe import Node

REMOVED: Any = object()  # a map entry deleted by a higher layer
_Origin = Callable[..., Provenance]  # (node, line=None) -> where that node was set
_MAP_PATHS = ("routes", "beat.schedules")

# Flags of the ``stem`` CLI, for provenance of values passed as overrides.
DEFAULT_FLAGS: dict[str, str] = {
    "broker.url": "--broker",
    "backend.url": "--backend",
    "logging.level": "--log-level",
    "logging.format": "--log-format",
    "worker.queues": "--queues",
    "worker.concurrency": "--concurrency",
    "worker.pool": "--pool",
    "worker.lease_s": "--lease",
    "worker.max_deliveries": "--max-deliveries",
    "worker.prefetch": "--prefetch",
    "worker.shutdown_budget_s": "--shutdown-budget",
    "worker.time_limit_s": "--time-limit",
    "worker.soft_time_limit_s": "--soft-time-limit",
    "worker.node_name": "--name",
    "worker.autoscale": "--autoscale",
}


@dataclass(slots=True)
class Assigned:
    value: Any
    origin: Provenance


class Merger:
    """Collects assignments from successive layers, and every problem found on the way."""

    def __init__(self) -> None:
        self.values: dict[str, Assigned] = {}
        self.issues: list[ConfigIssue] = []

    def issue(self, key: str, message: str, origin: Provenance, hint: str | None = None) -> None:
        self.issues.append(ConfigIssue(key, message, origin, hint))

    def apply(self, root: Node, layer: str, source: str, base_dir: str | None = None) -> None:
        """Validate ``root`` (a mapping of sections) as ``layer`` and merge it in."""

        def origin(node: Node, line: int | None = None) -> Provenance:
            if line is None:
                # A block mapping or list starts on the line after its key: point at the key.
                nested = isinstance(node.value, dict | list)
                line = node.key_line if nested and node.key_line else node.line
            return Provenance(layer, node.source or source, line)

        for key, child in root.value.items():
            if key in TOP_FIELDS:
                self._field(key, TOP_FIELDS[key], child, origin, base_dir)
            elif key in SCHEMA:
                if not isinstance(child.value, dict):
                    self.issue(key, f"expected a mapping of {key} settings", origin(child))
                    continue
                for name, sub in child.value.items():
                    spec = SCHEMA[key].get(name)
                    if spec is None:
                        self.issue(
                            f"{key}.{name}",
                            "unknown key",
                            origin(sub, sub.key_line),
                            suggest_key(key, name),
                        )
                    else:
                        self._field(f"{key}.{name}", spec, sub, origin, base_dir)
            else:
                self.issue(
                    key, "unknown section", origin(child, child.key_line), suggest_key(None, key)
                )

    def _field(
        self, path: str, spec: Field, node: Node, origin: _Origin, base_dir: str | None
    ) -> None:
        if spec.kind in ("map", "entries"):
            self._entries(path, spec, node, origin)
            return
        try:
            value = coerce(spec, node)
        except FieldProblem as exc:
            self.issue(path, exc.message, origin(node), exc.hint)
            return
        if spec.path and isinstance(value, str):
            value = resolve_path(value, base_dir)
        elif path in ("signing.keys", "signing.public_keys"):
            value = tuple(resolve_path(v, base_dir) if is_key_path(v) else v for v in value)
        self.values[path] = Assigned(value, origin(node))

    def _entries(self, path: str, spec: Field, node: Node, origin: _Origin) -> None:
        entries = node.value
        if node.text and isinstance(entries, str):
            try:
                parsed = parse_text(spec, entries)
            except FieldProblem as exc:
                self.issue(path, exc.message, origin(node))
                return
            entries = {
                k: Node(v, node.line, text=True, source=node.source) for k, v in parsed.items()
            }
        if not isinstance(entries, dict):
            self.issue(path, f"expected {spec.describe()}", origin(node))
            return
        self.values[path] = Assigned(None, origin(node))  # who touched the mapping last
        for name, child in entries.items():
            key = f"{path}.{name}"
            if child.value is None:
                self.values[key] = Assigned(REMOVED, origin(child))
            elif spec.entry is not None:
                try:
                    value = spec.entry(name, child)
                except FieldProblem as exc:
                    sub = f"{key}.{exc.subkey}" if exc.subkey else key
                    self.issue(sub, exc.message, origin(child, exc.line), exc.hint)
                    continue
                self.values[key] = Assigned(value, origin(child))
            elif not isinstance(child.value, str) or not child.value.strip():
                self.issue(key, "expected a queue name (a non-empty string)", origin(child))
            else:
                self.values[key] = Assigned(child.value.strip(), origin(child))


def resolve_path(value: str, base_dir: str | None) -> str:
    """``~`` expanded; relative paths from a file layer are relative to that file."""
    value = os.path.expanduser(value)
    if base_dir and not os.path.isabs(value):
        value = os.path.normpath(os.path.join(base_dir, value))
    return value


# -- turning the environment, code defaults and flags into trees ----------------------------


def _put(root: dict[str, Node], path: str, node: Node) -> None:
    """Place ``node`` at a dotted ``path`` (map entries keep their dots)."""
    for map_path in _MAP_PATHS:
        if path.startswith(map_path + "."):
            name = path[len(map_path) + 1 :]
            holder = _holder(root, map_path)
            holder.value[name] = node
            return
    section, dot, key = path.partition(".")
    if not dot:
        if path in TOP_FIELDS and isinstance(node.value, dict) and not node.text:
            _holder(root, path).value.update(node.value)
        else:
            root[path] = node
        return
    sect = root.setdefault(section, Node({}, source=node.source))
    if not isinstance(sect.value, dict):
        return  # a non-mapping section is reported by Merger.apply
    if path in _MAP_PATHS and isinstance(node.value, dict) and not node.text:
        _holder(root, path).value.update(node.value)
    else:
        sect.value[key] = node


def _holder(root: dict[str, Node], map_path: str) -> Node:
    section, dot, key = map_path.partition(".")
    if not dot:
        return root.setdefault(section, Node({}))
    sect = root.setdefault(section, Node({}))
    return sect.value.setdefault(key, Node({}))  # type: ignore[no-any-return]


def _wrap(value: Any, source: str | None, text: bool) -> Node:
    if isinstance(value, Mapping):
        return Node({str(k): _wrap(v, source, text) for k, v in value.items()}, source=source)
    if isinstance(value, list | tuple):
        return Node([_wrap(v, source, text) for v in value], source=source)
    return Node(value, text=text and isinstance(value, str), source=source)


def mapping_tree(
    data: Mapping[str, object], *, text: bool, flags: Mapping[str, str] | None = None
) -> Node:
    """A tree from nested sections and/or dotted keys (``{"broker.url": ...}``).

    ``None`` values mean "not given" except for optional fields in code defaults, where
    None is an explicit null. ``flags`` names the flag behind each dotted key.
    """
    root: dict[str, Node] = {}
    flat: list[tuple[str, object]] = []
    for key, value in data.items():
        if key in SCHEMA and isinstance(value, Mapping):
            flat.extend((f"{key}.{sub}", v) for sub, v in value.items())
        else:
            flat.append((key, value))
    for path, value in flat:
        spec = spec_for(path)
        if value is None and (text or spec is None or not spec.optional):
            continue
        source = None
        if flags is not None:
            source = flags.get(path) or DEFAULT_FLAGS.get(path) or f"override {path}"
        _put(root, path, _wrap(value, source, text))
    return Node(root)


def env_tree(environ: Mapping[str, str], merger: Merger) -> Node:
    """Settings from ``STEM_<SECTION>_<KEY>`` variables (see :func:`env_path`)."""
    found: list[tuple[int, str, str, str]] = []
    for name, value in environ.items():
        if not name.startswith("STEM_") or name in ENV_RESERVED:
            continue
        path = ENV_ALIASES.get(name) or env_path(name, merger)
        if path is not None:
            # Aliases first, so the canonical variable wins when both are set.
            found.append((0 if name in ENV_ALIASES else 1, name, path, value))
    root: dict[str, Node] = {}
    for _, name, path, value in sorted(found):
        _put(root, path, Node(value, text=True, source=name))
    return Node(root)


def env_path(name: str, merger: Merger) -> str | None:
    """``STEM_WORKER_LEASE_S`` -> ``worker.lease_s``.

    A variable whose name starts with a section (``STEM_WORKER_``...) must name a key of
    it (a typo is an error with a hint); other ``STEM_*`` variables are not settings and
    are ignored.
    """
    rest = name[len("STEM_") :].lower()
    if rest in TOP_FIELDS:
        return rest
    for section, fields in SCHEMA.items():
        if rest.startswith(section + "_"):
            key = rest[len(section) + 1 :]
            if key in fields:
                return f"{section}.{key}"
            candidates = [env_name(f"{section}.{k}") for k in fields]
            merger.issue(
                f"{section}.{key}",
                "unknown setting",
                Provenance("env", name),
                did_you_mean(name, candidates),
            )
            return None
    return None
