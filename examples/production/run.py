"""The production profile end to end: quality gates, TLS, signed messages, systemd units.

python examples/production/run.py

1. keys and secrets: ``stem keys generate``, a chmod-600 broker URL file;
2. development certificates (``stem certs dev``): ``stem config check --profile production``
   refuses them (gate G006, exit 78);
3. certificates from a private CA (own_ca.py, standing in for yours): the check passes --
   except G009 when this script runs as root, which no setting can waive;
4. a throwaway TLS-only ``redis-server`` (password, client certificates required);
5. ``stem worker`` and ``stem enqueue --wait`` over verified TLS with signed messages, under
   the production profile (as root: the same file layered on the development profile,
   where gates only warn), and the worker's Prometheus metrics;
6. ``systemd-analyze verify`` on the units in deploy/systemd (skipped if not installed).

Needs ``redis-server`` (built with TLS). Scratch files go to ``$STEM_DEMO_DIR`` (default
``examples/production/var``); ``etc/`` there stands in for ``/etc/stem``.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from own_ca import issue_certificates

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
STEM = [sys.executable, "-m", "stem.cli.main"]
WAIT_S = 20.0
HOSTS = ("localhost", "127.0.0.1")
UNITS = ("stem-worker@.service", "stem-beat.service", "stem-multi.service", "stem.target")


class Failed(Exception):
    """The example did not behave as its README says."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the worker drains, Redis shuts down), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


