"""`stem worker` under the production profile: refused with the gate's id when the
configuration is unsafe, started when it is complete (run as an unprivileged user)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stem import Stem
from stem.security.signing import Keyring

from .conftest import APPDIR, ROOT, StemCLI

pytestmark = pytest.mark.slow
NOBODY = 65534


def _production_dir(base: Path, db: Path, key: Path | None) -> Path:
    etc = base / "etc"
    etc.mkdir()
    signing = (
        ""
        if key is None
        else (f"signing:\n  algorithm: hmac-sha256\n  keys: [{key}]\n  active_key: v1\n")
    )
    (etc / "stem.production.yaml").write_text(
        f"broker:\n  url: sqlite:///{db}\nbackend:\n  result_ttl_s: 3600\n{signing}"
    )
    return etc


def test_production_refuses_signing_off_with_the_gate_id(cli: StemCLI, tmp_path: Path) -> None:
    etc = _production_dir(tmp_path, cli.db, None)
    proc = cli.run(
        "--profile", "production", "worker", "-P", "thread", env={"STEM_CONFIG_DIR": str(etc)}
    )
    assert proc.returncode == 78, proc.stderr
    assert "G001-signing-off" in proc.stderr
    assert "G009-run-as-root" in proc.stderr or os.geteuid() != 0
    check = cli.run(
        "--profile", "production", "config", "check", "--json", env={"STEM_CONFIG_DIR": str(etc)}
    )
    assert check.returncode == 78
    assert '"G001-signing-off"' in check.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_complete_production_config_starts_as_an_unprivileged_user(tmp_path: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is required to run the worker as another user")
    base = tmp_path / "prod"
    base.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(base, 0o777)
    keys = base / "keys"
    gen = subprocess.run(
        [
            sys.executable,
            "-m",
            "stem.cli.main",
            "keys",
            "generate",
            "--algorithm",
            "hmac-sha256",
            "--kid",
            "v1",
            "--out",
            str(keys),
        ],
        capture_output=True,
        text=True,
    )
    assert gen.returncode == 0, gen.stderr
    key = keys / "v1.hmac-sha256.key"
    for path in (keys, key):
        os.chown(path, NOBODY, NOBODY)
    db = base / "stem.db"
    etc = _production_dir(base, db, key)
    env = {
        **os.environ,
        "STEM_CONFIG_DIR": str(etc),
        "STEM_PROFILE": "production",
        "STEM_TEST_BROKER": f"sqlite:///{db}",
        "STEM_APP": "acc_tasks:app",
        "PYTHONPATH": os.pathsep.join([str(APPDIR), str(ROOT)]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": str(base),
    }
    # The worker runs as nobody; it may still read this checkout (under /root on some
    # machines) through CAP_DAC_READ_SEARCH, which grants no write access and no root.
    log = base / "worker.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "--inh-caps=+dac_read_search",
                "--ambient-caps=+dac_read_search",
                sys.executable,
                "-m",
                "stem.cli.main",
                "worker",
                "-P",
                "thread",
                "-c",
                "2",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=base,
        )
    try:
        keyring = Keyring.from_env(
            {
                "STEM_SIGNING_ALGORITHM": "hmac-sha256",
                "STEM_SIGNING_KEYS": str(key),
                "STEM_SIGNING_ACTIVE_KEY": "v1",
            }
        )
        deadline = time.monotonic() + 30
        while not db.exists() and time.monotonic() < deadline:
            if worker.poll() is not None:
                break
            time.sleep(0.1)
        assert worker.poll() is None, log.read_text()
        producer = Stem("producer", broker=f"sqlite:///{db}", keyring=keyring)
        assert producer.send_task("acc.square", [12]).get(timeout=30) == 144
        producer.close()
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text
    assert "G00" not in text  # no gate warned or failed
