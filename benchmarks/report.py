"""Tables from benchmark results: the plain one run.py prints, and the Markdown that
``run.py --all --write-readme`` puts into benchmarks/README.md between the markers."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import servers

Row = dict[str, Any]

BEGIN = "<!-- results:begin (written by run.py --all --write-readme) -->"
END = "<!-- results:end -->"
ROOT = Path(__file__).resolve().parent.parent

# The targets: workload -> (on Redis, on PostgreSQL); rates in tasks/s, times in ms.
TARGETS: dict[str, tuple[float | None, float | None]] = {
    "enqueue_single": (10_000, None),
    "enqueue_bulk": (50_000, None),
    "drain_best": (10_000, 5_000),
    "drain_process": (5_000, None),
    "rt_p50": (1.0, 5.0),
    "rt_p99": (3.0, None),
}


def _cmd(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        return "?"


def machine_info() -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = _cmd("free", "-h").splitlines()
    dirty = _cmd("git", "status", "--porcelain", "--", "stem")
    return {
        "nproc": _cmd("nproc"),
        "cpu": cpu,
        "memory": mem[1].split()[1] if len(mem) > 1 else "?",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "stem_commit": _cmd("git", "rev-parse", "--short", "HEAD")
        + (" (+ uncommitted changes in stem/)" if dirty else ""),
        "redis": servers.redis_version(),
        "postgres": servers.postgres_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _best(rows: Sequence[Row], key: str, *, low: bool = False) -> Row | None:
    have = [r for r in rows if r.get(key) is not None]
    if not have:
        return None
    pick = min if low else max
    return pick(have, key=lambda r: r[key])


def signing_pools(rows: Sequence[Row]) -> str:
    """POOL:C of the best pool and of the best process pool, for the signing runs."""
    best = _best(rows, "drain_per_s")
    procs = _best([r for r in rows if r["config"].startswith("process")], "drain_per_s")
    picked = [r for r in (best, procs) if r is not None]
    specs = dict.fromkeys(
        r["config"].replace(" c=", ":").replace(" prefetch=", ":") for r in picked
    )
    return ",".join(specs)


def _change(new: float, old: float) -> str:
    """Signed relative change, "-44%" or "+3%" (a faster signed run is noise, shown as is)."""
    return f"{new / old - 1:+.0%}"


def _fmt_rate(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _fmt_ms(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def plain(rows: Sequence[Row]) -> str:
    """The table ``run.py`` prints for one broker."""
    lines = [
        f"{'broker':<18} {'pool':<14} {'enq single/s':>12} {'enq bulk/s':>11} "
        f"{'drain/s':>9} {'drain+res/s':>11} {'rt p50 ms':>9} {'rt p99 ms':>9}"
    ]
    for r in rows:
        lines.append(
            f"{r['broker']:<18} {r['config']:<14} {_fmt_rate(r['enqueue_single_per_s']):>12} "
            f"{_fmt_rate(r['enqueue_bulk_per_s']):>11} {_fmt_rate(r['drain_per_s']):>9} "
            f"{_fmt_rate(r['drain_results_per_s']):>11} {_fmt_ms(r['rt_p50_ms']):>9} "
            f"{_fmt_ms(r['rt_p99_ms']):>9}"
        )
    if rows and rows[0]["extra"].get("bulk_median_per_s"):
        bulk = rows[0]["extra"]["bulk_median_per_s"]
        lines.append(f"enqueue bulk, median of this run's batches: {_fmt_rate(bulk)} tasks/s")
    return "\n".join(lines)


class _Column:
    """The summary numbers of one library on one broker."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = list(rows)

    def get(self, what: str) -> tuple[float | None, str]:
        rows = self.rows
        if not rows:
            return None, ""
        if what == "enqueue_single":
            r = _best(rows, "enqueue_single_per_s")
            return (r["enqueue_single_per_s"], "") if r else (None, "")
        if what == "enqueue_bulk":
            if rows[0]["library"] == "stem":
                return rows[0]["extra"].get("bulk_median_per_s"), ""
            r = _best(rows, "enqueue_bulk_per_s")
            return (r["enqueue_bulk_per_s"], "") if r else (None, "")
        if what == "drain_best":
            r = _best(rows, "drain_per_s")
            return (r["drain_per_s"], r["config"]) if r else (None, "")
        if what == "drain_process":
            if rows[0]["library"] == "dramatiq":
                r = rows[0]  # Dramatiq's worker processes each run 8 threads
            else:
                procs = [x for x in rows if re.match(r"(process|prefork)", x["config"])]
                r = _best(procs, "drain_per_s")
            return (r["drain_per_s"], r["config"]) if r else (None, "")
        if what == "drain_results":
            r = _best(rows, "drain_results_per_s")
            return (r["drain_results_per_s"], r["config"]) if r else (None, "")
        if what in ("rt_p50", "rt_p99"):
            r = _best(rows, "rt_p50_ms", low=True)
            return (r[f"{what}_ms"], r["config"]) if r else (None, "")
        raise KeyError(what)


