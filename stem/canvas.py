"""Signatures: a task name with arguments and options, ready to be sent or composed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.result import AsyncResult


@dataclass(frozen=True)
class Signature:
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    immutable: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    app: Stem | None = field(default=None, compare=False, repr=False)

    def set(self, **options: Any) -> Signature:
        return Signature(
            self.task, self.args, self.kwargs, self.immutable, {**self.options, **options}, self.app
        )

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        if self.app is None:
            raise RuntimeError("signature is not bound to an app")
        return self.app.send_task(
            self.task, (*self.args, *args), {**self.kwargs, **kwargs}, **self.options
        )
