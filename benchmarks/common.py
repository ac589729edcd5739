"""Measurement helpers shared by the Stem harness and the peer scripts.

Standard library only: the peer scripts import this from ``benchmarks/.peers-venv``, where
Stem is not installed. Every workload here is timed with ``time.perf_counter``.

What "drain" measures, for every library alike: the worker is started on a queue that
already holds the whole batch; the clock starts when the worker says it is ready (Stem:
sd_notify ``READY=1``; Celery: its ``worker_ready`` signal; Dramatiq: every worker process
after booting), so interpreter start-up, imports and connecting are not counted; it stops
when a poll of the broker finds no message of the queue left (Stem and Dramatiq: nothing
ready or leased, so every task ran and was acknowledged; Celery acknowledges on receipt by
default, so up to its prefetch window may still be running then: at most 8 tasks).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: Environment variable naming the datagram socket a benchmark worker reports readiness on.
#: Stem's worker speaks sd_notify there; the peer apps send ``READY=1`` from a boot hook.
NOTIFY_ENV = "NOTIFY_SOCKET"


@dataclass
class Result:
    """One library on one broker: rates in tasks/s, latencies in ms (None: not measured)."""

    library: str
    broker: str
    tasks: int
    config: str = ""
    enqueue_single_per_s: float | None = None
    enqueue_bulk_per_s: float | None = None
    bulk_how: str = ""
    drain_per_s: float | None = None
    drain_results_per_s: float | None = None
    rt_p50_ms: float | None = None
    rt_p99_ms: float | None = None
    rt_n: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class ReadySocket:
    """A unix datagram socket that worker processes send ``READY=1`` to."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="stem-bench-notify-")
        self.path = os.path.join(self._dir, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.path)

    def env(self) -> dict[str, str]:
        return {NOTIFY_ENV: self.path}

    def wait_ready(
        self, count: int, timeout_s: float, alive: Callable[[], bool] | None = None
    ) -> float:
        """Block until ``count`` datagrams containing ``READY=1`` arrived; return the
        ``perf_counter`` time the last one was read. Raises ``TimeoutError``, or
        ``RuntimeError`` if ``alive()`` turns false first."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while seen < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"worker not ready after {timeout_s:.0f}s ({seen}/{count})")
            if alive is not None and not alive():
                raise RuntimeError("the worker exited before it was ready")
            self._sock.settimeout(min(remaining, 0.5))
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            if b"READY=1" in data.split(b"\n"):
                seen += 1
        return time.perf_counter()

    def drain_pending(self) -> None:
        """Forget datagrams left from an earlier worker (watchdog pings, STOPPING=1)."""
        self._sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._sock.recv(4096)
        self._sock.setblocking(True)

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


def notify_ready() -> None:
    """For the peer apps' boot hooks: say ``READY=1`` on ``$NOTIFY_SOCKET`` if it is set."""
    path = os.environ.get(NOTIFY_ENV)
    if not path:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1\n", path)


def wait_drained(outstanding: Callable[[], int], total: int, timeout_s: float) -> float:
    """Poll ``outstanding()`` until it is 0; return the ``perf_counter`` time it was seen 0.

    The poll interval adapts: about half the time the rest should take at the rate seen so
    far, between 2 ms and 250 ms. Counting a large queue is not free on SQL brokers, so the
    broker is asked rarely while the queue is long and often when it is nearly empty; the
    end is seen within a few milliseconds."""
    start = time.perf_counter()
    deadline = start + timeout_s
    while True:
        left = outstanding()
        now = time.perf_counter()
        if left <= 0:
            return now
        if now > deadline:
            raise TimeoutError(f"{left} of {total} tasks still queued after {timeout_s:.0f}s")
        done = total - left
        if done <= 0:
            pause = 0.02
        else:
            rate = done / max(now - start, 1e-6)
            pause = min(0.25, max(0.002, left / rate / 2))
        time.sleep(pause)


def percentiles(latencies_ms: Sequence[float]) -> tuple[float, float]:
    """(p50, p99) with the nearest-rank method for p99."""
    ordered = sorted(latencies_ms)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, max(0, round(len(ordered) * 0.99) - 1))]
    return p50, p99


def round_trips(one: Callable[[], object], n: int, warmup: int = 20) -> tuple[float, float]:
    """Time ``n`` sequential calls of ``one`` (enqueue + wait for the result) after
    ``warmup`` untimed ones; return (p50, p99) in milliseconds."""
    for _ in range(warmup):
        one()
    lat: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        one()
        lat.append((time.perf_counter() - t) * 1000)
    return percentiles(lat)


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group:
    a worker and its pool processes (each worker runs in a session of its own)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state ppid pgrp ... utime(12) stime(13), 0-based from state
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / tick


def redis_cpu_s(url: str) -> float | None:
    """CPU seconds the Redis server at ``url`` has used (INFO cpu), or None if unknown."""
    try:
        import redis
    except ImportError:
        return None
    try:
        with redis.Redis.from_url(url) as client:
            info = client.info("cpu")
    except redis.RedisError:
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


@contextlib.contextmanager
def worker_process(
    argv: Sequence[str], env: dict[str, str], log_path: Path, *, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a worker command with its output in ``log_path``; SIGTERM it on exit (SIGKILL
    after 30 s) and say where its log is if it failed."""
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our terminal's Ctrl-C reaches the harness only
        )
    try:
        yield proc
    except BaseException:
        print(f"worker log: {log_path}", file=sys.stderr)
        raise
    finally:
        stop_process_group(proc)


def stop_process_group(proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    """SIGTERM the worker (it stops its own pool), SIGKILL its process group if it does not
    exit in time, and SIGKILL whatever of the group outlived it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()
    # Children that outlived their parent (a prefork pool) go with the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)


def emit(results: Sequence[Result], json_path: str | None) -> None:
    """Write results as JSON to ``json_path`` (``-``: stdout)."""
    if json_path is None:
        return
    payload = json.dumps([r.to_json() for r in results], indent=2)
    if json_path == "-":
        print(payload)
    else:
        Path(json_path).write_text(payload + "\n")
