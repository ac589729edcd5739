"""The application object: task registry, producer API, and connection settings."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, overload

from stem import envelope as env_codec
from stem import states
from stem.backends import backend_from_url
from stem.backends.base import ResultBackend
from stem.brokers import broker_from_url
from stem.brokers.base import Broker, Message
from stem.canvas import Signature
from stem.envelope import Envelope, new_id, now_ms
from stem.errors import (
    BackendError,
    BrokerConnectionError,
    BrokerTimeoutError,
    ConfigError,
    TaskNotRegistered,
)
from stem.observability import signals
from stem.result import AsyncResult
from stem.result_store import ResultStore
from stem.security.signing import Keyring
from stem.security.tls import TLSSettings
from stem.task import Task, TaskOptions, current_envelope

# A unique key set with an expiring task lapses this long after the task expires.
_UNIQUE_GRACE_S = 5.0
log = logging.getLogger("stem.app")

DEFAULT_URL = "sqlite:///stem.db"
DEFAULT_RESULT_TTL_S = 86400.0
_UNSET: Any = object()


_MAX_DELAY_S = 100 * 365 * 86400.0  # a countdown or expiry beyond this is a typo


def _to_ms(value: datetime | float | timedelta | None, *, relative_to_ms: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigError("eta/expires datetimes must be timezone-aware")
        return int(value.timestamp() * 1000)
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if not abs(value) <= _MAX_DELAY_S:  # NaN too
        raise ConfigError(
            f"countdown/expires must be a finite number of seconds (at most 100 years), got {value}"
        )
    return relative_to_ms + int(float(value) * 1000)


class Stem:
    """A Stem application.

    ``broker`` and ``backend`` are URLs (``sqlite:///path``, ``memory://``, ``redis://``,
    ``rediss://``, ``postgresql://``) or ready-made instances. Without a backend URL, results
    go to the broker's URL when that store can also keep results (SQLite, Redis,
    PostgreSQL, memory).
    """

    def __init__(
        self,
        name: str = "stem",
        broker: str | Broker | None = None,
        backend: str | ResultBackend | None = None,
        *,
        routes: Mapping[str, str] | None = None,
        default_queue: str = "default",
        result_ttl_s: float | None = _UNSET,
        max_message_bytes: int = env_codec.DEFAULT_MAX_BYTES,
        publish_retries: int = 3,
        publish_retry_backoff_s: float = 0.2,
        tls: TLSSettings | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.name = name
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.routes: dict[str, str] = dict(routes or {})
        self.default_queue = default_queue
        #: Whether the code chose the result TTL: configuration that leaves it at its
        #: built-in default does not replace it then (see stem.config.apply).
        self.has_explicit_result_ttl = result_ttl_s is not _UNSET
        self.result_ttl_s: float | None = (
            DEFAULT_RESULT_TTL_S if result_ttl_s is _UNSET else result_ttl_s
        )
        self.max_message_bytes = max_message_bytes
        self.publish_retries = publish_retries
        self.publish_retry_backoff_s = publish_retry_backoff_s
        self.tls = tls
        # Without one, the keyring comes from STEM_SIGNING_* when first needed: not here,
        # where the CLI has yet to apply its layers (keys in a file and the active key in
        # the environment are one keyring, not a half one).
        self._keyring: Keyring | None = keyring
        self._keyring_pending = keyring is None
        #: A keyring given in code: configuration without keys leaves it in place.
        self.has_explicit_keyring = keyring is not None
        self.import_spec: str | None = None  # "module:attr", set by the CLI loader
        self._code: dict[str, Any] = {}
        if isinstance(broker, str):
            self._code["broker.url"] = broker
        if isinstance(backend, str):
            self._code["backend.url"] = backend
        if routes:
            self._code["routes"] = dict(routes)
        if self.has_explicit_result_ttl and (
            result_ttl_s is None
            or (
                isinstance(result_ttl_s, int | float)
                and not isinstance(result_ttl_s, bool)
                and float(result_ttl_s).is_integer()
                and result_ttl_s >= 1
            )
        ):
            # What the configuration can hold (whole seconds) shows as the code layer.
            self._code["backend.result_ttl_s"] = None if result_ttl_s is None else int(result_ttl_s)
        self.has_explicit_broker = broker is not None and not isinstance(broker, str)
        self.has_explicit_backend = backend is not None and not isinstance(backend, str)
        self._broker_arg = broker or DEFAULT_URL
        self._backend_arg = backend
        self._broker: Broker | None = None
        self._backend: ResultBackend | None = None
        self._result_store: ResultStore | None = None
        self._lock = threading.RLock()
        self.schedules: dict[str, Any] = {}
        self._queues_ok: set[str] = set()  # queue names already checked (a few, in practice)
        #: Callables returning extra headers (trace context) set on every published
        #: envelope before it is sealed, so they are signed with it.
        self.header_hooks: list[Callable[[Envelope], Mapping[str, Any] | None]] = []

    def __repr__(self) -> str:
        from stem.observability.redact import redact_url

        return f"<Stem {self.name} broker={redact_url(self.broker_url)}>"

    # -- configuration -------------------------------------------------------------------

    def code_settings(self) -> dict[str, Any]:
        """What this app's code set (URLs, routes): the configuration's "code" layer."""
        return dict(self._code)

    @property
    def broker_url(self) -> str:
        arg = self._broker_arg
        return arg if isinstance(arg, str) else arg.url

    @property
    def backend_url(self) -> str:
        arg = self._backend_arg
        if arg is None:
            return self.broker_url
        return arg if isinstance(arg, str) else arg.url

    @property
    def keyring(self) -> Keyring | None:
        """The keys this app signs and verifies with (None: signing off)."""
        if self._keyring_pending:
            with self._lock:
                if self._keyring_pending:
                    self._keyring = Keyring.from_env(os.environ)
                    self._keyring_pending = False
        return self._keyring

    @keyring.setter
    def keyring(self, keyring: Keyring | None) -> None:
        self.configure(keyring=keyring)

    def child_config(self) -> dict[str, Any]:
        """What a process-pool child needs to act as this app, as configured now (by code,
        files, environment and flags): JSON-ready, keys inline, so send it only over a
        private channel. The child does not read configuration again (a file edited since
        must not stop new pool processes from starting)."""
        config: dict[str, Any] = {
            "broker": self.broker_url,
            "backend": self.backend_url,
            "routes": dict(self.routes),
            "result_ttl_s": self.result_ttl_s,
            "publish_retries": self.publish_retries,
            "tls": None if self.tls is None else dataclasses.asdict(self.tls),
        }
        ring = self.keyring
        if ring is None:
            config["keyring"] = None
        elif (portable := ring.to_settings()) is not None:
            config["keyring"] = portable
        # else: a keyring made in code from verifiers; the child's own app module makes it
        return config

    def configure_child(self, config: Mapping[str, Any]) -> None:
        """Apply :meth:`child_config` of the parent process."""
        tls = config.get("tls")
        extra: dict[str, Any] = {}
        if "keyring" in config:
            spec = config["keyring"]
            extra["keyring"] = None if spec is None else Keyring.from_settings(**spec)
        self.configure(
            broker=config.get("broker"),
            backend=config.get("backend"),
            routes=config.get("routes"),
            result_ttl_s=config.get("result_ttl_s", _UNSET),
            publish_retries=config.get("publish_retries"),
            tls=None if tls is None else TLSSettings(**tls),
            **extra,
        )

    def configure(
        self,
        *,
        broker: str | Broker | None = None,
        backend: str | ResultBackend | None = None,
        routes: Mapping[str, str] | None = None,
        result_ttl_s: float | None = _UNSET,
        tls: TLSSettings | None = None,
        keyring: Keyring | None = _UNSET,
        publish_retries: int | None = None,
    ) -> None:
        """Rebind connections and options (before first use; closes open connections).
        ``keyring=None`` switches signing off; leave it out to keep the keyring."""
        with self._lock:
            if broker is not None or backend is not None:
                self.close()
            if broker is not None:
                self._broker_arg = broker
            if backend is not None:
                self._backend_arg = backend
            if routes is not None:
                self.routes.update(routes)
            if result_ttl_s is not _UNSET:
                self.result_ttl_s = result_ttl_s
                self._result_store = None
            if tls is not None:
                self.tls = tls
            if keyring is not _UNSET:
                self._keyring, self._keyring_pending = keyring, False
                self._result_store = None
            if publish_retries is not None:
                self.publish_retries = publish_retries

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    arg = self._broker_arg
                    self._broker = (
                        broker_from_url(arg, tls=self.tls) if isinstance(arg, str) else arg
                    )
        return self._broker

    @property
    def backend(self) -> ResultBackend:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    arg = self._backend_arg
                    if arg is None:
                        arg = self.broker_url
                    self._backend = (
                        backend_from_url(arg, tls=self.tls) if isinstance(arg, str) else arg
                    )
        return self._backend

    @property
    def result_store(self) -> ResultStore:
        if self._result_store is None:
            with self._lock:
                if self._result_store is None:
                    seal = unseal = unseal_signed = None
                    if self.keyring is not None:
                        seal, unseal = self.keyring.record_sealers()
                        unseal_signed = self.keyring.unseal_acted_on
                    self._result_store = ResultStore(
                        self.backend,
                        ttl_s=self.result_ttl_s,
                        seal=seal,
                        unseal=unseal,
                        unseal_signed=unseal_signed,
                    )
        return self._result_store

    def close(self) -> None:
        with self._lock:
            for conn in (self._broker, self._backend):
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # closing must not mask the caller's error
                        log.debug("close failed", exc_info=True)
            self._broker = self._backend = None
            self._result_store = None

    # -- tasks ---------------------------------------------------------------------------

    @overload
    def task(self, fn: Callable[..., Any], /) -> Task[Any, Any]: ...

    @overload
    def task(
        self, fn: None = None, /, **options: Any
    ) -> Callable[[Callable[..., Any]], Task[Any, Any]]: ...

    def task(
        self, fn: Callable[..., Any] | None = None, /, **options: Any
    ) -> Task[Any, Any] | Callable[[Callable[..., Any]], Task[Any, Any]]:
        """Register a function as a task (``@app.task`` or ``@app.task(name=..., ...)``)."""

        def register(func: Callable[..., Any]) -> Task[Any, Any]:
            name = options.pop("name", None) or f"{func.__module__}.{func.__qualname__}"
            if "autoretry_for" in options:
                options["autoretry_for"] = tuple(options["autoretry_for"])
            try:
                opts = TaskOptions(name=name, **options)
            except TypeError as exc:
                raise ConfigError(f"task {name!r}: {exc}") from None
            if name in self.tasks and self.tasks[name].fn is not func:
                raise ConfigError(f"a different task is already registered as {name!r}")
            t: Task[Any, Any] = Task(self, func, opts)
            self.tasks[name] = t
            return t

        if fn is not None:
            return register(fn)
        return register

    def signature(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """A signature by task name (the task need not be registered in this process)."""
        sig = Signature(name, tuple(args), dict(kwargs or {}), app=self)
        return sig.set(**options) if options else sig

    def schedule(self, name: str, task: Any, **spec: Any) -> None:
        """Run ``task`` (a task or its name) periodically under ``stem beat``: ``every=``
        seconds or timedelta, ``cron="*/5 * * * *"`` (with ``tz=``), ``solar=``,
        ``calendar=``, or ``at=`` (one-off); see :func:`stem.beat.add_schedule`."""
        from stem.beat import add_schedule

        add_schedule(self, name, task, **spec)

    def get_task(self, name: str) -> Task[Any, Any]:
        try:
            return self.tasks[name]
        except KeyError:
            raise TaskNotRegistered(f"no task registered as {name!r}") from None

    def route(self, task_name: str, explicit: str | None = None) -> str:
        """Queue for a task: explicit argument, then routes (exact name, then patterns in
        order), then the task's own queue option, then the default queue."""
        if explicit:
            return explicit
        if task_name in self.routes:
            return self.routes[task_name]
        for pattern, queue in self.routes.items():
            if fnmatch.fnmatchcase(task_name, pattern):
                return queue
        task = self.tasks.get(task_name)
        if task is not None and task.options.queue:
            return task.options.queue
        return self.default_queue

    # -- producing -----------------------------------------------------------------------

    def build_envelope(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        ignore_result: bool | None = None,
        headers: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
        root_id: str | None = None,
        group_id: str | None = None,
    ) -> Envelope:
        now = now_ms()
        task = self.tasks.get(name)
        opts = task.options if task is not None else None
        if task is None and (problem := env_codec.name_problem("task name", name)):
            raise ConfigError(problem)  # a registered task's name was checked already
        if task_id is not None and (problem := env_codec.name_problem("task id", task_id)):
            raise ConfigError(problem)
        if eta is not None and countdown is not None:
            raise ConfigError("give countdown or eta, not both")
        not_before = _to_ms(eta if eta is not None else countdown, relative_to_ms=now)
        if expires is None and opts is not None and opts.expires is not None:
            expires = opts.expires
        expires_ms = _to_ms(expires, relative_to_ms=now)
        hdrs = dict(headers or {})
        if ignore_result if ignore_result is not None else (opts and opts.ignore_result):
            hdrs["ignore_result"] = True
        prio = priority if priority is not None else (opts.priority if opts else 0)
        if type(prio) is not int or not env_codec.PRIORITY_MIN <= prio <= env_codec.PRIORITY_MAX:
            raise ConfigError(
                f"priority must be an integer {env_codec.PRIORITY_MIN}.."
                f"{env_codec.PRIORITY_MAX}, got {prio!r}"
            )
        target = self.route(name, queue)
        if target not in self._queues_ok:  # on every enqueue: check each name once
            if problem := env_codec.queue_problem(target):
                raise ConfigError(f"task {name!r}: {problem}")
            if len(self._queues_ok) < 1024:
                self._queues_ok.add(target)
        tid = task_id or new_id()
        if parent_id is None and (cur := current_envelope()) is not None:
            # Published by a running task: its child, in the same workflow (and trace).
            parent_id, root_id = cur.id, root_id or cur.root_id or cur.id
        return Envelope(
            id=tid,
            task=name,
            args=tuple(args),
            kwargs=dict(kwargs or {}),
            queue=target,
            priority=prio,
            not_before_ms=not_before if not_before and not_before > now else None,
            expires_ms=expires_ms,
            max_retries=opts.max_retries if opts else None,
            created_ms=now,
            parent_id=parent_id,
            root_id=root_id or tid,
            group_id=group_id,
            headers=hdrs,
        )

    def send_task(
        self,
        name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Enqueue a task by name (it need not be registered in this process).

        For a unique task (``unique=True`` or ``unique_key=...``), while a task with the same
        key is queued, delayed or running, this returns that task's handle instead of
        enqueueing a twin."""
        env = self.build_envelope(name, args, kwargs, **options)
        task = self.tasks.get(name)
        if task is not None and (task.options.unique or task.options.unique_key):
            from stem.limits import unique_key

            key = unique_key(
                name, task.options.unique_key, env.args, env.kwargs, names=task.bound_arguments
            )
            ttl = task.options.unique_window_s
            if env.expires_ms is not None:
                # A task that expires unrun may never be reached by a worker (which would
                # free the key): the key lapses soon after; a run that starts in time
                # holds it for the whole window again (Admission).
                ttl = min(ttl, max(0.0, (env.expires_ms - now_ms()) / 1000) + _UNIQUE_GRACE_S)
            legacy = None
            if task.options.unique_key is None:
                legacy = self._legacy_unique_holder(name, env, key)
            owner = legacy or self._claim_unique(key, env.id, ttl)
            if owner != env.id:
                return AsyncResult(owner, self)
            env = env.replace(headers={**env.headers, "unique_key": key})
            try:
                self.publish([env])
            except BaseException:
                self.broker.release(key, env.id)
                raise
            return AsyncResult(env.id, self)
        self.publish([env])
        return AsyncResult(env.id, self)

    def _claim_unique(self, key: str, task_id: str, ttl_s: float) -> str:
        """Claim a unique key for ``task_id``; the id now holding it. A holder that will
        never run gives way: one revoked, or one that ended while its key stayed (its
        release failed). A dead-lettered holder keeps it (a replay may still run it)."""
        owner = self.broker.claim(key, task_id, ttl_s)
        for _ in range(3):
            if owner == task_id or not self._unique_holder_gone(owner):
                return owner
            if self.broker.swap(key, owner, task_id, ttl_s):
                return task_id
            owner = self.broker.claim(key, task_id, ttl_s)
        return owner

    def _legacy_unique_holder(self, name: str, env: Envelope, key: str) -> str | None:
        """The holder of the key an earlier Stem computed for this call (the arguments as
        sent, not bound by name), if one still runs: it is the same task. Read before the
        new key is claimed, so a concurrent producer never sees a claim that is given back.
        Keys of that form lapse within their window (``unique_window_s``) of an upgrade;
        this check can go a release later."""
        from stem.limits import unique_key

        old = unique_key(name, None, env.args, env.kwargs)
        if old == key:
            return None
        holder = self.broker.peek(old)
        if holder is None or self._unique_holder_gone(holder):
            return None
        return holder

    def _unique_holder_gone(self, holder: str) -> bool:
        from stem.control import revoked_key

        if self.broker.peek(revoked_key(holder)) is not None:
            return True
        try:
            rec = self.result_store.read(holder)
        except BackendError:  # unknown: the holder keeps its key (as before this check)
            return False
        return rec is not None and rec.state in states.DONE_STATES

    def seal(self, env: Envelope, *, headroom: int = 0, unsigned_ok: bool = False) -> bytes:
        """Sign (when a keyring can sign) and encode an envelope for the broker, leaving
        ``headroom`` bytes under the size limit (new messages leave room for a retry).

        A verify-only keyring (Ed25519 public keys) that requires signatures raises
        :class:`ConfigError`: what it would send unsigned, workers refuse, and the sender
        would never know. ``unsigned_ok``: send it unsigned all the same (a verify-only
        worker's control reply, which the caller refuses and says why)."""
        keyring = self.keyring
        if keyring is not None and keyring.can_sign:
            return keyring.seal_envelope(env, max_bytes=self.max_message_bytes, headroom=headroom)
        if keyring is not None and keyring.must_sign_but_cannot and not unsigned_ok:
            raise ConfigError(
                f"cannot send {env.task!r}: this process's signing keys are public keys only "
                "(verify-only), and signatures are required, so workers would refuse it "
                "unsigned: give the sender STEM_SIGNING_KEYS and STEM_SIGNING_ACTIVE_KEY "
                "(signing.keys, signing.active_key)"
            )
        return env_codec.encode(env, max_bytes=self.max_message_bytes, headroom=headroom)

    def publish(self, envelopes: Iterable[Envelope]) -> None:
        """Publish envelopes in one batch; retries with backoff on broker connection errors
        before raising :class:`~stem.errors.BrokerConnectionError`."""
        envs = list(envelopes)
        if signals.before_publish.has_receivers:
            for env in envs:
                signals.before_publish.send(envelope=env)
        if self.header_hooks:
            envs = [self._with_hook_headers(e) for e in envs]
        messages = [
            Message(
                id=e.id,
                queue=e.queue,
                body=self.seal(e, headroom=env_codec.REPUBLISH_HEADROOM),
                priority=e.priority,
                not_before_ms=e.not_before_ms,
            )
            for e in envs
        ]
        self.publish_messages(messages)
        if signals.after_publish.has_receivers:
            for env in envs:
                signals.after_publish.send(envelope=env)

    def _with_hook_headers(self, env: Envelope) -> Envelope:
        headers = dict(env.headers)
        for hook in self.header_hooks:
            try:
                extra = hook(env)
            except Exception:
                log.exception("header hook failed", extra={"event": "header-hook-failed"})
                continue
            if extra:
                headers.update(extra)
        return env.replace(headers=headers) if headers != env.headers else env

    def publish_messages(self, messages: Sequence[Message]) -> None:
        delay = self.publish_retry_backoff_s
        for attempt in range(self.publish_retries + 1):
            try:
                self.broker.publish(messages)
                return
            except BrokerTimeoutError:
                raise  # it may have gone in: sent again, it could run twice
            except BrokerConnectionError as exc:
                if attempt >= self.publish_retries:
                    raise
                log.warning(
                    "publish failed, retrying in %.2fs: %s",
                    delay,
                    exc,
                    extra={"event": "publish-retry", "attempt": attempt + 1},
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def AsyncResult(self, task_id: str) -> AsyncResult:
        return AsyncResult(task_id, self)
