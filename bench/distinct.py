"""Issue #13, item 3: distinct users over 30 days of reports, by each path, with its time and error.

A fresh PostgreSQL database gets 30 days of 30-minute windows, each flushed and reported through
aggregator's own ``Store.apply_batch``, ``Store.collect_window`` and ``Store.roll_up`` (so the day rollup
and the sketches are the ones the collector writes after each report). The range is then read three times
over: with every window's ids kept (path "ids"), with the ids pruned (path "daily", the per-day rollup), and
with the rollup pruned too (path "sketch"), each against the ground truth kept in Python.
``collect_cost``: what a report of a window of 10^6 ids costs, and the rollup that follows it.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from aggregator import distinct, store
from bench import figures
from bench.figures import Check, Figure, Result
from bench.workload import Env

WINDOW = 1800
DAYS = 30
READS = 5


def range_distinct(env: Env) -> Result:
    """Distinct users over 30 days (1,440 windows): time of each path, and the sketch's error."""
    per_window, pool = (200, 20_000) if env.quick else (2_000, 200_000)
    result = Result("range_distinct", f"distinct users over {DAYS} days of reports ({DAYS * 86400 // WINDOW:,} "
                                      f"windows of {per_window:,} users from {pool:,}): exact and sketch paths")
    url = env.scratch.fresh()
    try:
        timings, answers, truth, load_s = asyncio.run(_measure(url, per_window, pool))
    finally:
        env.scratch.drop(url)
    sketch = answers["sketch"]
    error = (sketch.value - truth) / truth
    result.ours = timings["sketch"]
    result.checks = [
        Check(peer=f"exact, path {path}", figure=timings[path], ratio_label="sketch/exact",
              ratio=timings["sketch"].median / timings[path].median)
        for path in ("ids", "daily")
    ]
    result.notes = [
        f"truth {truth:,}; ids path {answers['ids'].value:,}, daily path {answers['daily'].value:,} (both exact: "
        f"{answers['ids'].value == truth and answers['daily'].value == truth})",
        f"sketch path {sketch.value:,} [{sketch.lower:,}-{sketch.upper:,}] at ~95%: error {error:+.2%}, "
        f"relative standard error {sketch.relative_standard_error:.2%} (HLL lg_k={distinct.LG_K})",
        f"{READS} reads per path, median [min-max]; loading the {DAYS} days of reports took {load_s:.1f} s",
    ]
    result.params = {"window_s": WINDOW, "days": DAYS, "users_per_window": per_window, "user_pool": pool,
                     "reads": READS, "lg_k": distinct.LG_K, "truth": truth, "sketch_error": error}
    return result


