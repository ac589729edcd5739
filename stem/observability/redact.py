"""Keep secrets out of logs and command output."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "key", "credential", "private")
# The password runs to the last "@" before a space: users write "/", "#" and "?" into
# passwords unescaped, and hiding a little too much beats showing part of a secret.
_URL_IN_TEXT = re.compile(r"([a-z][a-z0-9+.-]*://)([^:/@\s]*):([^@\s]+)@", re.IGNORECASE)


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme, user info, the rest after the last "@"), read by hand: a password holding
    "/", "#" or "?" unescaped (not valid in a URL, but written all the same) fools
    urlsplit, which would show it as part of the host or path."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return (scheme, userinfo, host) if sep and at else None


def _password(url: str) -> str | None:
    found = _userinfo(url)
    if found is None or ":" not in found[1]:
        return None
    return found[1].partition(":")[2]


def misplaced_password(url: str) -> bool:
    """True when the URL's password holds "/", "?" or "#" unescaped, so that URL parsers
    end the host there and would read the password as a host, port or path."""
    found = _userinfo(url)
    if found is None:
        return False
    cut = re.search(r"[/?#]", found[1])
    if cut is None:
        return False
    # "host:port/path?x=a@b" is a URL with an "@" in its query, not a password.
    _, colon, after = found[1][: cut.start()].partition(":")
    return bool(colon) and not after.isdigit()


def redact_error(text: str, url: str) -> str:
    """An error message about ``url`` (from a client library) with its password removed,
    wherever it shows up (libraries quote pieces of a URL they could not parse)."""
    text = redact_text(text)
    password = _password(url)
    for form in {password, unquote(password)} if password else ():
        if len(form) >= 3:
            text = text.replace(form, REDACTED)
    return text


def redact_url(url: str) -> str:
    """Replace the password in a URL (and secret-looking query values) with ``***``."""
    found = _userinfo(url)
    if found is not None and misplaced_password(url):
        scheme, userinfo, host = found
        url = f"{scheme}://{userinfo.partition(':')[0]}:{REDACTED}@{host}"
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
