"""``stem config show|check|gates``: redaction, provenance output, JSON and exit codes."""

from __future__ import annotations

import base64
import json
import os
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from stem.cli import config_cmd
from stem.cli.exitcodes import ExitCode
from stem.config import gates as gates_mod

KEY32 = base64.b64encode(b"S" * 32).decode()
FILE_KEY = base64.b64encode(b"F" * 32).decode()
SECRETS = {
    "broker_pw": "brokerPW-1f3a",
    "backend_pw": "backendPW-9c2d",
    "query_pw": "queryPW-77aa",
    "inline_key": KEY32,
    "file_key": FILE_KEY,
    "kwarg_pw": "kwargPW-5e5e",
    "token": "tokenVAL-0b0b",
}


def make_root(obj: Any = None) -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _main(ctx: typer.Context) -> None:
        ctx.obj = obj

    root.add_typer(config_cmd.app, name="config")
    return root


@pytest.fixture
def etc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("STEM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STEM_CONFIG_DIR", str(tmp_path / "etc"))
    monkeypatch.setattr(gates_mod, "current_euid", lambda: 1000)
    (tmp_path / "etc").mkdir()
    return tmp_path / "etc"


def run(args: list[str], obj: Any = None, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(make_root(obj), ["config", *args], env=env)


@pytest.fixture
def secret_config(etc: Path) -> dict[str, str]:
    """A production configuration holding every kind of secret Stem knows."""
    url_file = etc / "broker-url"
    url_file.write_text(f"rediss://:{SECRETS['broker_pw']}@redis.internal:6380/0\n")
    keys_file = etc / "signing-keys"
    keys_file.write_text(f"# rotation\nk2:{FILE_KEY}\n")
    for p in (url_file, keys_file):
        p.chmod(0o600)
    (etc / "stem.production.yaml").write_text(
        textwrap.dedent(f"""\
        broker:
          url_file: {url_file}
        backend:
          url: "postgresql://stem:{SECRETS["backend_pw"]}@db/stem?sslmode=verify-full&password={SECRETS["query_pw"]}"
        signing:
          keys_file: {keys_file}
          active_key: k1
        beat:
          schedules:
            sync:
              task: crm.sync
              every: 60
              kwargs: {{password: {SECRETS["kwarg_pw"]}, api_token: {SECRETS["token"]}, n: 1}}
        """)
    )
    return {"STEM_PROFILE": "production", "STEM_SIGNING_KEYS": f"k1:{KEY32}"}


def assert_no_secrets(text: str) -> None:
    for name, value in SECRETS.items():
        assert value not in text, f"{name} leaked"


@pytest.mark.parametrize(
    "args",
    [
        ["show"],
        ["show", "--explain"],
        ["show", "--json"],
        ["show", "--json", "--explain"],
        ["check"],
        ["check", "--json"],
    ],
)
def test_no_secret_reaches_the_output(args: list[str], secret_config: dict[str, str]) -> None:
    result = run(args, env=secret_config)
    assert result.exit_code == 0, result.output
    assert_no_secrets(result.output)
    if args[0] == "show":
        assert "k1:***" in result.output
        assert "redis.internal" in result.output  # the rest of the URL is still shown


def test_show_json_is_redacted_structured_data(secret_config: dict[str, str]) -> None:
    result = run(["show", "--json", "--explain"], env=secret_config)
    data = json.loads(result.output)
    assert data["profile"] == "production"
    settings = data["settings"]
    assert settings["broker"]["url"] == "rediss://:***@redis.internal:6380/0"
    assert settings["backend"]["url"].startswith("postgresql://stem:***@db/stem")
    assert "password=***" in settings["backend"]["url"]
    assert settings["signing"]["keys"] == ["k1:***"]
    kwargs = settings["beat"]["schedules"]["sync"]["kwargs"]
    assert kwargs == {"password": "***", "api_token": "***", "n": 1}
    prov = data["provenance"]
    assert prov["broker.url"]["layer"] == "profile"
    assert prov["broker.url"]["line"] == 2
    assert prov["broker.url"]["note"].startswith("read from ")
    assert prov["signing.keys"] == {
        "layer": "env",
        "source": "STEM_SIGNING_KEYS",
        "line": None,
        "note": None,
    }
    assert prov["worker.pool"]["layer"] == "default"


def test_show_explain_names_layer_and_line(secret_config: dict[str, str], etc: Path) -> None:
    result = run(["show", "--explain"], env=secret_config)
    lines = {line.split(" = ")[0]: line for line in result.output.splitlines()}
    assert lines["signing.active_key"].endswith(f'"k1"  # profile {etc / "stem.production.yaml"}:7')
    assert lines["signing.keys"].endswith("# environment variable STEM_SIGNING_KEYS")
    assert lines["worker.lease_s"].endswith("# built-in default")
    assert lines["beat.schedules.sync"].endswith("stem.production.yaml:10")


def test_show_plain_is_yaml(etc: Path) -> None:
    result = run(["show"])
    assert result.exit_code == 0
    assert "# profile: development" in result.output
    assert "broker:\n  url: sqlite:///stem.db" in result.output


def test_check_exit_codes(etc: Path, secret_config: dict[str, str]) -> None:
    ok = run(["check"], env=secret_config)
    assert ok.exit_code == 0, ok.output
    assert "configuration accepted" in ok.output
    bad = run(["check"], env={**secret_config, "STEM_BACKEND_RESULT_TTL_S": "null"})
    assert bad.exit_code == int(ExitCode.CONFIG) == 78
    assert "FAIL G008-result-expiry" in bad.output
    assert "fix: set backend.result_ttl_s" in bad.output
    # development: failing gates are warnings, unless --strict
    dev = run(["check"])
    assert dev.exit_code == 0
    assert "warn G001-signing-off" in dev.output
    assert run(["check", "--strict"]).exit_code == 78


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("k9.hmac-sha256.key", "not base64 !!!", "neither PEM nor base64"),
        ("bad.key", FILE_KEY, "must look like"),
    ],
)
def test_check_loads_the_keys_a_worker_would_refuse(
    etc: Path, tmp_path: Path, name: str, content: str, expected: str
) -> None:
    """Naming a key file is not enough: check loads it, as a worker does at start-up."""
    key = tmp_path / name
    key.write_text(content + "\n")
    key.chmod(0o600)
    result = run(["check"], env={"STEM_SIGNING_KEYS": str(key)})
    assert result.exit_code == 78, result.output
    assert expected in result.output