def _cell(value: float | None, config: str, *, ms: bool) -> str:
    if value is None:
        return "—"
    text = _fmt_ms(value) if ms else _fmt_rate(value)
    return f"{text} ({config})" if config else text


def _target_text(what: str) -> str:
    redis_t, pg_t = TARGETS.get(what, (None, None))
    ms = what.startswith("rt")
    parts = []
    for name, target in (("Redis", redis_t), ("PG", pg_t)):
        if target is not None:
            parts.append(f"{name} {_goal(target, ms=ms)}")
    return "; ".join(parts) or "—"


def _goal(target: float, *, ms: bool) -> str:
    return f"≤ {target:g}" if ms else f"≥ {target:,.0f}"


def _met(value: float | None, target: float | None, *, ms: bool) -> str:
    if value is None or target is None:
        return ""
    ok = value <= target if ms else value >= target
    return "met" if ok else "missed"


WORKLOADS: list[tuple[str, str, bool]] = [
    ("enqueue_single", "enqueue, single (tasks/s)", False),
    ("enqueue_bulk", "enqueue, bulk (tasks/s)", False),
    ("drain_best", "drain, best pool (tasks/s)", False),
    ("drain_process", "drain, process pool (tasks/s)", False),
    ("drain_results", "drain, results stored (tasks/s)", False),
    ("rt_p50", "round trip p50 (ms)", True),
    ("rt_p99", "round trip p99 (ms)", True),
]


