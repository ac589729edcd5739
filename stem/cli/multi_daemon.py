"""The process side of ``stem-multi``: pidfiles, privilege drop, daemonizing, readiness.

How a node starts: ``stem-multi`` forks; the child enters a python-daemon ``DaemonContext``
(double fork and ``setsid``, umask 0027, working directory, all privileges dropped to
``--user``/``--group`` including supplementary groups, descriptors closed, stdout and stderr
to the node's log file, and the pidfile created with ``O_EXCL`` by the daemon itself), then
``exec``\\ s the ``stem worker`` command. So the pid in the pidfile *is* the worker's pid,
whatever runs the node is visible in ``ps`` as itself, and a second start cannot race the
first: the pidfile is created exclusively. ``exec`` skips python-daemon's own pidfile
cleanup, so the node removes its pidfile when it stops (``$STEM_MULTI_PIDFILE``, see
:func:`stem.worker.service.attach`); ``stop``/``stopwait``/``kill`` remove what a node that
died left behind.

A pipe that closes on ``exec`` tells the parent whether the exec happened (EOF) or what
failed before it (the message). The parent then waits for ``READY=1`` from the node on an
abstract sd_notify socket of its own, checking the sender's pid with ``SCM_CREDENTIALS``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pwd
import signal
import socket
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from stem.worker.service import PIDFILE_ENV, STATE_FILE_ENV, pid_alive

UMASK = 0o027
DIR_MODE = 0o750
LOG_MODE = 0o640
# Variables a node must not inherit from whatever started stem-multi (systemd's for the
# stem-multi unit itself): the node answers to stem-multi, not to the unit's manager.
_SERVICE_MANAGER_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "MAINPID",
)


class MultiExit(IntEnum):
    """``stem-multi``'s exit codes (stable; the init scripts rely on them). ``status`` uses
    the LSB ``status`` codes 0, 1 and 3; the other values are not used by ``status``."""

    OK = 0
    STALE = 1  # status: a node is dead but its pidfile remains
    USAGE = 2  # bad command line
    NOT_RUNNING = 3  # status: a node is not running
    UNKNOWN = 4  # status: a node's pidfile or process cannot be looked at by this user
    START_FAILED = 7  # start/restart: a node did not come up (LSB "program is not running")
    SOFTWARE = 70  # internal error
    STOP_TIMEOUT = 75  # stopwait/restart: a node still runs after the timeout
    NOPERM = 77  # cannot drop privileges, or cannot write a pidfile/log as the user
    CONFIG = 78  # unknown user or group, bad template


class LaunchError(Exception):
    def __init__(self, message: str, code: MultiExit = MultiExit.START_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Identity:
    """Who a node runs as (``--user``/``--group``)."""

    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class Node:
    name: str
    index: int
    pidfile: Path
    logfile: Path
    state_file: Path | None
    argv: tuple[str, ...]
    stop_timeout_s: float


@dataclass(frozen=True)
class PidState:
    state: str  # "running", "stopped", "stale" or "unknown" (this user cannot tell)
    pid: int | None = None
    detail: str = ""


def read_pid(path: Path) -> int | None:
    """The pid in ``path``: None if there is no such file, -1 if it holds no pid. Raises
    OSError if it cannot be read (permission): that is no reason to call it stale."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (IsADirectoryError, UnicodeDecodeError):
        return -1
    return int(text) if text.isdigit() and int(text) > 0 else -1


def _environ(pid: int) -> list[bytes]:
    """The environment ``pid`` was started with, as ``NAME=value`` entries (OSError if it
    cannot be read)."""
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def started_state_file(pid: int) -> Path | None:
    """The state file a running node was started to write (``$STEM_WORKER_STATE_FILE``),
    whatever template the command that now asks was given."""
    prefix = f"{STATE_FILE_ENV}=".encode()
    try:
        environ = _environ(pid)
    except OSError:
        return None
    for entry in environ:
        if entry.startswith(prefix) and len(entry) > len(prefix):
            return Path(os.fsdecode(entry[len(prefix) :]))
    return None


