"""Shared CLI state: the global options, and turning them into a configured app."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import typer

from stem.app import Stem
from stem.cli.exitcodes import ExitCode
from stem.errors import (
    BackendConnectionError,
    BrokerConnectionError,
    ConfigError,
    ResultTimeout,
    SignatureError,
    StemError,
    TaskError,
)
from stem.observability.redact import redact_text


@dataclass
class CLIState:
    app_spec: str | None = None
    profile: str | None = None
    config_file: str | None = None
    broker: str | None = None
    backend: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    _app: Stem | None = None
    settings: Any = None

    def as_obj(self) -> dict[str, Any]:
        return {"profile": self.profile, "config_file": self.config_file}


def state(ctx: typer.Context) -> CLIState:
    root = ctx.find_root()
    if not isinstance(root.obj, CLIState):
        root.obj = CLIState()  # a sub-command run on its own (tests): one state per run
    return root.obj


def print_table(table: Any) -> None:
    """A Rich table on stdout: at the terminal's width, or, piped or redirected (a log, a
    script, `| grep`), at its natural width, so no cell is cut short."""
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else _PIPED_WIDTH).print(table)


_PIPED_WIDTH = 1000


def load_app(
    ctx: typer.Context, *, need_spec: bool = False, gates: bool = False, existing: bool = False
) -> Stem:
    """The app named by --app (or a bare app on the configured broker), with settings
    from the config layers applied on top of what the code set. ``existing``: a command
    that inspects or operates what is there (queues, dead letters, workers, events,
    control) refuses a SQLite file that does not exist, rather than create one at a
    mistyped path and report it empty. (``stem result`` may wait for a store that a
    worker is about to create.)"""
    app = _load_app(ctx, need_spec=need_spec, gates=gates)
    if existing:
        _require_sqlite_files(app)
    return app


def absent_sqlite_file(url: str) -> Path | None:
    """The path of a SQLite URL whose file does not exist (None: it exists, or another
    kind of URL)."""
    from stem.brokers.sqlite import sqlite_path

    if url.lower().startswith("sqlite:") and not (path := sqlite_path(url)).exists():
        return path
    return None


def require_sqlite_file(url: str, error: type[Exception]) -> None:
    """Raise ``error`` if ``url`` names a SQLite file that does not exist."""
    if (path := absent_sqlite_file(url)) is not None:
        raise error(
            f"no SQLite database at {path}: nothing was ever stored there (is the path right?)"
        )


def _require_sqlite_files(app: Stem) -> None:
    require_sqlite_file(app.broker_url, BrokerConnectionError)
    require_sqlite_file(app.backend_url, BackendConnectionError)


def _load_app(ctx: typer.Context, *, need_spec: bool, gates: bool) -> Stem:
    st = state(ctx)
    if st._app is not None:
        return st._app
    if st.app_spec:
        from stem.loader import load_app as _load

        app = _load(st.app_spec)
    elif need_spec:
        raise ConfigError(
            "this command needs the app: pass --app package.module:app (or set STEM_APP)"
        )
    else:
        app = Stem("stem")
    from stem.cli.settings_bridge import apply_settings

    st.settings = apply_settings(app, st, gates=gates)
    st._app = app
    return app


_CODES: list[tuple[type[BaseException], ExitCode]] = [
    (ConfigError, ExitCode.CONFIG),
    (BrokerConnectionError, ExitCode.UNAVAILABLE),
    (BackendConnectionError, ExitCode.UNAVAILABLE),
    (ResultTimeout, ExitCode.TIMEOUT),
    (TaskError, ExitCode.TASK_FAILED),
    (SignatureError, ExitCode.CONFIG),
    (PermissionError, ExitCode.NOPERM),
]


def exit_code_for(exc: BaseException) -> ExitCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return ExitCode.FAILURE if isinstance(exc, StemError) else ExitCode.SOFTWARE


def fail(message: str, code: ExitCode = ExitCode.FAILURE) -> NoReturn:
    typer.echo(f"error: {redact_text(message)}", err=True)
    raise typer.Exit(int(code))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
