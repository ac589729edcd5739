"""The real ``stem`` CLI as subprocesses on the embedded SQLite default."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from stem import Stem, states

from .conftest import StemCLI

pytestmark = pytest.mark.slow


def _producer(cli: StemCLI) -> Stem:
    return Stem("producer", broker=cli.url, backend=cli.url)


def _wait_all(app: Stem, ids: list[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        recs = app.result_store.read_many(ids)
        done = {r.task_id: r.state for r in recs if r is not None}
        if len(done) == len(ids) and all(s in states.READY_STATES for s in done.values()):
            return done
        if time.monotonic() > deadline:
            return done
        time.sleep(0.2)


def _pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def test_sigkill_mid_batch_then_restart_every_task_succeeds(cli: StemCLI) -> None:
    app = _producer(cli)
    n = 400
    results = [app.send_task("acc.square", [i]) for i in range(n)]
    ids = [r.id for r in results]
    env = {"STEM_TEST_TASK_SLEEP": "0.01"}
    first = cli.start_worker("--pool", "process", "-c", "2", "--lease", "2", env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = sum(1 for r in app.result_store.read_many(ids) if r is not None)
        if done >= n // 4:
            break
        time.sleep(0.05)
    assert done < n, "the worker finished before it could be killed; make tasks slower"
    first.send_signal(signal.SIGKILL)
    first.wait()
    cli.start_worker("--pool", "process", "-c", "2", "--lease", "2", env=env)
    final = _wait_all(app, ids, timeout=120)
    assert len(final) == n, f"{n - len(final)} tasks never finished:\n{cli.log_text()[-3000:]}"
    assert set(final.values()) == {states.SUCCESS}
    assert [r.get(timeout=1) for r in results] == [i * i for i in range(n)]
    [stats] = [s for s in app.broker.stats() if s.queue == "default"]
    assert (stats.ready, stats.reserved, stats.delayed, stats.dead) == (0, 0, 0, 0)
    app.close()


def test_hard_time_limit_kills_the_child_not_the_worker(cli: StemCLI) -> None:
    app = _producer(cli)
    worker = cli.start_worker("--pool", "process", "-c", "1", "--lease", "5")
    stuck = app.send_task("acc.stuck")
    rec = stuck.wait_record(timeout=30)
    assert rec.state == states.FAILURE
    assert rec.error is not None and rec.error.type == "HardTimeLimitExceeded"
    assert worker.poll() is None, "the worker died with its child"
    assert app.send_task("acc.square", [7]).get(timeout=30) == 49
    app.close()


def test_sigterm_drains_running_tasks_before_exit(cli: StemCLI) -> None:
    app = _producer(cli)
    worker = cli.start_worker("--pool", "process", "-c", "1", "--shutdown-budget", "20")
    res = app.send_task("acc.sleep", [1.5])
    deadline = time.monotonic() + 30
    while app.broker.stats(["default"])[0].reserved == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert res.state == states.SUCCESS
    app.close()


@pytest.mark.parametrize("pool", ["process", "thread", "async"])
def test_drain_budget_hands_back_and_second_signal_stops_now(cli: StemCLI, pool: str) -> None:
    """On every pool, a task still running when the worker stops now is handed back and
    the process ends: one that lived on (the async pool's plain functions, in threads
    joined at exit) could run the task a second time beside its next delivery."""
    app = _producer(cli)
    worker = cli.start_worker("--pool", pool, "-c", "1", "--shutdown-budget", "60")
    res = app.send_task("acc.sleep", [30])
    deadline = time.monotonic() + 30
    while app.broker.stats(["default"])[0].reserved == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert worker.poll() is None  # still draining
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=15) == 0
    [stats] = app.broker.stats(["default"])
    assert (stats.ready, stats.reserved) == (1, 0)  # handed back, not lost
    assert res.state == states.PENDING
    app.close()


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_task_code_logs_in_the_workers_format_naming_its_task(cli: StemCLI, pool: str) -> None:
    """A task's own logger (not Stem's) comes out at the worker's level, in its format,
    with the task's id, on the process pool too (the default: tasks run in children)."""
    app = _producer(cli)
    worker = cli.start_worker("--pool", pool, "-c", "1", env={"STEM_LOG_FORMAT": "json"})
    res = app.send_task("acc.say", ["hello"])
    assert res.get(timeout=30) == "hello"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    lines = [json.loads(ln) for ln in cli.log_text().splitlines() if ln.startswith("{")]
    said = [ln for ln in lines if ln["logger"] == "acc.tasks"]
    assert said, cli.log_text()[-2000:]
    assert [(ln["level"], ln["message"], ln["task"], ln["task_id"]) for ln in said] == [
        ("info", "said hello", "acc.say", res.id)
    ]
    text = cli.start_worker("--pool", pool, "-c", "1", name="text")
    res = app.send_task("acc.say", ["again"])
    assert res.get(timeout=30) == "again"
    text.send_signal(signal.SIGTERM)
    assert text.wait(timeout=30) == 0
    assert f"INFO acc.tasks: acc.say[{res.id}] said again" in cli.log_text()
    app.close()