async def _measure(url: str, per_window: int, pool: int) -> tuple[dict[str, Figure], dict[str, distinct.Distinct],
                                                                   int, float]:
    rng = random.Random(13)
    population = sorted(uuid.UUID(int=rng.getrandbits(128)).int for _ in range(pool))
    first = (int(time.time()) // 86400 - DAYS - 1) * 86400
    end = first + DAYS * 86400
    db = store.Store(url)
    seen: set[int] = set()
    try:
        await db.check_window(WINDOW)
        writer = uuid.uuid4()
        began = time.perf_counter()
        for seq, start in enumerate(range(first, end, WINDOW), start=1):
            users = sorted(set(rng.sample(population, per_window)))
            seen.update(users)
            part = store.BatchWindow(workspaces=users[:10], users=users, allowed=len(users), denied=0)
            batch = store.Batch(seq=seq, windows={start: part}, events=len(users), watermark=float(start + WINDOW))
            await db.apply_batch(batch, writer_id=writer, replica_id="bench", window=WINDOW, now=start + 1.0)
            await db.collect_window(start, collector_id="bench", now=start + WINDOW + 1.0)
            await db.roll_up(now=start + WINDOW + 1.0, limit=1)
        load_s = time.perf_counter() - began
        timings: dict[str, Figure] = {}
        answers: dict[str, distinct.Distinct] = {}
        for path in ("ids", "daily", "sketch"):
            if path == "daily":  # every window's ids gone, the day rollup kept
                await db.prune_distinct(ids_before=end + 1.0, days_before=0)
                await db.prune(before=end + 1.0)
            elif path == "sketch":  # the rollup gone too
                await db.prune_distinct(ids_before=end + 1.0, days_before=end)
            samples = []
            for _ in range(READS):
                t = time.perf_counter()
                answers[path] = await db.distinct(first, end, "users")
                samples.append((time.perf_counter() - t) * 1000)
            assert answers[path].path == path, (path, answers[path].path)
            timings[path] = Figure(samples, "ms")
    finally:
        await db.close()
    return timings, answers, len(seen), load_s


def collect_cost(env: Env) -> Result:
    """A report of a window of 10^6 user ids (quick: 10^5): what its commit costs, and the rollup after it."""
    n = 100_000 if env.quick else 1_000_000
    result = Result("range_distinct_collect", f"collect_window of a window of {n:,} user ids, then range distinct's "
                                              "rollup of it (its day rollup and sketches) in commits of its own")
    url = env.scratch.fresh()
    try:
        reports, rollups = asyncio.run(_collect_and_roll(url, n))
    finally:
        env.scratch.drop(url)
    per_million = Figure([t * 1_000_000 / n for t in rollups.samples], "s")
    result.ours = reports
    result.checks = [
        Check(peer="report + rollup (about what the report's commit cost at a96ced4)",
              figure=Figure([a + b for a, b in zip(reports.samples, rollups.samples, strict=True)], "s"),
              ratio_label="report/(report+rollup)",
              ratio=reports.median / (reports.median + rollups.median)),
        Check(peer="rollup, per 10^6 ids (after the report, in commits of ~1 s)", figure=per_million),
        Check(peer="the report, scaled linearly to a window of 10^7 ids",
              figure=Figure([t * 10_000_000 / n for t in reports.samples], "s"), target="<= 2 s",
              passed=figures.at_most(reports.median * 10_000_000 / n, 2.0, not env.quick)),
    ]
    result.notes = [
        f"{COLLECT_WINDOWS} windows of {n:,} user ids and {n // 100:,} workspaces each, filled by generate_series and "
        "ANALYZEd, then collected one by one (Store.collect_window) and rolled up one by one (Store.roll_up)",
        "the report's commit holds the window's lock (late flushes of it wait): it no longer pays for range distinct",
    ]
    result.params = {"ids": n, "windows": COLLECT_WINDOWS}
    return result


COLLECT_WINDOWS = 3


async def _collect_and_roll(url: str, n: int) -> tuple[Figure, Figure]:
    first = (int(time.time()) // 86400 - 3) * 86400
    starts = [first + i * WINDOW for i in range(COLLECT_WINDOWS)]
    db = store.Store(url)
    reports, rollups = [], []
    try:
        await db.check_window(WINDOW)
        async with db.transaction() as conn:
            for start in starts:
                await conn.exec_driver_sql(f"INSERT INTO windows VALUES ({start}, {start + WINDOW}, NULL)")
                await conn.exec_driver_sql(f"INSERT INTO window_ids SELECT {start}, 2, md5((g + {start})::text)::uuid "
                                           f"FROM generate_series(1, {n}) g")
                await conn.exec_driver_sql(f"INSERT INTO window_ids SELECT {start}, 1, md5((g + {start})::text)::uuid "
                                           f"FROM generate_series(1, {n // 100}) g")
                await conn.exec_driver_sql("INSERT INTO contributions (window_start, replica_id, allowed, denied, "
                                           f"ontime) VALUES ({start}, 'bench', {n}, 0, true)")
        async with db.transaction() as conn:
            await conn.exec_driver_sql("ANALYZE")
        for start in starts:
            began = time.perf_counter()
            assert await db.collect_window(start, collector_id="bench", now=start + WINDOW + 1.0) is not None
            reports.append(time.perf_counter() - began)
        for start in starts:
            began = time.perf_counter()
            assert await db.roll_up(now=start + WINDOW + 2.0, limit=1) == [start]
            rollups.append(time.perf_counter() - began)
    finally:
        await db.close()
    return Figure(reports, "s"), Figure(rollups, "s")
