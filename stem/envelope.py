"""The envelope: one frozen, versioned record per task message, and its canonical codec.

The wire form is canonical JSON (sorted keys, compact separators, UTF-8). Times are integer
milliseconds since the epoch. Decoding is strict: unknown fields, wrong types, oversized or
too-deeply nested payloads raise :class:`~stem.errors.DecodeError` naming what is wrong, and
nothing else ever escapes the decoder. Nothing here imports code named by a message.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from stem.errors import DecodeError, EncodeError, EnvelopeTooLarge

ENVELOPE_VERSION = 1
DEFAULT_MAX_BYTES = 1024 * 1024
MAX_DEPTH = 64
PRIORITY_MIN = 0
PRIORITY_MAX = 9


def queue_problem(name: Any) -> str | None:
    """What makes ``name`` unusable as a queue name, or None: a worker must be able to name
    it on its command line (``-Q a,b``), so no spaces, commas or control characters."""
    if problem := name_problem("queue name", name):
        return problem
    if any(c.isspace() or c == "," or not c.isprintable() for c in name):
        return f"queue name {name!r} must be non-empty without spaces, commas or control characters"
    return None


_NAME_MAX = 255


def name_problem(what: str, value: Any) -> str | None:
    """Why ``value`` cannot be a task name, task id or queue name in a message, or None:
    what the decoder refuses, for producers to refuse before publishing."""
    if isinstance(value, str) and 0 < len(value) <= _NAME_MAX:
        return None
    shown = repr(value[:40]) + "..." if isinstance(value, str) and len(value) > 40 else repr(value)
    return f"{what} must be a non-empty string of at most {_NAME_MAX} characters, got {shown}"


def now_ms() -> int:
    """Wall-clock time in integer milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class SignatureBlock:
    """Who signed an envelope, when, and the signature value (base64url, no padding)."""

    algorithm: str
    key_id: str
    issued_at_ms: int
    nonce: str
    value: str


@dataclass(frozen=True, slots=True)
class Envelope:
    """A task message. Change it with :func:`dataclasses.replace`, never in place."""

    id: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str = "default"
    priority: int = 0
    not_before_ms: int | None = None
    expires_ms: int | None = None
    attempt: int = 0
    max_retries: int | None = None
    created_ms: int = 0
    parent_id: str | None = None
    root_id: str | None = None
    group_id: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    signature: SignatureBlock | None = None
    version: int = ENVELOPE_VERSION

    def replace(self, **changes: Any) -> Envelope:
        return dataclasses.replace(self, **changes)

    def is_expired(self, at_ms: int | None = None) -> bool:
        return self.expires_ms is not None and (at_ms or now_ms()) >= self.expires_ms


_FIELDS = {f.name for f in dataclasses.fields(Envelope)}
_SIG_FIELDS = {f.name for f in dataclasses.fields(SignatureBlock)}
_REQUIRED = {"id", "task", "version"}


def to_dict(env: Envelope, *, with_signature: bool = True) -> dict[str, Any]:
    d: dict[str, Any] = {
        "version": env.version,
        "id": env.id,
        "task": env.task,
        "args": list(env.args),
        "kwargs": dict(env.kwargs),
        "queue": env.queue,
        "priority": env.priority,
        "not_before_ms": env.not_before_ms,
        "expires_ms": env.expires_ms,
        "attempt": env.attempt,
        "max_retries": env.max_retries,
        "created_ms": env.created_ms,
        "parent_id": env.parent_id,
        "root_id": env.root_id,
        "group_id": env.group_id,
        "headers": dict(env.headers),
    }
    if with_signature and env.signature is not None:
        d["signature"] = signature_dict(env.signature)
    return d


def signature_dict(block: SignatureBlock, *, with_value: bool = True) -> dict[str, Any]:
    """The signature block as JSON fields (``dataclasses.asdict`` deep-copies, and is slow)."""
    d: dict[str, Any] = {
        "algorithm": block.algorithm,
        "key_id": block.key_id,
        "issued_at_ms": block.issued_at_ms,
        "nonce": block.nonce,
    }
    if with_value:
        d["value"] = block.value
    return d


_DUMPS_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS


