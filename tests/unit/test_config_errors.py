"""Every configuration error names its file and line (or variable or flag), the key path
and the layer; unknown keys get a did-you-mean hint; secret files must be private."""

from __future__ import annotations

import base64
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from stem.config import ConfigIssue, Settings, SettingsError, load_settings
from stem.errors import ConfigError

KEY32 = base64.b64encode(b"k" * 32).decode()


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    path.chmod(mode)
    return path


def load(tmp_path: Path, **kw: Any) -> Settings:
    kw.setdefault("environ", {})
    kw.setdefault("config_dir", str(tmp_path / "etc"))
    return load_settings(**kw)


def only_issue(tmp_path: Path, **kw: Any) -> ConfigIssue:
    with pytest.raises(SettingsError) as info:
        load(tmp_path, **kw)
    assert len(info.value.issues) == 1, info.value.issues
    assert isinstance(info.value, ConfigError)
    return info.value.issues[0]


def yaml_issue(tmp_path: Path, text: str, name: str = "stem.yaml") -> ConfigIssue:
    write(tmp_path / "etc" / name, text)
    return only_issue(tmp_path)


@pytest.mark.parametrize(
    ("text", "key", "line", "words"),
    [
        ("worker:\n  concurrency: 0\n", "worker.concurrency", 2, "integer >= 1 and <= 4096, got 0"),
        (
            "worker:\n  concurrency: '4'\n",
            "worker.concurrency",
            2,
            "integer >= 1 and <= 4096, got string",
        ),
        ("worker:\n  concurrency: 2.5\n", "worker.concurrency", 2, "integer"),
        ("worker:\n  pool: forks\n", "worker.pool", 2, "one of process, thread, async, solo"),
        ("worker:\n  lease_s: 0\n", "worker.lease_s", 2, "> 0.2"),
        ("beat:\n  tick_s: 7200\n", "beat.tick_s", 2, "3600"),  # beat refused it, no line
        # the worker's own bounds, which the configuration accepted (exit 1, no line)
        ("worker:\n  lease_s: 0.2\n", "worker.lease_s", 2, "> 0.2, got 0.2"),
        ("worker:\n  autoscale: '4,0'\n", "worker.autoscale", 2, "1 <= MIN <= MAX"),
        ("worker:\n  lease_s: true\n", "worker.lease_s", 2, "got boolean"),
        ("worker:\n  queues: []\n", "worker.queues", 2, "at least one queue"),
        ("worker:\n  queues:\n    - a b\n", "worker.queues", 2, "without spaces"),
        ("worker:\n  autoscale: '2,8'\n", "worker.autoscale", 2, "MAX,MIN"),
        ("metrics:\n  port: 70000\n", "metrics.port", 2, "<= 65535"),
        ("metrics:\n  enabled: 'yes'\n", "metrics.enabled", 2, "true or false"),
        ("broker:\n  url: ftp://x\n", "broker.url", 2, "URL starting with"),
        ("broker:\n  url: null\n", "broker.url", 2, "got null"),
        ("broker:\n  url: 'redis://[::1:6379/0'\n", "broker.url", 2, "not a valid URL"),
        ("backend:\n  result_ttl_s: 0\n", "backend.result_ttl_s", 2, ">= 1"),
        ("logging:\n  level: loud\n", "logging.level", 2, "one of debug"),
        ("signing:\n  keys: ['k1:!!!']\n", "signing.keys", 2, "not valid base64"),
        ("signing:\n  active_key: 'bad kid'\n", "signing.active_key", 2, "key id"),
        ("\n\nworker: 5\n", "worker", 3, "expected a mapping of worker settings"),
        ("routes:\n  'a.*': 5\n", "routes.a.*", 2, "queue name"),
        ("beat:\n  schedules:\n    x:\n      task: t\n", "beat.schedules.x", 3, "every"),
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      every: 5\n      cron: '* * * * *'\n",
            "beat.schedules.x",
            3,
            "exactly one",
        ),
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      cron: 'every day'\n",
            "beat.schedules.x.cron",
            5,
            "a cron expression has five fields",
        ),
        # beat refused these, and config check passed them (exit 78 without a line)
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      cron: '0 0 * * * *'\n",
            "beat.schedules.x.cron",
            5,
            "five fields",
        ),
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      cron: '0 0 31 2 *'\n",
            "beat.schedules.x.cron",
            5,
            "never fires",
        ),
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      every: 5\n      priority: 10\n",
            "beat.schedules.x.priority",
            6,
            "an integer 0..9",
        ),
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      every: 5\n      args: {a: 1}\n",
            "beat.schedules.x.args",
            6,
            "a list",
        ),
    ],
)
def test_type_and_range_errors_name_file_line_key_and_layer(
    tmp_path: Path, text: str, key: str, line: int, words: str
) -> None:
    issue = yaml_issue(tmp_path, text)
    assert issue.key == key
    assert words in issue.message
    assert issue.origin.layer == "system"
    assert issue.origin.source == str(tmp_path / "etc" / "stem.yaml")
    assert issue.origin.line == line
    assert f"stem.yaml:{line}: {key}: " in str(issue)
    assert "(layer system)" in str(issue)


