"""Frames between the worker and its pool processes."""

from __future__ import annotations

import os
import struct

import pytest

from stem.errors import DecodeError
from stem.worker.framing import MAX_FRAME, FrameReader, write_frame


def test_frames_and_bodies_round_trip_in_order() -> None:
    r, w = os.pipe()
    try:
        reader = FrameReader(r)
        write_frame(w, {"soft": 2.5}, b'{"id":"a"}')
        write_frame(w, {"type": "ready"})
        write_frame(w, {"soft": None}, b"")
        assert reader.frame() == {"soft": 2.5}
        assert reader.body() == b'{"id":"a"}'
        assert reader.frame() == {"type": "ready"}
        assert reader.frame() == {"soft": None}
        assert reader.body() == b""
    finally:
        os.close(w)
    assert reader.frame() is None  # end of stream
    os.close(r)


def test_a_frame_cut_short_reads_as_end_of_stream() -> None:
    r, w = os.pipe()
    os.write(w, struct.pack(">I", 10) + b"abc")
    os.close(w)
    assert FrameReader(r).frame() is None
    os.close(r)


def test_an_oversized_frame_is_refused_before_it_is_read() -> None:
    r, w = os.pipe()
    os.write(w, struct.pack(">I", MAX_FRAME + 1))
    os.close(w)
    with pytest.raises(DecodeError, match="exceeds"):
        FrameReader(r).frame()
    os.close(r)
