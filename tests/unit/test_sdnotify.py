"""sd_notify client, state file and `stem health` verdicts (no services, no subprocesses)."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from stem.cli import health_cmd
from stem.observability import signals
from stem.worker import service

# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A unix datagram socket on a path, as systemd's notify socket is."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield path, sock
    sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


def _recv_all(sock: socket.socket) -> list[dict[str, str]]:
    out = []
    sock.settimeout(0.05)
    try:
        while True:
            out.append(_fields(sock.recv(4096)))
    except TimeoutError:
        return out


class FakeWorker:
    """What attach() uses of a Worker."""

    def __init__(self, consuming: bool = True) -> None:
        self.name = "alpha@host"
        self.config = SimpleNamespace(
            queues=("default", "mail"), pool="thread", heartbeat_s=2.0, shutdown_budget_s=9.0
        )
        self.pool = SimpleNamespace(size=4)
        self.inflight: dict[str, Any] = {"r1": object()}
        self.consuming = consuming

    def health(self) -> dict[str, Any]:
        return {
            "worker": self.name,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "concurrency": 4,
            "queues": ["default", "mail"],
            "running": len(self.inflight),
            "processed": {"succeeded": 3, "failed": 1},
            "at_ms": int(time.time() * 1000),
            "draining": False,
            "consuming": self.consuming,
        }


# -- the notify protocol --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@stem/abc", "\0stem/abc"),
        ("", None),
        (None, None),
        ("@", None),
        ("vsock:2:1234", None),
        ("relative/path", None),
    ],
)
def test_notify_address(value: str | None, address: str | None) -> None:
    assert service.notify_address(value) == address


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_this_process(
    environ: dict[str, str], expected: float | None
) -> None:
    assert service.watchdog_interval_s(environ) == expected


def test_ready_watchdog_stopping_reach_a_path_socket(
    listener: tuple[str, socket.socket],
) -> None:
    path, sock = listener
    notifier = service.Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("consuming default")
    assert _fields(sock.recv(4096)) == {
        "READY": "1",
        "MAINPID": str(os.getpid()),
        "STATUS": "consuming default",
    }
    assert notifier.watchdog()
    assert _fields(sock.recv(4096)) == {"WATCHDOG": "1"}
    assert notifier.stopping("draining\nfor 9s")
    assert _fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "draining for 9s"}
    notifier.close()
    notifier.close()  # idempotent


def test_abstract_socket_address() -> None:
    name = f"stem-test/{os.getpid()}/{os.urandom(4).hex()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        notifier = service.Notifier("@" + name)
        assert notifier.notify(STATUS="hello", WATCHDOG=1)
        assert sock.recv(4096) == b"STATUS=hello\nWATCHDOG=1\n"
        notifier.close()


def test_notifier_without_socket_or_listener_never_raises(tmp_path: Path) -> None:
    off = service.Notifier.from_environ({})
    assert not off.enabled and not off.ready() and not off.watchdog()
    gone = service.Notifier(str(tmp_path / "nobody-listens"))
    assert gone.enabled
    assert not gone.ready()
    assert not gone.watchdog()  # the second failure is quiet, still no exception
    gone.close()


def test_notify_rejects_bad_variable_names() -> None:
    with pytest.raises(ValueError, match="not an sd_notify variable"):
        service.Notifier("/x").notify(**{"bad-key": 1})


# -- the state file -------------------------------------------------------------------------


def test_state_file_is_replaced_atomically_with_a_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "alpha.json"
    state = service.StateFile(path)
    assert state.write({"at_ms": 1, "consuming": True})
    assert state.write({"at_ms": 2, "consuming": False})
    assert service.read_state(path) == {"at_ms": 2, "consuming": False}
    assert stat.S_IMODE(path.stat().st_mode) & 0o007 == 0
    assert [p.name for p in tmp_path.iterdir()] == ["alpha.json"]  # no temporary left


def test_state_file_write_failure_is_reported_not_raised(tmp_path: Path) -> None:
    state = service.StateFile(tmp_path / "missing-dir" / "alpha.json")
    assert not state.write({"at_ms": 1})
    assert not state.write({"at_ms": 2})


def test_read_state_rejects_non_objects(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        service.read_state(path)


def test_remove_pidfile_only_if_it_names_us(tmp_path: Path) -> None:
    pidfile = tmp_path / "alpha.pid"
    pidfile.write_text("1\n")
    assert not service.remove_pidfile_if_ours(pidfile)
    assert pidfile.exists()
    pidfile.write_text(f"{os.getpid()}\n")
    assert service.remove_pidfile_if_ours(pidfile)
    assert not pidfile.exists()
    assert not service.remove_pidfile_if_ours(pidfile)


def test_pid_alive() -> None:
    assert service.pid_alive(os.getpid())
    assert not service.pid_alive(0)
    assert not service.pid_alive(2**22 + 12345)  # above pid_max: never a process


# -- attach: the worker's signals drive the protocol and the state file ----------------------


def test_attach_follows_the_worker_lifecycle(
    listener: tuple[str, socket.socket], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    state_path = tmp_path / "alpha.json"
    pidfile = tmp_path / "alpha.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    worker = FakeWorker()
    hooks = service.attach(worker, state_file=str(state_path), notify=True, pidfile=str(pidfile))
    try:
        signals.worker_ready.send(worker=worker)
        ready = _fields(sock.recv(4096))
        assert ready["READY"] == "1" and ready["MAINPID"] == str(os.getpid())
        assert "alpha@host" in ready["STATUS"] and "default,mail" in ready["STATUS"]
        assert service.read_state(state_path)["phase"] == "ready"

        signals.heartbeat.send(worker=worker, health=worker.health())
        beat = _fields(sock.recv(4096))
        assert beat["WATCHDOG"] == "1"
        assert beat["STATUS"] == "1/4 running, 4 processed, queues default,mail"
        snapshot = service.read_state(state_path)
        assert snapshot["phase"] == "running" and snapshot["heartbeat_s"] == 2.0

        worker.consuming = False
        signals.heartbeat.send(worker=worker, health=worker.health())
        assert "WATCHDOG" not in _fields(sock.recv(4096))  # a stalled worker is not fed

        other = FakeWorker()
        signals.heartbeat.send(worker=other, health=other.health())  # not ours: ignored
        assert _recv_all(sock) == []

        signals.worker_shutting_down.send(worker=worker)
        stopping = _fields(sock.recv(4096))
        assert stopping["STOPPING"] == "1"
        assert stopping["STATUS"] == "draining 1 task(s) for up to 9s"

        signals.worker_shutdown.send(worker=worker)
        final = service.read_state(state_path)
        assert final["phase"] == "stopped" and final["consuming"] is False
        assert final["shutdown_budget_s"] == worker.config.shutdown_budget_s
        assert not pidfile.exists()
        signals.heartbeat.send(worker=worker, health=worker.health())  # detached by now
        assert _recv_all(sock) == []
    finally:
        hooks.detach()


def test_attach_without_notify_socket_only_writes_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv(service.PIDFILE_ENV, str(tmp_path / "from-env.pid"))
    worker = FakeWorker()
    hooks = service.attach(worker, state_file=str(tmp_path / "s.json"), notify=True)
    try:
        assert hooks.notifier is None
        assert hooks.pidfile == str(tmp_path / "from-env.pid")
        signals.heartbeat.send(worker=worker, health=worker.health())
        assert service.read_state(tmp_path / "s.json")["consuming"] is True
    finally:
        hooks.detach()


# -- stem health ------------------------------------------------------------------------------


def _state(**over: Any) -> dict[str, Any]:
    base = {
        "worker": "alpha@host",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at_ms": int(time.time() * 1000),
        "consuming": True,
        "phase": "running",
        "heartbeat_s": 5.0,
        "running": 0,
    }
    base.update(over)
    return base


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({}, None),
        ({"at_ms": int(time.time() * 1000) - 60_000}, "last heartbeat"),
        ({"pid": 2**22 + 12345}, "is not running"),
        ({"consuming": False}, "not consuming"),
        ({"phase": "draining"}, "draining"),
        ({"phase": "ready", "consuming": False}, "starting"),
        ({"phase": "stopped", "consuming": False}, "has stopped"),
        ({"host": "elsewhere"}, "written on host elsewhere"),
        ({"at_ms": "soon"}, "no at_ms"),
        ({"pid": None}, "names no pid"),
    ],
)
def test_health_verdicts(tmp_path: Path, over: dict[str, Any], reason: str | None) -> None:
    verdict = health_cmd.check(_write(tmp_path / "alpha.json", _state(**over)))
    assert verdict.node == "alpha"
    if reason is None:
        assert verdict.healthy, verdict.reasons
        assert verdict.line().startswith("alpha: healthy (pid")
    else:
        assert not verdict.healthy
        assert any(reason in r for r in verdict.reasons), verdict.reasons
        assert verdict.line().startswith("alpha: unhealthy: ")


def test_health_max_age_defaults_to_three_heartbeats(tmp_path: Path) -> None:
    old = int(time.time() * 1000) - 40_000
    path = _write(tmp_path / "a.json", _state(at_ms=old, heartbeat_s=20.0))
    assert health_cmd.check(path).healthy  # 40 s < 3 x 20 s
    assert not health_cmd.check(path, max_age_s=30).healthy


def test_health_unreadable_files(tmp_path: Path) -> None:
    missing = health_cmd.check(tmp_path / "nope.json")
    assert "no state file" in missing.reasons[0]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "is not a state file" in health_cmd.check(bad).reasons[0]


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(health_cmd.health)
    return app


def test_health_command_exit_codes_and_json(tmp_path: Path) -> None:
    runner = CliRunner()
    _write(tmp_path / "alpha.json", _state())
    _write(tmp_path / "beta.json", _state(consuming=False))
    env = {"STEM_STATE_DIR": str(tmp_path)}

    ok = runner.invoke(_app(), ["--node", "alpha"], env=env)
    assert ok.exit_code == 0, ok.output
    assert "alpha: healthy" in ok.output

    bad = runner.invoke(_app(), ["--node", "beta", "--json"], env=env)
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["healthy"] is False
    assert report["nodes"][0]["node"] == "beta"
    assert "not consuming" in report["nodes"][0]["reasons"][0]

    every = runner.invoke(_app(), ["--json"], env=env)  # no --node: every node in the dir
    assert every.exit_code == 1
    assert [n["node"] for n in json.loads(every.stdout)["nodes"]] == ["alpha", "beta"]

    by_file = runner.invoke(_app(), ["--state-file", str(tmp_path / "alpha.json")])
    assert by_file.exit_code == 0

    # The unit sets STEM_WORKER_STATE_FILE; an explicit --node still wins over it.
    env_file = {**env, "STEM_WORKER_STATE_FILE": str(tmp_path / "alpha.json")}
    assert runner.invoke(_app(), ["--node", "beta"], env=env_file).exit_code == 1
    assert runner.invoke(_app(), [], env=env_file).exit_code == 0


def test_health_command_with_no_state_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(_app(), ["--state-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no state files" in result.output


def test_a_state_file_in_a_missing_directory_is_refused_at_start(tmp_path: Path) -> None:
    """A warning at start was easy to miss, and `stem health` then found no node."""
    from stem.errors import ConfigError

    with pytest.raises(ConfigError, match="missing-dir does not exist"):
        service.attach(
            FakeWorker(), state_file=str(tmp_path / "missing-dir" / "a.json"), notify=False
        )