@pytest.mark.parametrize(
    ("text", "key", "line", "hint"),
    [
        ("worker:\n  concurency: 4\n", "worker.concurency", 2, "did you mean 'concurrency'?"),
        ("wroker:\n  concurrency: 4\n", "wroker", 1, "did you mean 'worker'?"),
        ("\nconcurrency: 4\n", "concurrency", 2, "did you mean 'worker.concurrency'?"),
        ("signing:\n  key_file: /x\n", "signing.key_file", 2, "did you mean 'keys_file'?"),
        (
            "beat:\n  schedules:\n    x:\n      task: t\n      evry: 5\n",
            "beat.schedules.x.evry",
            5,
            "did you mean 'every'?",
        ),
    ],
)
def test_unknown_keys_get_a_hint(tmp_path: Path, text: str, key: str, line: int, hint: str) -> None:
    issue = yaml_issue(tmp_path, text)
    assert (issue.key, issue.origin.line, issue.hint) == (key, line, hint)
    assert hint in str(issue)


def test_errors_name_each_layer(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "conf.d" / "10-x.yaml", "worker:\n  max_deliveries: 0\n")
    write(tmp_path / "etc" / "stem.production.yaml", "metrics:\n  port: -1\n")
    extra = write(tmp_path / "extra.yaml", "tls:\n  allow_insecure: maybe\n")
    with pytest.raises(SettingsError) as info:
        load(
            tmp_path,
            profile="production",
            config_file=str(extra),
            code_defaults={"broker.publish_retries": -1},
            environ={"STEM_WORKER_CONCURRENCY": "many", "STEM_WORKER_CONCURENCY": "2"},
            overrides={"worker.lease_s": "soon", "worker.lese_s": "1"},
        )
    by_key = {i.key: i for i in info.value.issues}
    assert set(by_key) == {
        "broker.publish_retries",
        "worker.max_deliveries",
        "metrics.port",
        "tls.allow_insecure",
        "worker.concurrency",
        "worker.concurency",
        "worker.lease_s",
        "worker.lese_s",
    }
    assert by_key["broker.publish_retries"].origin.layer == "code"
    assert "Stem(...) in code" in str(by_key["broker.publish_retries"])
    assert by_key["worker.max_deliveries"].origin.layer == "conf.d"
    assert "10-x.yaml:2" in str(by_key["worker.max_deliveries"])
    assert by_key["metrics.port"].origin.layer == "profile"
    assert by_key["tls.allow_insecure"].origin.layer == "file"
    assert f"{extra}:2: tls.allow_insecure" in str(by_key["tls.allow_insecure"])
    env = by_key["worker.concurrency"]
    assert (env.origin.layer, env.origin.source) == ("env", "STEM_WORKER_CONCURRENCY")
    assert "environment variable STEM_WORKER_CONCURRENCY: worker.concurrency" in str(env)
    assert by_key["worker.concurency"].hint == "did you mean 'STEM_WORKER_CONCURRENCY'?"
    cli = by_key["worker.lease_s"]
    assert (cli.origin.layer, cli.origin.source) == ("cli", "--lease")
    assert "command-line flag --lease: worker.lease_s" in str(cli)
    assert by_key["worker.lese_s"].hint == "did you mean 'lease_s'?"
    assert str(info.value).startswith("invalid configuration (8 problems):")


def test_env_values_that_cannot_come_from_text(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, environ={"STEM_BEAT_SCHEDULES": "x"})
    assert issue.key == "beat.schedules"
    assert "YAML file" in issue.message
    issue = only_issue(tmp_path, environ={"STEM_ROUTES": "novalue"})
    assert "key=value" in issue.message


