"""Length-prefixed JSON frames over pipes between the worker and its child processes."""

from __future__ import annotations

import os
import struct
from typing import Any

from stem.envelope import dumps, loads
from stem.errors import DecodeError

_HEADER = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


def write_frame(fd: int, obj: Any) -> None:
    data = dumps(obj)
    buf = memoryview(_HEADER.pack(len(data)) + data)
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int) -> Any | None:
    """The next frame, or None at end of stream."""
    header = _read_exact(fd, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise DecodeError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    data = _read_exact(fd, length)
    if data is None:
        return None
    return loads(data)
