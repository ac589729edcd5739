"""Layer precedence, provenance, environment mapping and merging of stem.config."""

from __future__ import annotations

import base64
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stem.config import LAYERS, Settings, SettingsError, env_name, load_settings
from stem.config.schema import SCHEMA
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


@pytest.fixture
def layered(tmp_path: Path) -> dict[str, Any]:
    """Every layer sets worker.lease_s; each also sets one key only it and the layers
    below set, so each layer's win is visible."""
    etc = tmp_path / "etc"
    write(
        etc / "stem.yaml",
        """\
        worker:
          lease_s: 10
          max_deliveries: 2
        """,
    )
    write(
        etc / "conf.d" / "20-b.yaml",
        """\
        worker:
          lease_s: 12
          shutdown_budget_s: 7
        """,
    )
    write(
        etc / "conf.d" / "10-a.yaml",
        """\
        worker:
          lease_s: 11
          shutdown_budget_s: 6
          heartbeat_s: 1.5
        """,
    )
    write(etc / "conf.d" / "notes.txt", "not: yaml: at all: [\n")
    write(
        etc / "stem.staging.yaml",
        """\
        worker:
          lease_s: 13
          time_limit_s: 99
        """,
    )
    extra = write(
        tmp_path / "extra.yaml",
        """\
        worker:
          lease_s: 14
          soft_time_limit_s: 50
        """,
    )
    return {
        "profile": "staging",
        "config_file": str(extra),
        "code_defaults": {"worker.lease_s": 9, "worker.node_name": "code@host"},
        "environ": {"STEM_WORKER_LEASE_S": "15", "STEM_WORKER_POOL": "thread"},
        "overrides": {"worker.lease_s": "16"},
    }


def test_defaults_without_any_file(tmp_path: Path) -> None:
    s = load(tmp_path)
    assert s.profile == "development"
    assert s.broker.url == "sqlite:///stem.db"
    assert s.backend.url == s.broker.url
    assert s.backend.result_ttl_s == 86400
    assert s.worker.queues == ("default",)
    assert s.worker.concurrency == (os.cpu_count() or 1)
    assert s.provenance("worker.concurrency").note == "number of CPUs"
    assert s.provenance("backend.url").note == "same as broker.url"
    assert s.files == ()


def test_every_layer_in_order(tmp_path: Path, layered: dict[str, Any]) -> None:
    etc = tmp_path / "etc"
    s = load(tmp_path, **layered)
    assert s.worker.lease_s == 16.0
    p = s.provenance("worker.lease_s")
    assert (p.layer, p.source) == ("cli", "--lease")
    assert s.worker.pool == "thread"
    assert s.provenance("worker.pool").source == "STEM_WORKER_POOL"
    assert s.worker.soft_time_limit_s == 50.0
    assert s.provenance("worker.soft_time_limit_s") == type(p)(
        "file", str(tmp_path / "extra.yaml"), 3
    )
    assert s.worker.time_limit_s == 99.0
    assert s.provenance("worker.time_limit_s").layer == "profile"
    assert s.provenance("worker.time_limit_s").line == 3
    # conf.d in lexical order: 20-b.yaml wins over 10-a.yaml; other files are ignored
    assert s.worker.shutdown_budget_s == 7.0
    assert s.provenance("worker.shutdown_budget_s").source == str(etc / "conf.d" / "20-b.yaml")
    assert s.worker.heartbeat_s == 1.5
    assert s.provenance("worker.heartbeat_s").source == str(etc / "conf.d" / "10-a.yaml")
    assert s.worker.max_deliveries == 2
    assert s.provenance("worker.max_deliveries") == type(p)("system", str(etc / "stem.yaml"), 3)
    assert s.worker.node_name == "code@host"
    assert s.provenance("worker.node_name").layer == "code"
    assert s.provenance("worker.autoscale").layer == "default"
    assert s.files == (
        str(etc / "stem.yaml"),
        str(etc / "conf.d" / "10-a.yaml"),
        str(etc / "conf.d" / "20-b.yaml"),
        str(etc / "stem.staging.yaml"),
        str(tmp_path / "extra.yaml"),
    )


@pytest.mark.parametrize("drop", ["overrides", "environ", "config_file", "profile"])
def test_removing_a_layer_exposes_the_one_below(
    tmp_path: Path, layered: dict[str, Any], drop: str
) -> None:
    expected = {"overrides": 15.0, "environ": 16.0, "config_file": 16.0, "profile": 16.0}
    layered[drop] = {} if drop in ("overrides", "environ") else None
    s = load(tmp_path, **layered)
    assert s.worker.lease_s == expected[drop]
    if drop == "profile":  # falls back to development; stem.staging.yaml is not read
        assert s.profile == "development"
        assert s.worker.time_limit_s is None