class Example:
    def __init__(self, demo: Path) -> None:
        self.demo = demo
        self.etc = demo / "etc"  # stands in for /etc/stem
        self.as_root = os.geteuid() == 0
        pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        self.env = {
            # The caller's STEM_* settings would change what this example shows.
            **{k: v for k, v in os.environ.items() if not k.startswith("STEM_")},
            "PYTHONPATH": pythonpath,
            "STEM_CONFIG_DIR": str(self.etc),
        }
        self.password = secrets.token_urlsafe(24)
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []

    # -- helpers -------------------------------------------------------------------------------

    def stem(self, *args: str, ok: tuple[int, ...] = (0,), show: bool = True) -> str:
        """Run the ``stem`` CLI; its output (stdout then stderr) if its exit code is in
        ``ok``, else :class:`Failed`."""
        proc = subprocess.run(
            [*STEM, *args], env=self.env, capture_output=True, text=True, timeout=WAIT_S
        )
        output = (proc.stdout + proc.stderr).rstrip()
        if proc.returncode not in ok:
            raise Failed(f"stem {shlex.join(args)} exited {proc.returncode}:\n{output}")
        if show:
            print(f"$ stem {self.short(shlex.join(args))}   # exit {proc.returncode}")
            print("\n".join(f"  {self.short(line)}" for line in output.splitlines()))
        return output

    def short(self, text: str) -> str:
        return text.replace(str(self.demo), "$STEM_DEMO_DIR")

    def gates_failing(self, output: str) -> set[str]:
        return {line.split()[1].rstrip(":") for line in output.splitlines() if line[:4] == "FAIL"}

    # -- the steps -----------------------------------------------------------------------------

    def keys_and_secrets(self) -> None:
        print("== 1. signing key and secrets, as /etc/stem would hold them")
        self.etc.mkdir()
        shutil.copy(HERE / "stem.production.yaml", self.etc / "stem.production.yaml")
        (self.etc / "secrets").mkdir(mode=0o700)
        (self.etc / "tls").mkdir()
        self.stem("keys", "generate", "--algorithm", "hmac-sha256", "--kid", "k1", "--out",
                  str(self.etc / "keys"))  # fmt: skip
        self.write_broker_url()
        print("wrote etc/secrets/broker-url (600): rediss://:<password>@localhost:PORT/0")

    def dev_certificates_refused(self) -> None:
        print("\n== 2. development certificates: the production profile refuses them")
        self.stem("certs", "dev", "--out", str(self.etc / "tls"), "--hosts", ",".join(HOSTS))
        out = self.stem("config", "check", "--profile", "production", ok=(78,))
        expected = {"G006-dev-certificate"} | ({"G009-run-as-root"} if self.as_root else set())
        if self.gates_failing(out) != expected:
            raise Failed(f"gates failing: {self.gates_failing(out)}, expected {expected}")
        self.stem("certs", "check", str(self.etc / "tls" / "ca.pem"), ok=(1,))

    def own_ca_accepted(self) -> None:
        print("\n== 3. certificates from your own CA (own_ca.py plays its part here)")
        for path in (self.etc / "tls").iterdir():
            path.unlink()
        server_dir = self.demo / "redis-tls"
        server_dir.mkdir()
        issue_certificates(server_dir, self.etc / "tls", HOSTS)
        print("issued etc/tls/ca.pem, etc/tls/client.pem, etc/tls/client-key.pem (600)")
        tls = self.etc / "tls"
        self.stem("certs", "check", str(tls / "ca.pem"), str(tls / "client.pem"))
        out = self.stem(
            "config", "check", "--profile", "production", ok=(78,) if self.as_root else (0,)
        )
        if self.as_root:
            if self.gates_failing(out) != {"G009-run-as-root"}:
                raise Failed(f"gates failing: {self.gates_failing(out)}, expected only G009")
            print(
                "Only G009 is left: this script runs as root, and no setting waives that gate.\n"
                "Under systemd the units run as User=stem (deploy/systemd); run this example as\n"
                "an ordinary user to see the production profile accept this configuration."
            )

    def start_redis(self) -> None:
        print("\n== 4. Redis: TLS only, a password, client certificates required")
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
        if binary is None:
            raise Failed("redis-server is not installed (Debian/Ubuntu: apt install redis-server)")
        server = self.demo / "redis-tls"
        for attempt in range(3):
            if attempt:  # the free port was taken meanwhile: move to another one
                self.port = free_port()
                self.write_broker_url()
            conf = server / "redis.conf"
            write_secret(
                conf,
                f"port 0\ntls-port {self.port}\nbind 127.0.0.1\n"
                f"tls-cert-file {server / 'server.pem'}\ntls-key-file {server / 'server-key.pem'}\n"
                f"tls-ca-cert-file {server / 'ca.pem'}\ntls-auth-clients yes\n"
                f'requirepass "{self.password}"\nsave ""\nappendonly no\ndir {server}\n',
            )
            with open(self.demo / "redis.log", "ab") as log:
                proc = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            deadline = time.monotonic() + 10
            while proc.poll() is None and time.monotonic() < deadline:
                if self.redis_answers():
                    print(f"redis-server answers on rediss://localhost:{self.port} only")
                    return
                time.sleep(0.05)
            stop(proc)
        log_text = (self.demo / "redis.log").read_text(errors="replace")[-2000:]
        raise Failed(f"redis-server did not start with TLS:\n{log_text}")

    def write_broker_url(self) -> None:
        url = f"rediss://:{self.password}@localhost:{self.port}/0"
        write_secret(self.etc / "secrets" / "broker-url", url + "\n")

    def redis_answers(self) -> bool:
        tls = self.etc / "tls"
        try:
            with redis.Redis(
                host="localhost",
                port=self.port,
                password=self.password,
                ssl=True,
                ssl_ca_certs=str(tls / "ca.pem"),
                ssl_certfile=str(tls / "client.pem"),
                ssl_keyfile=str(tls / "client-key.pem"),
                socket_timeout=1,
                socket_connect_timeout=1,
            ) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def profile_args(self) -> list[str]:
        if not self.as_root:
            return ["--profile", "production"]
        # Gates only warn in the development profile; --config layers the production file
        # on top, so every setting (TLS, keys, URL) is the one production would use.
        return ["--profile", "development", "--config", str(self.etc / "stem.production.yaml")]

    def run_worker_and_producer(self) -> None:
        print("\n== 5. a worker and a producer: verified TLS, signed messages")
        profile = self.profile_args()
        if self.as_root:
            print(
                "(as root: --profile development --config etc/stem.production.yaml, so G009 "
                "only warns; the settings are the production file's)"
            )
        out = self.stem(*profile, "config", "show", "--explain", show=False)
        print(f"$ stem {self.short(shlex.join(profile))} config show --explain  # excerpt")
        for line in out.splitlines():
            if line.startswith(
                ("broker.url ", "tls.ca_file ", "signing.keys ", "signing.required ")
            ):
                print(f"  {self.short(line)}")
        if self.password in out:
            raise Failed("config show printed the Redis password")
        metrics_port = free_port()
        with open(self.demo / "worker.log", "wb") as log:
            worker = subprocess.Popen(
                [*STEM, "--app", "prod_tasks:app", *profile, "worker"],
                env={**self.env, "STEM_METRICS_PORT": str(metrics_port)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(worker)
        print(f"$ stem --app prod_tasks:app {self.short(shlex.join(profile))} worker &")
        try:
            lines = '{"lines": [[2, 1250], [1, 4999]]}'
            enqueue = ["enqueue", "invoices.total", "--kwargs", lines, "--wait", str(WAIT_S)]
            out = self.stem("--app", "prod_tasks:app", *profile, *enqueue)
            if "SUCCESS 7499" not in out:
                raise Failed(f"expected invoices.total = 7499, got:\n{out}")
            self.show_metrics(metrics_port)
        except (Failed, OSError) as exc:
            log_text = (self.demo / "worker.log").read_text(errors="replace")[-3000:]
            raise Failed(f"{exc}\nworker log:\n{log_text}") from None
        code = stop(worker)
        print(f"worker stopped on SIGTERM (exit {code})")
        if code != 0:
            log_text = (self.demo / "worker.log").read_text(errors="replace")[-3000:]
            raise Failed(f"the worker exited {code}:\n{log_text}")

    def show_metrics(self, port: int) -> None:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        lines = [ln for ln in text.splitlines() if ln.startswith("stem_tasks_total{")]
        print(f"$ curl {url}   # stem_tasks_total only")
        print("\n".join(f"  {line}" for line in lines))
        if not any('state="success"' in line for line in lines):
            raise Failed("the worker's metrics show no successful task")

    def verify_units(self) -> None:
        print("\n== 6. the systemd units (deploy/systemd)")
        tool = shutil.which("systemd-analyze")
        if tool is None:
            print("systemd-analyze is not installed: skipped")
            return
        units = self.demo / "systemd"
        units.mkdir()
        # verify checks that ExecStart= programs exist: point them at this Python's stem.
        bindir = Path(sys.executable).parent
        for name in UNITS:
            text = (ROOT / "deploy" / "systemd" / name).read_text()
            for program in ("stem-multi", "stem"):
                installed = bindir / program
                target = str(installed) if installed.exists() else sys.executable
                text = text.replace(f"/usr/bin/{program} ", f"{target} ")
            (units / name).write_text(text)
        (units / "stem-worker@alpha.service").symlink_to(units / "stem-worker@.service")
        paths = [str(units / n) for n in ("stem-worker@alpha.service", *UNITS[1:])]
        proc = subprocess.run(
            [tool, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60
        )
        print(
            f"$ systemd-analyze verify stem-worker@alpha.service {' '.join(UNITS[1:])}"
            f"   # exit {proc.returncode}"
        )
        problems = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0 or problems:
            raise Failed(f"systemd-analyze verify reported problems:\n{self.short(problems)}")
        print("  no problems reported")


@contextmanager
def cleanup(example: Example) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in reversed(example.procs):
            stop(proc)


def main() -> int:
    demo = Path(os.environ.get("STEM_DEMO_DIR") or HERE / "var")
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True)
    example = Example(demo)
    try:
        with cleanup(example):
            example.keys_and_secrets()
            example.dev_certificates_refused()
            example.own_ca_accepted()
            example.start_redis()
            example.run_worker_and_producer()
            example.verify_units()
    except (Failed, subprocess.TimeoutExpired, OSError, ValueError) as exc:
        print(f"FAILED: {example.short(str(exc))}", file=sys.stderr)
        print(f"(logs are in {demo})", file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
