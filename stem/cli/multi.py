"""``stem-multi``: start, stop and inspect detached worker nodes on one machine.

    stem-multi start 3 --app proj.tasks:app -Q mail -c:2 8
    stem-multi start alpha beta --user stem --pidfile /run/stem/%n.pid -c:alpha 8 -Q:beta mail
    stem-multi stopwait alpha beta
    stem-multi status alpha beta

Commands: ``start``, ``stop`` (SIGTERM, do not wait), ``stopwait`` (SIGTERM and wait for the
drain), ``restart`` (stopwait, then start), ``kill`` (SIGKILL), ``status``, ``show`` (print
each node's command), ``names``.

Nodes: names (``alpha beta``), or one number N for the nodes named ``1`` .. ``N``.

stem-multi's own options:

  --pidfile TEMPLATE      default /run/stem/%n.pid
  --logfile TEMPLATE      default /var/log/stem/%n.log
  --state-file TEMPLATE   default $STEM_STATE_DIR/%n.json ($STEM_STATE_DIR: /run/stem);
                          "" for none. Read by `stem health --node NAME`.
  --user USER --group GROUP
                          run the nodes as USER (stem-multi must be root): real, effective
                          and saved ids and the supplementary groups are all switched
  --workdir DIR           the nodes' working directory (default: the current one)
  --stem "COMMAND"        how to run the stem CLI (default: this Python, -m stem.cli.main)
  --role ROLE             the stem subcommand each node runs (default worker; beat)
  --ready-timeout S       start: seconds to wait for each node's READY=1 (default 60;
                          0: only check that the node is still running a moment later)
  --timeout S             stopwait/restart: seconds to wait for the drain (default: the
                          node's --shutdown-budget plus 30)
  --hostname NAME         the value of %h (default: this host's name)

Templates expand %n (node name), %h (host name), %i (node index, from 1) and %% (a percent
sign); other %-sequences stay as they are. They expand in pass-through values too. A
node's index is its place on this command line, so --pidfile and --state-file may not use
%i (a later `stop beta` would find alpha's file), and each node needs files of its own.

Every other option goes to each node's ``stem`` command: the global ones (``--app``,
``--broker``, ``--config``, ...) before the subcommand, the rest (``-Q``, ``-c``, ...) after
it. ``-OPT:SELECTOR VALUE`` applies an option to some nodes only; SELECTOR is a node name, a
comma-separated list, or a range ``1-3`` of numeric names. Everything after ``--`` goes to
every node verbatim. A worker node gets ``--name NODE@HOST`` unless ``--name`` is given.

Exit codes (stable):

  0  done: every node is in the state asked for (status: every node runs)
  1  status: a node is dead but its pidfile remains (LSB)
  2  usage error
  3  status: a node is not running (LSB)
  4  status: a node's pidfile or process cannot be looked at by this user (LSB "unknown")
  7  start/restart: a node did not start or did not become ready
  70 internal error
  75 stopwait/restart: a node still ran when the timeout expired
  77 permission: cannot switch user, cannot write a pidfile or log as that user, or
     (stop, kill, start) cannot read a node's pidfile or process, or signal it
  78 configuration: unknown user or group
"""

from __future__ import annotations

import os
import re
import select
import shlex
import signal
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stem.cli.multi_daemon import (
    Identity,
    LaunchError,
    MultiExit,
    Node,
    ReadyListener,
    launch,
    log_tail,
    node_environ,
    node_lock,
    prepare_dirs,
    probe,
    remove_pidfile,
    resolve_identity,
    send_signal,
    started_state_file,
)
from stem.worker.service import pid_alive

COMMANDS = ("start", "stop", "stopwait", "restart", "kill", "status", "show", "names")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_BUDGET_S = 30.0
STOP_MARGIN_S = 30.0
KILL_WAIT_S = 10.0

