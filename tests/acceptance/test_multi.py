"""`stem-multi` for real: detached nodes with pidfiles, logs and state files, on SQLite."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stem import Stem, states
from stem.cli import multi
from stem.cli.health_cmd import check
from stem.cli.multi_daemon import _started_for
from stem.worker.service import pid_alive, read_state

from .conftest import ROOT, StemCLI

HERE = Path(__file__).parent
SHIM = HERE / "service_shim.py"
HOST = socket.gethostname()


def _cli_wired() -> bool:
    """Whether `stem worker` calls stem.worker.service.attach itself (--state-file)."""
    return "state_file" in (ROOT / "stem/cli/worker_cmd.py").read_text()


# Until the CLI is wired, nodes run the CLI through a shim that attaches the service hooks
# exactly as `stem worker` will.
STEM_CMD = None if _cli_wired() else f"{sys.executable} {SHIM}"


class Multi:
    """Runs `python -m stem.cli.multi` with per-test pidfile, log and state directories."""

    def __init__(self, cli: StemCLI, base: Path) -> None:
        self.cli = cli
        self.base = base
        self.env = {**cli.env, "STEM_STATE_DIR": str(base / "state")}

    def paths(self) -> list[str]:
        return [
            "--pidfile",
            f"{self.base}/run/%n.pid",
            "--logfile",
            f"{self.base}/log/%n.log",
            "--workdir",
            str(self.base),
        ]

    def __call__(
        self, *args: str, stem: str | None = STEM_CMD, timeout: float = 120, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        command = args[0]
        extra = ["--stem", stem] if stem and command in ("start", "restart", "show") else []
        return subprocess.run(
            [sys.executable, "-m", "stem.cli.multi", *args, *self.paths(), *extra],
            env={**self.env, **kw.pop("env", {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            **kw,
        )

    def pid(self, node: str) -> int:
        return int((self.base / "run" / f"{node}.pid").read_text())

    def state(self, node: str) -> dict[str, Any]:
        return read_state(self.base / "state" / f"{node}.json")

    def cleanup(self) -> None:
        """SIGKILL whatever a failed test left running (only processes started for these
        pidfiles: a test forges one naming the test process itself)."""
        for pidfile in (self.base / "run").glob("*.pid"):
            try:
                pid = int(pidfile.read_text())
            except (OSError, ValueError):
                continue
            if pid != os.getpid() and _started_for(pid, pidfile):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def mt(cli: StemCLI, tmp_path: Path) -> Iterator[Multi]:
    m = Multi(cli, tmp_path)
    yield m
    m.cleanup()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


FAST = ("-P", "thread", "-c", "2", "--heartbeat", "0.3")


# -- the parser and the plan (no processes) ---------------------------------------------------


def test_nodes_templates_and_per_node_options() -> None:
    parsed = multi.parse(
        [
            "start",
            "alpha",
            "beta",
            "--app",
            "pkg.tasks:app",
            "-Q",
            "default",
            "-c:alpha",
            "8",
            "-Q:beta=mail",
            "--config:beta",
            "/etc/stem/%n.yaml",
            "--logfile",
            "/x/%n-%i.log",
            "--hostname",
            "h1",
            "--stem",
            "stem",
            "--",
            "--raw",
        ]
    )
    plan = multi.plan(parsed)
    alpha, beta = plan.nodes
    assert alpha.argv == (
        "stem",
        "--app",
        "pkg.tasks:app",
        "worker",
        "--name",
        "alpha@h1",
        "-Q",
        "default",
        "-c",
        "8",
        "--raw",
    )
    assert beta.argv == (
        "stem",
        "--app",
        "pkg.tasks:app",
        "--config",
        "/etc/stem/beta.yaml",
        "worker",
        "--name",
        "beta@h1",
        "-Q",
        "default",
        "-Q",
        "mail",
        "--raw",
    )
    assert (str(alpha.logfile), str(beta.logfile)) == ("/x/alpha-1.log", "/x/beta-2.log")
    assert str(alpha.pidfile) == "/run/stem/alpha.pid"
    assert alpha.stop_timeout_s == multi.DEFAULT_BUDGET_S + multi.STOP_MARGIN_S


def test_count_ranges_and_budget_derived_stop_timeout() -> None:
    plan = multi.plan(
        multi.parse(["stopwait", "3", "-c:1-2", "4", "--shutdown-budget:3", "5", "-c8"])
    )
    assert [n.name for n in plan.nodes] == ["1", "2", "3"]
    assert [n.argv[-1] for n in plan.nodes] == ["4", "4", "5"]
    assert plan.nodes[0].argv[-4:] == ("-c", "8", "-c", "4")  # the override comes last
    assert [n.stop_timeout_s for n in plan.nodes] == [60.0, 60.0, 35.0]
    assert multi.expand("%n@%h/%i/%%n/%x", name="a", host="h", index=2) == "a@h/2/%n/%x"


def test_stopwait_waits_for_the_budget_the_node_reports(tmp_path: Path) -> None:
    """A node's drain budget may come from YAML, which stem-multi does not read: its state
    file says what the node runs with, and stopwait waits that long plus the margin."""
    state = tmp_path / "a.json"
    argv = ["stopwait", "a", "--state-file", str(tmp_path / "%n.json")]
    plan = multi.plan(multi.parse(argv))
    [node] = plan.nodes
    assert multi._stop_timeout_s(plan, node, 4242) == 60.0  # no report: the env/flag default
    state.write_text(json.dumps({"pid": 4242, "shutdown_budget_s": 120.0}))
    assert multi._stop_timeout_s(plan, node, 4242) == 120.0 + multi.STOP_MARGIN_S
    assert multi._stop_timeout_s(plan, node, 999) == 60.0  # an earlier incarnation's report
    given = multi.plan(multi.parse([*argv, "--timeout", "5"]))
    assert multi._stop_timeout_s(given, given.nodes[0], 4242) == 5.0


def test_stopwait_finds_the_state_file_the_node_was_started_with(tmp_path: Path) -> None:
    """The README starts nodes with --state-file and stops them without it: the node's
    own environment says where its report is."""
    started_with = tmp_path / "run" / "a.json"
    started_with.parent.mkdir()
    node_env = {**os.environ, "STEM_WORKER_STATE_FILE": str(started_with)}
    proc = subprocess.Popen(["sleep", "30"], env=node_env)
    try:
        started_with.write_text(json.dumps({"pid": proc.pid, "shutdown_budget_s": 90.0}))
        plan = multi.plan(
            multi.parse(["stopwait", "a", "--pidfile", str(tmp_path / "%n.pid")]),
        )
        [node] = plan.nodes
        assert node.state_file != started_with  # the default template: elsewhere
        assert multi._stop_timeout_s(plan, node, proc.pid) == 90.0 + multi.STOP_MARGIN_S
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "^$"),
        (["launch", "a"], "unknown command"),
        (["start"], "name the nodes"),
        (["start", "a", "--frobnicate"], "unknown option --frobnicate"),
        (["start", "a", "-c"], "-c needs a value"),
        (["start", "a", "-c:b", "2"], "selects none of the nodes"),
        (["start", "a", "--pidfile:a", "x"], "takes no :NODE"),
        (["start", "a/b"], "bad node name"),
        (["start", "a", "a"], "named twice"),
        (["start", "0"], "between 1 and 1000"),
        (["start", "a", "--timeout", "soon"], "number of seconds"),
        # A node's index is its place on this command line: `stop beta` would find alpha.
        (["stop", "alpha", "beta", "--pidfile", "/r/node-%i.pid"], "--pidfile cannot use %i"),
        (["start", "a", "--state-file", "/r/%i.json"], "--state-file cannot use %i"),
        (["start", "2", "--pidfile", "/r/fleet.pid"], "nodes 1 and 2 would share --pidfile"),
        (["start", "a", "b", "--state-file", "/r/s.json"], "would share --state-file"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(multi.UsageError, match=message):
        multi.plan(multi.parse(argv))


def test_cli_usage_and_config_exit_codes() -> None:
    assert multi.run(["start", "a", "--bogus"]) == multi.MultiExit.USAGE
    assert multi.run([]) == multi.MultiExit.USAGE
    assert multi.run(["--help"]) == multi.MultiExit.OK
    assert multi.run(["names", "2"]) == multi.MultiExit.OK
    user = "no-such-user-stem"
    assert multi.run(["start", "a", "--user", user]) == multi.MultiExit.CONFIG
    assert multi.run(["start", "a", "--group", "nogroup"]) == multi.MultiExit.USAGE
    assert len({int(c) for c in multi.MultiExit}) == len(multi.MultiExit)  # all distinct


# -- nodes for real -----------------------------------------------------------------------------


@pytest.mark.slow
def test_three_nodes_consume_and_stopwait_drains_without_loss(mt: Multi) -> None:
    out = _ok(mt("start", "3", *FAST))
    assert sorted(line.split(":")[0] for line in out.splitlines()) == ["1", "2", "3"]
    assert out.count("started (pid") == 3
    pids = [mt.pid(n) for n in ("1", "2", "3")]
    assert len(set(pids)) == 3 and all(pid_alive(p) for p in pids)
    for node, pid in zip(("1", "2", "3"), pids, strict=True):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"worker" in cmdline and f"{node}@{HOST}".encode() in cmdline
        assert "ready" in (mt.base / "log" / f"{node}.log").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
        assert "Umask:\t0027" in status

    # Each node consumes: every one of them runs some of the work.
    app = Stem("producer", broker=mt.cli.url, backend=mt.cli.url)
    results = [app.send_task("acc.sleep", [0.2]) for _ in range(30)]
    assert [r.get(timeout=60) for r in results] == [0.2] * 30
    for node in ("1", "2", "3"):
        _wait(lambda n=node: mt.state(n)["processed"]["succeeded"] > 0, 10, f"node {node}")
        assert check(mt.base / "state" / f"{node}.json", max_age_s=5).healthy
    status = mt("status", "3")
    assert _ok(status).count(", healthy") == 3
    if "health_cmd" in (ROOT / "stem/cli/main.py").read_text():  # `stem health` registered
        probe = mt.cli.run("health", "--json", env={"STEM_STATE_DIR": str(mt.base / "state")})
        assert probe.returncode == 0, probe.stdout + probe.stderr
        assert [n["node"] for n in json.loads(probe.stdout)["nodes"]] == ["1", "2", "3"]

    # Stop while tasks run: stopwait returns once they are done, and nothing is lost.
    slow = [app.send_task("acc.sleep", [1.5]) for _ in range(6)]
    _wait(lambda: app.broker.stats(["default"])[0].reserved >= 3, 20, "tasks to start")
    stopped = _ok(mt("stopwait", "3"))
    assert stopped.count("stopped") == 3
    assert all(not pid_alive(p) for p in pids)
    assert not list((mt.base / "run").iterdir())  # the nodes removed their pidfiles
    assert {mt.state(n)["phase"] for n in ("1", "2", "3")} == {"stopped"}
    done = [r.state for r in slow]
    [stats] = app.broker.stats(["default"])
    assert done.count(states.SUCCESS) + stats.ready == 6, (done, stats)
    assert stats.reserved == 0
    assert _ok(mt("status", "3"), multi.MultiExit.NOT_RUNNING).count("stopped") == 3
    app.close()


@pytest.mark.slow
def test_kill9_node_is_replaced_by_start_and_twins_are_refused(mt: Multi) -> None:
    _ok(mt("start", "alpha", "beta", *FAST))
    alpha, beta = mt.pid("alpha"), mt.pid("beta")
    again = _ok(mt("start", "alpha", "beta", *FAST))
    assert f"alpha: already running (pid {alpha})" in again
    assert f"beta: already running (pid {beta})" in again

    os.kill(beta, signal.SIGKILL)
    _wait(lambda: not pid_alive(beta), 10, "beta to die")
    status = _ok(mt("status", "alpha", "beta"), multi.MultiExit.STALE)
    assert "alpha: running" in status and "beta: dead, pidfile remains" in status

    out = _ok(mt("start", "alpha", "beta", *FAST))
    assert f"alpha: already running (pid {alpha})" in out
    assert "beta: removed a stale pidfile" in out and "beta: started" in out
    assert mt.pid("alpha") == alpha and mt.pid("beta") != beta
    _ok(mt("status", "alpha", "beta"))

    killed = _ok(mt("kill", "alpha", "beta"))
    assert killed.count("sent SIGKILL") == 2 and killed.count("stopped") == 2
    assert not list((mt.base / "run").iterdir())


@pytest.mark.slow
def test_commands_on_a_node_wait_while_another_holds_its_pidfile_directory(mt: Multi) -> None:
    """Between writing the pidfile and its exec, a starting node cannot yet be recognized
    as stem-multi's: a second start or stop that looked then would call the pidfile
    another program's, remove it and start an untracked twin. Commands on a node take an
    exclusive lock on its pidfile directory, and launch returns only after the exec."""
    import fcntl

    run = mt.base / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a concurrent stem-multi between fork and exec
    cmd = [sys.executable, "-m", "stem.cli.multi", "start", "a", *mt.paths(), *FAST]
    cmd += ["--stem", STEM_CMD] if STEM_CMD else []
    proc = subprocess.Popen(cmd, env=mt.env, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        assert proc.poll() is None and not (run / "a.pid").exists()  # waiting its turn
    finally:
        os.close(fd)  # the lock is released
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "a: started" in out, out
    assert "already running" in _ok(mt("start", "a", *FAST))
    _ok(mt("stopwait", "a"))


def test_a_lock_held_too_long_fails_the_command_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The pidfile directory may belong to the node's user, who could hold its lock
    forever: root's stop or start gives up after a while, naming the directory."""
    import fcntl

    from stem.cli import multi_daemon

    run = tmp_path / "run"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    monkeypatch.setattr(multi_daemon, "LOCK_WAIT_S", 0.2)
    try:
        argv = ["--pidfile", f"{run}/%n.pid", "--logfile", f"{tmp_path}/%n.log"]
        assert multi.run(["stop", "a", *argv]) == multi.MultiExit.STOP_TIMEOUT
        assert multi.run(["start", "a", *argv, "--stem", "/bin/true"]) != multi.MultiExit.OK
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert err.count(f"{run} stayed locked") == 2, err


