"""Keep secrets out of logs and command output."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
_SECRET_WORDS = ("password", "passwd", "secret", "token", "key", "credential", "private")
# The lookbehind starts a match only where a scheme can start: without it a long run of
# letters (a token, base64) was scanned again from each of its characters (quadratic).
_URL_IN_TEXT = re.compile(r"(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)
# A host, a host:port, or a list of them (PostgreSQL): what an authority without user info
# looks like, told apart from "user:password".
_HOSTS = re.compile(r"(\[[^\]]*\]|[^:@,\[]*)(:\d*)?(,.*)?")


def _userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme, user info, the rest after it), read by hand: a password holding "/", "#" or
    "?" unescaped (not valid in a URL, but written all the same) fools urlsplit, which
    would show it as part of the host or path. The user info ends at the last "@" before
    the first "/", "?" or "#" that follows the first "@" (so an "@" in the query is not
    taken for one, and an "@" inside the password is)."""
    scheme, sep, rest = url.partition("://")
    first = rest.find("@")
    if not sep or first < 0:
        return None
    cut = re.compile(r"[/?#]").search(rest, first)
    at = rest.rfind("@", 0, cut.start() if cut else len(rest))
    return scheme, rest[:at], rest[at + 1 :]


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
    # What comes before the cut is a host (list), as in "h:5432/db?x=a@b": an "@" in the
    # query and no user info at all; or "user:pass" of a password that holds the cut.
    head = found[1][: cut.start()]
    return ":" in head and _HOSTS.fullmatch(head) is None


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
    """Replace the password in a URL (and secret-looking query values, and libpq's
    ``password=...`` where a keyword string was written after the scheme) with ``***``."""
    redacted = _redact_url_parts(url)
    scheme, sep, rest = redacted.partition("://")
    head, mark, query = rest.partition("?")  # the query was done, pair by pair
    if not _KEYWORD_START.match(head):
        return redacted  # a URL proper: user, host, port and path are no secrets
    return scheme + sep + _KEY_VALUE_SECRET.sub(_redact_value, head) + mark + query


# A libpq keyword string written after the scheme ("host=h password=x") starts keyword=.
_KEYWORD_START = re.compile(r"\s*[A-Za-z_]+\s*=")


def _redact_url_parts(url: str) -> str:
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


# key=value secrets (libpq's "host=h password=x", PGPASSWORD=x, AWS_SECRET_ACCESS_KEY=x,
# {'client_secret': 'x'}, api_key: x): a key, quoted or not, holding one of these words
# not followed by a letter (so not "tokenizer" or "max_tokens"), then its value, bare or
# quoted, on the same line. A match starts only where a word starts and takes the whole
# word at once (possessive): linear on any input.
_KEY_VALUE_SECRET = re.compile(
    r"""(?<![a-z0-9_])(["']?)"""
    r"""(?=[a-z0-9_]*?(?:pass(?:word|wd)|secret|token|api_?key)(?![a-z]))([a-z0-9_]++)"""
    r"""\1[ \t]*[=:][ \t]*"""
    r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*"|['"]?[^\s'",;}]+)""",
    re.IGNORECASE,
)
# Keys that name where a secret is, not the secret (as is_secret_name has it).
_NOT_SECRET_SUFFIXES = ("_file", "_path", "_dir")
_BEARER = re.compile(r"(?<![a-z0-9_])(bearer[ \t]+)[a-z0-9._~+/=-]+", re.IGNORECASE)


def _redact_value(m: re.Match[str]) -> str:
    if m.group(2).lower().endswith(_NOT_SECRET_SUFFIXES) or _is_passwd_file(m):
        return m.group(0)
    return m.string[m.start() : m.start(3)] + REDACTED


def _is_passwd_file(m: re.Match[str]) -> bool:
    """``/etc/passwd: file is not a database``: the file, then a message about it. Only
    this one: another word after a slash may be a key (``vault/passwd: x``)."""
    text, start = m.string, m.start()
    separator = text[m.end(2) : m.start(3)].strip()
    before = text[start - 6 : start - 5] if start >= 6 else ""
    whole = before in ("", "/", "(", "'", '"') or before.isspace()  # not kv/etc/passwd
    return text[start - 5 : m.end(2)] == "/etc/passwd" and separator == ":" and whole


def redact_text(text: str) -> str:
    """Redact credentials of any URLs inside free text (error messages, log lines), and
    the values of password=... in key=value connection strings."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    text = _KEY_VALUE_SECRET.sub(_redact_value, text)
    return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)


def is_secret_name(name: str) -> bool:
    lowered = name.lower()
    if lowered.endswith("_file") or lowered in {"key_id", "kid", "active_key", "algorithm"}:
        return False
    return any(word in lowered for word in _SECRET_WORDS)


def redact_mapping(data: Any) -> Any:
    """A copy of nested mappings/lists with values under secret-looking keys redacted,
    and passwords removed from URLs, whether a string is one or holds one in its text."""
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
        return redact_text(redact_url(data))
    return data