def test_lower_layers_when_upper_ones_are_silent(tmp_path: Path, layered: dict[str, Any]) -> None:
    layered.update(overrides={}, environ={}, config_file=None, profile=None)
    os.remove(tmp_path / "etc" / "conf.d" / "10-a.yaml")
    os.remove(tmp_path / "etc" / "conf.d" / "20-b.yaml")
    assert load(tmp_path, **layered).worker.lease_s == 10.0
    os.remove(tmp_path / "etc" / "stem.yaml")
    s = load(tmp_path, **layered)
    assert s.worker.lease_s == 9.0
    assert s.provenance("worker.lease_s").source == "Stem(...)"


def test_layer_names_are_the_documented_ones() -> None:
    assert LAYERS == ("default", "code", "system", "conf.d", "profile", "file", "env", "cli")


def test_profile_from_environment_and_config_dir_from_environment(tmp_path: Path) -> None:
    etc = tmp_path / "other"
    write(etc / "stem.production.yaml", "metrics: {port: 9100}\n")
    env = {"STEM_PROFILE": "production", "STEM_CONFIG_DIR": str(etc)}
    s = load_settings(environ=env)
    assert s.profile == "production"
    assert s.metrics.port == 9100
    # the argument beats the variable
    assert load_settings(environ=env, profile="development").metrics.port == 9808


def test_an_unreadable_conf_d_is_an_error_not_a_silent_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "conf.d" / "20-routes.yaml", "worker: {concurrency: 3}\n")
    env = {"STEM_CONFIG_DIR": str(tmp_path)}
    assert load_settings(environ=env).worker.concurrency == 3
    listing, listdir = Path.iterdir, os.listdir

    def refused(path: Any) -> bool:
        if os.path.basename(str(path)) == "conf.d":
            raise PermissionError(13, "Permission denied", str(path))
        return False

    # (root may list any directory: the refusal is simulated)
    monkeypatch.setattr(Path, "iterdir", lambda self: refused(self) or listing(self))
    monkeypatch.setattr(os, "listdir", lambda path: refused(path) or listdir(path))
    with pytest.raises(SettingsError, match=r"conf\.d: cannot list the conf\.d directory"):
        load_settings(environ=env)
    # A conf.d that does not exist is simply no layer.
    monkeypatch.undo()
    assert load_settings(environ={"STEM_CONFIG_DIR": str(tmp_path / "none")}).profile


def test_profile_name_cannot_escape_the_config_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="profile"):
        load(tmp_path, profile="../../etc/passwd")


def test_env_mapping_rule_covers_every_key() -> None:
    assert env_name("broker.url") == "STEM_BROKER_URL"
    assert env_name("worker.soft_time_limit_s") == "STEM_WORKER_SOFT_TIME_LIMIT_S"
    for section, fields in SCHEMA.items():
        for key in fields:
            assert env_name(f"{section}.{key}") == f"STEM_{section.upper()}_{key.upper()}"


def test_env_value_parsing(tmp_path: Path) -> None:
    env = {
        "STEM_WORKER_QUEUES": "high, default ,low",
        "STEM_METRICS_ENABLED": "1",
        "STEM_TLS_ALLOW_INSECURE": "false",
        "STEM_SIGNING_REQUIRED": "yes",
        "STEM_BACKEND_RESULT_TTL_S": "null",
        "STEM_WORKER_TIME_LIMIT_S": "2.5",
        "STEM_ROUTES": "reports.*=reports, email.send=mail",
        "STEM_LOG_LEVEL": "warning",  # alias of STEM_LOGGING_LEVEL
        "STEM_APP": "myapp:app",  # not a setting
        "STEM_ENQUEUE_QUEUE": "x",  # another command's option, ignored
        "STEM_SIGNING_KEYS": f"k1:{KEY32}",
    }
    s = load(tmp_path, environ=env)
    assert s.worker.queues == ("high", "default", "low")
    assert s.metrics.enabled is True
    assert s.tls.allow_insecure is False
    assert s.signing.required is True
    assert s.backend.result_ttl_s is None
    assert s.worker.time_limit_s == 2.5
    assert dict(s.routes) == {"reports.*": "reports", "email.send": "mail"}
    assert s.provenance("routes.email.send").source == "STEM_ROUTES"
    assert s.logging.level == "warning"
    assert s.provenance("logging.level").source == "STEM_LOG_LEVEL"
    assert s.signing.keys == (f"k1:{KEY32}",)
    both = load(tmp_path, environ={"STEM_LOG_LEVEL": "warning", "STEM_LOGGING_LEVEL": "error"})
    assert both.logging.level == "error"