@pytest.mark.parametrize("url", ["rediss://cache:6380/0", "postgresql://db/stem"])
def test_check_loads_the_tls_files_a_worker_would_refuse(
    etc: Path, tmp_path: Path, url: str
) -> None:
    """A CA file that holds no certificate passed check; the worker then refused it (or,
    for PostgreSQL, failed every connect)."""
    not_a_cert = tmp_path / "ca.pem"
    not_a_cert.write_text("not a certificate\n")
    (etc / "stem.yaml").write_text(f"broker:\n  url: {url}\ntls:\n  ca_file: {not_a_cert}\n")
    result = run(["check"])
    assert result.exit_code == 78, result.output
    assert "holds no certificate that can be read" in result.output


def test_check_json(etc: Path, secret_config: dict[str, str]) -> None:
    result = run(["check", "--json"], env={**secret_config, "STEM_BROKER_URL": "memory://"})
    assert result.exit_code == 78
    data = json.loads(result.output)
    assert data["ok"] is False
    assert data["profile"] == "production"
    by_id = {g["id"]: g for g in data["gates"]}
    assert by_id["G005-memory-transport"]["ok"] is False
    assert by_id["G005-memory-transport"]["severity"] == "error"
    assert by_id["G001-signing-off"]["ok"] is True
    passing = run(["check", "--json"], env=secret_config)
    assert passing.exit_code == 0
    assert json.loads(passing.output)["ok"] is True


