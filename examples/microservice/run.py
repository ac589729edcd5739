"""A producer service and a worker fleet on Redis, each in its own process.

python examples/microservice/run.py

Two ``stem worker`` processes (worker-1 consumes ``pricing``, worker-2 ``pricing`` and
``shipping``) and producer.py, which enqueues by task name and fetches the results.

Redis: the server at ``$STEM_BROKER_URL`` (or ``$REDIS_URL``). With neither set, this script
starts a throwaway ``redis-server`` on a free 127.0.0.1 port (``redis-server`` must be
installed), and stops it at the end. Logs go to ``$STEM_DEMO_DIR`` (default
``examples/microservice/var``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from stem.observability.redact import redact_url

HERE = Path(__file__).resolve().parent
STEM = [sys.executable, "-m", "stem.cli.main"]
FLEET = (("worker-1", "pricing"), ("worker-2", "pricing,shipping"))
# A throwaway server: loopback only, nothing written to disk, in the foreground.
REDIS_ARGS = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"]


class Failed(Exception):
    """The example did not behave as its README says."""


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM (workers drain, Redis shuts down), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def answers_ping(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def start_redis(demo: Path, procs: list[subprocess.Popen[bytes]]) -> str:
    """A throwaway redis-server (no persistence) on a free port; its URL."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/sbin")
    if binary is None:
        raise Failed(
            "set STEM_BROKER_URL (or REDIS_URL) to a Redis server, or install redis-server "
            "so this script can start a throwaway one"
        )
    data = demo / "redis"
    data.mkdir()
    log_path = demo / "redis.log"
    for _ in range(3):  # another process may take the free port before redis binds it
        port = free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [binary, "--port", str(port), *REDIS_ARGS, "--dir", str(data)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(proc)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            if answers_ping(url):
                print(f"started a throwaway redis-server on 127.0.0.1:{port}")
                return url
            time.sleep(0.05)
        stop(proc)
    raise Failed(f"redis-server did not start; log:\n{log_path.read_text(errors='replace')}")


def main() -> int:
    demo = Path(os.environ.get("STEM_DEMO_DIR") or HERE / "var")
    shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True)
    given = os.environ.get("STEM_BROKER_URL") or os.environ.get("REDIS_URL")
    procs: list[subprocess.Popen[bytes]] = []
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        url = given or start_redis(demo, procs)
        print(f"broker and results: {redact_url(url)}")
        pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
        env = {
            # Other STEM_* settings of the caller's shell would change what runs here.
            **{k: v for k, v in os.environ.items() if not k.startswith("STEM_")},
            "STEM_BROKER_URL": url,
            "STEM_CONFIG_DIR": str(demo),  # no /etc/stem files
            "PYTHONPATH": pythonpath,
        }
        for name, queues in FLEET:
            args = ["worker", "--name", name, "--queues", queues, "--pool", "thread", "-c", "2"]
            with open(demo / f"{name}.log", "wb") as log:
                workers[name] = subprocess.Popen(
                    [*STEM, "--app", "fleet_tasks:app", *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            print(f"$ stem --app fleet_tasks:app worker --name {name} --queues {queues} ...")
        print("$ python producer.py", flush=True)
        producer = subprocess.run([sys.executable, str(HERE / "producer.py")], env=env, timeout=90)
        if producer.returncode != 0:
            raise Failed(f"producer.py exited {producer.returncode}")
        for name, proc in workers.items():
            if proc.poll() is not None:
                raise Failed(f"{name} exited {proc.returncode} while the producer ran")
    except (Failed, subprocess.TimeoutExpired, OSError) as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        for name in workers:
            tail = (demo / f"{name}.log").read_text(errors="replace")[-1500:]
            print(f"last lines of {demo / name}.log:\n{tail}", file=sys.stderr)
        return 1
    finally:
        codes = {name: stop(proc) for name, proc in workers.items()}
        for proc in procs:
            stop(proc)
    for name, code in codes.items():
        print(f"{name} stopped (exit {code})")
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
