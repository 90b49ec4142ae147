"""Code that the PgBouncer tests run in separate processes (multiprocessing 'spawn': a clean interpreter each).

A clean interpreter matters here: asyncpg numbers its prepared statements per process from 1, so only
another process reproduces the clash a transaction pooler causes between replicas.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

from aggregator import Aggregator
from tests.helpers import FakeClock, ids, manual


def start_and_flush(url: str, pooler: str, out: Any) -> None:
    """Start an Aggregator, track and flush once, stop; put ``None`` or (error type, message)."""
    try:
        agg = manual(url, FakeClock(), database_pooler=pooler)
        with agg:
            for n, workspace in enumerate(ids(3)):
                agg.track(workspace, ids(1, offset=100 + n)[0], allowed=1)
            agg.flush()
    except Exception as exc:  # reported to the parent, which asserts on it
        out.put((type(exc).__name__, str(exc)))
        return
    out.put(None)


def pooled_replica(url: str, index: int, threads: int, window: int, duration: float, out: Any) -> None:
    """One replica process through PgBouncer: ``threads`` threads tracking, truth kept per window."""
    agg = Aggregator(database_url=url, database_pooler="transaction", window=f"{window}s", flush_interval="0.25s",
                     collect_interval="0.5s", replica_id=f"pooled-{index}", handle_sigterm=False)
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
