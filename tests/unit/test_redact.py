from __future__ import annotations

import pytest

from stem.observability.redact import redact_mapping, redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("sqlite:////var/lib/stem/x.db", "sqlite:////var/lib/stem/x.db"),
        ("sqlite:///stem.db", "sqlite:///stem.db"),
        ("memory://", "memory://"),
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        (
            "rediss://h:6380/0?password=s3cret&ssl_ca_certs=/ca.pem",
            "rediss://h:6380/0?password=***&ssl_ca_certs=/ca.pem",
        ),
        (
            "postgresql://app:s3cret@db/stem?sslmode=verify-full",
            "postgresql://app:***@db/stem?sslmode=verify-full",
        ),
        # Passwords with "/", "#" or "?" unescaped (not valid, but written all the same).
        ("redis://:s3cr/et@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://u:s3cr#et@h/0", "redis://u:***@h/0"),
        ("postgresql://u:s3?cret@db/stem", "postgresql://u:***@db/stem"),
        (
            "postgresql://db:5432/stem?application_name=a@b",
            "postgresql://db:5432/stem?application_name=a@b",
        ),
        (
            "postgresql://app:s3cret@db:5432/stem?application_name=stem@w1",
            "postgresql://app:***@db:5432/stem?application_name=stem@w1",
        ),
        ("postgresql://h1:5432,h2:5432/db?x=a@b", "postgresql://h1:5432,h2:5432/db?x=a@b"),
        ("postgresql://[::1]:5432/db?x=a@b", "postgresql://[::1]:5432/db?x=a@b"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),
        # A libpq keyword string written after the scheme (config show used to print it).
        (
            "postgresql://host=db password=s3cret dbname=x",
            "postgresql://host=db password=*** dbname=x",
        ),
        ("postgresql://u:p@h/db?sslpassword=s3&a=1", "postgresql://u:***@h/db?sslpassword=***&a=1"),
        (
            "postgresql://host=db password=p@ss dbname=x",
            "postgresql://host=db password=*** dbname=x",
        ),
        ("postgresql://user=u password=a@b host=db", "postgresql://user=u password=*** host=db"),
        # Hosts and users that merely hold a secret-looking word stay as they are.
        ("redis://token:pw@h:6379/0", "redis://token:***@h:6379/0"),
        ("redis://default:pw@cache-token:6379/0", "redis://default:***@cache-token:6379/0"),
        ("postgresql://app:pw@pg-secret:5432/db", "postgresql://app:***@pg-secret:5432/db"),
    ],
)
def test_redact_url_hides_secrets_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_text_and_mappings_are_redacted() -> None:
    assert "s3cret" not in redact_text("cannot reach redis://u:s3cret@h:1/0: refused")
    assert "s3cr" not in redact_text("cannot reach redis://u:s3cr/et@h:1/0: refused")
    kept = "redis://host:6379/0?client_name=a@b"  # an "@" in the query is no password
    assert redact_text(f"cannot reach {kept}: refused") == f"cannot reach {kept}: refused"
    data = redact_mapping(
        {
            "signing": {"keys": ["v1:abc"], "active_key": "v1"},
            "broker": {"url": "redis://u:s3cret@h/0"},
        }
    )
    assert data["signing"]["keys"] == "***" and data["signing"]["active_key"] == "v1"
    assert "s3cret" not in data["broker"]["url"]
    # a URL inside a longer string (a log record's extra field, logged task arguments)
    fields = redact_mapping({"task_kwargs": {"dsn": "use postgresql://u:s3cret@db/x now"}})
    assert fields == {"task_kwargs": {"dsn": "use postgresql://u:***@db/x now"}}


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis://:s3cr/et@127.0.0.1:1/0", "password holds '/', '?' or '#'"),
        ("redis://:s3cr#et@127.0.0.1:1/0", "password holds '/', '?' or '#'"),
        ("redis://:s3cret@127.0.0.1:6x/0", "Port could not be cast"),
        ("redis://:s3cret@[::1/0", "Invalid IPv6 URL"),
        ("postgresql://u:s3cr/et@127.0.0.1:1/db", "password holds '/', '?' or '#'"),
        ("postgresql://u:s3cr%zzet@127.0.0.1:1/db", "invalid percent-encoded token"),
        ("postgresql://u:s3cret@127.0.0.1:1/db?sslmode=bogus", "sslmode 'bogus' is not one of"),
    ],
)
def test_bad_urls_are_config_errors_that_never_show_the_password(url: str, words: str) -> None:
    """What the client libraries say about a URL they cannot read quotes pieces of it."""
    from stem import Stem
    from stem.errors import ConfigError

    app = Stem("x", broker=url, backend="memory://")
    assert "s3cr" not in repr(app)
    with pytest.raises(ConfigError) as caught:
        app.broker.ping()
    assert words in str(caught.value)
    assert "s3cr" not in str(caught.value)


