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
    ],
)
def test_redact_url_hides_secrets_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_text_and_mappings_are_redacted() -> None:
    assert "s3cret" not in redact_text("cannot reach redis://u:s3cret@h:1/0: refused")
    data = redact_mapping(
        {
            "signing": {"keys": ["v1:abc"], "active_key": "v1"},
            "broker": {"url": "redis://u:s3cret@h/0"},
        }
    )
    assert data["signing"]["keys"] == "***" and data["signing"]["active_key"] == "v1"
    assert "s3cret" not in data["broker"]["url"]
