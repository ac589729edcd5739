"""The service files: systemd units (verified by systemd-analyze), tmpfiles and sysusers,
the sd_notify protocol of a real worker, and the SysV scripts run with `sh`."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stem.cli.exitcodes import ExitCode
from stem.cli.health_cmd import check
from tests.fixtures.require import service_missing

from .conftest import ROOT, StemCLI
from .test_multi import STEM_CMD

SYSTEMD = ROOT / "deploy" / "systemd"
SYSV = ROOT / "deploy" / "sysv"
UNITS = ("stem-worker@.service", "stem-beat.service", "stem-multi.service", "stem.target")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        service_missing(f"{name} is not installed (Debian package: systemd)")
    assert path is not None
    return path


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(SYSTEMD / name)
    return parser


# -- systemd units ------------------------------------------------------------------------------


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    verify = _tool("systemd-analyze")
    # Point the units at executables that exist here (verify checks ExecStart= paths).
    bindir = Path(sys.executable).parent
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        for program in ("stem-multi", "stem"):
            installed = bindir / program
            target = str(installed) if installed.exists() else sys.executable
            text = text.replace(f"/usr/bin/{program} ", f"{target} ")
        (tmp_path / name).write_text(text)
    (tmp_path / "stem-worker@alpha.service").symlink_to(tmp_path / "stem-worker@.service")
    paths = [str(tmp_path / n) for n in ("stem-worker@alpha.service", *UNITS[1:])]
    proc = subprocess.run(
        [verify, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    # verify reports unknown keys and bad values as messages, not as its exit code.
    assert proc.stderr.strip() == "", proc.stderr


def test_worker_unit_notify_watchdog_drain_and_hardening() -> None:
    unit = _unit("stem-worker@.service")
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert int(svc["WatchdogSec"]) > 0
    text = (SYSTEMD / "stem-worker@.service").read_text()
    [budget] = re.findall(r"^Environment=STEM_WORKER_SHUTDOWN_BUDGET_S=(\d+)$", text, re.M)
    assert int(svc["TimeoutStopSec"]) >= int(budget) + 20, "the stop timeout must cover the drain"
    assert str(int(ExitCode.CONFIG)) in svc["RestartPreventExitStatus"].split()
    assert svc["Restart"] == "on-failure" and svc["RestartForceExitStatus"] == "0"
    assert svc["ExecReload"] == "/bin/kill -TERM $MAINPID"
    assert svc["KillMode"] == "mixed"
    assert svc["ExecStart"].startswith("/usr/bin/stem worker --name %i@%H")
    hardening = {
        "User": "stem",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "UMask": "0027",
        "CapabilityBoundingSet": "",
        "ProtectHome": "yes",
    }
    assert {k: svc[k] for k in hardening} == hardening
    assert "/run/stem" in svc["ReadWritePaths"] and "/var/lib/stem" in svc["ReadWritePaths"]
    assert unit["Install"]["WantedBy"] == "stem.target"
    assert unit["Unit"]["PartOf"] == "stem.target"
    # Each reload is a start too: a few rolling deploys must not leave the unit failed.
    assert int(unit["Unit"]["StartLimitBurst"]) >= 10


def test_units_and_defaults_select_the_production_profile() -> None:
    """config/stem.production.yaml says the shipped service files select it: gates are
    then errors, and a service that fails one does not start."""
    for unit in ("stem-worker@.service", "stem-beat.service", "stem-multi.service"):
        text = (SYSTEMD / unit).read_text()
        assert "\nEnvironment=STEM_PROFILE=production\n" in text, unit
        # before the environment files, so /etc/default/stem may choose another profile
        assert text.index("STEM_PROFILE=production") < text.index("EnvironmentFile=")
    assert re.search(r'^STEM_PROFILE="production"$', (SYSV / "default" / "stem").read_text(), re.M)
    readme = (ROOT / "deploy" / "README.md").read_text()
    [burst] = re.findall(
        r"^StartLimitBurst=(\d+)$", (SYSTEMD / "stem-worker@.service").read_text(), re.M
    )
    assert f"at most {burst} times in 10 minutes" in readme


def test_multi_unit_is_a_oneshot_that_drains_on_stop() -> None:
    svc = _unit("stem-multi.service")["Service"]
    assert (svc["Type"], svc["RemainAfterExit"]) == ("oneshot", "yes")
    assert svc["ExecStart"].startswith("/usr/bin/stem-multi start $STEM_NODES")
    assert svc["ExecStop"].startswith("/usr/bin/stem-multi stopwait $STEM_NODES")
    assert svc["ExecReload"].startswith("/usr/bin/stem-multi restart $STEM_NODES")
    assert "%%n.pid" in svc["ExecStart"]  # %n is systemd's; stem-multi must get a literal %n


def test_tmpfiles_and_sysusers_apply_to_a_root(tmp_path: Path) -> None:
    sysusers = _tool("systemd-sysusers")
    tmpfiles = _tool("systemd-tmpfiles")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSTEMD / "stem.sysusers")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    entry = next(
        line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
        if line.startswith("stem:")
    )
    assert entry[5:] == ["/var/lib/stem", "/usr/sbin/nologin"]
    uid = int(entry[2])
    assert 0 < uid < 1000  # a system user
    subprocess.run(
        [tmpfiles, "--create", f"--root={tmp_path}", str(SYSTEMD / "stem.tmpfiles")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for d in ("run/stem", "var/lib/stem", "var/log/stem"):
        st = (tmp_path / d).stat()
        assert (st.st_uid, st.st_mode & 0o777) == (uid, 0o750), d
    keys = (tmp_path / "etc/stem/keys").stat()
    assert (keys.st_uid, keys.st_mode & 0o777) == (0, 0o750)


# -- the notify protocol, spoken by a real worker ---------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield path, sock
    sock.close()


def _next(sock: socket.socket, key: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {key}=1 within {timeout}s")
        sock.settimeout(remaining)
        fields = dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines())
        if fields.get(key) == "1":
            return fields


@pytest.mark.slow
def test_worker_sends_ready_watchdog_and_stopping(
    cli: StemCLI, notify_socket: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, sock = notify_socket
    state = tmp_path / "alpha.json"
    env = {
        **cli.env,
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "1000000",  # systemd's WatchdogSec=1: pings every 0.5 s or sooner
        "STEM_WORKER_STATE_FILE": str(state),
    }
    program = STEM_CMD.split() if STEM_CMD else [sys.executable, "-m", "stem.cli.main"]
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [*program, "worker", "--name", "alpha", "-P", "thread", "-c", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        ready = _next(sock, "READY", 60)
        assert ready["MAINPID"] == str(worker.pid)
        assert ready["STATUS"].startswith("alpha: consuming default")
        for _ in range(2):  # fed again and again while it consumes
            assert "running" in _next(sock, "WATCHDOG", 10)["STATUS"]
        assert check(state, max_age_s=5).healthy
        worker.send_signal(signal.SIGTERM)
        assert _next(sock, "STOPPING", 10)["STATUS"].startswith("draining")
        assert worker.wait(timeout=30) == 0
        assert check(state).reasons == ("the worker has stopped",)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


# -- SysV scripts --------------------------------------------------------------------------------


def _sh(script: str, action: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SYSV / script), action],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _defaults(cli: StemCLI, prefix: Path, **extra: str) -> dict[str, str]:
    lines = {
        "STEM_APP": "acc_tasks:app",
        "STEM_USER": "",  # this machine's Python is not reachable by other users
        "STEM_PID_DIR": f"{prefix}/run",
        "STEM_LOG_DIR": f"{prefix}/log",
        "STEM_STATE_DIR": f"{prefix}/state",
        "STEM_WORKDIR": str(prefix),
        "STEM_MULTI": f"{sys.executable} -m stem.cli.multi",
        "STEM_BIN": STEM_CMD or "",
        **extra,
    }
    default = prefix / "default"
    default.write_text("".join(f'{k}="{v}"\n' for k, v in lines.items()))
    env = {k: v for k, v in cli.env.items() if not k.startswith("STEM_APP")}
    return {**env, "STEM_DEFAULTS": str(default)}


def test_sysv_scripts_are_posix_sh() -> None:
    for script in ("stem-worker", "stem-beat"):
        path = SYSV / script
        assert path.read_text().startswith("#!/bin/sh\n### BEGIN INIT INFO")
        assert os.access(path, os.X_OK)
        subprocess.run(["sh", "-n", str(path)], check=True)
        if shutil.which("checkbashisms"):
            subprocess.run(["checkbashisms", "--posix", str(path)], check=True)


def _config_clash(name: str) -> str | None:
    """Why the config loader would reject this variable (it reads STEM_<SECTION>_<KEY> as a
    setting and calls an unknown KEY of a known SECTION an error), or None."""
    from stem.config.schema import SCHEMA

    for section, fields in SCHEMA.items():
        prefix = f"STEM_{section.upper()}_"
        if name.startswith(prefix) and name[len(prefix) :].lower() not in fields:
            return f"{name} looks like a {section}.* setting but is not one"
    return None


def test_default_file_is_plain_assignments_the_config_loader_accepts() -> None:
    text = (SYSV / "default" / "stem").read_text()
    names = re.findall(r"^#?(STEM_[A-Z0-9_]+)=", text, re.M)
    assert {"STEM_APP", "STEM_NODES", "STEM_NODE_OPTS", "STEM_PID_DIR"} <= set(names)
    for line in text.splitlines():
        if line and not line.startswith("#"):
            # systemd's EnvironmentFile= and sh must read the same thing.
            assert re.fullmatch(r'STEM_[A-Z0-9_]+="[^"$`\\]*"', line), line
    clashes = [c for n in [*names, "STEM_MULTI_PIDFILE"] if (c := _config_clash(n))]
    assert clashes == []
    subprocess.run(["sh", "-c", f'set -e; . "{SYSV / "default" / "stem"}"'], check=True)


def test_state_file_variable_is_a_worker_setting() -> None:
    assert _config_clash("STEM_WORKER_STATE_FILE") is None


@pytest.mark.slow
def test_sysv_worker_script_start_status_stop(cli: StemCLI, tmp_path: Path) -> None:
    env = _defaults(
        cli, tmp_path, STEM_NODES="alpha beta", STEM_NODE_OPTS="-P thread -c 1 -c:beta 2"
    )
    assert _sh("stem-worker", "status", env).returncode == 3  # LSB: not running
    started = _sh("stem-worker", "start", env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "alpha: started" in started.stdout and "beta: started" in started.stdout
    status = _sh("stem-worker", "status", env)
    assert status.returncode == 0 and "alpha: running" in status.stdout
    beta = int((tmp_path / "run" / "beta.pid").read_text())
    assert b"-c\x002" in Path(f"/proc/{beta}/cmdline").read_bytes()
    again = _sh("stem-worker", "start", env)
    assert again.returncode == 0 and "already running" in again.stdout

    os.kill(beta, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{beta}").exists() and time.monotonic() < deadline:
        if Path(f"/proc/{beta}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            break
        time.sleep(0.05)
    assert _sh("stem-worker", "status", env).returncode == 1  # LSB: dead, pidfile remains

    restarted = _sh("stem-worker", "restart", env)
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "alpha: stopped" in restarted.stdout and "beta: started" in restarted.stdout
    stopped = _sh("stem-worker", "stop", env)
    assert stopped.returncode == 0 and stopped.stdout.count(": stopped") == 2
    assert _sh("stem-worker", "status", env).returncode == 3
    assert not list((tmp_path / "run").glob("*.pid"))
    assert _sh("stem-worker", "stop", env).returncode == 0  # stopping a stopped service
    assert _sh("stem-worker", "reload", env).returncode == 3
    assert _sh("stem-worker", "frobnicate", env).returncode == 2


FAKE_BEAT = """
# stands in for `stem beat` (its options are the global ones, then "beat"): says READY=1
# once up, as beat does after its first pass
import os, signal, socket, sys, time

