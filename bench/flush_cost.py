"""Issue #13, item 1: a small flush costs the same whatever its window already holds.

Each size gets a fresh database whose table statistics were taken before the window existed (as for
every new window in production until autovacuum's next ANALYZE); the window is then filled with SQL,
and the timed part is aggregator's own ``Store.apply_batch`` of 20 new ids, repeated.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from aggregator import store
from bench import figures
from bench.figures import Check, Figure, Result
from bench.workload import Env

WINDOW = 3600
BATCH_IDS = 20
REPS = 40


def by_window_size(env: Env) -> Result:
    """20-id flushes into windows of 0, 10^5 and 10^6 stored ids (quick: 0, 10^4, 10^5)."""
    sizes = (0, 10_000, 100_000) if env.quick else (0, 100_000, 1_000_000)
    result = Result("pg_flush_by_window", f"flush of {BATCH_IDS} new ids into a window already holding "
                                          f"{' / '.join(f'{n:,}' for n in sizes)} ids, statistics stale")
    medians: dict[int, Figure] = {}
    for n in sizes:
        url = env.scratch.fresh()
        try:
            medians[n] = Figure([t * 1000 for t in asyncio.run(_flushes_into(url, n))], "ms")
        finally:
            env.scratch.drop(url)
    empty, largest = medians[sizes[0]], medians[sizes[-1]]
    result.ours = largest
    result.checks = [
        Check(peer=f"the same flush into a window of {n:,} ids", figure=medians[n], ratio_label="ours/peer",
              ratio=largest.median / medians[n].median,
              target="<= 1.2x" if n == 0 else "",
              passed=figures.at_most(largest.median / medians[n].median, 1.2, not env.quick) if n == 0 else None)
        for n in sizes[:-1]
    ]
    result.notes = [
        f"ours: Store.apply_batch of {BATCH_IDS} new user ids (one window, counters, watermark) into a window of "
        f"{sizes[-1]:,} ids; {REPS} flushes per size, median; a fresh database per size, ANALYZE taken before the "
        "window was filled and autovacuum off for window_ids, so the planner has never seen the window",
        f"spread of medians across sizes: {max(f.median for f in medians.values()) / empty.median:.2f}x the empty "
        "window's",
    ]
    result.params = {"batch_ids": BATCH_IDS, "window_sizes": list(sizes), "repetitions": REPS}
    return result


async def _flushes_into(url: str, stored: int) -> list[float]:
    start = int(time.time()) // WINDOW * WINDOW
    conn = await asyncpg.connect(url)
    try:
        # Statistics never see the new window: autovacuum off on every day partition (or the plain table).
        for (name,) in await conn.fetch("SELECT inhrelid::regclass::text FROM pg_inherits "
                                        "WHERE inhparent = 'window_ids'::regclass") or [("window_ids",)]:
            await conn.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = false)")
        await conn.execute("ANALYZE window_ids")
        await conn.execute("INSERT INTO window_ids (window_start, dim, id) "
                           "SELECT $1, 2, md5('u' || i)::uuid FROM generate_series(1, $2) AS i", start, stored)
    finally:
        await conn.close()
    db = store.Store(url)
    writer = uuid.uuid4()
    samples: list[float] = []
    try:
        await db.ping()
        for seq in range(1, REPS + 2):
            users = sorted(uuid.uuid4().int for _ in range(BATCH_IDS))
            batch = store.Batch(seq=seq, windows={start: store.BatchWindow(workspaces=[], users=users, allowed=1,
                                                                           denied=0)},
                                events=BATCH_IDS, watermark=float(start))
            began = time.perf_counter()
            applied = await db.apply_batch(batch, writer_id=writer, replica_id="bench", window=WINDOW,
                                           now=start + 1.0)
            elapsed = time.perf_counter() - began
            if not applied.applied:
                raise AssertionError(f"batch {seq} was not applied")
            if seq > 1:  # the first pays for the connection's statement preparation
                samples.append(elapsed)
    finally:
        await db.close()
    conn = await asyncpg.connect(url)
    try:
        count = await conn.fetchval("SELECT count(*) FROM window_ids WHERE window_start = $1", start)
    finally:
        await conn.close()
    if count != stored + (REPS + 1) * BATCH_IDS:
        raise AssertionError(f"the window holds {count:,} ids, expected {stored + (REPS + 1) * BATCH_IDS:,}")
    return samples
