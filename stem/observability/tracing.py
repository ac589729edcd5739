"""OpenTelemetry tracing (optional extra ``stem[otel]``): a span per publish and per run.

:func:`enable_tracing` is called once per process, by producers and workers alike (the app
module is a good place). On publish, a PRODUCER span ``publish <task>`` is started and its
W3C trace context (``traceparent``, ``tracestate``, ``baggage``) is written into the
envelope's headers through the app's header hooks, before the envelope is signed, so the
context cannot be altered in transit without failing verification. On the worker, a
CONSUMER span ``run <task>`` continues that trace from task_prerun until the execution ends
(success, failure, retry or revocation). A follow-up a task's run publishes (a chain's next
step, a callback) is parented on that run span, so one trace covers a whole workflow.

No argument values or error messages go into spans (they may hold secrets): errors are
recorded by type name.

Without ``opentelemetry-api`` installed, importing this module works and
:func:`enable_tracing` raises :class:`~stem.errors.ConfigError` saying what to install.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from stem.errors import ConfigError
from stem.observability import signals
from stem.task import current_envelope

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.envelope import Envelope
    from stem.result import ErrorInfo

log = logging.getLogger("stem.tracing")

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
_MAX_OPEN_SPANS = 10_000

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # the optional extra is not installed
    _OTEL = False
else:
    _OTEL = True


def available() -> bool:
    """Whether ``opentelemetry-api`` is importable."""
    return _OTEL


def trace_carrier(headers: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace-context entries of envelope headers (string values only)."""
    return {k: v for k in TRACE_HEADERS if isinstance(v := headers.get(k), str)}


def _attributes(env: Envelope) -> dict[str, str | int]:
    return {
        "messaging.system": "stem",
        "messaging.destination.name": env.queue,
        "messaging.message.id": env.id,
        "stem.task": env.task,
        "stem.attempt": env.attempt,
    }