def _started_for(pid: int, pidfile: Path) -> bool | None:
    """Whether ``pid`` was started by stem-multi for this pidfile, however the path was
    spelled then and now (``None``: no /proc to tell by). Raises OSError when this user
    may not read the process's environment.

    A pidfile lives in a directory the node's user can write, and ``stem-multi`` may run as
    root: without this check a forged pidfile could make root signal any process."""
    try:
        environ = _environ(pid)
    except FileNotFoundError:
        return False if Path("/proc/self/environ").exists() else None
    prefix = f"{PIDFILE_ENV}=".encode()
    for entry in environ:
        if entry.startswith(prefix):
            started = Path(os.fsdecode(entry[len(prefix) :]))
            if started == pidfile:
                return True
            try:
                return os.path.samefile(started, pidfile)
            except OSError:
                return False
    return False


def probe(node: Node) -> PidState:
    try:
        pid = read_pid(node.pidfile)
    except OSError as exc:
        return PidState("unknown", None, f"cannot read {node.pidfile}: {exc.strerror}")
    if pid is None:
        return PidState("stopped")
    if pid < 0:
        return PidState("stale", None, f"{node.pidfile} does not hold a pid")
    if not pid_alive(pid):
        return PidState("stale", pid, f"pid {pid} is not running")
    try:
        ours = _started_for(pid, node.pidfile)
    except OSError as exc:
        # Never taken as the node's: a forged pidfile could name any process.
        return PidState(
            "unknown",
            pid,
            f"cannot tell whether pid {pid} is this node (its environment: {exc.strerror}; "
            "run as root or as the nodes' user)",
        )
    if ours is False:
        return PidState("stale", pid, f"pid {pid} is another program")
    return PidState("running", pid)


LOCK_WAIT_S = 60.0  # a command holds the lock for a probe and, at most, one exec