def test_a_password_and_an_at_sign_in_the_query_are_a_valid_url() -> None:
    from stem.pg.conninfo import parse

    url = "postgresql://app:s3cret@db.example.com:5432/stem?application_name=stem@worker1"
    assert parse(url).target == "db.example.com:5432/stem"


def test_option_reprs_hold_no_password() -> None:
    from stem.pg.conninfo import parse
    from stem.redis_conn import parse_url

    assert "s3cret" not in repr(parse_url("redis://:s3cret@h/0"))
    assert "s3cret" not in repr(parse("postgresql://u:s3cret@h/db"))


def test_postgres_urls_keep_their_unix_socket_form() -> None:
    from stem.pg.conninfo import parse

    assert parse("postgresql:///stem?pool_size=2").conninfo == "postgresql:///stem"
    assert parse("postgresql:///stem").conninfo == "postgresql:///stem"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("connect failed: host=db password=s3cret dbname=x", "host=db password=*** dbname=x"),
        ("host=db password='s3 cr\\'et' user=u", "host=db password=*** user=u"),
        ("sslpassword=s3cret sslkey=/etc/stem/client.key", "sslpassword=*** sslkey=/etc/stem"),
        ("PASSWORD = s3cret", "PASSWORD = ***"),
        ("STEM_DB_PASSWORD=s3cret and PGPASSWORD=s3cret", "STEM_DB_PASSWORD=*** and PGPASSWORD"),
        ('client_secret: "s3 cret" access_token=s3cret', "client_secret: *** access_token=***"),
        ("password='s3cret", "password=***"),
        ("{'password': 's3cret', 'user': 'u'}", "{'password': ***, 'user': 'u'}"),
        ('{"client_secret": "s3cret"} api_key=s3cret', '{"client_secret": ***} api_key=***'),
        ("Authorization: Bearer s3cret.abc-def", "Authorization: Bearer ***"),
        ("AWS_SECRET_ACCESS_KEY=s3cret SECRET_KEY=s3cret", "KEY=*** SECRET_KEY=***"),
        ("client_secret_id=s3cret password_hash=s3cret", "_id=*** password_hash=***"),
        # after a slash too (only "/passwd: ..." is the file)
        ("set /worker/password=s3cret", "/worker/password=***"),
        ("vault/password: s3cret", "vault/password: ***"),
        ("GET /login/token=s3cret", "/login/token=***"),
        ("cat /etc/passwd=s3cret", "/etc/passwd=***"),
        ("secret/app/passwd: s3cret", "secret/app/passwd: ***"),
        ("kv/app/etc/passwd: s3cret", "kv/app/etc/passwd: ***"),
    ],
)
def test_key_value_connection_strings_lose_their_passwords(text: str, shown: str) -> None:
    """libpq's keyword form (host=... password=...) was left as it was."""
    out = redact_text(text)
    assert "s3" not in out
    assert shown in out


def test_a_long_word_in_a_log_line_does_not_stall_redaction() -> None:
    """A run of letters with no "://" was scanned again from each of its characters:
    a 200 kB token in an exception stalled logging for minutes (quadratic). Run apart,
    so that the old behaviour fails the test rather than hang it."""
    import subprocess
    import sys

    code = (
        "from stem.observability.redact import redact_text\n"
        "for text in ('a' * 200_000, 'a_' * 100_000, 'ab://cd ' * 30_000,\n"
        "             'token' * 40_000, 'secret_' * 30_000, 'password_' * 30_000):\n"
        "    redact_text(text)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "text",
    [
        "tokenizer: bert",
        "max_tokens=512",
        "STEM_SECRET_FILE=/etc/stem/secret",
        "secrets: 3 loaded",
        "password=\nnext line",
        "KeyError: 'password'",
        # the file, then the message about it
        "SQLite database /etc/passwd: file is not a database",
        "bad URL sqlite:////etc/passwd: file is not a database",
    ],
)
def test_words_that_only_look_like_secrets_are_left_alone(text: str) -> None:
    assert redact_text(text) == text
