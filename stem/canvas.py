"""Signatures and the canvas: chain, group, chord, link and link_error.

Canvas state travels in the (signed) headers of the messages themselves and in the result
backend, never in a worker's memory, so a chain or chord in flight survives a restart of
every worker:

- a chain's first message carries the remaining steps (with their pre-assigned task ids);
  each step's worker publishes the next step after writing its own result;
- a group's members get ids ``<group id>-<index>`` so anyone can collect their results in
  order;
- a chord's members carry the callback; each finishing member adds its index to an
  idempotent set in the result backend (``add_member``), and the member that completes the
  set claims the firing in the broker and publishes the callback. A member redelivered
  after a worker kill is counted once, and the callback's id is fixed in advance.

A worker killed after publishing a follow-up (a chain's next step, a chord's callback) and
before acking its own message runs that task again and publishes the follow-up again, under
the same id. A copy of a step that already succeeded (or was revoked, or expired) is not
run: it publishes the step's follow-ups again from the stored result, so a follow-up whose
publish failed is published then. A copy delivered while the first is still queued or
running runs too, as any redelivery may (delivery is at least once: make follow-ups
idempotent). A failed or dead-lettered step is not "done": its copies, and the replay of
its dead letter, run (and a chain goes on from there).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from stem.envelope import Envelope, new_id
from stem.errors import ConfigError, DecodeError

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.result import AsyncResult, GroupResult

_SEND_OPTIONS = {"queue", "priority", "countdown", "expires", "ignore_result"}
_LINK_OPTIONS = {"link", "link_error"}
# Options only a signature sent at once takes (Task.enqueue's), not one stored in a canvas.
_CALL_OPTIONS = {"eta", "task_id", "headers"}
# Headers that carry canvas state (see the module docstring), checked by workers before a
# message runs: a worker acts on them only after the task ran, too late to refuse it.
CANVAS_HEADERS = frozenset({"chain", "chord", *_LINK_OPTIONS})


def _option_problem(key: str, value: Any) -> str | None:
    """What is wrong with a send option's value (as carried in a message), or None."""
    if value is None:
        return None
    if key == "queue":
        ok = isinstance(value, str)
        want = "a string"
    elif key == "priority":
        ok = type(value) is int
        want = "an integer"
    elif key in ("countdown", "expires"):
        ok = type(value) in (int, float) and math.isfinite(value)
        want = "a number of seconds"
    elif key == "ignore_result":
        ok = type(value) is bool
        want = "true or false"
    else:
        return f"unknown option {key!r}"
    return None if ok else f"option {key!r} must be {want}, not {type(value).__name__}"


def _wire_problem(wire: Any, where: str) -> str | None:
    """What is wrong with a wire-form signature (:meth:`Signature.to_wire`), or None."""
    if not isinstance(wire, dict):
        return f"{where} must be an object"
    for key in ("task", "id"):
        if not isinstance(wire.get(key), str):
            return f"{where}: field {key!r} must be a string"
    if not isinstance(wire.get("args") or [], list):
        return f"{where}: field 'args' must be a list"
    if not isinstance(wire.get("kwargs") or {}, dict):
        return f"{where}: field 'kwargs' must be an object"
    options = wire.get("options") or {}
    if not isinstance(options, dict):
        return f"{where}: field 'options' must be an object"
    for key, value in options.items():
        if key in _LINK_OPTIONS:
            problem = _wire_problem(value, f"{where}.options.{key}")
        else:
            problem = _option_problem(key, value)
            problem = problem and f"{where}: {problem}"
        if problem:
            return problem
    return None


def _portable(wire: dict[str, Any], what: str) -> dict[str, Any]:
    """``wire``, checked to travel in a message (a later chain step, a chord callback, a
    link): its options must be what a worker accepts (a datetime is not)."""
    for key, value in (wire.get("options") or {}).items():
        if key not in _LINK_OPTIONS and (problem := _option_problem(key, value)):
            raise ConfigError(
                f"{what} {wire['task']!r}: {problem}; a step sent later takes countdown "
                "and expires in seconds from when it is sent"
            )
    return wire


def check_headers(headers: Mapping[str, Any]) -> None:
    """Raise :class:`DecodeError` naming the first malformed canvas header, if any."""
    problem = _headers_problem(headers)
    if problem:
        raise DecodeError(problem)