def _fields_of(obj: Any) -> dict[str, Any]:
    """orjson's hook for what it cannot write itself. A dataclass becomes the dict of its
    fields, as ``dataclasses.asdict`` would make it, so that its keys are sorted like any
    dict's (orjson writes dataclasses in field order, and a worker that re-encodes the
    decoded dict to check a signature must get the same bytes)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def dumps(value: Any, *, user_data: Any = None) -> bytes:
    """Canonical JSON bytes (sorted keys, compact) for any JSON-able value. NaN and
    infinities are refused (orjson would silently write them as null). ``user_data``: the
    only part of ``value`` that may hold floats (the rest is known to be ints, strings and
    None), so only that part is searched when the output holds a null."""
    try:
        data = orjson.dumps(value, default=_fields_of, option=_DUMPS_OPTIONS)
    except (TypeError, orjson.JSONEncodeError):
        data = _dumps_non_str_keys(value)
    if b"null" in data and not _finite(value if user_data is None else user_data):
        raise EncodeError("value cannot be encoded as JSON: NaN or infinity is not JSON")
    return data


def _dumps_non_str_keys(value: Any) -> bytes:
    """:func:`dumps` for a value whose dicts have keys that are not strings (1, True, None,
    ...): written as strings, unless two keys of one dict would then be the same string
    (``{1: "a", "1": "b"}``). Such a body would hold a duplicate key, and a reader keeps
    only one of them: a signed message could then run with a value its signer never saw."""
    try:
        data = orjson.dumps(
            value, default=_fields_of, option=_DUMPS_OPTIONS | orjson.OPT_NON_STR_KEYS
        )
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise EncodeError(f"value cannot be encoded as JSON: {exc}") from None
    if _key_count(value) != _key_count(orjson.loads(data)):
        raise EncodeError(
            "value cannot be encoded as JSON: two keys of one dict are the same once "
            "written as strings (such as 1 and '1')"
        )
    return data


def _key_count(value: Any) -> int:
    """How many dict keys ``value`` holds, at every depth."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if type(item) in _PLAIN:
            continue
        if isinstance(item, dict):
            count += len(item)
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif dataclasses.is_dataclass(item) and not isinstance(item, type):
            fields = _fields_of(item)
            count += len(fields)
            stack.extend(fields.values())
        elif isinstance(item, enum.Enum):
            stack.append(item.value)
    return count


def _user_data(d: dict[str, Any]) -> list[Any]:
    """What may hold a float: the caller's data, and the numeric fields (typed as ints,
    but a caller can still pass ``max_retries=float("inf")``). Ids and names are strings."""
    return [
        d["args"],
        d["kwargs"],
        d["headers"],
        d["priority"],
        d["not_before_ms"],
        d["expires_ms"],
        d["attempt"],
        d["max_retries"],
        d["created_ms"],
    ]


_PLAIN = frozenset({str, int, bool, type(None)})


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind in _PLAIN:  # most items: one set lookup
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif dataclasses.is_dataclass(item):
            stack.extend(_fields_of(item).values())
        elif isinstance(item, enum.Enum):  # orjson writes an enum as its value
            stack.append(item.value)
    return True


def loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"not valid JSON: {exc}") from None


#: Bytes a message may grow by when a worker publishes it again: a retry's ``not_before_ms``
#: and longer ``attempt``, a rate-limit booking. New messages must leave this much room, or
#: one that fits at enqueue could not be retried.
REPUBLISH_HEADROOM = 96


def encode(env: Envelope, *, max_bytes: int = DEFAULT_MAX_BYTES, headroom: int = 0) -> bytes:
    """Encode to canonical JSON, refusing payloads over ``max_bytes - headroom``."""
    d = to_dict(env)
    return checked_size(env.task, dumps(d, user_data=_user_data(d)), max_bytes, headroom)


def checked_size(task: str, data: bytes, max_bytes: int, headroom: int) -> bytes:
    """``data``, unless it is over ``max_bytes - headroom`` (:class:`EnvelopeTooLarge`)."""
    if len(data) > max_bytes - headroom:
        kept = f", less {headroom} bytes kept for a retry" if headroom else ""
        raise EnvelopeTooLarge(
            f"message for task {task!r} is {len(data)} bytes, over the {max_bytes}-byte limit{kept}"
        )
    return data


def signing_bytes(env: Envelope, block: SignatureBlock | None = None) -> bytes:
    """The canonical bytes a signature covers: every field, and the signature block less its
    value (so algorithm, key id, issued-at and nonce are covered too). ``block``: the block
    to sign with, in place of the envelope's own."""
    d = to_dict(env, with_signature=False)
    sig = env.signature if block is None else block
    if sig is not None:
        d["signature"] = signature_dict(sig, with_value=False)
    return dumps(d, user_data=_user_data(d))


def with_signature_value(signed: bytes, nonce: str, value: str) -> bytes:
    """The body :func:`encode` writes for an envelope whose :func:`signing_bytes` are
    ``signed``, once its signature ``value`` is known (the inverse of :func:`signed_part`):
    ``value`` sorts last in the block, right after ``nonce``. Both are base64url, which JSON
    writes as is. The block is the last object holding this nonce: only ``task`` (a string)
    and ``version`` follow it."""
    anchor = b'"nonce":"' + nonce.encode("ascii") + b'"}'
    at = signed.rfind(anchor)
    if at < 0:
        raise EncodeError("the signed bytes hold no signature block with this nonce")
    end = at + len(anchor) - 1
    return signed[:end] + b',"value":"' + value.encode("ascii") + b'"' + signed[end:]