def test_code_defaults_nested_or_dotted(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        code_defaults={
            "broker": {"url": "memory://", "publish_retries": 7},
            "backend.result_ttl_s": None,  # explicit null: never expire
            "backend.url": None,  # not given
            "routes": {"a.*": "qa"},
            "routes.b.c": "qb",
        },
    )
    assert s.broker.url == "memory://"
    assert s.broker.publish_retries == 7
    assert s.backend.result_ttl_s is None
    assert s.backend.url == "memory://"
    assert dict(s.routes) == {"a.*": "qa", "b.c": "qb"}
    assert s.provenance("routes.b.c").layer == "code"


def test_overrides_accept_typed_values_and_skip_none(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        overrides={"worker.concurrency": 3, "broker.url": None, "worker.queues": "a,b"},
        flag_names={"worker.queues": "-Q"},
    )
    assert s.worker.concurrency == 3
    assert s.provenance("worker.concurrency").source == "--concurrency"
    assert s.worker.queues == ("a", "b")
    assert s.provenance("worker.queues").source == "-Q"
    assert s.provenance("broker.url").layer == "default"
    s = load(tmp_path, overrides={"metrics.port": "9100"})
    assert s.provenance("metrics.port").source == "override metrics.port"


def test_routes_and_schedules_merge_by_entry(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(
        etc / "stem.yaml",
        """\
        routes:
          "reports.*": reports
          "email.*": mail
        beat:
          schedules:
            nightly:
              task: reports.nightly
              cron: "0 3 * * *"
              kwargs: {format: pdf}
            ping:
              task: ops.ping
              every: 60
        """,
    )
    write(
        etc / "stem.development.yaml",
        """\
        routes:
          "email.*": null
          "img.*": images
        beat:
          schedules:
            ping:
              task: ops.ping2
              every_s: 30
              queue: ops
              priority: 9
              expires_s: 10
        """,
    )
    s = load(tmp_path)
    assert dict(s.routes) == {"reports.*": "reports", "img.*": "images"}
    assert s.provenance("routes.reports.*").layer == "system"
    assert s.provenance("routes.img.*") == type(s.provenance("routes.img.*"))(
        "profile", str(etc / "stem.development.yaml"), 3
    )
    with pytest.raises(KeyError):
        s.provenance("routes.email.*")
    nightly, ping = s.beat.schedules["nightly"], s.beat.schedules["ping"]
    assert (nightly.task, nightly.cron, nightly.every_s, nightly.kwargs) == (
        "reports.nightly",
        "0 3 * * *",
        None,
        {"format": "pdf"},
    )
    # an entry is replaced whole: no "every" left over from the lower layer
    assert (ping.task, ping.every_s, ping.queue, ping.priority, ping.expires_s) == (
        "ops.ping2",
        30.0,
        "ops",
        9,
        10.0,
    )
    assert s.provenance("beat.schedules.ping").line == 6
    assert s.provenance("beat.schedules.ping.task").line == 6
    assert s.provenance("beat.schedules").layer == "profile"


def test_url_file_supplies_the_url(tmp_path: Path) -> None:
    secret = write(tmp_path / "sec" / "broker-url", "redis://:s3cret@h:6379/0\n", 0o600)
    write(tmp_path / "etc" / "stem.yaml", f"broker:\n  url_file: {secret}\n")
    s = load(tmp_path)
    assert s.broker.url == "redis://:s3cret@h:6379/0"
    assert s.backend.url == s.broker.url
    p = s.provenance("broker.url")
    assert (p.layer, p.line) == ("system", 2)
    assert p.note == f"read from {secret}"
    # a higher layer's url wins over a lower layer's url_file
    s = load(tmp_path, environ={"STEM_BROKER_URL": "sqlite:///x.db"})
    assert s.broker.url == "sqlite:///x.db"


def test_url_and_url_file_in_one_layer_conflict(tmp_path: Path) -> None:
    secret = write(tmp_path / "u", "redis://h\n", 0o600)
    write(tmp_path / "etc" / "stem.yaml", f"broker:\n  url: redis://h\n  url_file: {secret}\n")
    with pytest.raises(SettingsError, match=r"set either broker\.url or broker\.url_file"):
        load(tmp_path)


def test_relative_paths_resolve_against_their_file(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    write(etc / "tls" / "ca.pem", "x")
    write(etc / "keys", f"# comment\nk1:{KEY32}\n\nk2.hmac-sha256.key\n", 0o600)
    write(etc / "k2.hmac-sha256.key", KEY32, 0o600)
    write(etc / "stem.yaml", "tls: {ca_file: tls/ca.pem}\nsigning: {keys_file: keys}\n")
    s = load(tmp_path)
    assert s.tls.ca_file == str(etc / "tls" / "ca.pem")
    assert s.signing.keys_file == str(etc / "keys")
    assert s.signing.key_entries == (f"k1:{KEY32}", str(etc / "k2.hmac-sha256.key"))
    assert s.signing.enabled and s.signing.effective_required


def test_to_keyring_uses_the_signing_module(tmp_path: Path) -> None:
    s = load(tmp_path, environ={"STEM_SIGNING_KEYS": f"k1:{KEY32}"})
    keyring = s.signing.to_keyring()
    assert keyring is not None and keyring.key_ids == ("k1",)
    assert load(tmp_path).signing.to_keyring() is None


def test_tls_settings_for_the_adapters(tmp_path: Path) -> None:
    assert load(tmp_path).tls.to_tls_settings() is None
    ca = write(tmp_path / "ca.pem", "x")
    tls = load(tmp_path, environ={"STEM_TLS_CA_FILE": str(ca)}).tls.to_tls_settings()
    assert tls is not None and tls.ca_file == str(ca) and not tls.allow_insecure


def test_settings_are_frozen_and_repr_hides_secrets(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        environ={"STEM_BROKER_URL": "redis://:pw-xyz@h/0", "STEM_SIGNING_KEYS": f"k1:{KEY32}"},
    )
    with pytest.raises(AttributeError):
        s.broker.url = "x"  # type: ignore[misc]
    text = repr(s)
    assert "pw-xyz" not in text and KEY32 not in text
    assert "k1:***" in text


def test_naming_a_directory_layer_again_does_not_lift_it_above_the_profile(
    tmp_path: Path,
) -> None:
    """STEM_CONFIG=/etc/stem/stem.yaml must not re-apply the base file over the profile."""
    etc = tmp_path / "etc"
    base = write(etc / "stem.yaml", "worker:\n  lease_s: 11\n")
    write(etc / "stem.production.yaml", "worker:\n  lease_s: 22\n")
    env = {"STEM_CONFIG_DIR": str(etc), "STEM_CONFIG": str(base)}
    s = load_settings(environ=env, profile="production")
    assert s.worker.lease_s == 22
    assert s.provenance("worker.lease_s").layer == "profile"
    assert s.files == (str(base), str(etc / "stem.production.yaml"))
    # Named but missing, it is still an error (it is only optional as a directory layer).
    base.unlink()
    with pytest.raises(ConfigError, match="config file does not exist"):
        load_settings(environ=env, profile="production")


def test_every_variable_the_cli_documents_is_accepted(tmp_path: Path) -> None:
    """`stem ... --help` lists a STEM_* variable for each option; setting any of them (in
    a unit's environment file, say) must not make the configuration invalid."""
    import typer.main

    from stem.cli.main import app

    def walk(command: Any) -> Iterator[str]:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            yield from [envvar] if isinstance(envvar, str) else envvar or []
        for sub in getattr(command, "commands", {}).values():
            yield from walk(sub)

    names = sorted(set(walk(typer.main.get_command(app))))
    assert {"STEM_WORKER_EVENTS", "STEM_BEAT_ID", "STEM_WORKER_LEASE_S"} <= set(names)
    for name in names:
        try:
            load(tmp_path, environ={name: "1"})
        except ConfigError as exc:  # "1" may be a bad value; it must not be a bad name
            assert "unknown setting" not in str(exc), name


def test_a_result_ttl_set_in_code_holds_under_the_cli_until_a_layer_sets_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stem worker` applies the configuration layers to the app: a result_ttl_s the code
    chose (3 s, a fraction, None for never) was replaced by the built-in day."""
    from stem import Stem
    from stem.config.apply import apply_layers

    for name in list(os.environ):
        if name.startswith("STEM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("STEM_CONFIG_DIR", str(tmp_path / "etc"))
    for ttl in (3, 3600.0, 0.5, None):
        app = Stem("x", broker="memory://", result_ttl_s=ttl)
        settings = apply_layers(app)
        assert app.result_ttl_s == ttl
        if ttl != 0.5:  # what the configuration can hold shows as the code layer
            assert settings.provenance("backend.result_ttl_s").layer == "code"
    assert apply_layers(default := Stem("x", broker="memory://")) is not None
    assert default.result_ttl_s == 86400
    monkeypatch.setenv(env_name("backend.result_ttl_s"), "60")
    app = Stem("x", broker="memory://", result_ttl_s=0.5)
    apply_layers(app)
    assert app.result_ttl_s == 60  # a layer that sets it wins over the code
