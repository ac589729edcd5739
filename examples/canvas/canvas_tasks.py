from __future__ import annotations

import os

from stem import Stem

DB = os.environ.get("STEM_CANVAS_DB", "var/stem.db")
app = Stem("canvas", broker=f"sqlite:///{DB}")


@app.task(name="canvas.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.mul")
def mul(x: int, y: int) -> int:
    return x * y


@app.task(name="canvas.total")
def total(values: list[int]) -> int:
    return sum(values)