def markdown(data: dict[str, Any]) -> str:
    rows: list[Row] = data["rows"]
    m = data["machine"]

    def stem_on(broker: str) -> _Column:
        return _Column([r for r in rows if r["library"] == "stem" and r["broker"] == broker])

    def peer(library: str) -> _Column:
        return _Column([r for r in rows if r["library"] == library])

    cols = {
        "Stem · Redis": stem_on("redis"),
        "Stem · PostgreSQL": stem_on("postgres"),
        f"Stem · SQLite ({data['sqlite_tasks']:,} tasks)": stem_on("sqlite"),
        "Celery · Redis": peer("celery"),
        "Dramatiq · Redis": peer("dramatiq"),
    }
    versions = {r["library"]: r["extra"].get("version", "?") for r in rows}
    out = [
        BEGIN,
        "",
        f"Measured {data['started']} in {data['duration_s']} s. Machine: {m['nproc']} cores "
        f"({m['cpu']}), {m['memory']} memory, Linux {m['kernel']}. Python {m['python']}; Stem "
        f"{m['stem_commit']}; Redis {m['redis']}; PostgreSQL {m['postgres']}; Celery "
        f"{versions.get('celery', '—')}; Dramatiq {versions.get('dramatiq', '—')}. Load average "
        f"(1/5/15 min) {_load(data['load_before'])} before, {_load(data['load_after'])} after. "
        f"{data['tasks']:,} tasks per workload ({data['sqlite_tasks']:,} on SQLite), "
        f"{data['round_trips']} round trips.",
        "",
        *_phases(data.get("phases") or []),
        "| workload | " + " | ".join(cols) + " | Stem target |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for key, label, ms in WORKLOADS:
        cells = [_cell(*col.get(key), ms=ms) for col in cols.values()]
        out.append(f"| {label} | " + " | ".join(cells) + f" | {_target_text(key)} |")
    out += ["", *_ratios(cols, ms_keys={"rt_p50", "rt_p99"}), "", *_per_pool(rows)]
    out += ["", *_signing(rows, data.get("signing_cost_us") or {}), "", END, ""]
    return "\n".join(out)


def _phases(phases: Sequence[dict[str, Any]]) -> list[str]:
    """One line saying how busy the machine was (with other work) as each phase began."""
    if not phases:
        return []
    seen = "; ".join(
        f"{p['phase']}: {p['busy_cores']:.2f} cores busy, load {p['load'][0]:.2f}" for p in phases
    )
    return [
        "Other work on the machine as each phase began (CPU over 3 s while the harness was "
        f"idle, and the 1-minute load average, which still counts the phase before): {seen}.",
        "",
    ]


def _load(load: Sequence[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _ratios(cols: dict[str, _Column], ms_keys: set[str]) -> list[str]:
    stem_redis = cols["Stem · Redis"]
    stem_pg = cols["Stem · PostgreSQL"]
    peers = [cols["Celery · Redis"], cols["Dramatiq · Redis"]]
    out = [
        "Stem on Redis against the best peer on the same Redis, and against its targets:",
        "",
        "| workload | Stem · Redis | best peer | Stem ÷ best peer | Redis target | "
        "PostgreSQL target |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, ms in WORKLOADS:
        value, _ = stem_redis.get(key)
        peer_vals = [(p.get(key)[0], p.rows[0]["library"]) for p in peers if p.rows]
        peer_vals = [(v, n) for v, n in peer_vals if v is not None]
        best_peer = (min if ms else max)(peer_vals, default=(None, ""))
        ratio = "—"
        if value is not None and best_peer[0]:
            ratio = f"{best_peer[0] / value:.2f}x faster" if ms else f"{value / best_peer[0]:.2f}x"
        redis_t, pg_t = TARGETS.get(key, (None, None))
        pg_value, _ = stem_pg.get(key)
        pg_text = "—"
        if pg_t is not None:
            shown_pg = _fmt_ms(pg_value) if ms else _fmt_rate(pg_value)
            pg_text = f"{shown_pg} ({_goal(pg_t, ms=ms)}: {_met(pg_value, pg_t, ms=ms)})"
        redis_text = "—"
        if redis_t is not None:
            redis_text = f"{_goal(redis_t, ms=ms)}: {_met(value, redis_t, ms=ms)}"
        peer_text = "—"
        if best_peer[0] is not None:
            shown = _fmt_ms(best_peer[0]) if ms else _fmt_rate(best_peer[0])
            peer_text = f"{shown} ({best_peer[1]})"
        stem_text = _fmt_ms(value) if ms else _fmt_rate(value)
        out.append(f"| {label} | {stem_text} | {peer_text} | {ratio} | {redis_text} | {pg_text} |")
    return out


def _cpu_text(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return "—"
    redis = cpu.get("redis")
    return f"{cpu['worker']:.0f}" + ("" if redis is None else f" / {redis:.0f}")


def _per_pool(rows: Sequence[Row]) -> list[str]:
    out = [
        "Every configuration (one worker process; round trips on the same worker). CPU is "
        "the worker's process group and, on Redis, the Redis server, per drained task:",
        "",
        "| library · broker | pool | drain (tasks/s) | CPU µs/task worker / Redis | "
        "drain, results stored | round trip p50 / p99 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['library']} · {r['broker']} | {r['config']} | {_fmt_rate(r['drain_per_s'])} | "
            f"{_cpu_text(r['extra'].get('drain_cpu_us_per_task'))} | "
            f"{_fmt_rate(r['drain_results_per_s'])} | "
            f"{_fmt_ms(r['rt_p50_ms'])} / {_fmt_ms(r['rt_p99_ms'])} |"
        )
    return out


def _signing(rows: Sequence[Row], costs: dict[str, dict[str, float]]) -> list[str]:
    base = {r["config"]: r for r in rows if r["broker"] == "redis" and r["library"] == "stem"}
    base_single = next(
        (r["enqueue_single_per_s"] for r in base.values() if r["enqueue_single_per_s"]), None
    )
    out = [
        "Signing on Redis: CPU per message (µs, best of 5 rounds of 5,000 calls) and what it costs "
        "the drain (results not stored) and the single enqueue, against the unsigned run above:",
        "",
        "| algorithm | sign | verify | result seal / unseal | enqueue single | drain by pool "
        "(signed, unsigned, cost) |",
        "|---|---|---|---|---|---|",
    ]
    plain_cost = costs.get("none", {})
    for mode, algorithm in (("hmac", "hmac-sha256"), ("ed25519", "ed25519")):
        signed = [r for r in rows if r["broker"] == f"redis+{mode}"]
        c = costs.get(algorithm, {})
        drains = []
        for r in signed:
            b = base.get(r["config"])
            if b is None or not r["drain_per_s"] or not b["drain_per_s"]:
                continue
            drains.append(
                f"{r['config']}: {_fmt_rate(r['drain_per_s'])} vs {_fmt_rate(b['drain_per_s'])}, "
                + _change(r["drain_per_s"], b["drain_per_s"])
            )
        single = next((r["enqueue_single_per_s"] for r in signed if r["enqueue_single_per_s"]), 0)
        single_text = "—"
        if single and base_single:
            single_text = f"{_fmt_rate(single)} ({_change(single, base_single)})"
        out.append(
            f"| {algorithm} | {c.get('sign', 0):.1f} | {c.get('verify', 0):.1f} | "
            f"{c.get('result_seal', 0):.1f} / {c.get('result_unseal', 0):.1f} | {single_text} | "
            f"{'; '.join(drains) or '—'} |"
        )
    if plain_cost:
        out += [
            "",
            f"For scale: encoding the unsigned envelope takes {plain_cost.get('encode', 0):.1f} "
            f"µs and decoding it {plain_cost.get('decode', 0):.1f} µs "
            f"({plain_cost.get('bytes', 0):.0f} bytes; signed: "
            f"{costs.get('hmac-sha256', {}).get('signed_bytes', 0):.0f} bytes with HMAC, "
            f"{costs.get('ed25519', {}).get('signed_bytes', 0):.0f} with Ed25519).",
        ]
    return out


def update_readme(path: Path, text: str) -> None:
    """Replace what is between the markers in ``path`` (or append the block)."""
    current = path.read_text() if path.exists() else ""
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + text.rstrip("\n") + tail
    else:
        new = current.rstrip("\n") + "\n\n" + text
    tmp = path.with_suffix(".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