print(f"beat {os.getpid()}: {' '.join(sys.argv[1:])}", flush=True)
def stop(*_):
    print(f"beat {os.getpid()} stopping", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
address = os.environ["NOTIFY_SOCKET"]
address = "\\0" + address[1:] if address.startswith("@") else address
socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1\\nSTATUS=fake beat\\n", address)
while True:
    time.sleep(0.1)
"""

FAILING_BEAT = """
import sys, time
time.sleep(1)  # importing a big app
print("refused: a gate failed", flush=True)
sys.exit(78)
"""


@pytest.mark.slow
def test_sysv_beat_script(cli: StemCLI, tmp_path: Path) -> None:
    fake = tmp_path / "fake-beat.py"
    fake.write_text(FAKE_BEAT)
    env = _defaults(cli, tmp_path, STEM_BIN=f"{sys.executable} {fake}")
    started = _sh("stem-beat", "start", env)
    assert started.returncode == 0, started.stdout + started.stderr
    assert "beat: started" in started.stdout and "fake beat" in started.stdout
    assert _sh("stem-beat", "status", env).returncode == 0
    log = (tmp_path / "log" / "beat.log").read_text()
    assert "beat" in log
    assert _sh("stem-beat", "force-reload", env).returncode == 0
    assert _sh("stem-beat", "stop", env).returncode == 0
    assert _sh("stem-beat", "status", env).returncode == 3
    assert "stopping" in (tmp_path / "log" / "beat.log").read_text()

    # A beat that exits at startup (a gate refused it) fails the start, whenever it exits.
    failing = tmp_path / "failing-beat.py"
    failing.write_text(FAILING_BEAT)
    env = _defaults(cli, tmp_path, STEM_BIN=f"{sys.executable} {failing}")
    refused = _sh("stem-beat", "start", env)
    assert refused.returncode == 7, refused.stdout + refused.stderr
    assert "refused: a gate failed" in refused.stderr


def test_sysv_script_without_stem_multi(cli: StemCLI, tmp_path: Path) -> None:
    env = _defaults(cli, tmp_path, STEM_MULTI="/nonexistent/stem-multi")
    assert _sh("stem-worker", "start", env).returncode == 5  # LSB: not installed
    assert _sh("stem-worker", "status", env).returncode == 4  # LSB: unknown
    assert _sh("stem-worker", "stop", env).returncode == 0
