"""How hard this process is working: the share of a core it used lately."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CpuGauge:
    """:meth:`busy` tells whether this process (all its threads) is short of CPU: it turns
    true once the process used ``threshold`` cores over a window of ``window_s`` or so, and
    false again only below ``release`` cores (so what it is used to decide, which itself
    saves CPU, does not make it flip back and forth). It reads the clocks at most once a
    window, so asking is cheap enough for a hot path."""

    def __init__(
        self,
        threshold: float = 0.75,
        release: float = 0.4,
        window_s: float = 0.1,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:
        self.threshold = threshold
        self.release = release
        self.window_s = window_s
        self._clock = clock
        self._cpu = cpu
        self._lock = threading.Lock()
        self._since = clock()
        self._cpu_since = cpu()
        self._busy = False

    def busy(self) -> bool:
        now = self._clock()
        if now - self._since < self.window_s:
            return self._busy
        with self._lock:
            elapsed = now - self._since
            if elapsed >= self.window_s:
                used = self._cpu()
                cores = (used - self._cpu_since) / elapsed
                self._busy = cores >= (self.release if self._busy else self.threshold)
                self._since, self._cpu_since = now, used
            return self._busy