class Tracing:
    """Publish and run spans for one app (see module docstring). ``close()`` undoes
    :func:`enable_tracing`."""

    def __init__(self, app: Stem, tracer_provider: Any = None) -> None:
        self.app = app
        provider = tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer("stem")
        self._lock = threading.Lock()
        # Spans between two signals, keyed by task id. Bounded: a publish that raised or a
        # run handed back at shutdown never sends the closing signal.
        self._publishing: OrderedDict[str, Any] = OrderedDict()
        self._running: OrderedDict[str, Any] = OrderedDict()
        self._receivers: list[tuple[signals.Signal, Callable[..., Any]]] = [
            (signals.after_publish, self._on_published),
            (signals.task_prerun, self._on_prerun),
            (signals.task_success, self._on_success),
            (signals.task_failure, self._on_failure),
            (signals.task_retry, self._on_retry),
            (signals.task_revoked, self._on_revoked),
            (signals.task_postrun, self._on_postrun),
        ]
        for sig, receiver in self._receivers:
            sig.connect(receiver)
        hooks = getattr(app, "header_hooks", None)
        self._hooked = isinstance(hooks, list)
        if isinstance(hooks, list):
            hooks.append(self.inject)
        else:
            log.warning(
                "this app cannot add headers at publish time; worker spans will not join "
                "producer traces",
                extra={"event": "tracing-no-header-hooks"},
            )

    def close(self) -> None:
        for sig, receiver in self._receivers:
            sig.disconnect(receiver)
        hooks = getattr(self.app, "header_hooks", None)
        if isinstance(hooks, list) and self.inject in hooks:
            hooks.remove(self.inject)
        with self._lock:
            spans = [*self._publishing.values(), *self._running.values()]
            self._publishing.clear()
            self._running.clear()
        for span in spans:
            span.end()

    @staticmethod
    def _remember(spans: OrderedDict[str, Any], key: str, span: Any) -> Any:
        """Store ``span``; return a span pushed out by the bound (the caller ends it)."""
        old = spans.pop(key, None)
        spans[key] = span
        if old is None and len(spans) > _MAX_OPEN_SPANS:
            old = spans.popitem(last=False)[1]
        return old

    # -- producer ------------------------------------------------------------------------

    def _parent_context(self, env: Envelope) -> Any:
        """The active span if there is one; else the run span of the task that publishes
        this one (the worker settles outside the task's context); else whatever context
        the envelope already carries."""
        if trace.get_current_span().get_span_context().is_valid:
            return None  # start_span uses the current context
        if env.parent_id is not None:
            with self._lock:
                run = self._running.get(env.parent_id)
            if run is not None:
                return trace.set_span_in_context(run)
        carrier = trace_carrier(env.headers)
        if not carrier and (running := current_envelope()) is not None:
            # Published by a task running where its run span is not (a process-pool
            # child): continue the trace its own message carries.
            carrier = trace_carrier(running.headers)
        return propagate.extract(carrier) if carrier else None

    def inject(self, env: Envelope) -> dict[str, str]:
        """Header hook: start the publish span; return its context as headers."""
        span = self.tracer.start_span(
            f"publish {env.task}",
            context=self._parent_context(env),
            kind=SpanKind.PRODUCER,
            attributes=_attributes(env),
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        with self._lock:
            pushed = self._remember(self._publishing, env.id, span)
        if pushed is not None:
            pushed.end()
        return carrier

    def _on_published(self, envelope: Envelope, **_: Any) -> None:
        with self._lock:
            span = self._publishing.pop(envelope.id, None)
        if span is not None:
            span.end()

    # -- worker --------------------------------------------------------------------------

    def _on_prerun(self, envelope: Envelope, **_: Any) -> None:
        carrier = trace_carrier(envelope.headers)
        span = self.tracer.start_span(
            f"run {envelope.task}",
            context=propagate.extract(carrier) if carrier else None,
            kind=SpanKind.CONSUMER,
            attributes=_attributes(envelope),
        )
        with self._lock:
            pushed = self._remember(self._running, envelope.id, span)
        if pushed is not None:
            pushed.end()

    def _span(self, env: Envelope) -> Any:
        with self._lock:
            return self._running.get(env.id)

    def _end(self, env: Envelope) -> None:
        with self._lock:
            span = self._running.pop(env.id, None)
        if span is not None:
            span.end()

    def _on_success(self, envelope: Envelope, **_: Any) -> None:
        span = self._span(envelope)
        if span is not None:
            span.set_attribute("stem.state", "SUCCESS")

    def _on_failure(self, envelope: Envelope, error: ErrorInfo | None = None, **_: Any) -> None:
        span = self._span(envelope)
        if span is not None:
            etype = error.type if error is not None else "Error"
            span.set_attribute("stem.state", "FAILURE")
            span.set_attribute("error.type", etype)
            span.set_status(Status(StatusCode.ERROR, etype))

    def _on_retry(
        self, envelope: Envelope, delay_s: float = 0.0, error: ErrorInfo | None = None, **_: Any
    ) -> None:
        span = self._span(envelope)
        if span is not None:
            span.set_attribute("stem.state", "RETRY")
            span.set_attribute("stem.retry.delay_s", float(delay_s))
            if error is not None:
                span.set_attribute("error.type", error.type)
        self._end(envelope)

    def _on_revoked(self, envelope: Envelope, **_: Any) -> None:
        span = self._span(envelope)
        if span is not None:
            span.set_attribute("stem.state", "REVOKED")
        self._end(envelope)

    def _on_postrun(self, envelope: Envelope, **_: Any) -> None:
        self._end(envelope)


_enabled: dict[int, Tracing] = {}
_enabled_lock = threading.Lock()


def enable_tracing(app: Stem, tracer_provider: Any = None) -> Tracing:
    """Trace ``app``'s publishes and this process's task runs; idempotent per app.

    ``tracer_provider`` defaults to OpenTelemetry's global provider (configure the SDK and
    an exporter first). Raises :class:`~stem.errors.ConfigError` without opentelemetry."""
    if not _OTEL:
        raise ConfigError(
            "tracing needs OpenTelemetry: pip install 'stem[otel]' "
            "(opentelemetry-api and opentelemetry-sdk)"
        )
    with _enabled_lock:
        existing = _enabled.get(id(app))
        if existing is not None and existing.app is app:
            return existing
        tracing = _enabled[id(app)] = Tracing(app, tracer_provider)
        return tracing


def disable_tracing(app: Stem) -> None:
    with _enabled_lock:
        tracing = _enabled.pop(id(app), None)
    if tracing is not None:
        tracing.close()
