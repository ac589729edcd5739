"""``stem keys generate|info`` and ``stem certs dev|check``.

Register with ``app.add_typer(security_cmd.keys_app, name="keys")`` and
``app.add_typer(security_cmd.certs_app, name="certs")``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stem.cli.exitcodes import ExitCode
from stem.security import devcerts, keys
from stem.security.signing import ENV_NAMES

keys_app = typer.Typer(help="Generate and inspect message signing keys.", no_args_is_help=True)
certs_app = typer.Typer(help="Development TLS certificates.", no_args_is_help=True)


@keys_app.command("generate")
def generate(
    algorithm: Annotated[
        str, typer.Option("--algorithm", "-a", help="hmac-sha256 or ed25519.")
    ] = keys.HMAC_SHA256,
    kid: Annotated[str, typer.Option("--kid", help="Key id, e.g. v2.")] = "v1",
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help=(
                "Directory for the key files (created 0700; in a 0750 root:GROUP directory, "
                "keys are written 0640 root:GROUP). '-' prints the keys to stdout."
            ),
        ),
    ] = "keys",
) -> None:
    """Create a new signing key. Files are written 0600 (public keys 0644), never overwritten;
    the secret is printed only with ``--out -``."""
    algorithm = keys.check_algorithm(algorithm.strip().lower(), "--algorithm")
    keys.check_kid(kid, "--kid")
    files = keys.generate_key(algorithm, kid)
    if out == "-":
        inline = keys.inline_entries(files)
        typer.echo(f"{ENV_NAMES['algorithm']}={algorithm}")
        typer.echo(f"{ENV_NAMES['keys']}={inline['keys']}")
        typer.echo(f"{ENV_NAMES['active_key']}={kid}")
        if "public_keys" in inline:
            typer.echo(f"# verify-only workers: {ENV_NAMES['public_keys']}={inline['public_keys']}")
        return
    paths = keys.write_key_files(files, Path(out))
    for p in paths:
        typer.echo(f"wrote {p} ({oct(p.stat().st_mode & 0o777)[2:]})", err=True)
    key_name, pub_name = keys.key_file_names(algorithm, kid)
    key_path = Path(out).resolve() / key_name
    who = "producers" if algorithm == keys.ED25519 else "producers and workers"
    typer.echo(f"# {who} (when rotating, append to the existing list):")
    typer.echo(f"{ENV_NAMES['algorithm']}={algorithm}")
    typer.echo(f"{ENV_NAMES['keys']}={key_path}")
    typer.echo(f"{ENV_NAMES['active_key']}={kid}")
    if pub_name is not None:
        typer.echo("# verify-only workers (copy the .pub file to them):")
        typer.echo(f"{ENV_NAMES['algorithm']}={algorithm}")
        typer.echo(f"{ENV_NAMES['public_keys']}={Path(out).resolve() / pub_name}")


@keys_app.command("info")
def info(ctx: typer.Context) -> None:
    """Show the keyring a worker or producer here would use (key ids only, no secrets):
    from the app's code, the configuration files (signing.*) and STEM_SIGNING_*."""
    from stem.cli.context import load_app

    keyring = load_app(ctx).keyring
    if keyring is None:
        typer.echo(
            "signing: off (no keys in the app, the configuration's signing section, "
            "STEM_SIGNING_KEYS or STEM_SIGNING_PUBLIC_KEYS)"
        )
        return
    typer.echo(f"algorithm:        {keyring.algorithm}")
    typer.echo(f"key ids:          {', '.join(keyring.key_ids)}")
    typer.echo(f"active key:       {keyring.active_key_id or '(none: verify only)'}")
    typer.echo(f"required:         {str(keyring.required).lower()}")
    typer.echo(f"results required: {str(keyring.results_required).lower()}")
    typer.echo(f"replay window:    {keyring.replay_window_s:g}s")


@certs_app.command("dev")
def dev(
    out: Annotated[str, typer.Option("--out", "-o", help="Output directory.")] = "certs/dev",
    hosts: Annotated[
        str, typer.Option("--hosts", help="Comma-separated server names and IP addresses.")
    ] = ",".join(devcerts.DEFAULT_HOSTS),
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Write a development-only CA, server and client certificate (refused in production)."""
    names = [h.strip() for h in hosts.split(",") if h.strip()]
    paths = devcerts.generate_dev_certs(out, names, overwrite=force)
    for p in paths.values():
        typer.echo(f"wrote {p}")
    typer.echo("these certificates are for development only; production refuses them")


@certs_app.command("check")
def check(paths: Annotated[list[Path], typer.Argument(help="Certificate files.")]) -> None:
    """Exit 1 if any file is a development certificate, or holds no certificate at all
    (a key, or the wrong file: it must not pass for checked)."""
    failed = False
    for p in paths:
        certs = devcerts.certificates(p)
        if not certs:
            verdict = "no certificate in this file"
        elif any(devcerts.certificate_is_dev(c) for c in certs):
            verdict = "development certificate"
        else:
            verdict = "ok"
        failed |= verdict != "ok"
        typer.echo(f"{p}: {verdict}")
    if failed:
        sys.exit(int(ExitCode.FAILURE))
