"""``stem health``: does this node consume? For probes, watchdogs and load balancers.

It reads the state file the worker rewrites on every heartbeat (see
:mod:`stem.worker.service`) and exits 0 only if the snapshot is fresh, the process it names
is alive, and the worker says it is consuming. Otherwise it exits 1 and says why. It never
talks to the broker, so a probe costs nothing and cannot hang.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from stem.cli.context import emit_json
from stem.cli.exitcodes import ExitCode
from stem.worker.service import pid_alive, read_state

DEFAULT_STATE_DIR = "/run/stem"
MIN_DEFAULT_MAX_AGE_S = 10.0


@dataclass(frozen=True)
class Verdict:
    node: str
    path: str
    reasons: tuple[str, ...]
    state: dict[str, Any] = field(default_factory=dict)
    age_s: float | None = None

    @property
    def healthy(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "state_file": self.path,
            "healthy": self.healthy,
            "reasons": list(self.reasons),
            "age_s": None if self.age_s is None else round(self.age_s, 3),
            "state": self.state,
        }

    def line(self) -> str:
        if not self.healthy:
            return f"{self.node}: unhealthy: {'; '.join(self.reasons)}"
        s = self.state
        return (
            f"{self.node}: healthy (pid {s.get('pid')}, {s.get('worker')}, "
            f"heartbeat {self.age_s or 0:.1f}s ago, {s.get('running', 0)} running)"
        )


def check(
    path: str | os.PathLike[str],
    *,
    node: str | None = None,
    max_age_s: float | None = None,
    now_s: float | None = None,
) -> Verdict:
    """Judge one state file. ``max_age_s`` defaults to three heartbeats of the worker that
    wrote it (at least ``MIN_DEFAULT_MAX_AGE_S``)."""
    p = Path(path)
    name = node or p.stem
    try:
        state = read_state(p)
    except FileNotFoundError:
        return Verdict(
            name,
            str(p),
            (f"no state file {p}: the node is not running, or runs without --state-file",),
        )
    except OSError as exc:
        return Verdict(name, str(p), (f"cannot read {p}: {exc.strerror or exc}",))
    except ValueError as exc:
        return Verdict(name, str(p), (f"{p} is not a state file: {exc}",))
    reasons: list[str] = []
    now = time.time() if now_s is None else now_s
    at_ms = state.get("at_ms")
    age_s: float | None = None
    if not isinstance(at_ms, int):
        reasons.append("the state file has no at_ms timestamp")
    else:
        age_s = now - at_ms / 1000
        limit = max_age_s
        if limit is None:
            beat = state.get("heartbeat_s")
            beat_s = float(beat) if isinstance(beat, int | float) else 5.0
            limit = max(MIN_DEFAULT_MAX_AGE_S, 3 * beat_s)
        if age_s > limit:
            reasons.append(f"last heartbeat {age_s:.1f}s ago (max {limit:g}s)")
    pid = state.get("pid")
    if state.get("phase") == "stopped":
        reasons.append("the worker has stopped")
    elif not isinstance(pid, int):
        reasons.append("the state file names no pid")
    elif state.get("host") not in (None, socket.gethostname()):
        reasons.append(f"the state file was written on host {state.get('host')}, not this one")
    elif not pid_alive(pid):
        reasons.append(f"pid {pid} is not running")
    phase = state.get("phase")
    if phase == "draining":
        reasons.append("the worker is draining (stopping): it takes no new work")
    elif phase == "ready" and not state.get("consuming"):
        reasons.append("the worker is starting: no heartbeat since it became ready")
    elif not state.get("consuming") and phase != "stopped":
        reasons.append("the worker is not consuming (consumer loop stalled or broker silent)")
    return Verdict(name, str(p), tuple(reasons), state, age_s)


def _targets(
    node: str | None, state_file: str | None, state_dir: str
) -> list[tuple[str | None, Path]]:
    if state_file:
        return [(node, Path(state_file))]
    if node:
        return [(node, Path(state_dir) / f"{node}.json")]
    found = sorted(p for p in Path(state_dir).glob("*.json") if not p.name.startswith("."))
    return [(None, p) for p in found]


def health(
    ctx: typer.Context,
    node: Annotated[
        str | None,
        typer.Option(
            "--node",
            "-n",
            envvar="STEM_HEALTH_NODE",
            help="Node name: reads STATE_DIR/NODE.json. Without --node or --state-file, "
            "every node in STATE_DIR is checked.",
        ),
    ] = None,
    state_file: Annotated[
        str | None,
        typer.Option(
            "--state-file",
            envvar="STEM_WORKER_STATE_FILE",
            help="The worker's state file (as given to `stem worker --state-file`).",
        ),
    ] = None,
    state_dir: Annotated[
        str,
        typer.Option("--state-dir", envvar="STEM_STATE_DIR", help="Where state files live."),
    ] = DEFAULT_STATE_DIR,
    max_age_s: Annotated[
        float | None,
        typer.Option(
            "--max-age",
            envvar="STEM_HEALTH_MAX_AGE_S",
            min=0.0,
            help="Seconds a heartbeat stays fresh (default: three heartbeats, at least 10).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the verdict as JSON.")] = False,
) -> None:
    """Exit 0 if the node's last heartbeat is fresh, its process alive, and it consumes;
    exit 1 and say why otherwise."""
    source = ctx.get_parameter_source("state_file")
    if node and state_file and getattr(source, "name", "") == "ENVIRONMENT":
        state_file = None  # an explicit --node beats the unit's own state file variable
    targets = _targets(node, state_file, state_dir)
    verdicts = [check(path, node=name, max_age_s=max_age_s) for name, path in targets]
    healthy = bool(verdicts) and all(v.healthy for v in verdicts)
    if as_json:
        emit_json({"healthy": healthy, "nodes": [v.as_dict() for v in verdicts]})
    elif not verdicts:
        typer.echo(f"unhealthy: no state files in {state_dir}", err=True)
    else:
        for v in verdicts:
            typer.echo(v.line(), err=not v.healthy)
    raise typer.Exit(int(ExitCode.OK if healthy else ExitCode.FAILURE))
