"""An extra row, beyond the issue's: how fast one flush applies experience checkpoints into PostgreSQL.

Each checkpoint costs a few statements (its dedup row, the journey's row under its lock, an update), so
this row says how many checkpoints per second one database takes, and how fast stale journeys time out.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from aggregator import Aggregator, store
from aggregator.client import new_correlation_id
from bench.figures import Check, Figure, Result
from bench.workload import Env

WINDOW = 3600


def checkpoints(env: Env) -> Result:
    """Checkpoints per second applied by agg.flush(), and journeys per second timed out by the sweeper."""
    n = env.sizes.journeys
    result = Result("pg_checkpoints", f"apply {2 * n:,} checkpoints ({n:,} journeys) into PostgreSQL")
    applied: list[float] = []
    swept: list[float] = []
    for _ in range(env.sizes.pg_reps):
        url = env.scratch.fresh()
        try:
            flush_s, sweep_s = _once(url, n)
            applied.append(2 * n / flush_s)
            swept.append(n / sweep_s)
        finally:
            env.scratch.drop(url)
    result.ours = Figure(applied, "checkpoints/s")
    result.checks = [Check(peer="sweeper: stale journeys timed out (with their failure events)",
                           figure=Figure(swept, "journeys/s"))]
    result.notes = [
        f"{n:,} journeys: half with start and end (completed), half with a start only; checkpoint_many() then "
        "perf_counter around agg.flush(), all in one batch; then the clock moves past the lifetime and "
        "perf_counter around the sweeper's passes (1,000 journeys a transaction) until none is left",
        "no target in the issue: shown so that the cost of a checkpoint is measured, not guessed",
    ]
    result.params = {"journeys": n, "repetitions": env.sizes.pg_reps}
    return result


def _once(url: str, n: int) -> tuple[float, float]:
    start = int(time.time()) // WINDOW * WINDOW
    clock = {"now": start + 60.0}
    agg = Aggregator(database_url=url, window="1h", flush_interval="1h", collect=False, handle_sigterm=False,
                     clock=lambda: clock["now"]).start()
    try:
        stamp = dt.datetime.fromtimestamp(start + 60, dt.timezone.utc).isoformat()
        ended = dt.datetime.fromtimestamp(start + 61, dt.timezone.utc).isoformat()
        items = []
        for k in range(n):
            journey = new_correlation_id()
            fields = {"correlation_id": journey, "experience_id": "http_request", "type": "web",
                      "feature_category": "ci", "urgency": "sync_fast"}
            items.append({**fields, "checkpoint": "start", "client_timestamp": stamp})
            items.append({**fields, "checkpoint": "end" if k % 2 else "intermediate", "client_timestamp": ended})
        agg.checkpoint_many(items)
        began = time.perf_counter()
        agg.flush()
        flush_s = time.perf_counter() - began
    finally:
        agg.stop()
    return flush_s, asyncio.run(_sweep(url, start + 3600 - 1, n - n // 2))


async def _sweep(url: str, now: float, expected: int) -> float:
    db = store.Store(url)
    try:
        began = time.perf_counter()
        timed_out = 0
        while batch := await db.sweep_experiences(now=now, window=WINDOW):
            timed_out += len(batch)
        elapsed = time.perf_counter() - began
    finally:
        await db.close()
    if timed_out != expected:
        raise AssertionError(f"the sweeper timed out {timed_out:,} journeys, expected {expected:,}")
    return elapsed