def test_cross_field_checks_name_both_places(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "stem.yaml", "worker:\n  time_limit_s: 10\n")
    issue = only_issue(tmp_path, environ={"STEM_WORKER_SOFT_TIME_LIMIT_S": "20"})
    assert issue.key == "worker.soft_time_limit_s"
    assert issue.origin.source == "STEM_WORKER_SOFT_TIME_LIMIT_S"
    assert "stem.yaml:2" in issue.message


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("worker:\n  pool: a\n  pool: b\n", 3, "duplicate key 'pool' (first set on line 2)"),
        ("worker: !!python/object:os.system {}\n", 1, "unsupported YAML tag"),
        ("worker:\n  node_name: !!binary aGVsbG8=\n", 2, "unsupported YAML tag"),
        ("base: &b {pool: solo}\nworker:\n  <<: *b\n", 3, "merge keys"),
        ("worker:\n  pool: [unclosed\n", 3, "YAML syntax error"),
        ("- a\n- b\n", 1, "top level must be a mapping"),
        ("a: 1\n---\nb: 2\n", 2, "single"),
        ("? [a, b]\n: 1\n", 1, "plain strings"),
        ("routes: &r\n  x: *r\n", 2, "a loop"),
        ("routes: &r\n  - [*r]\n", 1, "a loop"),
        ("routes: " + "[" * 70 + "]" * 70 + "\n", 1, "nested deeper than 64 levels"),
    ],
)
def test_bad_yaml_is_located(tmp_path: Path, text: str, line: int, words: str) -> None:
    issue = yaml_issue(tmp_path, text)
    assert words in issue.message
    assert issue.origin.line == line
    assert issue.origin.layer == "system"