def signed_part(body: bytes, value: str) -> bytes | None:
    """The bytes a signature with ``value`` covered, read off a body as :func:`encode`
    writes it: the body less ``,"value":"..."``, which sorted keys put last in the
    signature block. None if the body holds no such member (it was written otherwise).

    Only the last such member is cut out. Whatever is cut, the result passes only if it is
    exactly what a key holder signed; a body whose ``value`` member sits anywhere but in the
    signature block leaves that block without a value, and such a body does not decode."""
    body = bytes(body)
    tail = b',"value":"' + value.encode("utf-8", "replace") + b'"}'
    at = body.rfind(tail)
    if at < 0:
        return None
    return body[:at] + body[at + len(tail) - 1 :]


_CONTAINERS = (dict, list)


def _depth_ok(value: Any, limit: int) -> bool:
    """Whether no dict or list in ``value`` (itself at depth 1) sits deeper than ``limit``.
    Only containers go on the stack: most values in a message are scalars."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, _CONTAINERS):
                stack.append((child, depth + 1))
    return True


def _opt_int(d: Mapping[str, Any], key: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if type(v) is not int:
        raise DecodeError(f"field {key!r} must be an integer or null, got {type(v).__name__}")
    return v


def _opt_str(d: Mapping[str, Any], key: str) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or len(v) > _NAME_MAX:
        raise DecodeError(f"field {key!r} must be a string of at most {_NAME_MAX} characters")
    return v


def _req_str(d: Mapping[str, Any], key: str) -> str:
    v = _opt_str(d, key)
    if not v:
        raise DecodeError(f"field {key!r} is required and must be a non-empty string")
    return v


def _signature(raw: Any) -> SignatureBlock | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.keys() != _SIG_FIELDS:
        raise DecodeError(f"field 'signature' must be an object with keys {sorted(_SIG_FIELDS)}")
    algorithm, key_id, issued, nonce, value = (
        raw["algorithm"],
        raw["key_id"],
        raw["issued_at_ms"],
        raw["nonce"],
        raw["value"],
    )
    for k, v in (("algorithm", algorithm), ("key_id", key_id), ("nonce", nonce), ("value", value)):
        if not isinstance(v, str):
            raise DecodeError(f"field 'signature.{k}' must be a string")
    if type(issued) is not int:
        raise DecodeError("field 'signature.issued_at_ms' must be an integer")
    return SignatureBlock(algorithm, key_id, issued, nonce, value)


def from_dict(d: Any) -> Envelope:
    """Build an envelope from decoded JSON, validating every field."""
    if not isinstance(d, dict):
        raise DecodeError(f"message must be a JSON object, got {type(d).__name__}")
    keys = d.keys()
    if not keys <= _FIELDS:
        unknown = keys - _FIELDS
        raise DecodeError(f"unknown field(s) in message: {', '.join(sorted(unknown))}")
    if not keys >= _REQUIRED:
        missing = _REQUIRED - keys
        raise DecodeError(f"missing field(s) in message: {', '.join(sorted(missing))}")
    version = d["version"]
    if type(version) is not int or version != ENVELOPE_VERSION:
        raise DecodeError(f"unsupported message version {version!r} (this Stem reads 1)")
    args = d.get("args", [])
    kwargs = d.get("kwargs", {})
    headers = d.get("headers", {})
    if not isinstance(args, list):
        raise DecodeError("field 'args' must be a list")
    if not isinstance(kwargs, dict):
        raise DecodeError("field 'kwargs' must be an object")
    if not isinstance(headers, dict):
        raise DecodeError("field 'headers' must be an object")
    if not _depth_ok([args, kwargs, headers], MAX_DEPTH):
        raise DecodeError(f"message nests deeper than {MAX_DEPTH} levels")
    priority = d.get("priority", 0)
    if type(priority) is not int or not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise DecodeError(f"field 'priority' must be an integer {PRIORITY_MIN}..{PRIORITY_MAX}")
    attempt = d.get("attempt", 0)
    if type(attempt) is not int or attempt < 0:
        raise DecodeError("field 'attempt' must be a non-negative integer")
    max_retries = _opt_int(d, "max_retries")
    if max_retries is not None and max_retries < 0:
        raise DecodeError("field 'max_retries' must be a non-negative integer or null")
    return Envelope(
        id=_req_str(d, "id"),
        task=_req_str(d, "task"),
        args=tuple(args),
        kwargs=kwargs,
        queue=_req_str(d, "queue") if "queue" in d else "default",
        priority=priority,
        not_before_ms=_opt_int(d, "not_before_ms"),
        expires_ms=_opt_int(d, "expires_ms"),
        attempt=attempt,
        max_retries=max_retries,
        created_ms=_opt_int(d, "created_ms") or 0,
        parent_id=_opt_str(d, "parent_id"),
        root_id=_opt_str(d, "root_id"),
        group_id=_opt_str(d, "group_id"),
        headers=headers,
        signature=_signature(d.get("signature")),
        version=version,
    )


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Envelope:
    """Decode wire bytes. Raises only :class:`DecodeError` (or its subclass)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"message body must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise EnvelopeTooLarge(f"message is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        return from_dict(loads(bytes(data)))
    except DecodeError:
        raise
    except (RecursionError, ValueError, TypeError, KeyError) as exc:
        raise DecodeError(f"malformed message: {type(exc).__name__}: {exc}") from None
