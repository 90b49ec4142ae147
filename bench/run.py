"""The benchmark harness: runs the rows of issue #4, prints one table, writes the results as JSON.

Each row states its target and prints PASS or MISS; a missed target is a result, not a failure, so
the exit code is 0 unless a row could not be measured at all (then 1, with the traceback on stderr).
Progress goes to stderr; the machine, the table and the notes go to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aggregator import dsn, logs
from bench import (
    capacity,
    daemon,
    distinct,
    figures,
    fleet,
    flush_cost,
    hostile,
    hotpath,
    journeys,
    memory,
    postgres,
    spool,
    watermarks,
    workload,
)
from bench.figures import Result

DATABASE_ENV = "AGGREGATOR_BENCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"

# The rows, in its order.
ROWS: dict[str, Callable[[workload.Env], Result]] = {
    "caller_cost": hotpath.caller_cost,
    "total_cpu": hotpath.total_cpu,
    "threads_8": hotpath.threads,
    "pg_flush": postgres.flush,
    "pg_collect": postgres.collect,
    "memory": memory.memory,
    "daemon_ingest": daemon.ingest,
    # Beyond the rows:
    "pg_checkpoints": journeys.checkpoints,
    # Issue #11: watermarks (a window is reported once every replica has flushed past it) and the spool.
    "report_latency": watermarks.report_latency,
    "spool": spool.throughput,
    # Issue #12: hostile input is handled in bounded time.
    "worst_request": hostile.worst_request,
    # Issue #13: past one machine on PostgreSQL.
    "pg_flush_by_window": flush_cost.by_window_size,
    # Issue #13, item 3: distinct over any range (exact paths, sketch path).
    "range_distinct": distinct.range_distinct,
    "range_distinct_collect": distinct.collect_cost,  # a report's cost at 10^6 ids, and the rollup's after it
}

# Issue #13, items 5-6: minutes each (a fleet of 5,000 replicas, a window of 10^7 ids), so they run only
# when named: python -m bench --only fleet_1000 capacity (capacity reuses the fleet of 1,000 of the same run).
ON_REQUEST: dict[str, Callable[[workload.Env], Result]] = {
    "fleet_100": functools.partial(fleet.row, replicas=100),
    "fleet_1000": functools.partial(fleet.row, replicas=1_000),
    "fleet_5000": functools.partial(fleet.row, replicas=5_000),
    "capacity": capacity.capacity,
    "capacity_1e7": functools.partial(capacity.capacity, largest=10_000_000),  # and a window of 10^7 ids
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small sizes, fewer repetitions; size-bound targets are not checked")
    parser.add_argument("--only", nargs="+", choices=[*ROWS, *ON_REQUEST], metavar="ROW",
                        help=f"run only these rows, of: {', '.join(ROWS)}; and, only when named here: "
                             f"{', '.join(ON_REQUEST)}")
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_ENV, DEFAULT_DATABASE_URL),
                        help="superuser URL of a PostgreSQL server; scratch databases are created and dropped "
                             f"on it [env: {DATABASE_ENV}; default: {DEFAULT_DATABASE_URL}]")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="PATH",
                        help="where to write the results [default: bench/results.json]")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(level="warning")  # aggregator's own info events (start, flush) would drown the table
    sizes = workload.QUICK if args.quick else workload.FULL
    names = [name for name in ROWS if args.only is None or name in args.only]
    names += [name for name in ON_REQUEST if args.only is not None and name in args.only]
    machine = machine_info()
    began = time.monotonic()
    print(f"aggregator benchmarks ({'quick' if args.quick else 'full'}), "
          f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {machine['cpus']} cpus ({machine['cpus_usable']} usable, {machine['cpu_model']}), "
          f"Python {machine['python']} ({machine['implementation']}), {machine['platform']}")
    print(f"code: {machine['git']}; PostgreSQL: {dsn.mask_url(args.database_url)}\n", flush=True)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="aggregator-bench-") as tmp:
        env = workload.Env(sizes, quick=args.quick, database_url=args.database_url, tmp=Path(tmp))
        try:
            for name in names:
                results.append(_run_row(name, env))
        finally:
            env.close()
    elapsed = time.monotonic() - began
    print(figures.table(results))
    print(f"\n{figures.summary(results)}; median [min-max] of the repetitions; ratios are of medians; "
          f"{elapsed:.0f} s in all\n")
    for result in results:
        print(f"{result.name}: {result.title} ({result.seconds:.0f} s)")
        for note in result.notes:
            print(f"  - {note}")
    _write_json(args.json, {
        "issue": 4, "quick": args.quick, "started_at": machine.pop("started_at"), "duration_s": round(elapsed, 1),
        "machine": machine, "database_url": dsn.mask_url(args.database_url),
        "rows": {r.name: r.as_json() for r in results},
    })
    print(f"\nresults written to {args.json}")
    return 1 if any(r.error is not None for r in results) else 0


def _run_row(name: str, env: workload.Env) -> Result:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    began = time.monotonic()
    try:
        result = (ROWS.get(name) or ON_REQUEST[name])(env)
    except Exception as exc:
        traceback.print_exc()
        result = Result(name, name, error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.monotonic() - began
    print(f"[bench] {name} done in {result.seconds:.1f} s", file=sys.stderr, flush=True)
    return result


def machine_info() -> dict[str, Any]:
    return {
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "git": _git_revision(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown cpu"


def _git_revision() -> str:
    """The commit measured, and whether the work tree differed from it (results depend on both)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "aggregator"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"{head}{' + uncommitted changes in aggregator/' if dirty else ''}"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