def test_alias_bombs_are_capped(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    issue = yaml_issue(tmp_path, "\n".join(lines) + "\n")
    assert "document too large" in issue.message


def test_empty_file_is_an_empty_layer(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "stem.yaml", "# nothing yet\n")
    assert load(tmp_path).files == (str(tmp_path / "etc" / "stem.yaml"),)


def test_missing_config_file_is_an_error_missing_layers_are_not(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, config_file=str(tmp_path / "nope.yaml"))
    assert issue.origin.layer == "file"
    assert "does not exist" in issue.message
    assert load(tmp_path, profile="production").files == ()


def test_secret_values_are_never_quoted_in_errors(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "stem.yaml", "broker:\n  url: 123456789\n")
    issue = only_issue(tmp_path)
    assert "123456789" not in str(issue)
    write(tmp_path / "etc" / "stem.yaml", "signing:\n  keys: ['k1:sec ret!']\n")
    assert "sec ret" not in str(only_issue(tmp_path))


# -- secret files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "content"),
    [
        ("broker.url_file", "redis://:pw@h/0"),
        ("backend.url_file", "redis://:pw@h/1"),
        ("signing.keys_file", f"k1:{KEY32}"),
        ("tls.key_file", "-----BEGIN PRIVATE KEY-----\n"),
    ],
)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_loose_secret_files_are_refused_outside_development(
    tmp_path: Path, key: str, content: str, mode: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stem.config import secrets

    monkeypatch.setattr(secrets, "euid", lambda: 1000)  # judged as the service user
    secret = write(tmp_path / "secret", content, mode)
    if os.getuid() == 0:  # root's own 0640 file is the accepted packaged layout
        os.chown(secret, 0, 54321)  # a group this process is not in
    section, _, name = key.partition(".")
    write(tmp_path / "etc" / "stem.staging.yaml", f"# x\n{section}:\n  {name}: {secret}\n")
    issue = only_issue(tmp_path, profile="staging")
    assert issue.key == key
    assert issue.origin.line == 3
    assert str(secret) in issue.message
    assert f"mode {mode:04o}" in issue.message
    assert "chmod 600" in issue.message
    # development loads it (the G007 gate warns instead)
    write(tmp_path / "etc" / "stem.development.yaml", f"{section}:\n  {name}: {secret}\n")
    assert getattr(getattr(load(tmp_path), section), name) == str(secret)
    secret.chmod(0o600)
    assert getattr(getattr(load(tmp_path, profile="staging"), section), name) == str(secret)


def test_key_file_entries_in_signing_keys_are_checked(tmp_path: Path) -> None:
    key = write(tmp_path / "k1.hmac-sha256.key", KEY32, 0o644)
    issue = only_issue(tmp_path, profile="production", environ={"STEM_SIGNING_KEYS": str(key)})
    assert (issue.key, issue.origin.source) == ("signing.keys", "STEM_SIGNING_KEYS")
    assert "mode 0644" in issue.message
    issue = only_issue(tmp_path, environ={"STEM_SIGNING_KEYS": str(tmp_path / "missing")})
    assert "entry 1 is neither 'kid:base64' nor an existing key file" in issue.message


@pytest.mark.parametrize(
    "environ",
    [
        {"STEM_SIGNING_KEYS": "k1=S3cretS3cretS3cretS3cretS3cretS3cret"},
        {"STEM_SIGNING_KEYS": "my key:S3cretS3cretS3cretS3cretS3cretS3cret"},
        {
            "STEM_SIGNING_KEYS": "k1:" + "A" * 44,
            "STEM_SIGNING_ACTIVE_KEY": "S3cretS3cretS3cretS3cretS3cretS3cret",
        },
    ],
)
def test_mistyped_key_settings_are_reported_without_the_secret(
    tmp_path: Path, environ: dict[str, str]
) -> None:
    issue = only_issue(tmp_path, environ=environ)
    assert issue.key in ("signing.keys", "signing.active_key")
    assert "S3cret" not in issue.message


def test_missing_and_malformed_secret_files(tmp_path: Path) -> None:
    issue = only_issue(tmp_path, environ={"STEM_BROKER_URL_FILE": str(tmp_path / "nope")})
    assert issue.key == "broker.url_file"
    assert f"secret file {tmp_path / 'nope'} does not exist" in issue.message
    bad = write(tmp_path / "url", "not a url\n", 0o600)
    issue = only_issue(tmp_path, environ={"STEM_BROKER_URL_FILE": str(bad)})
    assert "does not hold a URL" in issue.message
    keys = write(tmp_path / "keys", f"k1:{KEY32}\nk2:***\n", 0o600)
    issue = only_issue(tmp_path, environ={"STEM_SIGNING_KEYS_FILE": str(keys)})
    assert f"{keys}:2:" in issue.message and "base64" in issue.message
    empty = write(tmp_path / "empty", "# none\n", 0o600)
    issue = only_issue(tmp_path, environ={"STEM_SIGNING_KEYS_FILE": str(empty)})
    assert "holds no key entries" in issue.message


def test_active_key_must_exist(tmp_path: Path) -> None:
    env = {"STEM_SIGNING_KEYS": f"k1:{KEY32}", "STEM_SIGNING_ACTIVE_KEY": "k9"}
    issue = only_issue(tmp_path, environ=env)
    assert issue.key == "signing.active_key"
    assert "names no signing key" in issue.message and "k1" in issue.message
    env["STEM_SIGNING_KEYS"] += f",k9:{KEY32},k9:{KEY32}"
    assert "more than once" in only_issue(tmp_path, environ=env).message


def test_missing_tls_files(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "stem.yaml", "tls:\n  ca_file: ca.pem\n")
    issue = only_issue(tmp_path)
    assert issue.key == "tls.ca_file"
    assert str(tmp_path / "etc" / "ca.pem") in issue.message


def test_an_app_whose_dependency_is_missing_is_not_called_missing_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--app tasks_prod:app` whose module imports a missing `tasks` was reported as
    "module 'tasks_prod' not found" (a prefix of the name, not a parent package)."""
    from stem.loader import load_app

    (tmp_path / "stem_tasks_prod.py").write_text("import stem_tasks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing 'stem_tasks_prod' failed: .*'stem_tasks'"):
        load_app("stem_tasks_prod:app")


def test_yaml_schedules_take_every_field_beat_takes(tmp_path: Path) -> None:
    """A local-time cron (tz), jitter, catch_up, "5m" intervals: refused in YAML as
    unknown keys, though app.schedule and stem schedule add take them."""
    from stem.beat import parse_entry
    from stem.cli.beat_cmd import config_specs

    cfg = write(
        tmp_path / "beat.yaml",
        """
        beat:
          schedules:
            nightly: {task: t, cron: "30 2 * * *", tz: Europe/Berlin, jitter: 5m, catch_up: true}
            often: {task: t, every: 5m, expires: 60}
        """,
    )
    specs = config_specs(load(tmp_path, config_file=str(cfg)))
    nightly = parse_entry("nightly", specs["nightly"], origin="config")
    assert (nightly.when["tz"], nightly.jitter_s, nightly.catch_up) == ("Europe/Berlin", 300, True)
    often = parse_entry("often", specs["often"], origin="config")
    assert (often.when["every_s"], often.expires_s) == (300, 60)
    bad = write(
        tmp_path / "bad.yaml", "beat:\n  schedules:\n    x: {task: t, every: 1, origin: cli}\n"
    )
    with pytest.raises(ConfigError, match=r"bad\.yaml:3: beat\.schedules\.x\.origin"):
        load(tmp_path, config_file=str(bad))
    # the operator's flag: one here would be ignored for an entry already stored
    off = write(
        tmp_path / "off.yaml", "beat:\n  schedules:\n    x: {task: t, every: 1, enabled: no}\n"
    )
    with pytest.raises(ConfigError, match=r"off\.yaml:3: beat\.schedules\.x\.enabled: not set"):
        load(tmp_path, config_file=str(off))
