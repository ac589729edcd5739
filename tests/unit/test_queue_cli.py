"""`stem queues` and `stem dlq replay|purge` on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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


def test_replay_resigns_only_letters_whose_signature_verifies(tmp_path: Path) -> None:
    """The reason of a dead letter is unsigned broker data: `dlq replay` re-signs a letter
    only when its own signature verifies (however old), whatever reason it is filed under.
    Forged, altered, unsigned and retired-key letters go back untouched, for workers to
    refuse again; a genuine one goes back to the queue it was signed for."""
    import base64

    from stem.envelope import decode, encode
    from stem.errors import SignatureError
    from stem.security.signing import Keyring

    url = f"sqlite:///{tmp_path / 'stem.db'}"
    secrets = {"v0": b"0" * 32, "v1": b"1" * 32}
    old = Keyring.build("hmac-sha256", secrets, active_key="v0")
    ring = Keyring.build("hmac-sha256", {"v1": secrets["v1"]}, active_key="v1")
    app = Stem("dlq-sign", broker=url, backend=url, keyring=ring)
    bodies: dict[str, bytes] = {}

    def dead(reason: str, env_id: str, body: bytes) -> None:
        app.publish_messages([Message(id=env_id, queue="default", body=body)])
        [delivery] = app.broker.reserve(["default"], 1, 30.0, 1.0)
        app.broker.dead_letter(delivery, reason, "test")
        bodies[env_id] = body

    try:
        genuine = app.build_envelope("t", [1], task_id="genuine")
        dead("retries-exhausted", genuine.id, app.seal(genuine))
        altered = decode(app.seal(app.build_envelope("t", [2], task_id="altered")))
        dead("retries-exhausted", altered.id, encode(altered.replace(task="evil", args=(2,))))
        dead("unknown-task", "forged", encode(app.build_envelope("evil", [3], task_id="forged")))
        retired = old.sign(app.build_envelope("t", [4], task_id="retired"))
        dead("unknown-task", retired.id, encode(retired))
        routed = app.build_envelope("t", [5], queue="payments", task_id="routed")
        dead("misrouted", routed.id, app.seal(routed))
        later = app.build_envelope("t", [6], countdown=3600, task_id="later")
        dead("misrouted", later.id, app.seal(later))  # its ETA is still ahead

        env = {
            "STEM_SIGNING_KEYS": "v1:" + base64.b64encode(secrets["v1"]).decode(),
            "STEM_SIGNING_ACTIVE_KEY": "v1",
        }
        out = CliRunner().invoke(cli, ["--broker", url, "dlq", "replay", "--all"], env=env)
        assert out.exit_code == 0, out.output
        assert "replayed 6" in out.stdout
        [stats] = app.broker.stats(["default"])
        assert stats.delayed == 1  # "later" waits for its ETA

        got = {
            d.message_id: d
            for q in ("default", "payments")
            for d in app.broker.reserve([q], 10, 30.0, 1.0)
        }
        assert {m: got[m].queue for m in got} == {
            "genuine": "default",
            "altered": "default",
            "forged": "default",
            "retired": "default",
            "routed": "payments",
        }
        for untouched in ("altered", "forged", "retired"):
            assert got[untouched].body == bodies[untouched]
            with pytest.raises(SignatureError):
                ring.verify(decode(got[untouched].body), body=got[untouched].body)
        for resigned in ("genuine", "routed"):
            assert got[resigned].body != bodies[resigned]
            ring.verify(decode(got[resigned].body), body=got[resigned].body)
    finally:
        app.close()


def test_purging_a_dead_unique_task_frees_its_key(tmp_path: Path) -> None:
    """A dead-lettered unique task keeps its key while a replay may still run it; once
    purged for good, the same enqueue creates a new task instead of returning the dead one."""
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    app = Stem("dlq-unique", broker=url, backend=url)

    @app.task(name="once", unique=True)
    def once(n: int) -> int:
        return n

    try:
        first = once.delay(1)
        other = once.delay(2)
        assert once.delay(1).id == first.id
        for _ in range(2):
            [delivery] = app.broker.reserve(["default"], 1, 30.0, 1.0)
            app.broker.dead_letter(delivery, "max-deliveries-exceeded", "test")
        assert once.delay(1).id == first.id  # dead, but replayable: still holds its key
        letter = next(d for d in app.broker.dlq_list() if d.message_id == first.id)
        out = CliRunner().invoke(cli, ["--broker", url, "dlq", "purge", "--yes", letter.id])
        assert out.exit_code == 0, out.output
        assert once.delay(1).id != first.id
        assert once.delay(2).id == other.id  # a letter not purged keeps its key
    finally:
        app.close()


def test_dead_letter_rows_with_mistyped_columns_still_list_and_show(tmp_path: Path) -> None:
    """Rows written by something else than Stem made `dlq list` fail for every letter."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'stem.db'}"
    _dead_letter(url)  # one well-formed letter (and the schema)
    raw = sqlite3.connect(tmp_path / "stem.db")
    for dead_ms in ("'yesterday'", "1e30"):
        raw.execute(
            "INSERT INTO stem_dead_letters (message_id, queue, priority, body, reason, detail, "
            f"dead_ms, delivery_count) VALUES ('odd', 'default', 0, 'text body', 'r', 'd', "
            f"{dead_ms}, 'x')"
        )
    raw.commit()
    raw.close()
    runner = CliRunner()
    listed = runner.invoke(cli, ["--broker", url, "dlq", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert len(rows) == 3
    shown = runner.invoke(cli, ["--broker", url, "dlq", "show", str(rows[-1]["id"])])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["body"] == "text body"


def test_a_signed_letter_named_twice_is_replayed_once(tmp_path: Path) -> None:
    import base64

    from stem.security.signing import Keyring

    url = f"sqlite:///{tmp_path / 'stem.db'}"
    secret = b"1" * 32
    app = Stem(
        "dlq-twice", broker=url, backend=url, keyring=Keyring.build("hmac-sha256", {"v1": secret})
    )
    try:
        env = app.build_envelope("t", [1], task_id="once")
        app.publish_messages([Message(id=env.id, queue="default", body=app.seal(env))])
        [delivery] = app.broker.reserve(["default"], 1, 30.0, 1.0)
        app.broker.dead_letter(delivery, "unknown-task", "test")
        [letter] = app.broker.dlq_list("default")
        keys = {"STEM_SIGNING_KEYS": "v1:" + base64.b64encode(secret).decode()}
        out = CliRunner().invoke(
            cli, ["--broker", url, "dlq", "replay", letter.id, letter.id, "0" + letter.id], env=keys
        )
        assert out.exit_code == 0, out.output
        assert "replayed 1" in out.stdout
        assert [d.message_id for d in app.broker.reserve(["default"], 10, 30.0)] == ["once"]
    finally:
        app.close()


def test_tables_piped_are_not_cut_short(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    long_name = "billing.invoices.monthly-close." + "x" * 90
    app = Stem("wide", broker=url, backend=url)
    try:
        app.publish_messages([Message(id="m1", queue=long_name, body=b"{}")])
    finally:
        app.close()
    out = CliRunner().invoke(cli, ["--broker", url, "queues"])  # stdout is not a terminal
    assert out.exit_code == 0, out.output
    assert long_name in out.stdout