@pytest.mark.parametrize("module", ["acc_own_logging", "acc_basic_logging"])
@pytest.mark.parametrize("pool", ["process", "thread"])
def test_an_app_with_its_own_root_logging_gets_each_line_once(
    cli: StemCLI, pool: str, module: str
) -> None:
    """Stem's lines through Stem's handler only (redacted, never twice); task code's
    through the handlers the app set up (dictConfig, or basicConfig: which does nothing
    if the root logger already has a handler when the app is imported)."""
    app = _producer(cli)
    env = {"STEM_APP": f"{module}:app"}
    worker = cli.start_worker("--pool", pool, "-c", "1", env=env)
    res = app.send_task("own.say", ["hi"])
    assert res.get(timeout=30) == "hi"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    lines = cli.log_text().splitlines()
    assert [ln for ln in lines if "said hi" in ln] == ["APP-HANDLER own.tasks: said hi"]
    assert len([ln for ln in lines if "ready: queues=default" in ln]) == 1
    assert not [ln for ln in lines if ln.startswith("APP-HANDLER stem.")]
    app.close()


def test_enqueue_result_queues_and_dlq_commands(cli: StemCLI) -> None:
    out = cli.run("enqueue", "acc.square", "--args", "[9]", check=True)
    task_id = out.stdout.strip()
    ghost = cli.run("enqueue", "no.such.task", "--args", "[]", check=True).stdout.strip()
    queues = json.loads(cli.run("queues", "--json", check=True).stdout)
    assert queues == [{"queue": "default", "ready": 2, "delayed": 0, "reserved": 0, "dead": 0}]
    pending = cli.run("result", task_id)
    assert pending.returncode == 66 and "PENDING" in pending.stdout
    # Waited in vain: scripts asking for JSON still get the new task's id and its state.
    timed = cli.run("enqueue", "acc.square", "--args", "[3]", "--wait", "0.3", "--json")
    assert timed.returncode == 75, timed.stderr
    body = json.loads(timed.stdout)
    assert (body["state"], body["timed_out"]) == ("PENDING", True) and body["task_id"]
    timed = cli.run("result", task_id, "--wait", "0.3", "--json")
    assert timed.returncode == 75 and json.loads(timed.stdout)["task_id"] == task_id

    cli.start_worker("--pool", "thread", "-c", "2")
    shown = cli.run("result", task_id, "--wait", "30", "--json", check=True)
    assert json.loads(shown.stdout)["result"] == 81
    dead = cli.run("result", ghost, "--wait", "30")
    assert dead.returncode == 65 and "DEAD" in dead.stdout
    # A task still running is no success: `stem result ID && next_step` must not go on.
    store = Stem("acc", broker=cli.url)
    store.result_store.write_state("running-1", states.STARTED, task="acc.square")
    store.close()
    running = cli.run("result", "running-1")
    assert running.returncode == 75 and "STARTED" in running.stdout

    letters = json.loads(cli.run("dlq", "list", "--json", check=True).stdout)
    assert [(d["reason"], d["detail"]) for d in letters] == [("unknown-task", "no.such.task")]
    missing = cli.run("dlq", "show", "nope")
    assert missing.returncode == 66 and "no dead letter 'nope'" in missing.stderr
    show = json.loads(cli.run("dlq", "show", letters[0]["id"], check=True).stdout)
    assert json.loads(show["body"])["task"] == "no.such.task"
    cli.stop_all()
    replay = cli.run("dlq", "replay", "--all", check=True)
    assert replay.stdout.strip() == "replayed 1"
    after = json.loads(cli.run("queues", "--json", check=True).stdout)
    assert after[0]["ready"] == 1 and after[0]["dead"] == 0
    assert cli.run("dlq", "purge", "--all", "--yes", check=True).stdout.strip() == "purged 0"


