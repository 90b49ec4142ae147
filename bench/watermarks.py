"""Row: the time from a window's end to its report, with a simulated fleet publishing watermarks.

N logical replicas (each its own incarnation: writer id, sequence numbers, watermark) flush small
batches into one PostgreSQL every flush interval, as real replicas do; a collector runs beside them.
A window cannot be reported before every replica's watermark passes its end: at the earliest one
flush interval plus the watermark's slack after it. That bound is the physical reference here.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from aggregator import collector, flush, health, store
from bench.figures import Check, Figure, Result
from bench.workload import Env

WINDOW = 4
FLUSH_INTERVAL = 1.0
COLLECT_INTERVAL = 0.1
IDS_PER_FLUSH = 20


def report_latency(env: Env) -> Result:
    """Seconds from each window's end to its report, 100 replicas; every report checked exact."""
    replicas = 100
    windows = 2 if env.quick else 6
    result = Result("report_latency", f"window end to report, {replicas} simulated replicas, one PostgreSQL")
    url = env.scratch.fresh()
    try:
        latencies, exact = asyncio.run(_fleet(url, replicas, windows))
    finally:
        env.scratch.drop(url)
    reference = FLUSH_INTERVAL + flush.WATERMARK_SLACK
    ours = Figure(latencies, "s")
    ratio = ours.median / reference
    result.ours = ours
    result.checks = [Check(peer=f"reference: flush interval + watermark slack = {reference:g} s",
                           ratio_label="ours/reference", ratio=ratio, target="≤ 1.5x",
                           passed=None if env.quick else ratio <= 1.5),
                     Check(peer=f"reports exact against the fleet's truth: {exact} of {len(latencies)}",
                           target="all", passed=exact == len(latencies))]
    result.notes = [
        f"{replicas} incarnations in one process, each flushing {IDS_PER_FLUSH} new user ids of the open window "
        f"every {FLUSH_INTERVAL:g} s (jittered) through Store.apply_batch with its watermark; a Collector "
        f"every {COLLECT_INTERVAL:g} s; window {WINDOW} s; {windows} windows measured; latency = report's "
        "generated_at - window end (one clock)",
        "before watermarks the wait was a fixed grace of 2 x flush_interval whether or not the data had arrived",
    ]
    result.params = {"replicas": replicas, "windows": windows, "window_s": WINDOW, "flush_interval_s": FLUSH_INTERVAL}
    return result


async def _fleet(url: str, replicas: int, windows: int) -> tuple[list[float], int]:
    db = store.Store(url, pool_size=10)
    contact = health.Contact()
    contact.succeeded()
    judge = collector.Collector(db, collector_id="bench", grace=0.0, id_retention=86400.0, lease=30.0,
                                max_delay=300.0, contact=contact)
    truth: dict[int, set[int]] = {}
    first = (int(time.time()) // WINDOW + 1) * WINDOW  # the first whole window measured
    last_end = first + windows * WINDOW
    stop = asyncio.Event()

    async def replica(k: int) -> None:
        rng = random.Random(k)
        writer, seq = uuid.uuid4(), 0
        await asyncio.sleep(rng.uniform(0, FLUSH_INTERVAL))
        while not stop.is_set():
            now = time.time()
            start = int(now // WINDOW) * WINDOW
            users = [uuid.uuid4().int for _ in range(IDS_PER_FLUSH)]
            truth.setdefault(start, set()).update(users)
            seq += 1
            batch = store.Batch(seq=seq, windows={start: store.BatchWindow(workspaces=[k + 1], users=users,
                                                                           allowed=IDS_PER_FLUSH, denied=0)},
                                events=IDS_PER_FLUSH, watermark=now - flush.WATERMARK_SLACK)
            await db.apply_batch(batch, writer_id=writer, replica_id=f"sim-{k}", window=WINDOW, now=now)
            await asyncio.sleep(FLUSH_INTERVAL * rng.uniform(0.9, 1.1))

    async def collect() -> dict[int, tuple[float, int]]:
        seen: dict[int, tuple[float, int]] = {}
        while not (seen and max(seen) >= last_end - WINDOW):
            for report in await judge.run_once():
                start = int(report.window_start.timestamp())
                seen[start] = (report.generated_at.timestamp() - (start + WINDOW), report.unique_users)
            await asyncio.sleep(COLLECT_INTERVAL)
        return seen

    tasks = [asyncio.create_task(replica(k)) for k in range(replicas)]
    try:
        seen = await asyncio.wait_for(collect(), timeout=(windows + 4) * WINDOW + 60)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await db.close()
    measured = [start for start in sorted(seen) if first <= start < last_end]
    exact = sum(1 for start in measured if seen[start][1] == len(truth.get(start, ())))

    return [seen[start][0] for start in measured], exact

