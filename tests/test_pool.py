"""An idle replica holds one PostgreSQL connection (#13 item 4): a fleet's connection count is its size.

Jobs that overlap (a flush during a collection, a host's flush()) open more, closed when they end.
"""

from __future__ import annotations

import threading
import time
import uuid

import asyncpg
import sqlalchemy as sa

from aggregator import Aggregator
from tests.faults import blocking


def _connections(url: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(False))
        try:
            return int(await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"))
        finally:
            await conn.close()
    return blocking(count())


def test_an_idle_replica_keeps_one_connection_after_overlapping_jobs(pg_url: str) -> None:
    with Aggregator(database_url=pg_url, window="10s", flush_interval="1h", collect_interval="1h",
                    handle_sigterm=False) as agg:
        for _ in range(100):
            agg.track(uuid.uuid4(), uuid.uuid4())
        # Jobs at once, from threads: each needs a connection of its own while it runs.
        barrier = threading.Barrier(4)

        def job(work: str) -> None:
            barrier.wait()
            for _ in range(5):
                agg.collect() if work == "collect" else agg.flush()
                agg.track(uuid.uuid4(), uuid.uuid4())
        threads = [threading.Thread(target=job, args=(w,)) for w in ("collect", "flush", "collect", "flush")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.3)  # connections returned
        idle = _connections(pg_url)
        assert idle == 1, f"{idle} connections held by an idle replica"
        agg.flush()  # and the one kept still works
