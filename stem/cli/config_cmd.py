"""``stem config show|check|gates``: the effective configuration and its quality gates."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, NoReturn

import typer
import yaml

from stem.cli.exitcodes import ExitCode
from stem.config import (
    Settings,
    SettingsError,
    list_gates,
    load_settings,
    run_gates,
)
from stem.errors import ConfigError
from stem.observability.redact import redact_text

app = typer.Typer(
    name="config",
    help="Show the effective configuration and check it against the quality gates.",
    no_args_is_help=True,
)

ProfileOpt = Annotated[
    str | None,
    typer.Option("--profile", envvar="STEM_PROFILE", help="Config profile (development, ...)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", envvar="STEM_CONFIG", help="An extra YAML config file."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def _from_obj(ctx: typer.Context) -> dict[str, Any]:
    """Options the main CLI's callback put in ``ctx.obj`` (a dict, or its state object)."""
    obj = ctx.obj  # click hands a parent's obj down to sub-commands
    if isinstance(obj, Mapping):
        return dict(obj)
    if obj is None:
        return {}
    found: dict[str, Any] = {
        "profile": getattr(obj, "profile", None),
        "config_file": getattr(obj, "config_file", None),
    }
    # Only flags typed on the command line (an environment variable behind --broker
    # reaches the settings through its own layer, and provenance names it).
    found["overrides"] = dict(getattr(obj, "overrides", None) or {})
    # With --app, what the app's code sets (Stem(broker=...)) is a layer too: the worker
    # sees it, so the check must.
    spec = getattr(obj, "app_spec", None)
    if spec:
        from stem.loader import load_app

        found["code_defaults"] = load_app(spec).code_settings()
    return found


def _load(ctx: typer.Context, profile: str | None, config_file: str | None) -> Settings:
    given = _from_obj(ctx)

    def pick(name: str, own: str | None) -> str | None:
        # Typed on this command wins over `stem --profile X config ...`, which wins over
        # the environment (which both options read).
        source = ctx.get_parameter_source(name)
        if own is not None and getattr(source, "name", None) == "COMMANDLINE":
            return own
        return given.get(name) or own

    return load_settings(
        profile=pick("profile", profile),
        config_file=pick("config_file", config_file),
        overrides=given.get("overrides") or None,
        code_defaults=given.get("code_defaults") or None,
        flag_names=given.get("flag_names") or None,
    )


def _config_failure(exc: ConfigError, as_json: bool) -> NoReturn:
    if as_json:
        issues = exc.issues if isinstance(exc, SettingsError) else ()
        data = {
            "ok": False,
            "errors": [i.as_dict() for i in issues] or [{"message": str(exc)}],
        }
        typer.echo(redact_text(json.dumps(data, indent=2, sort_keys=True)))
    else:
        typer.echo(f"error: {redact_text(str(exc))}", err=True)
    raise typer.Exit(int(ExitCode.CONFIG))


def _shown(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


@app.command("show")
def show(
    ctx: typer.Context,
    explain: Annotated[
        bool, typer.Option("--explain", help="Say which layer and file:line set each value.")
    ] = False,
    as_json: JsonOpt = False,
    profile: ProfileOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Print the effective settings (secrets redacted)."""
    try:
        settings = _load(ctx, profile, config_file)
    except ConfigError as exc:
        _config_failure(exc, as_json)
    if as_json:
        data: dict[str, Any] = {
            "profile": settings.profile,
            "files": list(settings.files),
            "settings": settings.as_dict(redact=True),
        }
        if explain:
            data["provenance"] = {
                key: settings.provenance(key).as_dict() for key in settings.flat(redact=True)
            }
        typer.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    typer.echo(f"# profile: {settings.profile}")
    for path in settings.files:
        typer.echo(f"# file: {path}")
    if not explain:
        typer.echo(yaml.safe_dump(settings.as_dict(redact=True), sort_keys=False).rstrip())
        return
    for key, value in settings.flat(redact=True).items():
        typer.echo(f"{key} = {_shown(value)}  # {settings.provenance(key)}")


@app.command("check")
def check(
    ctx: typer.Context,
    as_json: JsonOpt = False,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on warnings too (development profile).")
    ] = False,
    profile: ProfileOpt = None,
    config_file: ConfigOpt = None,
) -> None:
    """Validate the configuration, load the signing keys, and run the quality gates.

    Exits 78 (EX_CONFIG) on an invalid configuration or a failing gate whose severity is
    error (every profile but development; with --strict, warnings too)."""
    try:
        settings = _load(ctx, profile, config_file)
        # Load the keys as a worker will: a key file that is malformed, misnamed or
        # unreadable by this user fails here, not at the next restart.
        settings.signing.to_keyring()
        _check_store_urls(settings)
    except ConfigError as exc:
        _config_failure(exc, as_json)
    results = run_gates(settings)
    failing = [r for r in results if not r.ok and (r.severity == "error" or strict)]
    if as_json:
        data = {
            "ok": not failing,
            "profile": settings.profile,
            "files": list(settings.files),
            "gates": [r.as_dict() for r in results],
            "errors": [],
        }
        typer.echo(redact_text(json.dumps(data, indent=2, sort_keys=True)))
    else:
        for r in results:
            status = "ok  " if r.ok else ("FAIL" if r.severity == "error" else "warn")
            typer.echo(redact_text(f"{status} {r.id}: {r.message}"))
            if not r.ok:
                typer.echo(f"     fix: {r.hint}")
        verdict = "refused" if failing else "accepted"
        typer.echo(f"profile {settings.profile}: configuration {verdict}")
    if failing:
        raise typer.Exit(int(ExitCode.CONFIG))


def _check_store_urls(settings: Any) -> None:
    """Read the Redis and PostgreSQL URLs as a worker will, with their TLS files loaded:
    a CA file that holds no certificate, or a key that is not the certificate's, fails
    here."""
    from stem.pg import conninfo
    from stem.redis_conn import parse_url

    tls = settings.tls.to_tls_settings()
    for url in dict.fromkeys((settings.broker.url, settings.backend.url)):
        scheme = url.partition(":")[0].lower() if url else ""
        if scheme in ("redis", "rediss"):
            parse_url(url, tls)
        elif scheme in ("postgresql", "postgres"):
            conninfo.parse(url, tls)


@app.command("gates")
def gates(as_json: JsonOpt = False) -> None:
    """List the quality gates with what each demands and how to fix a failure."""
    items = [{"id": g.id, "message": g.message, "hint": g.hint} for g in list_gates()]
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    for item in items:
        typer.echo(f"{item['id']}: {item['message']}\n    fix: {item['hint']}")
