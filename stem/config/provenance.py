"""Where a setting came from, and configuration errors that say where they are."""

from __future__ import annotations

from dataclasses import dataclass

from stem.errors import ConfigError

# Layer names, lowest precedence first. ``LAYER_RANK`` orders them.
LAYERS: tuple[str, ...] = ("default", "code", "system", "conf.d", "profile", "file", "env", "cli")
LAYER_RANK: dict[str, int] = {name: rank for rank, name in enumerate(LAYERS)}


@dataclass(frozen=True, slots=True)
class Provenance:
    """The layer that set an effective value and where in that layer.

    ``source`` is a file path for file layers, the variable name for ``env``
    (``STEM_BROKER_URL``), the flag for ``cli`` (``--broker``), ``Stem(...)`` for ``code``
    and ``built-in`` for defaults. ``line`` is 1-based and only set for files.
    ``note`` explains derived values (``same as broker.url``, ``read from ...``).
    """

    layer: str
    source: str
    line: int | None = None
    note: str | None = None

    @property
    def location(self) -> str:
        """``path:line`` for files, otherwise a phrase naming the variable or flag."""
        if self.layer == "env":
            return f"environment variable {self.source}"
        if self.layer == "cli":
            return f"command-line flag {self.source}"
        if self.layer == "code":
            return f"{self.source} in code"
        if self.layer == "default":
            return "built-in default"
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    def __str__(self) -> str:
        # File layers need the layer name; the other locations already say what they are.
        file_layer = self.layer not in ("default", "code", "env", "cli")
        text = f"{self.layer} {self.location}" if file_layer else self.location
        return f"{text} ({self.note})" if self.note else text

    def as_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "source": self.source, "line": self.line, "note": self.note}


DEFAULT = Provenance("default", "built-in")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One thing wrong with the configuration, located precisely."""

    key: str
    message: str
    origin: Provenance
    hint: str | None = None

    def __str__(self) -> str:
        key = f"{self.key}: " if self.key else ""
        text = f"{self.origin.location}: {key}{self.message} (layer {self.origin.layer})"
        return f"{text}; {self.hint}" if self.hint else text

    def as_dict(self) -> dict[str, object]:
        return {
            "key": self.key,
            "message": self.message,
            "hint": self.hint,
            "layer": self.origin.layer,
            "source": self.origin.source,
            "line": self.origin.line,
        }


class SettingsError(ConfigError):
    """The configuration is invalid; ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue] | tuple[ConfigIssue, ...]) -> None:
        self.issues = tuple(issues)
        if len(self.issues) == 1:
            text = f"invalid configuration: {self.issues[0]}"
        else:
            lines = "\n".join(f"  - {issue}" for issue in self.issues)
            text = f"invalid configuration ({len(self.issues)} problems):\n{lines}"
        super().__init__(text)
