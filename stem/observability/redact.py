"""Keep secrets out of logs and command output."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "key", "credential", "private")
_URL_IN_TEXT = re.compile(r"([a-z][a-z0-9+.-]*://)([^:/@\s]*):([^@/\s]+)@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Replace the password in a URL (and secret-looking query values) with ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    secret_query = any(
        sep and is_secret_name(name)
        for name, sep, _ in (pair.partition("=") for pair in parts.query.split("&"))
    )
    if parts.password is None and not secret_query:
        return url  # nothing to hide; urlunsplit would also drop empty hosts (sqlite:////x)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = []
        for pair in query.split("&"):
            name, sep, value = pair.partition("=")
            if sep and is_secret_name(name):
                value = REDACTED
            pairs.append(f"{name}{sep}{value}")
        query = "&".join(pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Redact credentials of any URLs inside free text (error messages, log lines)."""
    return _URL_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}:{REDACTED}@", text)


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    if lowered.endswith("_file") or lowered in {"key_id", "kid", "active_key", "algorithm"}:
        return False
    return any(word in lowered for word in _SECRET_WORDS)


def redact_mapping(data: Any) -> Any:
    """A copy of nested mappings/lists with values under secret-looking keys redacted,
    and passwords inside URL strings removed."""
    if isinstance(data, dict):
        return {
            k: (
                REDACTED
                if is_secret_name(str(k)) and v not in (None, "", [], {})
                else redact_mapping(v)
            )
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [redact_mapping(v) for v in data]
    if isinstance(data, str) and "://" in data:
        return redact_url(data)
    return data