@pytest.mark.slow
def test_a_missing_directory_is_a_configuration_error(mt: Multi, tmp_path: Path) -> None:
    """Not a permission problem (77, LSB 4 in the init script): the path is wrong (78)."""

    def start(paths: dict[str, str]) -> subprocess.CompletedProcess[str]:
        paths = {"--pidfile": f"{mt.base}/run/%n.pid", "--logfile": f"{mt.base}/log/%n.log"} | paths
        options = [x for item in paths.items() for x in item]
        return subprocess.run(
            [sys.executable, "-m", "stem.cli.multi", "start", "a", *options, "--stem", "/bin/true"],
            env=mt.env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    proc = start({"--workdir": str(tmp_path / "no-such-dir")})
    assert proc.returncode == multi.MultiExit.CONFIG, proc.stderr
    assert "no-such-dir" in proc.stderr
    proc = start({"--logfile": "/proc/no-log/%n.log"})
    assert proc.returncode == multi.MultiExit.CONFIG, proc.stderr
    assert "cannot create /proc/no-log" in proc.stderr


@pytest.mark.slow
def test_stale_and_forged_pidfiles(mt: Multi) -> None:
    run = mt.base / "run"
    run.mkdir()
    (run / "a.pid").write_text("garbage\n")
    (run / "b.pid").write_text(f"{os.getpid()}\n")  # alive, but not a node: this test
    status = _ok(mt("status", "a", "b"), multi.MultiExit.STALE)
    assert "does not hold a pid" in status and "is another program" in status
    stop = _ok(mt("stop", "a", "b"))  # must not signal the test process
    assert stop.count("removed a stale pidfile") == 2
    assert not list(run.iterdir())
    assert _ok(mt("stop", "a")).strip() == "a: not running"

    (run / "a.pid").write_text("4194400\n")  # above the kernel's largest pid
    out = _ok(mt("start", "a", *FAST))
    assert "a: removed a stale pidfile (pid 4194400 is not running)" in out
    assert "a: started" in out
    _ok(mt("stop", "a"))
    _wait(lambda: not (run / "a.pid").exists(), 30, "the node to remove its pidfile")


def _sleeper(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"], env={**os.environ, **env})


def test_a_node_is_known_by_its_pidfile_however_the_path_is_spelled(tmp_path: Path) -> None:
    """/var/run is a link to /run on Debian: a node started with one spelling is found, and
    stopped, with the other, not taken for another program (its pidfile then removed and a
    twin started)."""
    from stem.cli.multi_daemon import PIDFILE_ENV, probe

    real = tmp_path / "run"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    node = multi.plan(multi.parse(["status", "a", "--pidfile", f"{real}/%n.pid"])).nodes[0]
    ours = _sleeper({PIDFILE_ENV: str(tmp_path / "link" / "a.pid")})
    other = _sleeper({PIDFILE_ENV: str(tmp_path / "elsewhere.pid")})
    try:
        node.pidfile.write_text(f"{ours.pid}\n")
        assert probe(node).state == "running"
        node.pidfile.write_text(f"{other.pid}\n")
        assert (probe(node).state, probe(node).detail) == (
            "stale",
            f"pid {other.pid} is another program",
        )
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


def test_a_node_this_user_cannot_look_at_is_neither_signalled_nor_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whether a pid is the node's is read from /proc/PID/environ; a user who may not read
    it (or the pidfile) cannot tell, and must not act as if it could: a forged pidfile
    could name any process."""
    from stem.cli import multi_daemon

    victim = _sleeper({})
    paths = ["--pidfile", f"{tmp_path}/%n.pid", "--logfile", f"{tmp_path}/%n.log"]
    (tmp_path / "a.pid").write_text(f"{victim.pid}\n")

    def unreadable(pid: int) -> list[bytes]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(multi_daemon, "_environ", unreadable)
    try:
        assert multi.run(["status", "a", *paths]) == multi.MultiExit.UNKNOWN
        assert multi.run(["stop", "a", *paths]) == multi.MultiExit.NOPERM
        assert multi.run(["kill", "a", *paths]) == multi.MultiExit.NOPERM
        assert multi.run(["start", "a", *paths, "--ready-timeout", "0"]) == (multi.MultiExit.NOPERM)
        assert victim.poll() is None  # never signalled
        assert (tmp_path / "a.pid").read_text() == f"{victim.pid}\n"  # nor its pidfile removed
        out = capsys.readouterr()
        assert "cannot tell whether pid" in out.out + out.err

        def no_read(path: Path) -> int | None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(multi_daemon, "read_pid", no_read)
        assert multi.run(["status", "a", *paths]) == multi.MultiExit.UNKNOWN
        assert multi.run(["stop", "a", *paths]) == multi.MultiExit.NOPERM
        assert "cannot read" in capsys.readouterr().out
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_a_directory_in_place_of_a_pidfile_is_reported_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.pid").mkdir()
    paths = ["--pidfile", f"{tmp_path}/%n.pid", "--logfile", f"{tmp_path}/%n.log"]
    assert multi.run(["status", "a", *paths]) == multi.MultiExit.STALE
    assert multi.run(["stop", "a", *paths]) == multi.MultiExit.CONFIG
    assert f"cannot remove {tmp_path}/a.pid" in capsys.readouterr().err
    (tmp_path / "f").write_text("a file where the pidfile directory should be")
    paths = ["--pidfile", f"{tmp_path}/f/%n.pid", "--logfile", f"{tmp_path}/%n.log"]
    assert multi.run(["stop", "a", *paths]) == multi.MultiExit.CONFIG
    assert f"cannot open {tmp_path}/f" in capsys.readouterr().err


@pytest.mark.slow
def test_stopwait_timeout_is_reported(mt: Multi) -> None:
    _ok(mt("start", "a", *FAST, "--shutdown-budget", "60"))
    app = Stem("producer", broker=mt.cli.url, backend=mt.cli.url)
    app.send_task("acc.sleep", [30])
    _wait(lambda: app.broker.stats(["default"])[0].reserved == 1, 20, "the task to start")
    late = mt("stopwait", "a", "--timeout", "0.5")
    assert late.returncode == multi.MultiExit.STOP_TIMEOUT
    assert "a: still running" in late.stderr
    _ok(mt("kill", "a"))
    app.close()


@pytest.mark.slow
def test_a_node_that_cannot_start_is_reported_with_its_log(mt: Multi) -> None:
    proc = mt("start", "a", "--app", "no_such_module:app", *FAST)
    assert proc.returncode == multi.MultiExit.START_FAILED
    assert "a: exited during startup" in proc.stderr
    assert "no_such_module" in proc.stderr  # the end of the node's log
    assert not (mt.base / "run" / "a.pid").exists()


@pytest.mark.slow
def test_a_beat_node_is_started_once_it_says_it_is_ready(mt: Multi) -> None:
    out = _ok(mt("start", "beat", "--role", "beat", "--ready-timeout", "60"))
    assert "beat: started" in out and "starting" in out  # its READY=1 STATUS, not a guess
    assert _ok(mt("status", "beat")).startswith("beat: running")
    _ok(mt("stopwait", "beat"))
    assert "beat: stopped" in _ok(mt("status", "beat"), multi.MultiExit.NOT_RUNNING)


def test_a_beat_whose_schedules_do_not_parse_is_not_reported_started(
    mt: Multi, tmp_path: Path
) -> None:
    config = tmp_path / "beat.yaml"
    config.write_text("beat:\n  schedules:\n    'bad name!':\n      task: t\n      every: 5\n")
    proc = mt("start", "beat", "--role", "beat", env={"STEM_CONFIG": str(config)})
    assert proc.returncode == multi.MultiExit.START_FAILED, proc.stdout + proc.stderr
    assert "exited during startup" in proc.stderr and "bad name!" in proc.stderr


def test_show_and_names(mt: Multi) -> None:
    shown = _ok(mt("show", "2", "-Q", "mail", "-c:2", "4", stem="stem"))
    lines = shown.splitlines()
    state = mt.base / "state"
    assert lines[0] == f"STEM_WORKER_STATE_FILE={state}/1.json " + shlex.join(
        ["stem", "worker", "--name", f"1@{HOST}", "-Q", "mail"]
    )
    assert lines[1].endswith("-Q mail -c 4")
    assert _ok(mt("names", "3")).split() == ["1", "2", "3"]


# -- privileges -----------------------------------------------------------------------------

FAKE_NODE = """#!/bin/sh
echo "fake node $$ as $(id -u):$(id -g) args: $*"
trap 'echo "fake node $$ stopping"; exit 0' TERM
while :; do sleep 0.1; done
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory an unprivileged user can reach (pytest's tmp_path is root-only)."""
    base = Path(tempfile.mkdtemp(prefix="stem-multi-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_privileges_are_dropped_completely(open_dir: Path, mt: Multi) -> None:
    # The node is a shell script: this machine's Python lives under /root, which an
    # unprivileged user cannot enter, and the point here is stem-multi's privilege drop.
    fake = open_dir / "fake-node.sh"
    fake.write_text(FAKE_NODE)
    fake.chmod(0o755)
    mt.base = open_dir
    user = pwd.getpwnam("nobody")
    group = grp.getgrgid(user.pw_gid)
    args = ("start", "a", "--user", "nobody", "--group", group.gr_name, "--ready-timeout", "0")
    # stem-multi runs with an extra supplementary group: the node must not keep it.
    out = _ok(mt(*args, stem=f"/bin/sh {fake}", extra_groups=[4]))
    assert "a: started" in out
    pid = mt.pid("a")
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert status["Uid"].split() == [str(user.pw_uid)] * 4  # real, effective, saved, fs
    assert status["Gid"].split() == [str(group.gr_gid)] * 4
    expected_groups = sorted(os.getgrouplist("nobody", group.gr_gid))
    assert sorted(int(g) for g in status["Groups"].split()) == expected_groups
    assert status["Umask"].strip() == "0027"
    pidfile, log = open_dir / "run" / "a.pid", open_dir / "log" / "a.log"
    for path in (pidfile, log, pidfile.parent, log.parent):
        assert path.stat().st_uid == user.pw_uid, path
    assert oct(log.stat().st_mode & 0o777) == "0o640"
    _wait(lambda: f"as {user.pw_uid}:{group.gr_gid}" in log.read_text(), 10, "the node log")
    assert pwd.getpwuid(os.getuid()).pw_name == "root"  # stem-multi itself was root
    _ok(mt("stopwait", "a"))
    assert "stopping" in log.read_text()
    assert _ok(mt("status", "a"), multi.MultiExit.NOT_RUNNING) == "a: stopped\n"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_user_that_cannot_write_the_pidfile_is_reported(open_dir: Path, mt: Multi) -> None:
    run = open_dir / "run"
    run.mkdir(mode=0o755)  # exists, owned by root: stem-multi does not chown what it found
    mt.base = open_dir
    proc = mt("start", "a", "--user", "nobody", "--ready-timeout", "0", stem="/bin/true")
    assert proc.returncode == multi.MultiExit.NOPERM, proc.stderr
    assert f"cannot create the pidfile {run}/a.pid as user nobody" in proc.stderr
