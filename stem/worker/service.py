"""Running a worker as a system service: the sd_notify protocol, a state file, and the glue
that ties both to the worker's lifecycle signals.

sd_notify is one datagram of newline-separated ``KEY=VALUE`` lines sent to the unix socket
that ``$NOTIFY_SOCKET`` names: a filesystem path, or an abstract-namespace name written with
a leading ``@``. We speak it directly rather than through libsystemd: it is a few lines, and
the same client serves ``stem-multi``, which listens on a socket of its own to learn when
each node it started is ready.

What a worker says, and when:

* ``READY=1`` (with ``MAINPID`` and a ``STATUS``) once it consumes (``signals.worker_ready``);
* ``WATCHDOG=1`` on each heartbeat, but only while ``Worker.health()["consuming"]`` is true,
  so a worker whose consumer loop is wedged or whose broker stopped answering is restarted
  by systemd's ``WatchdogSec=`` instead of looking alive forever;
* ``STOPPING=1`` when it starts draining (``signals.worker_shutting_down``).

The state file is a JSON snapshot of ``Worker.health()`` rewritten atomically on every
heartbeat; ``stem health`` reads it to answer probes without talking to the worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stem.errors import ConfigError
from stem.observability import signals

if TYPE_CHECKING:
    from stem.worker.consumer import Worker

log = logging.getLogger("stem.worker.service")

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
STATE_FILE_ENV = "STEM_WORKER_STATE_FILE"
#: Set by ``stem-multi`` for each node: the pidfile the node removes when it exits.
PIDFILE_ENV = "STEM_MULTI_PIDFILE"
STATE_FILE_MODE = 0o640  # group-readable, so a probe running in the service's group can read it

_KEY_RE = re.compile(r"[A-Z][A-Z0-9_]*")


def notify_address(value: str | None) -> str | None:
    """The address ``$NOTIFY_SOCKET`` names, as Python's ``AF_UNIX`` sockets take it: a path
    as is, an abstract name (``@name``) with a leading NUL. ``None`` when unset or of a kind
    we do not speak (``vsock:`` addresses of virtual machines)."""
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval_s(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """How often to send ``WATCHDOG=1``: half of ``$WATCHDOG_USEC`` (systemd's advice), or
    ``None`` when no watchdog is armed for this process (unset or invalid ``WATCHDOG_USEC``,
    or a ``WATCHDOG_PID`` naming another process, as after inheriting the environment).

    The worker's heartbeat interval should be at most this value."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


class Notifier:
    """An sd_notify client. Every method is a no-op returning ``False`` when no notify
    socket is configured, and never raises: a service manager that went away must not take
    the worker down with it."""

    def __init__(self, address: str | None) -> None:
        self.address = notify_address(address)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._delivered = False
        self._failed = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get(NOTIFY_SOCKET_ENV))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines. Values are made single-line."""
        lines = []
        for key, value in fields.items():
            if not _KEY_RE.fullmatch(key):
                raise ValueError(f"not an sd_notify variable name: {key!r}")
            text = " ".join(str(value).splitlines())
            lines.append(f"{key}={text}")
        return self.send("\n".join(lines) + "\n")

    def send(self, message: str) -> bool:
        if self.address is None:
            return False
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(message.encode(), self.address)
            except OSError as exc:
                # Warn once, and only if nothing ever got through: a listener that went away
                # after READY (stem-multi exits once its nodes are up) refuses every later
                # datagram, which is expected, and each heartbeat would log the same line.
                loud = not self._failed and not self._delivered
                level = logging.WARNING if loud else logging.DEBUG
                self._failed = True
                log.log(
                    level,
                    "sd_notify to %s failed: %s",
                    self.address.replace("\0", "@"),
                    exc,
                    extra={"event": "sd-notify-failed"},
                )
                return False
            self._delivered = True
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1, "MAINPID": os.getpid()}
        if status:
            fields["STATUS"] = status
        return self.notify(**fields)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify(STOPPING=1, **({"STATUS": status} if status else {}))

    def watchdog(self, status: str | None = None) -> bool:
        return self.notify(WATCHDOG=1, **({"STATUS": status} if status else {}))

    def status(self, status: str) -> bool:
        return self.notify(STATUS=status)

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


class StateFile:
    """A JSON snapshot written atomically: a temporary file in the same directory, then a
    rename, so a reader sees the previous snapshot or the next one and never half of one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._warned = False

    def write(self, data: Mapping[str, Any]) -> bool:
        payload = json.dumps(data, sort_keys=True, default=str).encode() + b"\n"
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, STATE_FILE_MODE
            )
            try:
                os.write(fd, payload)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(
                level,
                "cannot write the state file %s: %s",
                self.path,
                exc.strerror or exc,
                extra={"event": "state-file-failed"},
            )
            return False
        return True


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state file. Raises ``OSError`` if it cannot be read and ``ValueError`` if it
    does not hold a JSON object."""
    data = json.loads(Path(path).read_bytes())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def remove_pidfile_if_ours(path: str | os.PathLike[str], pid: int | None = None) -> bool:
    """Remove a pidfile if it still names this process (a newer node may own it by now)."""
    me = os.getpid() if pid is None else pid
    try:
        if int(Path(path).read_text().strip() or "0") != me:
            return False
        os.unlink(path)
    except (OSError, ValueError):
        return False
    return True


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not count: it has exited, nobody reaped it)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is just not ours
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs to ask: kill(0) is all we know
    # The state letter follows the command name, which is in parentheses and may hold ")".
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def _summary(health: Mapping[str, Any]) -> str:
    processed = health.get("processed") or {}
    total = sum(int(v) for v in processed.values()) if isinstance(processed, dict) else 0
    return (
        f"{health.get('running', 0)}/{health.get('concurrency', '?')} running, "
        f"{total} processed, queues {','.join(health.get('queues') or [])}"
    )


class ServiceHooks:
    """What :func:`attach` connected; :meth:`detach` disconnects it (the worker's shutdown
    does so by itself)."""

    def __init__(
        self,
        worker: Worker,
        notifier: Notifier | None,
        state: StateFile | None,
        pidfile: str | None,
    ) -> None:
        self.worker = worker
        self.notifier = notifier
        self.state = state
        self.pidfile = pidfile
        self._receivers = (
            (signals.worker_ready, self._on_ready),
            (signals.heartbeat, self._on_heartbeat),
            (signals.worker_shutting_down, self._on_shutting_down),
            (signals.worker_shutdown, self._on_shutdown),
        )
        for sig, receiver in self._receivers:
            sig.connect(receiver)

    def detach(self) -> None:
        for sig, receiver in self._receivers:
            sig.disconnect(receiver)
        if self.notifier is not None:
            self.notifier.close()

    def _write(self, phase: str, health: Mapping[str, Any] | None = None) -> None:
        if self.state is None:
            return
        snapshot = dict(self.worker.health() if health is None else health)
        snapshot["phase"] = phase
        snapshot["heartbeat_s"] = self.worker.config.heartbeat_s
        # What `stem-multi stopwait` waits for: this node's own drain budget, whatever layer
        # (flag, variable, YAML) set it.
        snapshot["shutdown_budget_s"] = self.worker.config.shutdown_budget_s
        if phase == "stopped":
            snapshot["consuming"] = False
        self.state.write(snapshot)

    def _on_ready(self, worker: Worker, **_: Any) -> None:
        if worker is not self.worker:
            return
        self._write("ready")
        if self.notifier is not None:
            cfg = worker.config
            self.notifier.ready(
                f"{worker.name}: consuming {','.join(cfg.queues)} "
                f"with {worker.pool.size} {cfg.pool} slot(s)"
            )

    def _on_heartbeat(self, worker: Worker, health: Mapping[str, Any], **_: Any) -> None:
        if worker is not self.worker:
            return
        self._write("draining" if health.get("draining") else "running", health)
        if self.notifier is None:
            return
        if health.get("consuming"):
            self.notifier.watchdog(_summary(health))
        else:
            # No WATCHDOG=1: if this lasts past WatchdogSec=, systemd restarts the node.
            self.notifier.status("not consuming: the broker has not answered recently")

    def _on_shutting_down(self, worker: Worker, **_: Any) -> None:
        if worker is not self.worker:
            return
        if self.notifier is not None:
            self.notifier.stopping(
                f"draining {len(worker.inflight)} task(s) for up to "
                f"{worker.config.shutdown_budget_s:g}s"
            )
        self._write("draining")

    def _on_shutdown(self, worker: Worker, **_: Any) -> None:
        if worker is not self.worker:
            return
        self._write("stopped")
        if self.pidfile:
            remove_pidfile_if_ours(self.pidfile)
        self.detach()


def attach(
    worker: Worker,
    *,
    state_file: str | None,
    notify: bool,
    pidfile: str | None = None,
) -> ServiceHooks:
    """Connect a worker's lifecycle to its service manager.

    ``state_file``: where to keep the JSON health snapshot (``None``: none).
    ``notify``: speak sd_notify when ``$NOTIFY_SOCKET`` is set (a no-op otherwise).
    ``pidfile``: removed when the worker stops if it still names this process; defaults to
    ``$STEM_MULTI_PIDFILE``, which ``stem-multi`` sets for the nodes it starts.

    Call it before ``worker.run()``. Read :func:`watchdog_interval_s` first to size the
    heartbeat: the watchdog is fed from the heartbeat."""
    notifier = Notifier.from_environ() if notify else None
    if notifier is not None and not notifier.enabled:
        notifier = None
    if state_file and not Path(state_file).parent.is_dir():
        # Not a warning to miss: `stem health` and stopwait would find no node there.
        raise ConfigError(
            f"state file {state_file}: the directory {Path(state_file).parent} does not exist"
        )
    state = StateFile(state_file) if state_file else None
    return ServiceHooks(worker, notifier, state, pidfile or os.environ.get(PIDFILE_ENV))
