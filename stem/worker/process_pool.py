"""The process pool: one child process per slot, spoken to over pipes in JSON frames.

Children are started as ``python -m stem.worker.child`` (no fork of a threaded parent, no
pickle). A hard time limit kills the child with SIGKILL; its reader thread sees the pipe
close, records the failure and starts a replacement, so the worker carries on.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from stem.errors import HardTimeLimitExceeded, StemError, WorkerLost
from stem.observability import signals
from stem.worker.framing import FrameReader, write_frame
from stem.worker.job import Job, Outcome, autoretries, failure
from stem.worker.pools import Done, Progress

log = logging.getLogger("stem.worker.process")

# How long a new pool process may take to say it is ready (it imports the app).
START_TIMEOUT_S = 120.0


@dataclass(eq=False)
class _Child:
    proc: subprocess.Popen[bytes]
    to_child: int
    from_child: int
    reader: FrameReader
    job: Job | None = None
    retiring: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def _waited_past_limit(job: Job) -> str:
    return (
        f"task {job.task.name!r} exceeded its hard time limit of {job.hard_limit_s}s "
        "waiting for a pool process; it did not start"
    )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a pool process and every process in its group (what its task forked)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()  # the group is gone already (or never formed): the process alone


class ProcessPool:
    name = "process"

    def __init__(
        self,
        size: int,
        done: Done,
        progress: Progress | None = None,
        *,
        bootstrap: dict[str, Any],
    ) -> None:
        if not bootstrap.get("app"):
            raise StemError(
                "the process pool needs the app as an import path: run the worker with "
                "--app package.module:app (or use --pool thread)"
            )
        self.size = size
        self._done = done
        self._progress = progress
        self._bootstrap = bootstrap
        self._children: set[_Child] = set()
        self._idle: queue.SimpleQueue[_Child] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._resize_lock = threading.Lock()
        self._stopping = False
        self._spawns: queue.SimpleQueue[Future[_Child] | None] = queue.SimpleQueue()
        self._spawner = threading.Thread(
            target=self._spawn_loop, name="stem-child-spawner", daemon=True
        )
        self._spawner.start()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> _Child:
        """Start a pool process, always from the pool's spawner thread: a pool process
        has the kernel kill it when the thread that started it ends (PR_SET_PDEATHSIG, so
        that it never outlives a worker killed with SIGKILL, even while its task holds the
        GIL), so that thread must live as long as the pool."""
        if threading.current_thread() is self._spawner:
            return self._start_child()
        started: Future[_Child] = Future()
        with self._lock:  # never queued behind the spawner's end (stop)
            if self._stopping:
                raise StemError("the pool is stopping: no new pool process")
            self._spawns.put(started)
        return started.result()

    def _spawn_loop(self) -> None:
        while (started := self._spawns.get()) is not None:
            if not started.set_running_or_notify_cancel():
                continue
            try:
                started.set_result(self._start_child())
            except BaseException as exc:  # the caller raises it; this thread must live on
                started.set_exception(exc)

    def _start_child(self) -> _Child:
        c_in, p_out = os.pipe()  # parent writes jobs, child reads
        p_in, c_out = os.pipe()  # child writes outcomes, parent reads
        try:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stem.worker.child",
                    str(c_in),
                    str(c_out),
                    str(os.getpid()),
                ],
                pass_fds=(c_in, c_out),
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # Its own process group: a kill reaches what its task forked too, which
                # would otherwise keep the outcome pipe open and the slot taken.
                process_group=0,
            )
        except BaseException:
            os.close(p_out)
            os.close(p_in)
            raise
        finally:
            os.close(c_in)
            os.close(c_out)
        child = _Child(proc, p_out, p_in, FrameReader(p_in))
        try:
            write_frame(p_out, self._bootstrap)
            first = self._first_frame(child)
        except OSError as exc:  # it exited before reading its bootstrap, say
            first = {"error": f"{type(exc).__name__}: {exc}"}
        if first is None or first.get("type") != "ready":
            code = self._discard(child)
            error = (first or {}).get("error") or f"exited with code {code}"
            raise StemError(f"pool process failed to start: {error}")
        with self._lock:
            # A pool stopped meanwhile has taken its snapshot of the processes to stop:
            # this one would outlive it (and take a job handed back already).
            stopping = self._stopping
            if not stopping:
                self._children.add(child)
        if stopping:
            self._discard(child)
            raise StemError("the pool is stopping: no new pool process")
        threading.Thread(
            target=self._reader, args=(child,), name=f"stem-child-{proc.pid}", daemon=True
        ).start()
        self._idle.put(child)
        return child

    def _discard(self, child: _Child) -> int:
        """Kill a pool process that will not be used, close its pipes, reap it; its exit
        code."""
        _kill(child.proc)
        self._close(child)
        return child.proc.wait()

    @staticmethod
    def _first_frame(child: _Child) -> dict[str, Any] | None:
        """The pool process's first frame ("ready"), or an error if it says nothing for
        START_TIMEOUT_S: one hung while importing the app would hold up every later start
        (they all go through the spawner thread)."""
        ready, _, _ = select.select([child.from_child], [], [], START_TIMEOUT_S)
        if not ready:
            return {"error": f"no word from it within {START_TIMEOUT_S:.0f}s (stuck importing?)"}
        return child.reader.frame()

    @staticmethod
    def _close_writer(child: _Child) -> None:
        """Closing the child's input makes it exit after its current job."""
        with child.lock:
            fd, child.to_child = child.to_child, -1
        if fd >= 0:
            os.close(fd)

    def _close(self, child: _Child) -> None:
        self._close_writer(child)
        with child.lock:
            fd, child.from_child = child.from_child, -1
        if fd >= 0:
            os.close(fd)

    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._children]

    # -- running ---------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        while True:
            try:
                child = self._idle.get(timeout=0.5)
            except queue.Empty:
                if self._stopping:
                    return  # no process will come: shutdown hands the job back
                continue
            if child.retiring or child.proc.poll() is not None:
                continue  # stale entry for a child that is gone or going
            break
        if self._stopping or job.settled:  # handed back meanwhile (shutdown): not run here
            self._idle.put(child)
            return
        with child.lock:
            child.job = job
        if job.hard_fired:
            # Its hard limit passed while it waited for a pool process (a replacement still
            # starting): on_hard_limit found no process to kill then. It does not start.
            with child.lock:
                if child.job is job:
                    child.job = None
            self._idle.put(child)
            self._done(job, failure(HardTimeLimitExceeded(_waited_past_limit(job))))
            return
        # The delivered bytes, which the parent verified; the child decodes them itself.
        try:
            write_frame(child.to_child, {"soft": job.soft_limit_s}, job.delivery.body)
        except OSError:
            # The child died; its reader reports WorkerLost for this job and replaces it.
            _kill(child.proc)

    def _reader(self, child: _Child) -> None:
        while True:
            try:
                frame = child.reader.frame()
            except (OSError, StemError) as exc:
                # A frame we cannot read (over the limit, garbled): the child may be blocked
                # writing the rest of it, so it is killed, not waited for.
                log.error(
                    "bad frame from pool process %s (%s); killing it",
                    child.proc.pid,
                    exc,
                    extra={"event": "pool-frame-failed"},
                )
                _kill(child.proc)
                frame = None
            if frame is None:
                break
            kind = frame.get("type")
            if kind == "progress" and child.job is not None and self._progress is not None:
                self._progress(child.job, frame["data"])
            elif kind == "sent":
                fields = frame.get("sent")
                if isinstance(fields, dict) and signals.child_published.has_receivers:
                    signals.child_published.send(
                        **{k: fields.get(k) for k in signals.CHILD_PUBLISHED_FIELDS if k in fields}
                    )
            elif kind == "result":
                with child.lock:
                    job, child.job = child.job, None
                if job is not None:
                    self._done(job, Outcome.from_wire(frame["outcome"]))
                if child.retiring:
                    self._close_writer(child)
                else:
                    self._idle.put(child)
        self._on_exit(child)

    def _on_exit(self, child: _Child) -> None:
        code = child.proc.wait()
        self._close(child)
        with self._lock:
            self._children.discard(child)
        with child.lock:
            job, child.job = child.job, None
        if job is not None:
            if job.hard_fired:
                # Fails the task, as on every pool: never retried, autoretry_for or not.
                hard = HardTimeLimitExceeded(
                    f"task {job.task.name!r} exceeded its hard time limit of {job.hard_limit_s}s"
                    " and its process was killed"
                )
                self._done(job, failure(hard))
            else:
                lost = WorkerLost(f"pool process {child.proc.pid} exited with code {code}")
                # Raised in this process, not in the task: autoretry_for still decides.
                self._done(job, failure(lost, autoretry=autoretries(job.task, lost)))
        if not self._stopping and not child.retiring:
            log.warning(
                "pool process %s exited (%s); starting a replacement",
                child.proc.pid,
                code,
                extra={"event": "pool-process-replaced"},
            )
            self._replace()

    def _replace(self, delay_s: float = 0.0) -> None:
        """Start a pool process in place of one that exited; if it cannot start (the app
        fails to import after a bad deploy, say), try again in the background with a
        growing delay until it does, rather than run short of a process for good."""
        if delay_s:
            time.sleep(delay_s)
        if self._stopping:
            return
        try:
            self._spawn()
        except (StemError, OSError):
            retry_in = min(30.0, max(1.0, delay_s * 2))
            log.exception(
                "could not replace pool process; trying again in %.0fs",
                retry_in,
                extra={"event": "pool-process-spawn-failed"},
            )
            threading.Thread(
                target=self._replace, args=(retry_in,), name="stem-child-respawn", daemon=True
            ).start()

    def on_soft_limit(self, job: Job) -> None:
        """Soft limits are raised inside the child by its own timer."""

    def on_hard_limit(self, job: Job) -> None:
        with self._lock:
            children = list(self._children)
        for child in children:
            if child.job is job:
                _kill(child.proc)

    def resize(self, size: int) -> None:
        # One at a time: two (control and autoscale) reading the same size both grew it.
        with self._resize_lock:
            self._resize(max(1, size))

    def _resize(self, size: int) -> None:
        with self._lock:
            delta = size - self.size
            if delta <= 0:
                self.size = size
        for _ in range(delta):
            self._spawn()  # may raise: the size then counts the processes that did start
            with self._lock:
                self.size += 1
        retire = -delta
        while retire > 0:
            # Retire an idle child now; if none is idle the next one to finish retires.
            try:
                child = self._idle.get_nowait()
            except queue.Empty:
                with self._lock:
                    busy = [c for c in self._children if not c.retiring]
                if busy:
                    busy[0].retiring = True
                retire -= 1
                continue
            if child.retiring or child.proc.poll() is not None:
                continue  # a stale entry (a process gone or going): retires nothing
            child.retiring = True
            self._close_writer(child)
            retire -= 1

    def stop(self, *, kill: bool) -> None:
        with self._lock:
            self._stopping = True  # no start is queued after this
            children = list(self._children)
        for child in children:
            child.retiring = True
            if kill:
                _kill(child.proc)
            else:
                self._close_writer(child)
        for child in children:
            try:
                child.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill(child.proc)
                child.proc.wait()
        # Only now: the kernel kills the pool processes when their starting thread ends
        # (PR_SET_PDEATHSIG), which would cut short a graceful stop (and the app's
        # pool_process_shutdown receivers).
        self._spawns.put(None)
