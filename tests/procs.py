"""Code that tests run in separate processes (multiprocessing 'spawn': a clean interpreter each)."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aggregator import Aggregator, NotRunning
from tests.helpers import GRACE, T0, WINDOW, FakeClock, manual


def hang_after_taking_the_lock(url: str, ready: str) -> None:
    """A collector that takes the collector lock and then never finishes (the parent kills it)."""

    async def on_locked() -> None:
        Path(ready).write_text(str(os.getpid()))
        await asyncio.sleep(3600)

    clock = FakeClock()
    clock.past_window(T0)
    agg = manual(url, clock, replica_id="doomed", on_collector_locked=on_locked)
    agg.start()
    agg.collect()


def collect_at_once(url: str, start_at: float, out: Any) -> None:
    """Collect every due window at (almost) the same moment as the other processes."""
    clock = FakeClock()
    clock.past_window(T0 + 4 * WINDOW)
    agg = manual(url, clock, replica_id=f"collector-{os.getpid()}").start()
    time.sleep(max(0.0, start_at - time.time()))
    out.put(len(agg.collect()))
    agg.stop()


def track_until_signalled(url: str, counter: Any, flush_interval: str, handle_sigterm: bool) -> None:
    """Track from two threads, counting the requests of each accepted call, until a signal ends the process."""
    agg = Aggregator(database_url=url, window=f"{WINDOW}s", flush_interval=flush_interval, grace=f"{GRACE}s",
                     collect=False, handle_sigterm=handle_sigterm)
    agg.start()

    def work(seed: int) -> None:
        rng = random.Random(seed)
        while True:
            denied = rng.randrange(2)
            try:
                agg.track(uuid.UUID(int=rng.randrange(20) + 1), uuid.UUID(int=rng.randrange(500) + 1000),
                          allowed=1, denied=denied)
            except NotRunning:
                return
            with counter.get_lock():
                counter.value += 1 + denied  # requests, as reports count them
            if rng.random() < 0.05:
                time.sleep(0.001)

    for seed in range(2):
        threading.Thread(target=work, args=(seed,), daemon=True).start()
    while True:
        time.sleep(0.05)


def stress_replica(url: str, index: int, threads: int, window: int, duration: float, out: Any) -> None:
    """One replica process of the stress test: ``threads`` threads tracking, truth kept per window."""
    agg = Aggregator(database_url=url, window=f"{window}s", flush_interval="0.25s", grace="4s",
                     collect_interval="0.5s", replica_id=f"stress-{index}", handle_sigterm=False)
    track_with_truth(agg, index, threads, window, duration, out)


def track_with_truth(agg: Aggregator, index: int, threads: int, window: int, duration: float, out: Any) -> None:
    """Start ``agg``, track from ``threads`` threads for ``duration``, stop; put the truth per window on ``out``."""
    agg.start()
    truths: list[dict[int, list[Any]]] = []
    deadline = time.time() + duration

    def work(seed: int) -> None:
        rng = random.Random(index * 100 + seed)
        truth: dict[int, list[Any]] = {}
        truths.append(truth)
        while time.time() < deadline:
            for _ in range(50):
                ws, user = rng.randrange(30) + 1, rng.randrange(300) + 1000
                allowed, denied = rng.randrange(3), rng.randrange(2)
                at = time.time()
                agg.track(uuid.UUID(int=ws), str(uuid.UUID(int=user)), allowed=allowed, denied=denied, at=at)
                t = truth.setdefault(int(at // window) * window, [set(), set(), 0, 0])
                t[0].add(ws)
                t[1].add(user)
                t[2] += allowed
                t[3] += denied
            time.sleep(rng.uniform(0.001, 0.01))

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    agg.stop()
    merged: dict[int, list[Any]] = {}
    for truth in truths:
        for start, (ws, users, allowed, denied) in truth.items():
            m = merged.setdefault(start, [set(), set(), 0, 0])
            m[0] |= ws
            m[1] |= users
            m[2] += allowed
            m[3] += denied
    out.put({start: (sorted(ws), sorted(u), a, d) for start, (ws, u, a, d) in merged.items()})


PROCESS_METERS = {
    "work": {"aggregation": "sum", "unit": "ms", "dimensions": ["project"]},
    "users": {"aggregation": "distinct", "field": "user", "unit": "users", "dimensions": ["project"]},
}
JOBS = 3000


def meter_replica(url: str, index: int, window: int, duration: float, out: Any) -> None:
    """One replica of the meters process test: 3 threads recording; job ids overlap across processes."""
    agg = Aggregator(database_url=url, window=f"{window}s", flush_interval="0.25s", grace="3s",
                     collect_interval="0.5s", replica_id=f"meters-{index}", meters=PROCESS_METERS,
                     handle_sigterm=False).start()
    users: dict[tuple[int, str], set[int]] = {}
    jobs: set[int] = set()
    lock = threading.Lock()
    deadline = time.time() + duration

    def work(seed: int) -> None:
        rng = random.Random(index * 10 + seed)
        while time.time() < deadline:
            k = rng.randrange(JOBS)  # the same job is recorded by other threads and processes too
            agg.record("work", k % 97 + 1, {"project": f"p{k % 5}"}, event_id=f"job-{k}")
            user, now = rng.randrange(200), time.time()
            agg.record("users", f"u{user}", {"project": f"p{user % 5}"}, at=now)
            with lock:
                jobs.add(k)
                users.setdefault((int(now // window) * window, f"p{user % 5}"), set()).add(user)
            if rng.random() < 0.2:
                time.sleep(0.001)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agg.stop()
    out.put(({f"{s}/{p}": sorted(u) for (s, p), u in users.items()}, sorted(jobs)))


def sweep_at_once(url: str, start_at: float, now: float, directory: str, out: Any) -> None:
    """One of several processes timing out the same stale experiences at (almost) the same moment."""
    clock = FakeClock(now)
    agg = manual(url, clock, replica_id=f"sweeper-{os.getpid()}", pseudonym_key="k" * 32,
                 writers={"events": {"type": "jsonl", "directory": directory}}).start()
    time.sleep(max(0.0, start_at - time.time()))
    agg.collect()
    out.put(agg.status()["collector"].timed_out)
    agg.stop()
