"""OpenTelemetry tracing: a producer's trace continues in the worker, through the signed
envelope headers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from stem import Stem
from stem.errors import ConfigError, SignatureError
from stem.observability import tracing
from stem.security.signing import Keyring
from stem.testing import memory_app, running_worker


def _wait_for(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


class Traced:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]

    def one(self, name: str, timeout_s: float = 5.0) -> ReadableSpan:
        _wait_for(lambda: len(self.spans(name)) >= 1, timeout_s)
        (span,) = self.spans(name)
        return span


@pytest.fixture
def traced() -> Iterator[Traced]:
    t = Traced()
    yield t
    t.provider.shutdown()


@pytest.fixture
def app() -> Iterator[Stem]:
    a = memory_app()
    a.configure(keyring=Keyring.build("hmac-sha256", {"v1": b"s" * 32}))
    yield a
    tracing.disable_tracing(a)
    a.close()


def _register(app: Stem) -> Any:
    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="boom", max_retries=0)
    def boom() -> None:
        raise ValueError("secret detail")

    return add, boom


def test_trace_spans_producer_and_worker(app: Stem, traced: Traced) -> None:
    add, _ = _register(app)
    tracing.enable_tracing(app, traced.provider)
    with running_worker(app):
        with traced.tracer.start_as_current_span("http request") as request:
            res = add.delay(2, 3)
        assert res.get(timeout=5) == 5
        run = traced.one("run add")
    publish = traced.one("publish add")
    trace_id = request.get_span_context().trace_id
    assert {publish.context.trace_id, run.context.trace_id} == {trace_id}
    assert (
        publish.parent is not None and publish.parent.span_id == request.get_span_context().span_id
    )
    assert run.parent is not None and run.parent.span_id == publish.context.span_id
    assert publish.kind is SpanKind.PRODUCER and run.kind is SpanKind.CONSUMER
    assert run.attributes is not None
    assert run.attributes["messaging.message.id"] == res.id
    assert run.attributes["stem.task"] == "add"
    assert run.attributes["stem.state"] == "SUCCESS"
    assert run.status.status_code is StatusCode.UNSET


def test_trace_context_travels_signed(app: Stem, traced: Traced) -> None:
    tracing.enable_tracing(app, traced.provider)
    with traced.tracer.start_as_current_span("root"):
        res = app.send_task("add", (1, 2))
    (delivery,) = app.broker.reserve(["default"], 1, 5.0)
    from stem import envelope as codec

    env = codec.decode(delivery.body)
    assert set(tracing.trace_carrier(env.headers)) >= {"traceparent"}
    assert env.id == res.id
    app.keyring.verify(env)  # type: ignore[union-attr]
    forged = env.replace(
        headers={**env.headers, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    )
    with pytest.raises(SignatureError):
        app.keyring.verify(forged)  # type: ignore[union-attr]


def test_a_chain_is_one_trace(app: Stem, traced: Traced) -> None:
    """The next step, published by the worker while settling, hangs under the run span."""
    from stem.canvas import chain

    add, _ = _register(app)
    tracing.enable_tracing(app, traced.provider)
    with running_worker(app):
        with traced.tracer.start_as_current_span("request"):
            res = chain(add.s(1, 2), add.s(10)).delay()
        assert res.get(timeout=5) == 13
        _wait_for(lambda: len(traced.spans("run add")) == 2)
    publishes = sorted(traced.spans("publish add"), key=lambda s: s.start_time or 0)
    runs = sorted(traced.spans("run add"), key=lambda s: s.start_time or 0)
    assert len(publishes) == 2
    assert len({s.context.trace_id for s in publishes + runs}) == 1
    assert publishes[1].parent is not None
    assert publishes[1].parent.span_id == runs[0].context.span_id
    assert runs[1].parent is not None
    assert runs[1].parent.span_id == publishes[1].context.span_id


def test_worker_continues_a_trace_from_headers(app: Stem, traced: Traced) -> None:
    """Extraction on the worker needs only the headers (any producer may put them there)."""
    _register(app)
    tracing.enable_tracing(app, traced.provider)
    carrier: dict[str, str] = {}
    with traced.tracer.start_as_current_span("upstream") as upstream:
        propagate.inject(carrier)
    with running_worker(app):
        res = app.send_task("add", (1, 1), headers=carrier)
        assert res.get(timeout=5) == 2
        run = traced.one("run add")
    assert run.context.trace_id == upstream.get_span_context().trace_id


def test_failure_marks_the_run_span_without_the_message(app: Stem, traced: Traced) -> None:
    _, boom = _register(app)
    tracing.enable_tracing(app, traced.provider)
    with running_worker(app):
        boom.delay()
        run = traced.one("run boom")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["error.type"] == "ValueError"
    assert "secret detail" not in str(run.attributes) + str(run.status.description)


def test_retry_ends_one_span_per_attempt(app: Stem, traced: Traced) -> None:
    @app.task(name="flaky", bind=True, max_retries=2, default_retry_delay=0.01, retry_jitter=False)
    def flaky(ctx: Any) -> int:
        if ctx.attempt == 0:
            raise ctx.retry(exc=ConnectionError("x"))
        return int(ctx.attempt)

    tracing.enable_tracing(app, traced.provider)
    with running_worker(app):
        assert flaky.delay().get(timeout=5) == 1
        _wait_for(lambda: len(traced.spans("run flaky")) == 2)
    states = sorted(str((s.attributes or {}).get("stem.state")) for s in traced.spans("run flaky"))
    assert states == ["RETRY", "SUCCESS"]


def test_enable_is_idempotent_and_disable_disconnects(app: Stem, traced: Traced) -> None:
    first = tracing.enable_tracing(app, traced.provider)
    assert tracing.enable_tracing(app, traced.provider) is first
    tracing.disable_tracing(app)
    _register(app)
    with running_worker(app):
        app.send_task("add", (1, 1)).get(timeout=5)
    assert traced.spans() == []
    assert first.inject not in app.header_hooks


def test_without_opentelemetry_enable_says_what_to_install(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tracing, "_OTEL", False)
    assert not tracing.available()
    with pytest.raises(ConfigError, match=r"stem\[otel\]"):
        tracing.enable_tracing(app)


def test_module_imports_without_opentelemetry() -> None:
    """The optional extra missing must not break importing stem.observability.tracing."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'opentelemetry' or name.startswith('opentelemetry.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from stem.observability import tracing\n"
        "assert not tracing.available()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_trace_carrier_keeps_only_string_trace_headers() -> None:
    headers = {"traceparent": "00-abc", "tracestate": 5, "unique_key": "k", "baggage": "a=b"}
    assert tracing.trace_carrier(headers) == {"traceparent": "00-abc", "baggage": "a=b"}
    assert trace.get_current_span().get_span_context().is_valid is False


def test_a_task_published_by_a_task_joins_its_trace(app: Stem, traced: Traced) -> None:
    """A task's own .delay() makes a child task (parent_id, root_id), in the same trace,
    under the run span, as a chain's next step is."""
    from stem.result import AsyncResult

    @app.task(name="child", bind=True)
    def child(ctx: Any) -> list[str | None]:
        return [ctx.parent_id, ctx.root_id]

    @app.task(name="spawn")
    def spawn() -> str:
        return child.delay().id

    tracing.enable_tracing(app, traced.provider)
    with running_worker(app):
        parent = spawn.delay()
        child_id = parent.get(timeout=5)
        assert AsyncResult(child_id, app).get(timeout=5) == [parent.id, parent.id]
        _wait_for(lambda: len(traced.spans("run child")) == 1)
    [run_spawn] = traced.spans("run spawn")
    [publish_child] = traced.spans("publish child")
    [run_child] = traced.spans("run child")
    trace_ids = {s.context.trace_id for s in (run_spawn, publish_child, run_child)}
    assert len(trace_ids) == 1
    assert publish_child.parent is not None
    assert publish_child.parent.span_id == run_spawn.context.span_id
