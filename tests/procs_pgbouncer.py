"""Code that the PgBouncer tests run in separate processes (multiprocessing 'spawn': a clean interpreter each).

A clean interpreter matters here: asyncpg numbers its prepared statements per process from 1, so only
another process reproduces the clash a transaction pooler causes between replicas.
"""

from __future__ import annotations

from typing import Any

from aggregator import Aggregator
from tests import procs
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
    procs.track_with_truth(agg, index, threads, window, duration, out)