# stem-multi's own options: option -> (attribute, takes a value)
_OWN = {
    "--pidfile": "pidfile",
    "--logfile": "logfile",
    "--state-file": "state_file",
    "--user": "user",
    "--uid": "user",
    "--group": "group",
    "--gid": "group",
    "--workdir": "workdir",
    "--stem": "stem",
    "--role": "role",
    "--ready-timeout": "ready_timeout",
    "--timeout": "timeout",
    "--hostname": "hostname",
}


class UsageError(Exception):
    pass


@dataclass
class Parsed:
    command: str
    nodes: list[str]
    own: dict[str, str] = field(default_factory=dict)
    global_args: list[str] = field(default_factory=list)
    sub_args: list[str] = field(default_factory=list)
    overrides: list[tuple[str, bool, list[str]]] = field(default_factory=list)
    tail: list[str] = field(default_factory=list)


def _option_tables(role: str) -> tuple[dict[str, bool], dict[str, bool]]:
    """The stem CLI's global options and ``role``'s options: option -> takes a value."""
    try:
        import typer.main

        from stem.cli.main import app

        group = typer.main.get_command(app)
    except Exception:  # a broken CLI must not stop stem-multi from stopping nodes
        return {}, {}

    def table(params: Sequence[object]) -> dict[str, bool]:
        out: dict[str, bool] = {}
        for p in params:
            opts = getattr(p, "opts", None)
            if getattr(p, "param_type_name", "") != "option" or not opts:
                continue
            flag = bool(getattr(p, "is_flag", False) or getattr(p, "count", False))
            for name in opts:
                out[name] = not flag
            for name in getattr(p, "secondary_opts", ()):
                out[name] = False
        return out

    commands = getattr(group, "commands", {})
    sub = commands.get(role)
    return table(group.params), table(sub.params if sub is not None else [])


def _split_option(token: str) -> tuple[str, str | None, str | None]:
    """``-c:alpha=8`` -> (``-c``, ``alpha``, ``8``); ``-c8`` -> (``-c``, None, ``8``)."""
    if token.startswith("--"):
        head, eq, value = token.partition("=")
        name, colon, selector = head.partition(":")
        return name, selector if colon else None, value if eq else None
    name, rest = token[:2], token[2:]
    if rest.startswith(":"):
        selector, eq, value = rest[1:].partition("=")
        return name, selector, value if eq else None
    return name, None, (rest[1:] if rest.startswith("=") else rest) or None


def parse(argv: Sequence[str]) -> Parsed:
    if not argv or argv[0] in ("-h", "--help", "help"):
        raise UsageError("")
    command = argv[0]
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    rest = list(argv[1:])
    parsed = Parsed(command, [])
    # The role decides the subcommand's option table, so read it first.
    role = "worker"
    for i, tok in enumerate(rest):
        if tok == "--":
            break
        if tok == "--role" and i + 1 < len(rest):
            role = rest[i + 1]
        elif tok.startswith("--role="):
            role = tok.partition("=")[2]
    glob, sub = _option_tables(role)
    i = 0
    while i < len(rest):
        tok = rest[i]
        i += 1
        if tok == "--":
            parsed.tail = rest[i:]
            break
        if tok in ("-h", "--help"):
            raise UsageError("")
        if not tok.startswith("-") or tok == "-":
            parsed.nodes.append(tok)
            continue
        name, selector, value = _split_option(tok)
        if name in _OWN:
            if selector is not None:
                raise UsageError(f"{name} applies to every node; it takes no :NODE")
            if value is None:
                if i >= len(rest):
                    raise UsageError(f"{name} needs a value")
                value, i = rest[i], i + 1
            parsed.own[_OWN[name]] = value
            continue
        if name in glob:
            is_global, takes = True, glob[name]
        elif name in sub:
            is_global, takes = False, sub[name]
        else:
            raise UsageError(
                f"unknown option {name}: not a stem-multi option, nor one of "
                f"`stem` or `stem {role}` (put raw arguments after --)"
            )
        args = [name]
        if takes:
            if value is None:
                if i >= len(rest):
                    raise UsageError(f"{name} needs a value")
                value, i = rest[i], i + 1
            args.append(value)
        elif value is not None:
            raise UsageError(f"{name} takes no value")
        if selector is not None:
            if not selector:
                raise UsageError(f"{tok}: empty node selector")
            parsed.overrides.append((selector, is_global, args))
        elif is_global:
            parsed.global_args += args
        else:
            parsed.sub_args += args
    if not parsed.nodes:
        raise UsageError("name the nodes: `stem-multi start alpha beta`, or a count: `start 3`")
    return parsed


