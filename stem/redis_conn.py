"""Connections shared by the Redis broker and result backend.

A Stem Redis URL is an ordinary redis-py URL (``redis://[user:pw@]host:port/db`` or
``rediss://`` for TLS) that may carry these query options:

``prefix``                  key prefix (default ``stem:``), so several apps share one database
``socket_timeout``          seconds a reply may take (default 15; blocking waits stay below it)
``socket_connect_timeout``  seconds to connect (default 3)
``max_connections``         pool size limit (default: unbounded)
``health_check_interval``   seconds between PINGs on idle connections (default 0: off)
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (``required`` or
``none``): TLS files and verification for ``rediss://``

Any other option is refused, so a typo cannot silently turn a setting off. TLS: options in the
URL win and :class:`TLSSettings` fills in the rest. Certificates and host names are verified
with TLS 1.2 or newer unless ``allow_insecure`` (or ``ssl_cert_reqs=none``) is set, which
logs a warning on ``stem.redis`` every time a connection pool is made.

Reconnects: every connection retries a command three times with exponential backoff after a
connection error or timeout (so a Redis restart costs a reconnect, not an error). A retried
write may be applied twice if the first attempt reached the server: at-least-once, as
promised. Errors leave this module as Stem errors naming ``host:port/db`` and never a
password.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.exceptions import NoScriptError
from redis.retry import Retry

from stem.errors import ConfigError, StemError
from stem.observability.redact import redact_error, redact_text, redact_url
from stem.security.tls import TLSSettings, check_tls_files
from stem.urls import check_url, number_option

log = logging.getLogger("stem.redis")

T = TypeVar("T")

DEFAULT_PREFIX = "stem:"
_DEFAULT_SOCKET_TIMEOUT_S = 15.0
_DEFAULT_CONNECT_TIMEOUT_S = 3.0
_NUMBERS: dict[str, tuple[type, float, float]] = {
    "socket_timeout": (float, 0.1, 3600.0),
    "socket_connect_timeout": (float, 0.1, 600.0),
    "max_connections": (int, 1, 100_000),
    "health_check_interval": (int, 0, 3600),
    "db": (int, 0, 100_000),
}
_TLS_QUERY = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"})
_KNOWN = frozenset({"prefix", *_NUMBERS, *_TLS_QUERY})
_TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """What a client needs to open connections; ``target`` never holds a password."""

    target: str
    prefix: str = DEFAULT_PREFIX
    tls: bool = False
    insecure: bool = False
    socket_timeout_s: float = _DEFAULT_SOCKET_TIMEOUT_S
    # Not in repr: it holds the password.
    pool_kwargs: Mapping[str, Any] = field(default_factory=dict, repr=False)


def _number(name: str, value: str, url: str) -> float:
    kind, low, high = _NUMBERS[name]
    return number_option(name, value, url, low=low, high=high, kind=kind)


def _existing_file(what: str, path: str | None) -> str | None:
    if path and not os.path.isfile(path):
        raise ConfigError(f"the Redis TLS {what} {path!r} does not exist or is not a file")
    return path or None


class _SSLConnection(redis.SSLConnection):
    """redis-py's TLS connection with the handshake bounded by the connect timeout, not the
    (longer) reply timeout: a TLS client on a plaintext port, which answers nothing to a
    ClientHello, fails in seconds instead of minutes."""

    def _connect(self) -> Any:
        reply_timeout = self.socket_timeout
        self.socket_timeout = self.socket_connect_timeout
        try:
            sock = super()._connect()  # type: ignore[no-untyped-call]  # TCP, then handshake
        finally:
            self.socket_timeout = reply_timeout
        sock.settimeout(reply_timeout)
        return sock


def _tls_kwargs(
    query: Mapping[str, str], tls: TLSSettings | None, url: str
) -> tuple[dict[str, Any], bool]:
    tls = tls or TLSSettings()
    reqs = query.get("ssl_cert_reqs", "none" if tls.allow_insecure else "required").lower()
    if reqs not in {"required", "optional", "none"}:
        raise ConfigError(
            f"URL option ssl_cert_reqs={reqs!r} in {redact_url(url)} must be required or none "
            "(optional is read as required)"
        )
    insecure = reqs == "none"
    version = _TLS_VERSIONS.get(tls.min_version)
    if version is None:
        raise ConfigError(
            f"TLS min_version {tls.min_version!r} is not supported for Redis; "
            f"use one of {', '.join(_TLS_VERSIONS)}"
        )
    kwargs: dict[str, Any] = {
        "connection_class": _SSLConnection,
        "ssl_cert_reqs": "none" if insecure else "required",
        "ssl_check_hostname": not insecure,
        "ssl_min_version": version,
        "ssl_ca_certs": _existing_file("CA file", query.get("ssl_ca_certs") or tls.ca_file),
        "ssl_certfile": _existing_file(
            "certificate file", query.get("ssl_certfile") or tls.cert_file
        ),
        "ssl_keyfile": _existing_file("key file", query.get("ssl_keyfile") or tls.key_file),
    }
    if kwargs["ssl_keyfile"] and not kwargs["ssl_certfile"]:
        raise ConfigError("a Redis TLS key file was given without a certificate file")
    check_tls_files("Redis", kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"])
    return kwargs, insecure


def parse_url(url: str, tls: TLSSettings | None = None) -> RedisOptions:
    """Check a Stem Redis URL and turn it into connection-pool arguments."""
    check_url(url, "Redis")
    try:
        parts = urlsplit(url)
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError(
            f"invalid Redis URL {redact_url(url)}: {redact_error(str(exc), url)}"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in {"redis", "rediss"}:
        raise ConfigError(f"not a Redis URL: {redact_url(url)} (use redis:// or rediss://)")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - _KNOWN)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} in Redis URL {redact_url(url)}; "
            f"known: {', '.join(sorted(_KNOWN))}"
        )
    host = parts.hostname or "localhost"
    path_db = parts.path.strip("/")
    if path_db and not path_db.isdigit():
        raise ConfigError(f"the database in Redis URL {redact_url(url)} must be a number")
    db = int(_number("db", query["db"], url)) if "db" in query else int(path_db or 0)
    kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
        "socket_timeout": _DEFAULT_SOCKET_TIMEOUT_S,
        "socket_connect_timeout": _DEFAULT_CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "client_name": "stem",
    }
    for name in ("socket_timeout", "socket_connect_timeout", "health_check_interval"):
        if name in query:
            kwargs[name] = _number(name, query[name], url)
    if "max_connections" in query:
        kwargs["max_connections"] = int(_number("max_connections", query["max_connections"], url))
    if "health_check_interval" in kwargs:
        kwargs["health_check_interval"] = int(kwargs["health_check_interval"])
    insecure = False
    if scheme == "rediss":
        tls_kwargs, insecure = _tls_kwargs(query, tls, url)
        kwargs.update(tls_kwargs)
    else:
        given = [k for k in sorted(_TLS_QUERY) if k in query]
        if tls is not None and (tls.ca_file or tls.cert_file or tls.key_file):
            given.append("TLS settings")
        if given:
            raise ConfigError(
                f"{', '.join(given)} given for the plaintext URL {redact_url(url)}: "
                "use rediss:// to connect with TLS"
            )
    prefix = query.get("prefix", DEFAULT_PREFIX)
    return RedisOptions(
        target=f"{host}:{port}/{db}",
        prefix=prefix,
        tls=scheme == "rediss",
        insecure=insecure,
        socket_timeout_s=float(kwargs["socket_timeout"]),
        pool_kwargs=kwargs,
    )


# -- errors ------------------------------------------------------------------------------------


def _detail(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return redact_text(text) or type(exc).__name__


def _hint(exc: BaseException, options: RedisOptions) -> str:
    """A sentence telling the operator what is most likely wrong, from the error text."""
    text = str(exc)
    lowered = text.lower()
    if "certificate verify failed" in lowered or "certificate_verify_failed" in lowered:
        if "hostname mismatch" in lowered or "ip address mismatch" in lowered:
            return (
                "the server's TLS certificate is not valid for the host name in the URL; "
                "connect by a name the certificate lists"
            )
        if "has expired" in lowered or "not yet valid" in lowered:
            return (
                "the server's TLS certificate is outside its validity dates (renew it, or "
                "check this host's clock)"
            )
        return (
            "the server's TLS certificate could not be verified: check that the CA file "
            "(TLS ca_file / ssl_ca_certs) is the one that signed it"
        )
    if "wrong_version_number" in lowered or "wrong version number" in lowered:
        return "the server does not speak TLS on this port: use redis:// or the TLS port"
    if options.tls and "timeout connecting" in lowered:
        return (
            "no answer to the TLS handshake: the server may not speak TLS on this port "
            "(then use redis://), or it is unreachable"
        )
    if options.tls and (
        "certificate required" in lowered
        or "violation of protocol" in lowered
        or "unexpected eof" in lowered
        or "alert" in lowered
    ):
        return (
            "the server ended the TLS session: it may require a client certificate "
            "(TLS cert_file/key_file) signed by a CA it trusts"
        )
    if isinstance(exc, redis.AuthenticationError) or "wrongpass" in lowered:
        return "the user name or password was refused"
    if not options.tls and (
        "closed by server" in lowered or "connection reset" in lowered or "eof" in lowered
    ):
        return (
            "the server closed the connection at once: if it accepts only TLS, use a rediss:// URL"
        )
    return ""


def translate(
    exc: BaseException,
    options: RedisOptions,
    doing: str,
    *,
    error: type[StemError],
    conn_error: type[StemError],
    timeout_error: type[StemError] | None = None,
) -> StemError:
    """Turn a redis-py (or socket/ssl) error into a Stem error with a clear message.
    ``timeout_error``: for a call sent and not answered in time (not a connect timeout)."""
    detail = _detail(exc)
    hint = _hint(exc, options)
    where = f"Redis at {options.target}"
    if (
        timeout_error is not None
        and isinstance(exc, redis.TimeoutError)
        and "connecting" not in str(exc).lower()
    ):
        return timeout_error(
            f"{where} did not answer in time while {doing}: {detail} (the call may or may "
            "not have been applied)"
        )
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError | OSError):
        message = f"cannot reach {where} while {doing}: {detail}"
        return conn_error(f"{message} ({hint})" if hint else message)
    if isinstance(exc, redis.ResponseError) and str(exc).startswith("NOAUTH"):
        return conn_error(f"{where} requires a password ({doing}): {detail}")
    return error(f"{where} failed while {doing}: {detail}")


# -- client ------------------------------------------------------------------------------------

_LIVE_ERRORS = (redis.ConnectionError, redis.TimeoutError)
_SPARES = 8  # most connections the short path keeps idle between calls


class RedisConn:
    """One connection pool plus the Lua scripts of one broker or backend. Thread-safe; after
    a fork the pool notices the new pid and opens fresh connections."""

    def __init__(
        self,
        url: str,
        tls: TLSSettings | None,
        *,
        error: type[StemError],
        conn_error: type[StemError],
        timeout_error: type[StemError] | None = None,
    ) -> None:
        self.options = parse_url(url, tls)
        self._error = error
        self._conn_error = conn_error
        self._timeout_error = timeout_error
        # Retried: a connection refused or reset (a restart), which fails fast. Not a
        # timeout: a server that stopped answering (a black-holed link) would hold every
        # call for four timeouts instead of one.
        retry = Retry(
            ExponentialBackoff(cap=1.0, base=0.05), 3, supported_errors=(redis.ConnectionError,)
        )
        if self.options.insecure:
            log.warning(
                "TLS certificate verification is OFF for Redis at %s (allow_insecure): "
                "anyone on the network path can read and change the traffic",
                self.options.target,
                extra={"event": "tls-insecure", "target": self.options.target},
            )
        self.pool = redis.ConnectionPool(retry=retry, **self.options.pool_kwargs)
        self.client = redis.Redis(connection_pool=self.pool)
        # Connections the short path keeps between calls (see _short). Not with a pool
        # size limit: idle here, they would count as in use against it.
        self._spares: list[Any] = []
        self._spares_pid = os.getpid()
        self._eviction_checked = False
        self._keep_spares = "max_connections" not in self.options.pool_kwargs

    @property
    def prefix(self) -> str:
        return self.options.prefix

    @property
    def max_block_s(self) -> float:
        """Longest server-side block (XREAD BLOCK, pub/sub wait) that stays clear of the
        socket timeout."""
        return max(0.05, min(10.0, self.options.socket_timeout_s * 0.6))

    def load_script(self, path: Path) -> Script:
        return self.client.register_script(path.read_text(encoding="utf-8"))

    def fail(self, exc: BaseException, doing: str) -> StemError:
        return translate(
            exc,
            self.options,
            doing,
            error=self._error,
            conn_error=self._conn_error,
            timeout_error=self._timeout_error,
        )

    def is_connection_error(self, exc: BaseException) -> bool:
        return isinstance(exc, (*_LIVE_ERRORS, OSError))

    def run(self, doing: str, fn: Callable[[redis.Redis], T]) -> T:
        """Call ``fn`` with the client, translating every driver error."""
        try:
            return fn(self.client)
        except (redis.RedisError, OSError) as exc:
            raise self.fail(exc, doing) from None

    def evalsha(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """``script(keys=keys, args=args)``, the same reply and the same redis-py errors, by
        the short path of :meth:`command`; a script missing after a restart is loaded again
        by the full path."""
        return self._short(
            ("EVALSHA", script.sha, len(keys), *keys, *args),
            lambda: script(keys=list(keys), args=list(args)),
        )

    def command(self, *args: Any) -> Any:
        """``client.execute_command(*args)`` for commands whose raw reply is what the caller
        wants (no response callback), by a shorter path: send and read on a pooled
        connection. redis-py's per-command layers (retry wrapper, deprecation and
        observability hooks, argument filtering) cost more CPU than a small command's round
        trip, and a worker or producer makes one such call per batch or per message."""
        client: Any = self.client  # execute_command is untyped
        return self._short(args, lambda: client.execute_command(*args))

    def _short(self, args: Sequence[Any], full: Callable[[], T]) -> Any:
        """Send ``args`` on a connection and read the reply. A connection error drops that
        connection and hands the call to ``full``, which reconnects with backoff (a call
        whose reply was lost may then be applied twice: at-least-once, as documented
        above); so does a missing script.

        The connection comes from a short free list of this object's own, refilled from
        the pool: the pool's checkout and return (a lock, metrics hooks and a readiness
        poll of the socket) cost about 5 us, which a no-op ``delay()`` notices. A
        connection goes back on the list only after a whole reply was read, so one on the
        list has nothing unread."""
        conn = self._checkout()
        try:
            conn.send_command(*args)
            reply = conn.read_response()
        except NoScriptError:
            self._checkin(conn)  # the connection is fine; the full path loads the script
        except redis.TimeoutError:
            self._discard(conn)  # no answer in time: another try would wait as long again
            raise
        except (redis.ConnectionError, OSError):
            self._discard(conn)
        except redis.ResponseError:
            self._checkin(conn)  # an error reply: the connection read it whole and is fine
            raise
        except BaseException:
            self._discard(conn)  # interrupted mid-reply: never reuse a half-read connection
            raise
        else:
            self._checkin(conn)
            return reply
        return full()

    def _checkout(self) -> Any:
        if self._spares_pid != os.getpid():  # forked: the parent's sockets are not ours
            self._spares, self._spares_pid = [], os.getpid()
        try:
            conn = self._spares.pop()  # list.pop and append are atomic: no lock needed
        except IndexError:
            return self.pool.get_connection()
        if conn.should_reconnect():  # marked while idle (a server maintenance notice)
            self.pool.release(conn)  # the pool reconnects it as redis-py intends
            return self.pool.get_connection()
        return conn

    def _checkin(self, conn: Any) -> None:
        # _checkout already set _spares_pid to this process's pid: no second getpid
        if (
            self._keep_spares
            and conn.pid == self._spares_pid
            and not conn.should_reconnect()
            and len(self._spares) < _SPARES
        ):
            self._spares.append(conn)
        else:
            self.pool.release(conn)

    def _discard(self, conn: Any) -> None:
        conn.disconnect()
        self.pool.release(conn)

    def eval_many(
        self, doing: str, script: Script, arg_lists: Sequence[Sequence[Any]]
    ) -> list[Any]:
        """Run ``script`` once per argument list in one pipelined round trip (each call is
        atomic on its own). A script missing after a server restart is loaded and only the
        calls that failed for that reason are sent again."""
        if len(arg_lists) == 1:
            return [self.run(doing, lambda c: self.evalsha(script, (), arg_lists[0]))]

        def send(indexes: list[int]) -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for i in indexes:
                pipe.evalsha(script.sha, 0, *arg_lists[i])
            return list(pipe.execute(raise_on_error=False))

        def go(c: redis.Redis) -> list[Any]:
            results = send(list(range(len(arg_lists))))
            missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
            if missing:
                script.sha = c.script_load(script.script)
                for i, r in zip(missing, send(missing), strict=True):
                    results[i] = r
            return results

        results = self.run(doing, go)
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            # Each call is atomic, the lot is not: say how much went through.
            done = len(results) - len(failed)
            raise self.fail(failed[0], f"{doing} (calls done: {done} of {len(results)})")
        return results

    def ping(self) -> None:
        self.run("pinging", lambda c: c.ping())
        if not self._eviction_checked:
            self._eviction_checked = True
            self._warn_if_evicting()

    def _warn_if_evicting(self) -> None:
        """A full Redis under an eviction policy deletes Stem's keys without a word."""
        try:
            info: Any = self.client.info("memory")
        except redis.RedisError:  # INFO may be renamed or forbidden on managed servers
            return
        policy = str(info.get("maxmemory_policy", ""))
        if policy.startswith("allkeys"):
            lost = "any key: queued messages and results are lost"
        elif policy.startswith("volatile"):
            lost = (
                "keys set to expire: results, replay-protection nonces, unique-task keys "
                "and beat claims vanish early"
            )
        else:
            return
        log.warning(
            "Redis at %s has maxmemory-policy %s: when memory runs out it evicts %s; use "
            "noeviction for Stem",
            self.options.target,
            policy,
            lost,
            extra={"event": "redis-evicting", "target": self.options.target},
        )

    def close(self) -> None:
        spares, self._spares = self._spares, []
        for conn in spares:
            self.pool.release(conn)
        self.pool.disconnect()
