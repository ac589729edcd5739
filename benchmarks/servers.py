"""Throwaway Redis and PostgreSQL servers for benchmarks (standard library only).

The test fixtures in tests/fixtures/ do the same job but import pytest and are tuned for
crash tests (Redis with ``appendfsync always``). A benchmark wants a server that costs
nothing but its work: Redis without persistence (``--save '' --appendonly no``), PostgreSQL
with ``fsync=off`` (``synchronous_commit`` stays on, so each commit still waits for its WAL
write, just not for the disk flush). Each server runs in its own temporary directory on a
free port of 127.0.0.1, dies with the harness (``PR_SET_PDEATHSIG``) and is removed when
the ``with`` block ends.

PostgreSQL refuses to run as root; when we are root its programs run as ``postgres``.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Between fork and exec: the kernel kills the server if the harness dies, even by SIGKILL.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def redis_binary() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None
    )


def redis_version() -> str:
    binary = redis_binary()
    if binary is None:
        return "not installed"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """Yield the URL of a fresh Redis without persistence; stop and remove it afterwards."""
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    directory = Path(tempfile.mkdtemp(prefix="stem-bench-redis-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # the free port may be taken between choosing and binding it
            port = free_port()
            with open(directory / "redis.log", "ab") as log:
                proc = subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--dir",
                        str(directory),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--daemonize",
                        "no",
                        "--protected-mode",
                        "no",
                        "--loglevel",
                        "warning",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if _port_open(port):
                    yield f"redis://127.0.0.1:{port}/0"
                    return
                time.sleep(0.02)
            _stop(proc)
        log_text = (directory / "redis.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"redis-server did not start; log:\n{log_text}")
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- PostgreSQL ----------------------------------------------------------------------------

_RUN_AS = "postgres" if os.geteuid() == 0 else None


def pg_bin_dir() -> Path | None:
    """The newest PostgreSQL server binaries on this machine, or None."""

    def major(path: str) -> int:
        name = Path(path).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=major)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def postgres_version() -> str:
    bindir = pg_bin_dir()
    if bindir is None:
        return "not installed"
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True)
    # "postgres (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    found = re.search(r"\(PostgreSQL\) (\S+)", out.stdout)
    return found.group(1) if found else out.stdout.strip() or "unknown"


def _run_pg(args: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        user=_RUN_AS,
        group=_RUN_AS,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd="/",
        env={**os.environ, "LC_ALL": "C.UTF-8"},
        check=False,
    )


def _give_to_postgres(path: Path) -> None:
    if _RUN_AS:
        pw = pwd.getpwnam(_RUN_AS)
        os.chown(path, pw.pw_uid, pw.pw_gid)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a database on a fresh PostgreSQL server; stop and remove it
    afterwards. Stem applies its migrations itself on first connect."""
    bindir = pg_bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    base = Path(tempfile.mkdtemp(prefix="stem-bench-pg-"))
    _give_to_postgres(base)
    data, sock = base / "data", base / "sock"
    port = free_port()
    started = False
    try:
        init = _run_pg(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ]
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{init.stdout}{init.stderr}")
        sock.mkdir()
        _give_to_postgres(sock)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(port),
            "unix_socket_directories": f"'{sock}'",
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "100",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
        }
        conf = data / "postgresql.auto.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        _give_to_postgres(conf)
        start = _run_pg(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "postgres.log"),
                "-w",
                "-t",
                "30",
                "start",
            ]
        )
        if start.returncode != 0:
            log_text = (base / "postgres.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start:\n{start.stderr}\n{log_text}")
        started = True
        made = _run_pg(
            [
                str(bindir / "createdb"),
                "-h",
                str(sock),
                "-p",
                str(port),
                "-U",
                "postgres",
                "stem_bench",
            ]
        )
        if made.returncode != 0:
            raise RuntimeError(f"createdb failed:\n{made.stderr}")
        yield f"postgresql://postgres@127.0.0.1:{port}/stem_bench"
    finally:
        if started:
            _run_pg([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)