def test_invalid_configuration_exits_78_with_location(etc: Path) -> None:
    (etc / "stem.yaml").write_text("worker:\n  concurency: 4\n")
    for args in (["check"], ["show"]):
        result = run(args)
        assert result.exit_code == 78
        assert "stem.yaml:2: worker.concurency: unknown key" in result.output
        assert "did you mean 'concurrency'?" in result.output
    result = run(["check", "--json"])
    assert result.exit_code == 78
    data = json.loads(result.output)
    assert data["ok"] is False
    assert data["errors"][0]["key"] == "worker.concurency"
    assert data["errors"][0]["line"] == 2
    assert data["errors"][0]["layer"] == "system"


def test_gates_lists_ids_messages_and_hints(etc: Path) -> None:
    result = run(["gates"])
    assert result.exit_code == 0
    for gate in gates_mod.list_gates():
        assert gate.id in result.output and gate.hint in result.output
    data = json.loads(run(["gates", "--json"]).output)
    assert [g["id"] for g in data] == [g.id for g in gates_mod.list_gates()]


def test_profile_and_config_options(etc: Path, tmp_path: Path) -> None:
    (etc / "stem.production.yaml").write_text("metrics:\n  port: 9100\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("metrics:\n  host: 0.0.0.0\n")
    data = json.loads(run(["show", "--json", "--profile", "production"]).output)
    assert data["settings"]["metrics"]["port"] == 9100
    data = json.loads(run(["show", "--json"], env={"STEM_PROFILE": "production"}).output)
    assert data["settings"]["metrics"]["port"] == 9100
    data = json.loads(run(["show", "--json", "--config", str(extra)]).output)
    assert data["settings"]["metrics"]["host"] == "0.0.0.0"
    data = json.loads(run(["show", "--json"], env={"STEM_CONFIG": str(extra)}).output)
    assert data["files"] == [str(extra)]


def test_a_profile_typed_on_the_command_wins(etc: Path, tmp_path: Path) -> None:
    """`STEM_PROFILE=development stem config check --profile production` checks
    production (the upgrade runbook's check), whether the environment reached the
    command's own option or the main CLI's."""
    (etc / "stem.production.yaml").write_text("metrics:\n  port: 9100\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("metrics:\n  host: 0.0.0.0\n")
    typed = ["show", "--json", "--profile", "production", "--config", str(extra)]
    env = {"STEM_PROFILE": "development", "STEM_CONFIG": str(tmp_path / "other.yaml")}
    for obj in (None, {"profile": "development", "config_file": str(tmp_path / "other.yaml")}):
        data = json.loads(run(typed, obj=obj, env=env).output)
        assert (data["profile"], data["settings"]["metrics"]["port"]) == ("production", 9100)
        assert data["files"][-1] == str(extra)


def test_options_from_the_main_cli_context(etc: Path, tmp_path: Path) -> None:
    (etc / "stem.production.yaml").write_text("metrics:\n  port: 9100\n")
    extra = tmp_path / "extra.yaml"
    extra.write_text("metrics:\n  host: 0.0.0.0\n")
    obj = {"profile": "production", "config_file": str(extra)}
    data = json.loads(run(["show", "--json"], obj=obj).output)
    assert (data["profile"], data["settings"]["metrics"]["port"]) == ("production", 9100)
    assert data["settings"]["metrics"]["host"] == "0.0.0.0"
    # the main CLI's state: a typed --broker is a command-line override
    state = SimpleNamespace(
        profile=None,
        config_file=None,
        broker="redis://:pw-cli@h/0",
        backend=None,
        overrides={"broker.url": "redis://:pw-cli@h/0"},
    )
    result = run(["show", "--json", "--explain"], obj=state)
    data = json.loads(result.output)
    assert data["settings"]["broker"]["url"] == "redis://:***@h/0"
    assert data["provenance"]["broker.url"]["source"] == "--broker"
    assert "pw-cli" not in result.output


def test_check_and_show_see_what_the_apps_code_sets(
    etc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker applies Stem(broker=...) from the app's code: with --app, so must the
    check operators run before starting it (here: a production gate the code trips)."""
    from stem.cli.main import app as main_cli

    (tmp_path / "codeapp.py").write_text(
        "from stem import Stem\napp = Stem('x', broker='redis://cache.internal:6379/0')\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {"STEM_PROFILE": "production", "STEM_SIGNING_KEYS": f"v1:{KEY32}"}
    shown = CliRunner().invoke(
        main_cli, ["--app", "codeapp:app", "config", "show", "--json", "--explain"], env=env
    )
    data = json.loads(shown.output)
    assert data["settings"]["broker"]["url"] == "redis://cache.internal:6379/0"
    assert data["provenance"]["broker.url"]["layer"] == "code"
    checked = CliRunner().invoke(main_cli, ["--app", "codeapp:app", "config", "check"], env=env)
    assert checked.exit_code == ExitCode.CONFIG, checked.output
    assert "FAIL G003-tls-off" in checked.output


def test_a_url_from_the_environment_is_attributed_to_its_variable(etc: Path) -> None:
    """STEM_BROKER_URL also feeds --broker; provenance must name the variable, not a flag
    nobody typed."""
    from stem.cli.main import app as main_cli

    def source(*args: str) -> str:
        result = CliRunner().invoke(
            main_cli,
            [*args, "config", "show", "--json", "--explain"],
            env={"STEM_BROKER_URL": "redis://env-host/0"},
        )
        assert result.exit_code == 0, result.output
        return str(json.loads(result.output)["provenance"]["broker.url"]["source"])

    assert source() == "STEM_BROKER_URL"
    assert source("--broker", "redis://flag-host/0") == "--broker"


@pytest.mark.parametrize("args", [["show"], ["show", "--json"], ["show", "--explain"]])
@pytest.mark.parametrize(
    "url",
    [
        "redis://u:Pw5/ecret@redis.internal:6379/0",
        "postgresql://u:Pw5#ecret@db/stem?sslmode=verify-full",
        "redis://:Pw5?ecret@redis.internal/0",
    ],
)
def test_a_password_holding_url_delimiters_is_still_redacted(
    etc: Path, url: str, args: list[str]
) -> None:
    """urlsplit cuts such a netloc short and sees no password; show must not print it."""
    result = run(args, env={"STEM_BROKER_URL": url, "STEM_BACKEND_URL": url})
    assert result.exit_code == 0, result.output
    assert "ecret" not in result.output
    assert ":***@" in result.output


@pytest.mark.parametrize(
    "args, env",
    [
        (["--log-level", "banana"], {}),
        ([], {"STEM_LOG_LEVEL": "banana"}),
        (["--log-format", "banana"], {}),
    ],
)
def test_a_bad_log_setting_is_a_configuration_error_not_a_traceback(
    etc: Path, tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'stem.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "stem.cli.main", *args, "--broker", url, "queues"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert "expected one of" in result.stderr and "banana" in result.stderr


def test_every_service_option_reads_an_environment_variable() -> None:
    """README: a service's defaults file can set any option of these commands."""
    from stem.cli.main import app as cli_app

    root = typer.main.get_command(cli_app)
    missing = [
        f"{name or 'stem'} --{p.name}"
        for name in (None, "worker", "beat", "enqueue", "result")
        for p in (root if name is None else root.commands[name]).params  # type: ignore[attr-defined]
        if p.param_type_name == "option"
        and p.envvar is None
        and p.name not in {"as_json", "install_completion", "show_completion"}
    ]
    assert missing == []
