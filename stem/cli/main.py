"""The ``stem`` command."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from stem.cli import (
    beat_cmd,
    config_cmd,
    control_cmd,
    db_cmd,
    dlq_cmd,
    health_cmd,
    observe_cmd,
    security_cmd,
    task_cmds,
    worker_cmd,
)
from stem.cli.context import CLIState, exit_code_for
from stem.cli.settings_bridge import typed_flags
from stem.errors import StemError
from stem.observability.logs import setup_logging
from stem.observability.redact import redact_text

app = typer.Typer(
    name="stem",
    help="Stem: a security-hardened background task queue.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _global(
    ctx: typer.Context,
    app_spec: Annotated[
        str | None,
        typer.Option(
            "--app", "-A", envvar="STEM_APP", help="The app to load, as package.module:attribute."
        ),
    ] = None,
    broker: Annotated[
        str | None,
        typer.Option(
            "--broker", envvar="STEM_BROKER_URL", help="Broker URL (overrides code and config)."
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option("--backend", envvar="STEM_BACKEND_URL", help="Result backend URL.")
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", envvar="STEM_PROFILE", help="Config profile (development, production)."
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            "--config", envvar="STEM_CONFIG", help="An extra YAML config file (highest file layer)."
        ),
    ] = None,
    log_level: Annotated[
        str,
        typer.Option("--log-level", envvar="STEM_LOG_LEVEL", help="debug, info, warning, error."),
    ] = "info",
    log_format: Annotated[
        str, typer.Option("--log-format", envvar="STEM_LOG_FORMAT", help="text or json.")
    ] = "text",
) -> None:
    setup_logging(log_level, log_format, root_too=False)  # the root: once the app is loaded
    typed = typed_flags(
        ctx,
        {
            "broker": "broker.url",
            "backend": "backend.url",
            "log_level": "logging.level",
            "log_format": "logging.format",
        },
    )
    ctx.obj = CLIState(
        app_spec=app_spec,
        profile=profile,
        config_file=config_file,
        broker=broker,
        backend=backend,
        overrides=typed,
    )


app.command("worker")(worker_cmd.worker)
app.command("enqueue")(task_cmds.enqueue)
app.command("result")(task_cmds.result)
app.command("queues")(task_cmds.queues)
app.command("beat")(beat_cmd.beat)
app.add_typer(beat_cmd.app, name="schedule")
app.command("health")(health_cmd.health)
app.command("events")(observe_cmd.events)
app.command("workers")(observe_cmd.workers)
app.add_typer(dlq_cmd.app, name="dlq")
app.add_typer(control_cmd.app, name="control")
app.add_typer(config_cmd.app, name="config")
app.add_typer(security_cmd.keys_app, name="keys")
app.add_typer(security_cmd.certs_app, name="certs")
app.add_typer(db_cmd.app, name="db")
# -- sub-apps of other roles register below ----------------------------------------------


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="stem")
    except StemError as exc:
        typer.echo(f"error: {redact_text(str(exc))}", err=True)
        sys.exit(int(exit_code_for(exc)))


if __name__ == "__main__":
    main()
