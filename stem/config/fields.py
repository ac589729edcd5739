"""Field specifications: the type, range and meaning of one setting, and parsing into it.

Typed layers (YAML, ``Stem(...)`` code defaults, typed flag values) must already hold the
right type: ``concurrency: "4"`` is an error, not a guess. Text layers (environment
variables, string flag values) are parsed with the rules in :func:`parse_text`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from stem.config.yamlsafe import Node

Check = Callable[[Any], str | None]
EntryParser = Callable[[str, Node], Any]

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})
NULL_WORDS = frozenset({"null", "none", "~"})


class FieldProblem(Exception):
    """A value does not fit its field; the message says what was expected.

    ``subkey``/``line`` point inside a structured entry (``every`` on line 12).
    """

    def __init__(
        self,
        message: str,
        *,
        subkey: str | None = None,
        line: int | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.subkey = subkey
        self.line = line
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Field:
    """One setting.

    ``kind``: ``str``, ``int``, ``float``, ``bool``, ``choice``, ``list`` (of strings),
    ``map`` (string to string) or ``entries`` (a mapping of named sub-records, validated by
    ``check`` and merged entry by entry).
    ``secret``: the value itself is secret (redacted in output).
    ``secret_file``: a path to a file holding a secret (its mode is checked).
    ``path``: a filesystem path; relative paths in a file layer resolve against that
    file's directory.
    """

    kind: str
    default: Any = None
    optional: bool = False
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    above: float | None = None  # exclusive lower bound
    secret: bool = False
    secret_file: bool = False
    path: bool = False
    check: Check | None = None
    entry: EntryParser | None = None  # kind "entries": parses one named entry

    def describe(self) -> str:
        """The expected type in words, for error messages."""
        base = {
            "str": "a string",
            "int": "an integer",
            "float": "a number",
            "bool": "true or false",
            "choice": "one of " + ", ".join(self.choices),
            "list": "a list of strings",
            "map": "a mapping of strings to strings",
            "entries": "a mapping of named entries",
        }[self.kind]
        bounds = []
        if self.above is not None:
            bounds.append(f"> {self.above:g}")
        if self.min is not None:
            bounds.append(f">= {self.min:g}")
        if self.max is not None:
            bounds.append(f"<= {self.max:g}")
        if bounds:
            base += " " + " and ".join(bounds)
        return base + (" or null" if self.optional else "")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), "list" if isinstance(value, list) else "mapping"
    )


def parse_text(spec: Field, text: str) -> Any:
    """Parse an environment variable or flag string for ``spec``.

    Rules: ``null``/``none``/``~`` (or an empty string) is null for optional fields;
    booleans are true/false/1/0/yes/no/on/off; lists are comma-separated; maps are
    comma-separated ``key=value`` pairs.
    """
    stripped = text.strip()
    if spec.optional and (stripped == "" or stripped.lower() in NULL_WORDS):
        return None
    if spec.kind == "bool":
        lowered = stripped.lower()
        if lowered in TRUE_WORDS:
            return True
        if lowered in FALSE_WORDS:
            return False
        raise FieldProblem(f"expected true or false, got {_shown(text)}")
    if spec.kind == "int":
        try:
            return int(stripped, 10)
        except ValueError:
            raise FieldProblem(f"expected {spec.describe()}, got {_shown(text)}") from None
    if spec.kind == "float":
        try:
            return float(stripped)
        except ValueError:
            raise FieldProblem(f"expected {spec.describe()}, got {_shown(text)}") from None
    if spec.kind == "list":
        return [part.strip() for part in stripped.split(",") if part.strip()]
    if spec.kind == "map":
        out: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in stripped.split(","))):
            name, sep, value = pair.partition("=")
            if not sep or not name.strip() or not value.strip():
                raise FieldProblem(f"expected comma-separated key=value pairs, got {_shown(pair)}")
            out[name.strip()] = value.strip()
        return out
    if spec.kind == "entries":
        raise FieldProblem("cannot be set from text; set it in a YAML file")
    return text


def coerce(spec: Field, node: Node) -> Any:
    """The value of ``node`` converted to ``spec``'s type, or :class:`FieldProblem`.

    Scalar and list kinds only: the loader merges ``map`` and ``entries`` entry by entry.
    """
    if node.text and isinstance(node.value, str):
        value = parse_text(spec, node.value)
    else:
        value = node.plain()
    if value is None:
        if spec.optional:
            return None
        raise FieldProblem(f"expected {spec.describe()}, got null")
    value = _typed(spec, value)
    _check_range(spec, value)
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise FieldProblem(problem)
    return value


def _wrong(spec: Field, value: Any) -> FieldProblem:
    if spec.secret:  # never echo what may be a secret
        return FieldProblem(f"expected {spec.describe()}, got {_type_name(value)}")
    return FieldProblem(f"expected {spec.describe()}, got {_type_name(value)} {_shown(value)}")


def _typed(spec: Field, value: Any) -> Any:
    kind = spec.kind
    if kind in ("str", "choice"):
        if not isinstance(value, str):
            raise _wrong(spec, value)
        if kind == "choice":
            for choice in spec.choices:
                if value.strip().lower() == choice.lower():
                    return choice
            raise FieldProblem(f"expected one of {', '.join(spec.choices)}, got {_shown(value)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise _wrong(spec, value)
        return value
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(spec, value)
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _wrong(spec, value)
        if not math.isfinite(value):
            raise FieldProblem(f"expected a finite number, got {value}")
        return float(value)
    if kind == "list":
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise _wrong(spec, value)
        return tuple(value)
    raise AssertionError(f"unknown field kind {kind}")


def _check_range(spec: Field, value: Any) -> None:
    if spec.kind not in ("int", "float"):
        return
    if (
        (spec.min is not None and value < spec.min)
        or (spec.max is not None and value > spec.max)
        or (spec.above is not None and value <= spec.above)
    ):
        raise FieldProblem(f"expected {spec.describe()}, got {_shown(value)}")
