"""`stem queues` and `stem dlq replay|purge` on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from stem import Stem
from stem.brokers.base import Message
from stem.cli.main import app as cli


def _dead_letter(url: str) -> str:
    app = Stem("dlq-cli", broker=url, backend=url)
    try:
        app.publish_messages([Message(id="m1", queue="default", body=b"not an envelope")])
        [delivery] = app.broker.reserve(["default"], 1, 30.0, 1.0)
        app.broker.dead_letter(delivery, "malformed", "test")
        [letter] = app.broker.dlq_list("default")
        return letter.id
    finally:
        app.close()


def test_replay_and_purge_name_the_ids_they_did_not_find(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    runner = CliRunner()
    real = _dead_letter(url)
    replay = runner.invoke(cli, ["--broker", url, "dlq", "replay", real, "nope"])
    assert replay.exit_code == 66, replay.output
    assert "replayed 1" in replay.stdout
    assert "no dead letter 'nope'" in replay.stderr

    real = _dead_letter(url)
    purge = runner.invoke(cli, ["--broker", url, "dlq", "purge", "--yes", "gone", real])
    assert purge.exit_code == 66, purge.output
    assert "purged 1" in purge.stdout and "no dead letter 'gone'" in purge.stderr
    assert runner.invoke(cli, ["--broker", url, "dlq", "purge", "--all", "--yes"]).exit_code == 0


def test_queues_hides_stem_internal_queues_unless_asked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    app = Stem("queues-cli", broker=url, backend=url)
    try:
        app.publish_messages(
            [
                Message(id=f"m{i}", queue=q, body=b"{}")
                for i, q in enumerate(["default", "stem.control.alpha@h", "stem.reply.r1"])
            ]
        )
    finally:
        app.close()
    runner = CliRunner()

    def listed(*extra: str) -> list[str]:
        out = runner.invoke(cli, ["--broker", url, "queues", "--json", *extra])
        assert out.exit_code == 0, out.output
        return [row["queue"] for row in json.loads(out.stdout)]

    assert listed() == ["default"]
    assert listed("--internal") == ["default", "stem.control.alpha@h", "stem.reply.r1"]
    assert listed("stem.reply.r1") == ["stem.reply.r1"]


def test_replay_all_stops_at_what_was_dead_when_it_started() -> None:
    """A replayed message that a running worker dead-letters again (a forged one) shows up
    in the DLQ again while `dlq replay --all` is still reading it: it must not loop."""
    from stem.brokers.base import DeadLetter
    from stem.cli.dlq_cmd import _batches

    class RefillingDLQ:
        calls = 0

        def dlq_list(self, queue: str | None, limit: int) -> list[DeadLetter]:
            self.calls += 1
            return [
                DeadLetter(f"d{self.calls}-{i}", "m", "default", b"", "malformed", "", 0, 1)
                for i in range(limit)
            ][:1]

    broker = RefillingDLQ()
    batches = list(_batches(broker, None, None, [], limit=3))  # type: ignore[arg-type]
    assert sum(len(b) for b in batches) == 3 and broker.calls == 3
