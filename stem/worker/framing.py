"""Length-prefixed frames over pipes between the worker and its child processes.

A frame is a 4-byte big-endian length and that many bytes: a JSON object, optionally
followed by one raw frame (a task's message body, sent as the bytes the broker delivered,
so the parent does not re-encode what the child decodes anyway).
"""

from __future__ import annotations

import os
import struct
from typing import Any

from stem.envelope import dumps, loads
from stem.errors import DecodeError

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


class FrameTooLarge(DecodeError):
    """A frame the other side would refuse (over ``MAX_FRAME``); nothing was written."""


def write_frame(fd: int, obj: Any, body: bytes | None = None) -> None:
    """Write a JSON frame, and ``body`` as a raw frame after it, in one write. Raises
    :class:`FrameTooLarge` (writing nothing) for a frame the reader would refuse."""
    data = dumps(obj)
    for part in (data, body or b""):
        if len(part) > MAX_FRAME:
            raise FrameTooLarge(f"{len(part)} bytes, over the {MAX_FRAME >> 20} MiB frame limit")
    parts = [_HEADER.pack(len(data)), data]
    if body is not None:
        parts += [_HEADER.pack(len(body)), bytes(body)]
    buf = memoryview(b"".join(parts))
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


class FrameReader:
    """Reads frames from a pipe through a buffer (one system call for most frames). One
    reader per pipe, used by one thread; it does not close the descriptor."""

    def __init__(self, fd: int) -> None:
        # Lives as long as the pipe; whoever owns the descriptor closes it.
        self._file = open(fd, "rb", buffering=1 << 16, closefd=False)  # noqa: SIM115

    def _raw(self) -> bytes | None:
        header = self._file.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack(header)
        if length > MAX_FRAME:
            raise DecodeError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        data = self._file.read(length)
        return data if len(data) == length else None

    def frame(self) -> Any | None:
        """The next JSON frame, or None at end of stream."""
        data = self._raw()
        return None if data is None else loads(data)

    def body(self) -> bytes | None:
        """The raw frame that follows a JSON frame sent with a body, or None at the end."""
        return self._raw()