@contextlib.contextmanager
def node_lock(node: Node) -> Iterator[None]:
    """Hold an exclusive lock on the directory of the node's pidfile while a command looks
    at the pidfile and acts on it. Between writing the pidfile and its ``exec``, a starting
    node does not yet carry ``$STEM_MULTI_PIDFILE`` (:func:`probe` would call it another
    program); :func:`launch` returns only after the ``exec``, so a second ``stem-multi``
    that waits here sees a node it can recognize. The lock is on the directory, so no
    lock file is created in a place the node's user can write; since that user could
    hold it, waiting is bounded (:class:`LaunchError` after ``LOCK_WAIT_S``)."""
    try:
        fd = os.open(node.pidfile.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield  # no pidfile can exist yet; start creates the directory first
        return
    except OSError as exc:  # not allowed, a file where the directory should be, ...
        raise LaunchError(
            f"cannot open {node.pidfile.parent}: {exc.strerror}", _exit_code(exc)
        ) from None
    deadline = time.monotonic() + LOCK_WAIT_S
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LaunchError(
                        f"{node.pidfile.parent} stayed locked by another stem-multi "
                        "(or a process of the node's user); try again",
                        MultiExit.START_FAILED,
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def _exit_code(exc: BaseException | None) -> MultiExit:
    """NOPERM for a permission problem; CONFIG for a path that does not exist or cannot
    be one (a missing working directory, a log directory under /proc)."""
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MultiExit.NOPERM
    return MultiExit.CONFIG if isinstance(exc, OSError) else MultiExit.NOPERM


def remove_pidfile(node: Node, pid: int | None) -> None:
    """Remove the pidfile if it still holds ``pid`` (a new start may own it by now).
    :class:`LaunchError` if it cannot (NOPERM when this user may not)."""
    try:
        current = read_pid(node.pidfile)
        if current is not None and (pid is None or current == pid or current < 0):
            with contextlib.suppress(FileNotFoundError):
                node.pidfile.unlink()
    except OSError as exc:  # not allowed, a directory in its place, ...
        raise LaunchError(
            f"cannot remove {node.pidfile}: {exc.strerror}", _exit_code(exc)
        ) from None


def send_signal(pid: int, signum: signal.Signals) -> bool:
    """Signal ``pid``; False if it is gone. :class:`LaunchError` (NOPERM) if not allowed."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        raise LaunchError(
            f"not allowed to signal pid {pid} (run as root or as the nodes' user)",
            MultiExit.NOPERM,
        ) from None
    return True


def node_environ(
    base: Mapping[str, str], node: Node, identity: Identity | None, notify_socket: str | None
) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _SERVICE_MANAGER_VARS}
    env[PIDFILE_ENV] = str(node.pidfile)
    if node.state_file is not None:
        env[STATE_FILE_ENV] = str(node.state_file)
    if notify_socket:
        env["NOTIFY_SOCKET"] = notify_socket
    if identity is not None:
        env.update(HOME=identity.home, USER=identity.name, LOGNAME=identity.name)
    return env


# -- starting --------------------------------------------------------------------------------


def prepare_dirs(node: Node, identity: Identity | None) -> None:
    """Create the node's pidfile, log and state directories (owned by its user)."""
    dirs = {node.pidfile.parent, node.logfile.parent}
    if node.state_file is not None:
        dirs.add(node.state_file.parent)
    for d in sorted(dirs):
        if d.is_dir():
            continue
        try:
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            if identity is not None:
                os.chown(d, identity.uid, identity.gid)
        except OSError as exc:
            raise LaunchError(f"cannot create {d}: {exc.strerror}", _exit_code(exc)) from None


def _open_log(node: Node, identity: Identity | None) -> int:
    # O_NOFOLLOW and fchown on the descriptor: the log directory may be writable by the
    # node's user, who must not be able to point root's chown at another file.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(node.logfile, flags, LOG_MODE)
        if identity is not None:
            os.fchown(fd, identity.uid, identity.gid)
    except OSError as exc:
        raise LaunchError(
            f"cannot open the log file {node.logfile}: {exc.strerror}", _exit_code(exc)
        ) from None
    return fd


def _check_identity(identity: Identity) -> None:
    """Refuse to run a node that kept any privilege it was meant to drop."""
    uids, gids = set(os.getresuid()), set(os.getresgid())
    allowed = set(os.getgrouplist(identity.name, identity.gid))
    extra = set(os.getgroups()) - allowed
    if uids != {identity.uid} or gids != {identity.gid} or extra:
        raise LaunchError(
            f"privilege drop incomplete: uids {sorted(uids)}, gids {sorted(gids)}, "
            f"unexpected groups {sorted(extra)}",
            MultiExit.NOPERM,
        )
    if identity.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise LaunchError("privilege drop incomplete: could become root again", MultiExit.NOPERM)


def _daemonize_and_exec(
    node: Node,
    identity: Identity | None,
    workdir: str,
    env: dict[str, str],
    log_fd: int,
    status_fd: int,
) -> None:
    import daemon
    from daemon.pidfile import TimeoutPIDLockFile
    from lockfile import AlreadyLocked, LockFailed

    if identity is not None:
        # Supplementary groups: the user's own, not root's. Done here and not with
        # DaemonContext(initgroups=True): python-daemon then calls initgroups() *instead of*
        # setgid(), and the process keeps root's primary group.
        try:
            os.initgroups(identity.name, identity.gid)
        except OSError as exc:
            raise LaunchError(
                f"cannot set the groups of {identity.name}: {exc.strerror}", MultiExit.NOPERM
            ) from None
    log = os.fdopen(log_fd, "ab", buffering=0)
    context = daemon.DaemonContext(
        working_directory=workdir,
        umask=UMASK,
        # setgid() then setuid() as root: real, effective and saved ids all switch.
        uid=None if identity is None else identity.uid,
        gid=None if identity is None else identity.gid,
        initgroups=False,
        # Always detach: python-daemon skips it when started by init or inetd, and then
        # the parent's waitpid would wait for the whole life of the node.
        detach_process=True,
        files_preserve=[status_fd],
        stdout=log,
        stderr=log,
        # acquire_timeout=0: an existing pidfile fails at once (AlreadyLocked).
        pidfile=TimeoutPIDLockFile(str(node.pidfile), acquire_timeout=0),
        # Ignored signals survive exec: keep terminal job control away from the node, and
        # nothing else (SIGTERM must reach the worker's drain handler).
        signal_map={signal.SIGTSTP: None, signal.SIGTTIN: None, signal.SIGTTOU: None},
    )
    as_user = "" if identity is None else f" as user {identity.name}"
    try:
        context.open()
    except AlreadyLocked:
        raise LaunchError(
            f"{node.pidfile} appeared meanwhile: is another stem-multi starting {node.name}?"
        ) from None
    except LockFailed as exc:
        cause = exc.__context__
        why = cause.strerror if isinstance(cause, OSError) else str(exc)
        raise LaunchError(
            f"cannot create the pidfile {node.pidfile}{as_user}: {why}", MultiExit.NOPERM
        ) from None
    except daemon.daemon.DaemonError as exc:
        cause = exc.__cause__ or exc.__context__
        raise LaunchError(f"cannot become a daemon{as_user}: {exc}", _exit_code(cause)) from None
    try:
        if identity is not None:
            _check_identity(identity)
        try:
            os.execvpe(node.argv[0], list(node.argv), env)  # noqa: S606 - argv, no shell
        except OSError as exc:
            raise LaunchError(f"cannot run {node.argv[0]}{as_user}: {exc.strerror}") from None
    finally:
        context.close()  # only reached when exec failed: removes the pidfile


def launch(
    node: Node, identity: Identity | None, workdir: str, env: dict[str, str], banner: str
) -> int:
    """Start one node as a daemon; return its pid once it has exec'd (its
    directories made by :func:`prepare_dirs`). Raises :class:`LaunchError`."""
    log_fd = _open_log(node, identity)
    os.write(log_fd, banner.encode())
    read_end, write_end = os.pipe()  # both close on exec
    try:
        child = os.fork()
    except OSError as exc:
        for fd in (log_fd, read_end, write_end):
            os.close(fd)
        raise LaunchError(f"cannot fork: {exc.strerror}", MultiExit.SOFTWARE) from None
    if child == 0:  # pragma: no cover - measured only in the forked process
        code, message = MultiExit.SOFTWARE, "unexpected failure"
        try:
            os.close(read_end)
            _daemonize_and_exec(node, identity, workdir, env, log_fd, write_end)
        except LaunchError as exc:
            code, message = exc.code, str(exc)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}"
        with contextlib.suppress(OSError):
            os.write(write_end, f"{int(code)}:{message}".encode()[:4000])
        os._exit(int(code))
    os.close(write_end)
    os.close(log_fd)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode(errors="replace")  # EOF once the node has exec'd
    _, status = os.waitpid(child, 0)
    if report:
        code_text, _, message = report.partition(":")
        known = {int(c) for c in MultiExit}
        number = int(code_text) if code_text.isdigit() else -1
        raise LaunchError(message, MultiExit(number) if number in known else MultiExit.SOFTWARE)
    if status != 0:
        raise LaunchError(f"the launcher exited with status {status}", MultiExit.SOFTWARE)
    pid = read_pid(node.pidfile)
    if pid is None or pid < 0:
        raise LaunchError(f"{node.pidfile} is missing after start (the node exited at once?)")
    return pid


# -- readiness ---------------------------------------------------------------------------------

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ReadyListener:
    """An sd_notify socket in the abstract namespace (no file to clean up, no file
    permissions in the way of a node that dropped privileges). ``SO_PASSCRED`` makes the
    kernel attach the sender's real pid, so a node is believed only about itself."""

    def __init__(self) -> None:
        self.address = f"@stem-multi/{os.getpid()}/{os.urandom(6).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self.sock.bind("\0" + self.address[1:])
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive(self) -> tuple[int | None, dict[str, str]]:
        data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        pid = None
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[: _UCRED.size])[0]
        fields = dict(
            line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line
        )
        return pid, fields

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> ReadyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_identity(user: str | None, group: str | None) -> Identity | None:
    """``--user``/``--group`` as an :class:`Identity`; ``None`` when no switch is needed."""
    import grp

    if user is None:
        if group is not None:
            raise LaunchError("--group needs --user", MultiExit.USAGE)
        return None
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise LaunchError(f"no such user: {user}", MultiExit.CONFIG) from None
    gid = entry.pw_gid
    if group is not None:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise LaunchError(f"no such group: {group}", MultiExit.CONFIG) from None
    if os.geteuid() != 0 and (entry.pw_uid, gid) != (os.getuid(), os.getgid()):
        raise LaunchError(
            f"only root can run nodes as {entry.pw_name}; run stem-multi as that user instead",
            MultiExit.NOPERM,
        )
    if os.geteuid() != 0:
        return None  # already that user: nothing to drop
    return Identity(entry.pw_name, entry.pw_uid, gid, entry.pw_dir)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def all_dead(pids: Sequence[int]) -> bool:
    return not any(pid_alive(p) for p in pids)
