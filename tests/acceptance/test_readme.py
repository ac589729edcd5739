"""Every example and command in the README runs (issue: enablement and quality)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
pytestmark = pytest.mark.slow


def _blocks(lang: str) -> list[str]:
    text = README.read_text()
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _stem_lines() -> list[str]:
    lines = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("stem ", "stem-multi ")):
                lines.append(line)
    return lines


def test_readme_names_the_two_commands() -> None:
    sh = "\n".join(_blocks("sh"))
    assert "make demo" in sh and "make test" in sh
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_quick_start_and_cli_examples_run(tmp_path: Path) -> None:
    [tasks_src] = [b for b in _blocks("python") if b.startswith("# shop/tasks.py")]
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "__init__.py").write_text("")
    # The README's absolute database path, moved into this test's directory.
    assert "sqlite:////var/tmp/stem.db" in tasks_src
    db = f"sqlite:///{tmp_path / 'stem.db'}"
    (tmp_path / "shop" / "tasks.py").write_text(tasks_src.replace("sqlite:////var/tmp/stem.db", db))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    stem = [sys.executable, "-m", "stem.cli.main"]
    multi = [sys.executable, "-m", "stem.cli.multi"]
    lines = _stem_lines()
    [worker_line] = [ln for ln in lines if " worker " in ln and "-Q default,mail" not in ln]
    worker = subprocess.Popen(stem + shlex.split(worker_line)[1:], cwd=tmp_path, env=env)
    try:
        producers = [b for b in _blocks("python") if b.startswith("from shop.tasks import")]
        assert producers, "the README lost its producer example"
        canvas = [b for b in _blocks("python") if b.startswith("from stem import chain")]
        assert canvas, "the README lost its canvas example"
        for src in producers + canvas:
            subprocess.run(
                [sys.executable, "-c", src], cwd=tmp_path, env=env, check=True, timeout=60
            )
        enq = [ln for ln in lines if " enqueue " in ln]
        assert enq
        task_id = ""
        for line in lines:
            if " worker " in line and not line.startswith("stem-multi"):
                continue
            words = shlex.split(line.replace("TASK_ID", task_id or "missing"))
            cmd = (multi if words[0] == "stem-multi" else stem) + words[1:]
            proc = subprocess.run(
                cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
            )
            assert proc.returncode == 0, f"{line}\n{proc.stdout}\n{proc.stderr}"
            if " enqueue " in line:
                task_id = proc.stdout.strip().splitlines()[0]
                time.sleep(6)  # the README's enqueue uses --countdown 5
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0


def test_the_commands_the_readme_names_read_every_option_from_the_environment() -> None:
    """README: every option of the global set, worker, beat, enqueue and result reads a
    STEM_* variable."""
    import typer.main

    from stem.cli.main import app

    root = typer.main.get_command(app)
    commands = {
        "(global)": root,
        **{n: root.commands[n] for n in ("worker", "beat", "enqueue", "result")},
    }  # type: ignore[attr-defined]
    missing = [
        f"{name} {p.opts[0]}"
        for name, cmd in commands.items()
        for p in cmd.params
        if type(p).__name__.endswith("Option")
        and p.opts[0] not in ("--help", "--install-completion", "--show-completion", "--json")
        and not str(p.envvar or "").startswith("STEM_")
    ]
    assert "every option of the global set, `worker`, `beat`, `enqueue` and `result`" in (
        " ".join(README.read_text().split()).lower()
    )
    assert missing == []
