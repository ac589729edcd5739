"""URL helpers shared by the broker and backend adapters: the scheme table lookup and the
parsing of Stem's own query options, with errors that name the option and hide secrets."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from stem.errors import ConfigError, UnsupportedURL
from stem.observability.redact import misplaced_password, redact_error, redact_url
from stem.security.tls import TLSSettings

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def open_by_scheme(
    url: str, schemes: Mapping[str, tuple[str, str]], what: str, tls: TLSSettings | None
) -> Any:
    """Instantiate the class the URL's scheme names in ``schemes`` (a fixed table: URLs
    never name code to import)."""
    check_url(url, what)
    scheme = urlsplit(url).scheme.lower()
    if scheme not in schemes:
        known = ", ".join(f"{s}://" for s in schemes)
        raise UnsupportedURL(
            f"unsupported {what} URL scheme {scheme!r} in {redact_url(url)}; use one of {known}"
        )
    module_name, cls_name = schemes[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UnsupportedURL(f"the {scheme}:// {what} is not available") from None
        raise
    return getattr(module, cls_name)(url, tls=tls)


def check_url(url: str, what: str) -> None:
    """Raise :class:`ConfigError` for a URL that parsers would misread: one whose password
    holds "/", "?" or "#" unescaped (it would be read as a host, port or path, and could be
    shown as one), or one that does not split at all (a stray "[")."""
    if misplaced_password(url):
        raise ConfigError(
            f"invalid {what} URL {redact_url(url)}: the password holds '/', '?' or '#'; "
            "percent-encode them (%2F, %3F, %23)"
        )
    try:
        urlsplit(url)
    except ValueError as exc:
        raise ConfigError(
            f"invalid {what} URL {redact_url(url)}: {redact_error(str(exc), url)}"
        ) from None


def bool_option(name: str, value: str, url: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"URL option {name}={value!r} in {redact_url(url)} must be true or false")


def number_option(
    name: str, value: str, url: str, *, low: float, high: float, kind: type = float
) -> float:
    """A numeric query option within [low, high] (``kind=int`` refuses fractions)."""
    try:
        number = float(kind(value))
    except ValueError:
        number = float("nan")
    if not low <= number <= high:
        raise ConfigError(
            f"URL option {name}={value!r} in {redact_url(url)} must be a number "
            f"from {low:g} to {high:g}"
        )
    return number