def _headers_problem(headers: Mapping[str, Any]) -> str | None:
    chain_ = headers.get("chain")
    if chain_ is not None:
        if not isinstance(chain_, list):
            return "header 'chain' must be a list"
        for i, wire in enumerate(chain_):
            if problem := _wire_problem(wire, f"header 'chain[{i}]'"):
                return problem
    for key in _LINK_OPTIONS:
        if headers.get(key) is not None and (
            problem := _wire_problem(headers[key], f"header {key!r}")
        ):
            return problem
    spec = headers.get("chord")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return "header 'chord' must be an object"
    size, index = spec.get("size"), spec.get("index")
    if not (type(size) is int and type(index) is int and 0 <= index < size):
        return "header 'chord': 'size' and 'index' must be integers, 0 <= index < size"
    return _wire_problem(spec.get("callback"), "header 'chord.callback'")


@dataclass(frozen=True)
class Signature:
    """A task name with (partial) arguments and options, to send now or compose."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    immutable: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    app: Stem | None = field(default=None, compare=False, repr=False)
    task_id: str | None = None

    def set(self, **options: Any) -> Signature:
        unknown = set(options) - _SEND_OPTIONS - _LINK_OPTIONS
        if unknown:
            raise ConfigError(f"unknown signature option(s): {', '.join(sorted(unknown))}")
        for key, value in options.items():
            if key in _LINK_OPTIONS:
                if not isinstance(value, Signature):
                    raise ConfigError(f"option {key!r} takes a signature")
                continue
            if isinstance(value, timedelta):
                options[key] = value = value.total_seconds()
            if key == "expires" and isinstance(value, datetime):
                if value.tzinfo is None:
                    raise ConfigError("eta/expires datetimes must be timezone-aware")
                continue  # fine where sent at once; refused where it travels (_portable)
            problem = _option_problem(key, value)
            if problem:
                raise ConfigError(
                    f"signature {self.task!r}: {problem} (in a canvas, countdown and expires "
                    "are seconds from when the step is sent)"
                )
        return replace(self, options={**self.options, **options})

    def link(self, callback: Signature) -> Signature:
        return self.set(link=callback)

    def link_error(self, errback: Signature) -> Signature:
        return self.set(link_error=errback)

    def __or__(self, other: Signature | Chain) -> Chain:
        return chain(self, other)

    def _app(self) -> Stem:
        if self.app is None:
            raise ConfigError(f"signature {self.task!r} is not bound to an app")
        return self.app

    def to_wire(self, task_id: str | None = None) -> dict[str, Any]:
        opts = {k: v for k, v in self.options.items() if k in _SEND_OPTIONS}
        for key in _LINK_OPTIONS:
            if key in self.options:
                opts[key] = _portable(self.options[key].to_wire(), key)
        return {
            "task": self.task,
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "immutable": self.immutable,
            "options": opts,
            "id": task_id or self.task_id or new_id(),
        }

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult:
        """Send now, as :meth:`Task.enqueue <stem.task.Task.enqueue>` does (the same options,
        a unique task's deduplication included), plus ``link`` and ``link_error``."""
        unknown = set(options) - _SEND_OPTIONS - _LINK_OPTIONS - _CALL_OPTIONS
        if unknown:
            raise ConfigError(f"unknown option(s) for {self.task!r}: {', '.join(sorted(unknown))}")
        call = {k: options.pop(k) for k in _CALL_OPTIONS if k in options}
        wire = self.set(**options).to_wire(call.get("task_id"))
        sent = dict(wire["options"])
        headers = dict(call.get("headers") or {})
        for key in _LINK_OPTIONS:
            if key in sent:
                headers[key] = sent.pop(key)
        return self._app().send_task(
            self.task,
            [*wire["args"], *args],
            {**wire["kwargs"], **(kwargs or {})},
            task_id=wire["id"],
            headers=headers,
            eta=call.get("eta"),
            **sent,
        )


def envelope_from_wire(
    app: Stem,
    wire: Mapping[str, Any],
    *,
    prepend: Sequence[Any] = (),
    headers: Mapping[str, Any] | None = None,
    parent_id: str | None = None,
    root_id: str | None = None,
    group_id: str | None = None,
) -> Envelope:
    """Build the envelope for a wire-form signature (``prepend`` goes before its args unless
    it is immutable)."""
    opts = dict(wire.get("options") or {})
    hdrs = dict(headers or {})
    for key in _LINK_OPTIONS:
        if key in opts:
            hdrs[key] = opts.pop(key)
    args = list(wire.get("args") or [])
    if prepend and not wire.get("immutable"):
        args = [*prepend, *args]
    return app.build_envelope(
        wire["task"],
        args,
        dict(wire.get("kwargs") or {}),
        task_id=wire["id"],
        headers=hdrs,
        parent_id=parent_id,
        root_id=root_id,
        group_id=group_id,
        queue=opts.get("queue"),
        priority=opts.get("priority"),
        countdown=opts.get("countdown"),
        expires=opts.get("expires"),
        ignore_result=opts.get("ignore_result"),
    )


@dataclass(frozen=True)
class Chain:
    steps: tuple[Signature, ...]

    def __or__(self, other: Signature | Chain) -> Chain:
        return chain(self, other)

    def delay(self) -> AsyncResult:
        """Start the chain; the result handle is the last step's."""
        from stem.result import AsyncResult

        if not self.steps:
            raise ConfigError("an empty chain has nothing to run")
        app = self.steps[0]._app()
        wires = [s.to_wire() for s in self.steps]
        rest = [_portable(w, "chain step") for w in wires[1:]]
        first = envelope_from_wire(app, wires[0], headers={"chain": rest} if rest else None)
        app.publish([first])
        return AsyncResult(wires[-1]["id"], app)

    apply_async = delay


def chain(*steps: Signature | Chain) -> Chain:
    """Run steps one after another; each result is the first argument of the next step
    (``.si()`` signatures ignore it)."""
    flat: list[Signature] = []
    for step in steps:
        if isinstance(step, Chain):
            flat.extend(step.steps)
        elif isinstance(step, Signature):
            flat.append(step)
        else:
            raise ConfigError(f"a chain takes signatures, not {type(step).__name__}")
    return Chain(tuple(flat))


@dataclass(frozen=True)
class Group:
    members: tuple[Signature, ...]

    def _publish(self, extra_headers: Mapping[str, Any] | None = None) -> tuple[str, Stem]:
        if not self.members:
            raise ConfigError("an empty group has nothing to run")
        app = self.members[0]._app()
        gid = new_id()
        envs = []
        for i, sig in enumerate(self.members):
            hdrs = dict(extra_headers or {})
            if "chord" in hdrs:
                hdrs["chord"] = {**hdrs["chord"], "index": i}
            envs.append(
                envelope_from_wire(app, sig.to_wire(f"{gid}-{i}"), headers=hdrs, group_id=gid)
            )
        app.publish(envs)
        return gid, app

    def delay(self) -> GroupResult:
        from stem.result import AsyncResult, GroupResult

        gid, app = self._publish()
        return GroupResult(
            gid, [AsyncResult(f"{gid}-{i}", app) for i in range(len(self.members))], app
        )

    apply_async = delay


def group(*members: Signature | Iterable[Signature]) -> Group:
    """Run signatures in parallel; ``.delay()`` returns a GroupResult in member order.
    Members come one by one, or in lists, tuples or generators."""
    flat: list[Any] = []
    for m in members:
        flat.extend(m if isinstance(m, list | tuple | Iterator) else [m])
    for m in flat:
        if not isinstance(m, Signature):
            raise ConfigError(f"a group takes signatures, not {type(m).__name__}")
    return Group(tuple(flat))


@dataclass(frozen=True)
class Chord:
    header: Group
    body: Signature

    def delay(self) -> AsyncResult:
        """Run the group, then the callback once with the members' results in order."""
        from stem.result import AsyncResult

        app = self.body._app()
        for sig in self.header.members:
            task = app.tasks.get(sig.task)
            if sig.options.get("ignore_result") or (
                task is not None
                and task.options.ignore_result
                and sig.options.get("ignore_result") is not False
            ):
                raise ConfigError(
                    f"chord member {sig.task!r} ignores its result, which the callback "
                    "needs: set ignore_result=False on it"
                )
        cb = _portable(self.body.to_wire(), "chord callback")
        spec = {"size": len(self.header.members), "callback": cb}
        gid, _ = self.header._publish({"chord": spec})
        del gid
        return AsyncResult(cb["id"], app)

    apply_async = delay


def chord(header: Group | Iterable[Signature], body: Signature) -> Chord:
    if not isinstance(body, Signature):
        raise ConfigError(f"a chord's callback is one signature, not {type(body).__name__}")
    grp = header if isinstance(header, Group) else group(*header)
    return Chord(grp, body)
