"""`aggregator demo`: several replica processes, live windows, each report checked against the truth.

Every replica process tracks synthetic traffic drawn from one shared pool of workspaces and users (so
the same user shows up on several replicas) and keeps its own ground truth per window. The parent
merges the truths, waits for each window's report, and prints the two side by side.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import queue
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aggregator import config, logs, migrate, reports, runtime
from aggregator.runtime import Aggregator

POOL_WORKSPACES = 50
POOL_USERS = 400


@dataclasses.dataclass
class Truth:
    workspaces: set[int] = dataclasses.field(default_factory=set)
    users: set[int] = dataclasses.field(default_factory=set)
    allowed: int = 0
    denied: int = 0
    replicas: set[int] = dataclasses.field(default_factory=set)


def _worker(index: int, url: str, window: float, flush_interval: float, duration: float,
            out: Any) -> None:
    """One replica: track random traffic for ``duration`` seconds, report truth per finished window."""
    logs.configure(level="warning")
    rng = random.Random(index)
    agg = Aggregator(database_url=url, window=window, flush_interval=flush_interval,
                     grace=max(3 * flush_interval, 2.0), handle_sigterm=False)
    agg.start()
    truth: dict[int, Truth] = {}
    w = int(window)
    # Replicas see overlapping but different slices of the user pool.
    users = list(range(POOL_USERS))[index * 40: index * 40 + POOL_USERS // 2]
    deadline = time.time() + duration
    while (now := time.time()) < deadline:
        for _ in range(rng.randint(20, 80)):
            ws, user = rng.randrange(POOL_WORKSPACES), rng.choice(users)
            allowed, denied = (1, 0) if rng.random() < 0.9 else (0, 1)
            at = time.time()
            agg.track(uuid.UUID(int=ws + 1), uuid.UUID(int=(1 << 64) + user), allowed=allowed, denied=denied, at=at)
            t = truth.setdefault(int(at // w) * w, Truth())
            t.workspaces.add(ws + 1)
            t.users.add((1 << 64) + user)
            t.allowed += allowed
            t.denied += denied
        for start in [s for s in truth if s + w <= now]:
            _send(out, index, start, truth.pop(start))
        time.sleep(rng.uniform(0.005, 0.03))
    agg.stop()
    for start in list(truth):
        _send(out, index, start, truth.pop(start))
    out.put(("done", index))


def _send(out: Any, index: int, start: int, t: Truth) -> None:
    out.put(("truth", index, start, sorted(t.workspaces), sorted(t.users), t.allowed, t.denied))


def run(*, replicas: int, window: float, duration: float, flush_interval: float, database_url: str | None) -> int:
    tmp = None
    if database_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="aggregator-demo-")
        database_url = f"sqlite:///{Path(tmp.name) / 'demo.db'}"
    url = config.resolve_database_url(database_url)
    asyncio.run(migrate.upgrade_url(url))
    print(f"aggregator demo: {replicas} replica processes, {window:g}s windows, {duration:g}s of traffic, "
          f"flush every {flush_interval:g}s, database {config.mask_url(url)}", flush=True)
    print("each report is shown as reported/truth; 'exact' means every figure matches\n", flush=True)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(i, url, window, flush_interval, duration, out), daemon=True)
             for i in range(replicas)]
    for p in procs:
        p.start()
    # A collector of our own keeps closing windows after the replicas have gone.
    collector = Aggregator(database_url=url, window=window, flush_interval=flush_interval,
                           grace=max(3 * flush_interval, 2.0), handle_sigterm=False)
    collector.start()
    try:
        ok = _watch(url, procs, out, replicas, window, deadline=time.time() + duration + 6 * window + 30)
    finally:
        collector.stop()
        for p in procs:
            p.join(timeout=10)
        if tmp is not None:
            tmp.cleanup()
    return 0 if ok else 1


def _watch(url: str, procs: list[Any], out: Any, replicas: int, window: float, deadline: float) -> bool:
    truths: dict[int, Truth] = {}
    done: set[int] = set()
    shown: set[int] = set()
    mismatches = 0
    total_tracked = total_reported = 0
    while time.time() < deadline:
        try:
            while True:
                message = out.get(timeout=0.2)
                if message[0] == "done":
                    done.add(message[1])
                    continue
                _, index, start, workspaces, users, allowed, denied = message
                t = truths.setdefault(start, Truth())
                t.workspaces.update(workspaces)
                t.users.update(users)
                t.allowed += allowed
                t.denied += denied
                t.replicas.add(index)
                total_tracked += allowed + denied
        except queue.Empty:
            pass
        if any(p.exitcode not in (None, 0) for p in procs):
            print("a replica process failed; see its error above", file=sys.stderr)
            return False
        finished = {r.window_start.timestamp(): r for r in asyncio.run(runtime.read_reports(url))}
        for start in sorted(truths):
            report = finished.get(start)
            # Show a window once its report exists and every live replica has sent its truth for it.
            if start in shown or report is None:
                continue
            if len(done) < replicas and start + window > time.time() - 0.5:
                continue
            shown.add(start)
            exact = _print_row(report, truths[start])
            mismatches += not exact
            total_reported += report.allowed_requests + report.denied_requests
        if len(done) == replicas and shown >= set(truths):
            late = sum(r.late_allowed_requests + r.late_denied_requests for r in finished.values())
            total_reported += late
            print(f"\n{len(shown)} windows, {total_reported} requests reported of {total_tracked} tracked "
                  f"({late} arrived late); {'all reports exact' if not mismatches else f'{mismatches} NOT exact'}",
                  flush=True)
            return mismatches == 0 and total_reported == total_tracked
        time.sleep(0.3)
    print(f"timed out waiting for reports of {sorted(set(truths) - shown)}", file=sys.stderr)
    return False


def _print_row(report: reports.Report, truth: Truth) -> bool:
    pairs = [
        ("workspaces", report.unique_workspaces, len(truth.workspaces)),
        ("users", report.unique_users, len(truth.users)),
        ("allowed", report.allowed_requests, truth.allowed),
        ("denied", report.denied_requests, truth.denied),
        ("replicas", report.replicas, len(truth.replicas)),
    ]
    exact = all(got == want for _, got, want in pairs)
    cells = "  ".join(f"{name} {got:>5}/{want:<5}" for name, got, want in pairs)
    print(f"{report.window_start:%H:%M:%S}–{report.window_end:%H:%M:%S}  {cells}  "
          f"{'exact' if exact else 'NOT EXACT'}", flush=True)
    return exact