def node_names(specs: Sequence[str]) -> list[str]:
    if len(specs) == 1 and specs[0].isdigit():
        count = int(specs[0])
        if not 1 <= count <= 1000:
            raise UsageError("a node count must be between 1 and 1000")
        return [str(n) for n in range(1, count + 1)]
    names: list[str] = []
    for spec in specs:
        if not NAME_RE.fullmatch(spec):
            raise UsageError(f"bad node name {spec!r}: letters, digits, '.', '_' and '-' only")
        if spec in names:
            raise UsageError(f"node {spec!r} is named twice")
        names.append(spec)
    return names


def _selected(selector: str, name: str) -> bool:
    for part in selector.split(","):
        low, dash, high = part.partition("-")
        if part == name:
            return True
        numeric = dash and low.isdigit() and high.isdigit() and name.isdigit()
        if numeric and int(low) <= int(name) <= int(high):
            return True
    return False


def expand(template: str, *, name: str, host: str, index: int) -> str:
    values = {"n": name, "h": host, "i": str(index), "%": "%"}
    return re.sub(r"%([nhi%])", lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class Plan:
    command: str
    nodes: tuple[Node, ...]
    identity: Identity | None
    workdir: str
    role: str
    ready_timeout_s: float
    timeout_given: bool = False  # --timeout: stop waits exactly that long


def _float(value: str, option: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{option} takes a number of seconds, not {value!r}") from None
    if number < 0:
        raise UsageError(f"{option} cannot be negative")
    return number


def _budget_s(args: Sequence[str]) -> float:
    budget: str | None = os.environ.get("STEM_WORKER_SHUTDOWN_BUDGET_S")
    for i, arg in enumerate(args[:-1]):
        if arg == "--shutdown-budget":
            budget = args[i + 1]
    try:
        return float(budget) if budget else DEFAULT_BUDGET_S
    except ValueError:
        return DEFAULT_BUDGET_S


def plan(parsed: Parsed) -> Plan:
    own = parsed.own
    names = node_names(parsed.nodes)
    for selector, _, args in parsed.overrides:
        if not any(_selected(selector, n) for n in names):
            raise UsageError(f"{args[0]}:{selector} selects none of the nodes {' '.join(names)}")
    host = own.get("hostname") or socket.gethostname()
    role = own.get("role", "worker")
    workdir = os.path.abspath(own.get("workdir") or os.getcwd())
    stem_cmd = shlex.split(own.get("stem") or "") or [sys.executable, "-m", "stem.cli.main"]
    state_dir = os.environ.get("STEM_STATE_DIR") or "/run/stem"
    state_tpl = own.get("state_file", f"{state_dir}/%n.json") if role == "worker" else ""
    timeout = own.get("timeout")
    nodes = []
    for index, name in enumerate(names, start=1):

        def x(text: str, name: str = name, index: int = index) -> str:
            return expand(text, name=name, host=host, index=index)

        glob = [x(a) for a in parsed.global_args]
        sub = [x(a) for a in parsed.sub_args]
        for selector, is_global, args in parsed.overrides:
            if _selected(selector, name):
                # Appended after the shared value: the last occurrence of an option wins.
                (glob if is_global else sub).extend(x(a) for a in args)
        if role == "worker" and not any(a in ("--name", "-n") for a in sub):
            sub = ["--name", f"{name}@{host}", *sub]
        argv = (*stem_cmd, *glob, role, *sub, *(x(a) for a in parsed.tail))
        stop_s = _float(timeout, "--timeout") if timeout else _budget_s(sub) + STOP_MARGIN_S
        nodes.append(
            Node(
                name=name,
                index=index,
                pidfile=Path(workdir, x(own.get("pidfile", "/run/stem/%n.pid"))),
                logfile=Path(workdir, x(own.get("logfile", "/var/log/stem/%n.log"))),
                state_file=Path(workdir, x(state_tpl)) if state_tpl else None,
                argv=tuple(argv),
                stop_timeout_s=stop_s,
            )
        )
    _check_own_files(own, nodes)
    identity = None
    if parsed.command in ("start", "restart"):
        identity = resolve_identity(own.get("user"), own.get("group"))
    ready = _float(own.get("ready_timeout", "60"), "--ready-timeout")
    return Plan(parsed.command, tuple(nodes), identity, workdir, role, ready, bool(timeout))


def _check_own_files(own: Mapping[str, str], nodes: Sequence[Node]) -> None:
    """A node is found by its pidfile (and reports through its state file): each needs its
    own, named the same whatever else is on the command line."""
    for option, attr in (("--pidfile", "pidfile"), ("--state-file", "state_file")):
        template = own.get(option[2:].replace("-", "_"))
        if template is not None and "%i" in template.replace("%%", ""):
            raise UsageError(
                f"{option} cannot use %i: a node's index is its place on this command line; use %n"
            )
        seen: dict[str, str] = {}
        for node in nodes:
            path = getattr(node, attr)
            if path is None:
                continue
            key = os.path.realpath(path)
            if key in seen:
                raise UsageError(
                    f"nodes {seen[key]} and {node.name} would share {option} {path}: put %n in it"
                )
            seen[key] = node.name


# -- commands ----------------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cmd_start(p: Plan) -> MultiExit:
    if os.geteuid() == 0 and p.identity is None:
        warn("warning: running nodes as root; pass --user to drop privileges")
    result = MultiExit.OK
    started: dict[int, Node] = {}
    with ReadyListener() as listener:
        for node in p.nodes:
            try:
                prepare_dirs(node, p.identity)
                with node_lock(node):
                    pid = _start_one(p, node, listener.address)
            except LaunchError as exc:
                warn(f"{node.name}: failed to start: {exc}")
                result = _worse(result, exc.code)
                continue
            if pid is not None:
                started[pid] = node
        failed = _await_ready(p, listener, started)
    if failed:
        result = _worse(result, MultiExit.START_FAILED)
    return result


def _start_one(p: Plan, node: Node, notify: str) -> int | None:
    """Start ``node`` unless it runs; its pid, or None if it was running already."""
    st = probe(node)
    if st.state == "unknown":
        raise LaunchError(st.detail, MultiExit.NOPERM)
    if st.state == "running":
        say(f"{node.name}: already running (pid {st.pid})")
        return None
    if st.state == "stale":
        remove_pidfile(node, st.pid)
        say(f"{node.name}: removed a stale pidfile ({st.detail})")
    env = node_environ(os.environ, node, p.identity, notify)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    banner = f"--- stem-multi: starting node {node.name} at {stamp}\n"
    return launch(node, p.identity, p.workdir, env, banner)


def _await_ready(p: Plan, listener: ReadyListener, started: dict[int, Node]) -> bool:
    """Report each started node once it is ready; True if any is not."""
    pending = dict(started)
    failed = False
    wait_ready = p.ready_timeout_s > 0
    deadline = time.monotonic() + (p.ready_timeout_s if wait_ready else 0.5)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([listener], [], [], min(remaining, 0.2))
        if readable:
            pid, fields = listener.receive()
            node = pending.get(pid) if pid is not None else None
            if pid is not None and node is not None and fields.get("READY") == "1":
                del pending[pid]
                say(f"{node.name}: started (pid {pid}): {fields.get('STATUS', 'ready')}")
        for pid, node in list(pending.items()):
            if not pid_alive(pid):
                del pending[pid]
                _forget(node, pid)  # it died before it could remove it itself
                failed = True
                warn(f"{node.name}: exited during startup; the end of {node.logfile}:")
                warn(log_tail(node.logfile))
    for pid, node in pending.items():
        if wait_ready:
            failed = True
            warn(
                f"{node.name}: running (pid {pid}) but not ready after "
                f"{p.ready_timeout_s:g}s; see {node.logfile}"
            )
        else:
            say(f"{node.name}: started (pid {pid})")
    return failed


def _signal_all(p: Plan, signum: signal.Signals) -> tuple[dict[int, Node], MultiExit]:
    """Signal each running node: (pid -> node for each signalled, OK or the worst reason a
    node could not be looked at or signalled: its pidfile directory stayed locked
    (STOP_TIMEOUT), this user may not (NOPERM), its pidfile is unusable (CONFIG))."""
    sent: dict[int, Node] = {}
    problem = MultiExit.OK
    for node in p.nodes:
        try:
            _signal_one(node, signum, sent)
        except LaunchError as exc:
            warn(f"{node.name}: not signalled: {exc}")
            # A directory that stayed locked: the node may still run (as a stop timeout).
            code = MultiExit.STOP_TIMEOUT if exc.code == MultiExit.START_FAILED else exc.code
            problem = _worse(problem, code)
    return sent, problem


def _signal_one(node: Node, signum: signal.Signals, sent: dict[int, Node]) -> None:
    with node_lock(node):  # not while a start of this node is between fork and exec
        st = probe(node)
        if st.state == "unknown":
            raise LaunchError(st.detail, MultiExit.NOPERM)
        if st.state == "running" and st.pid is not None and send_signal(st.pid, signum):
            say(f"{node.name}: sent {signum.name} (pid {st.pid})")
            sent[st.pid] = node
        elif st.state == "stale":
            remove_pidfile(node, st.pid)
            say(f"{node.name}: not running (removed a stale pidfile: {st.detail})")
        else:
            say(f"{node.name}: not running")


def _forget(node: Node, pid: int) -> None:
    """Remove what a node that exited left of its pidfile, if this user may."""
    try:
        remove_pidfile(node, pid)
    except LaunchError as exc:
        warn(f"{node.name}: {exc}")


def _wait_gone(sent: dict[int, Node], timeout_of: dict[int, float]) -> dict[int, Node]:
    """Wait until each pid exits or its own timeout passes; return those still running."""
    start = time.monotonic()
    pending = dict(sent)
    left: dict[int, Node] = {}
    while pending:
        for pid, node in list(pending.items()):
            if not pid_alive(pid):
                del pending[pid]
                _forget(node, pid)
                say(f"{node.name}: stopped")
            elif time.monotonic() - start > timeout_of[pid]:
                del pending[pid]
                left[pid] = node
                warn(f"{node.name}: still running (pid {pid}) after {timeout_of[pid]:g}s")
        if pending:
            time.sleep(0.1)
    return left


def _stop_timeout_s(p: Plan, node: Node, pid: int) -> float:
    """How long to wait for a stopping node: --timeout if given; else its own drain budget
    as its state file reports it (set by a flag, a variable or YAML), plus the margin, or
    what its command line and environment say when there is no such report. The state
    file is the one the node was started with, even when this command was given another
    --state-file template (or none)."""
    state_file = None if p.timeout_given else started_state_file(pid) or node.state_file
    if state_file is None:
        return node.stop_timeout_s
    from stem.worker.service import read_state

    try:
        state = read_state(state_file)
    except (OSError, ValueError):
        return node.stop_timeout_s
    budget = state.get("shutdown_budget_s")
    if state.get("pid") != pid or not isinstance(budget, int | float) or not budget >= 0:
        return node.stop_timeout_s
    return float(budget) + STOP_MARGIN_S


def cmd_stop(p: Plan, *, wait: bool) -> MultiExit:
    sent, problem = _signal_all(p, signal.SIGTERM)
    if not wait:
        return problem
    left = _wait_gone(sent, {pid: _stop_timeout_s(p, node, pid) for pid, node in sent.items()})
    return _worse(problem, MultiExit.STOP_TIMEOUT) if left else problem


def cmd_kill(p: Plan) -> MultiExit:
    sent, problem = _signal_all(p, signal.SIGKILL)
    left = _wait_gone(sent, dict.fromkeys(sent, KILL_WAIT_S))
    return _worse(problem, MultiExit.STOP_TIMEOUT) if left else problem


def cmd_status(p: Plan) -> MultiExit:
    from stem.cli.health_cmd import check

    result = MultiExit.OK
    for node in p.nodes:
        st = probe(node)
        if st.state == "running":
            line = f"{node.name}: running (pid {st.pid})"
            if node.state_file is not None and _readable(node.state_file):
                verdict = check(node.state_file, node=node.name)
                line += ", healthy" if verdict.healthy else f", {'; '.join(verdict.reasons)}"
            say(line)
        elif st.state == "stale":
            say(f"{node.name}: dead, pidfile remains ({st.detail}): {node.pidfile}")
            result = MultiExit.STALE
        elif st.state == "unknown":
            say(f"{node.name}: status unknown: {st.detail}")
            if result != MultiExit.STALE:
                result = MultiExit.UNKNOWN
        else:
            say(f"{node.name}: stopped")
            if result == MultiExit.OK:
                result = MultiExit.NOT_RUNNING
    return result


_SEVERITY = [
    MultiExit.OK,
    MultiExit.START_FAILED,
    MultiExit.STOP_TIMEOUT,
    MultiExit.CONFIG,
    MultiExit.NOPERM,
    MultiExit.SOFTWARE,
]


def _readable(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a directory this user may not look into
        return False


def _worse(a: MultiExit, b: MultiExit) -> MultiExit:
    rank = {code: i for i, code in enumerate(_SEVERITY)}
    return a if rank.get(a, 0) >= rank.get(b, 0) else b


def run(argv: Sequence[str]) -> MultiExit:
    try:
        p = plan(parse(argv))
    except UsageError as exc:
        if str(exc):
            warn(f"stem-multi: {exc}")
            warn("try `stem-multi --help`")
            return MultiExit.USAGE
        say(__doc__ or "")
        return MultiExit.OK if argv else MultiExit.USAGE
    except LaunchError as exc:
        warn(f"stem-multi: {exc}")
        return exc.code
    if p.command == "names":
        for node in p.nodes:
            say(node.name)
        return MultiExit.OK
    if p.command == "show":
        for node in p.nodes:
            env = f"STEM_WORKER_STATE_FILE={node.state_file} " if node.state_file else ""
            say(f"{env}{shlex.join(node.argv)}")
        return MultiExit.OK
    if p.command == "start":
        return cmd_start(p)
    if p.command in ("stop", "stopwait"):
        return cmd_stop(p, wait=p.command == "stopwait")
    if p.command == "restart":
        stopped = cmd_stop(p, wait=True)
        return stopped if stopped != MultiExit.OK else cmd_start(p)
    if p.command == "kill":
        return cmd_kill(p)
    return cmd_status(p)


def main(argv: Sequence[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = run(args)
    except KeyboardInterrupt:
        code = MultiExit.SOFTWARE
    sys.exit(int(code))


if __name__ == "__main__":
    main()
