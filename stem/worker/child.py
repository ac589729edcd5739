"""Entry point of a process-pool child: ``python -m stem.worker.child IN_FD OUT_FD``.

The child imports the operator's app (the spec arrives in the bootstrap frame, with the
worker's configuration as it resolved it: URLs, TLS, routes, keys; over the pipe so secrets
never show in ``ps``), then runs one job at a time.
It ignores SIGINT/SIGTERM (the parent drains and stops it) and exits if its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Any

from stem import envelope as codec
from stem.errors import EncodeError, SoftTimeLimitExceeded, StemError, TaskNotRegistered
from stem.observability import signals
from stem.observability.logs import setup_logging
from stem.worker.framing import FrameReader, FrameTooLarge, write_frame
from stem.worker.job import execute, failure


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(0.5)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when the worker's thread that started it
    ends (the worker killed with SIGKILL included): the watcher thread below cannot run
    while a task holds the GIL in C code, and a pool process that lives on runs its task
    beside the copy delivered again after the lease. Linux only; elsewhere the watcher."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # it died before the request took effect
        os._exit(1)


_PR_SET_PDEATHSIG = 1


class _Alarm:
    writing = False  # the main thread is writing a frame to the worker
    deferred = False  # the soft limit came meanwhile


_alarm = _Alarm()


def _on_alarm(signum: int, frame: Any) -> None:
    if _alarm.writing:
        _alarm.deferred = True
        return
    raise SoftTimeLimitExceeded("task exceeded its soft time limit")


def _on_stop_signal(signum: int, frame: Any) -> None:
    """SIGINT and SIGTERM do not stop a pool process: its worker stops it, letting its
    task finish or not. A handler, not SIG_IGN: an ignored signal stays ignored through
    fork and exec, and programs a task starts (``Popen.terminate()``) would not stop."""


def _stop_signals_as_by_default() -> None:
    """In a process the task forks: SIGINT and SIGTERM act as they would by default, at
    once (a Python handler waits for the interpreter, which a long C call holds)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str]) -> int:
    in_fd, out_fd, parent_pid = int(argv[0]), int(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, _on_stop_signal)
    signal.signal(signal.SIGTERM, _on_stop_signal)
    os.register_at_fork(after_in_child=_stop_signals_as_by_default)
    signal.signal(signal.SIGALRM, _on_alarm)
    _die_with_parent(parent_pid)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    reader = FrameReader(in_fd)
    boot = reader.frame()
    if boot is None:
        return 0
    logs = boot.get("logging")
    if isinstance(logs, dict):
        # Log as the worker does (its --log-level/--log-format), task code included.
        setup_logging(**logs, root_too=False)
    try:
        from stem.loader import load_app

        app = load_app(boot["app"])
        app.configure_child(boot["config"])
    except (StemError, ImportError, Exception) as exc:  # report any import failure, then exit
        write_frame(out_fd, {"type": "fatal", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    if isinstance(logs, dict):
        setup_logging(**logs)  # and the root, unless the app set up handlers of its own
    pid = os.getpid()
    out_lock = threading.Lock()  # tasks may report progress or publish from threads

    def send(frame: dict[str, Any]) -> None:
        # The soft limit (SIGALRM, raised in the main thread) waits while the main thread
        # writes a frame: raised part-way through, it left half a frame in the pipe and
        # the worker killed this process for it. It is raised once the frame is out.
        main = threading.current_thread() is threading.main_thread()
        with out_lock:
            _alarm.writing = main
            try:
                write_frame(out_fd, frame)
            finally:
                _alarm.writing = False
        if main and _alarm.deferred:
            _alarm.deferred = False
            raise SoftTimeLimitExceeded("task exceeded its soft time limit")

    def progress(data: dict[str, Any]) -> None:
        send({"type": "progress", "data": data})

    def published(envelope: codec.Envelope, **_: Any) -> None:
        # For the worker's task-sent events (the worker's own after_publish never sees
        # what tasks publish here). Not from a process the task forked.
        if os.getpid() == pid:
            send({"type": "sent", "sent": signals.child_published_fields(envelope)})

    signals.after_publish.connect(published)
    signals.pool_process_init.send(pid=pid)
    send({"type": "ready", "pid": pid})

    while True:
        frame = reader.frame()
        body = reader.body() if frame is not None else None
        if frame is None or body is None:
            break
        env = codec.decode(body, max_bytes=len(body))  # verified by the parent
        soft = frame.get("soft")
        try:
            task = app.get_task(env.task)
        except TaskNotRegistered as exc:
            outcome = failure(exc)
        else:
            if soft:
                signal.setitimer(signal.ITIMER_REAL, float(soft))
            try:
                outcome = execute(task, env, progress)
            except SoftTimeLimitExceeded as exc:  # fired between task return and here
                outcome = failure(exc)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        if os.getpid() != pid:
            # A process the task forked, returning instead of exiting: it must not report
            # an outcome or take jobs as if it were this pool process.
            os._exit(0)
        try:
            send({"type": "result", "outcome": outcome.to_wire()})
        except FrameTooLarge as exc:
            # Too big for the pipe to the worker (and for any result store).
            error = EncodeError(f"the task's result is too large to hand back: {exc}")
            send({"type": "result", "outcome": failure(error).to_wire()})
    signals.pool_process_shutdown.send(pid=os.getpid())
    app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