def test_delayed_task_survives_a_worker_restart(cli: StemCLI) -> None:
    # Long enough to be still delayed when counted below, on a loaded machine too (with
    # 2 s, the count ran after it on a loaded CI run).
    out = cli.run("enqueue", "acc.square", "--args", "[4]", "--countdown", "8", check=True)
    task_id = out.stdout.strip()
    worker = cli.start_worker("--pool", "thread", "-c", "1")
    time.sleep(0.5)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    queues = json.loads(cli.run("queues", "--json", check=True).stdout)
    assert queues[0]["delayed"] == 1
    cli.start_worker("--pool", "thread", "-c", "1")
    shown = cli.run("result", task_id, "--wait", "30", "--json", check=True)
    assert json.loads(shown.stdout)["result"] == 16


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["enqueue", "acc.square", "--args", "{bad"], 2, "--args is not valid JSON"),
        (["enqueue", "acc.square", "--args", "{}"], 2, "--args must be a JSON array"),
        (["--broker", "ftp://x", "queues"], 78, "--broker: broker.url: expected a URL starting"),
        (["--app", "no_such_module:app", "worker"], 78, "module 'no_such_module' not found"),
        (["--app", "acc_tasks:nothing", "worker"], 78, "has no attribute 'nothing'"),
        (
            ["--app", "broken_import_app:app", "worker"],
            78,
            "importing 'broken_import_app' failed: ModuleNotFoundError: No module named "
            "'stem_test_dependency_not_installed' (at ",
        ),
        (["worker", "--pool", "gevent"], 78, "--pool: worker.pool: expected one of process"),
        (["worker", "-c", "100000"], 2, "less than or equal to 4096"),
        (["dlq", "show", "nope"], 69, "no SQLite database at"),  # nothing ran here yet
        (["--broker", "sqlite:////proc/forbidden/x.db", "queues"], 69, "/proc/forbidden"),
    ],
)
def test_cli_errors_are_clear(cli: StemCLI, args: list[str], code: int, message: str) -> None:
    proc = cli.run(*args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_inspecting_a_mistyped_sqlite_path_creates_nothing(cli: StemCLI, tmp_path: Path) -> None:
    typo = tmp_path / "typo" / "dir" / "stme.db"
    commands = (
        ["queues"],
        ["dlq", "list"],
        ["workers"],
        ["events", "--no-follow"],
        ["control", "ping"],
        ["schedule", "list"],
        ["schedule", "disable", "nightly"],
        ["schedule", "remove", "nightly"],
        ["result", "0123456789abcdef"],
    )
    # Independent commands: run side by side (one after another they took 8 s).
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = list(
            pool.map(lambda args: cli.run("--broker", f"sqlite:///{typo}", *args), commands)
        )
    for args, proc in zip(commands, procs, strict=True):
        assert proc.returncode == 69, (args, proc.stderr)
        assert f"no SQLite database at {typo}" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_cli_never_prints_broker_passwords(cli: StemCLI) -> None:
    proc = cli.run(
        "--broker", "redis://user:s3cr3t-pw@127.0.0.1:1/0?password=s3cr3t-pw", "queues", timeout=60
    )
    assert proc.returncode != 0
    assert "s3cr3t-pw" not in proc.stderr + proc.stdout


def test_every_option_reads_an_environment_variable(cli: StemCLI) -> None:
    out = cli.run(
        "enqueue",
        "acc.square",
        env={"STEM_ENQUEUE_ARGS": "[5]", "STEM_ENQUEUE_QUEUE": "envq"},
        check=True,
    )
    assert out.stdout.strip()
    queues = json.loads(cli.run("queues", "--json", check=True).stdout)
    assert {q["queue"]: q["ready"] for q in queues} == {"envq": 1}


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_tasks_published_by_tasks_are_sent_events_on_every_pool(cli: StemCLI, pool: str) -> None:
    """On the process pool a task publishes from a pool process, where the worker's event
    publisher never heard of it: no task-sent event came out."""
    cli.start_worker("--pool", pool, "-c", "1", "--events")
    out = cli.run("enqueue", "acc.fan_out", "--args", "[5]", "--wait", "30", "--json", check=True)
    child_id = json.loads(out.stdout)["result"]
    deadline = time.monotonic() + 30
    sent: list[dict[str, object]] = []
    while not sent and time.monotonic() < deadline:
        shown = cli.run("events", "--no-follow", "--json", check=True).stdout.splitlines()
        events = [json.loads(line) for line in shown]
        sent = [e for e in events if e["type"] == "task-sent" and e.get("task_id") == child_id]
        time.sleep(0.2)
    assert sent, "no task-sent event for the task published from inside a task"
    assert (sent[0]["task"], sent[0]["queue"]) == ("acc.square", "default")


def test_a_pool_process_dies_with_a_worker_killed_while_its_task_holds_the_gil(
    cli: StemCLI, tmp_path: Path
) -> None:
    """A pool process noticed its worker's death only from a Python thread, which cannot
    run while the task holds the GIL in C: killed with SIGKILL, the worker left it running
    the task beside the copy delivered again after the lease."""
    pid_file = tmp_path / "hog.pid"
    worker = cli.start_worker("--pool", "process", "-c", "1")
    cli.run("enqueue", "acc.gil_hog", "--args", json.dumps([str(pid_file)]), check=True)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    hog = int(pid_file.read_text())
    time.sleep(0.5)  # well inside its C call
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(hog, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the pool process outlived its worker")
    finally:
        try:
            os.kill(hog, signal.SIGKILL)
        except ProcessLookupError:
            pass
