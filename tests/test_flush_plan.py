"""The flush's id insert on PostgreSQL costs per id sent, not per id already in the window (#13, item 1).

A window opened after the last ANALYZE looks empty to the planner; an anti-join planned on that picture
reads every id already stored. These tests build exactly that situation on a real server and read the plan.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import asyncpg
import sqlalchemy as sa

from aggregator import store
from aggregator.store.ids import _PG_INSERT_NEW_WINDOW_IDS

STORED = 200_000
NOT_EXISTS = (  # the statement before this change, to show the situation is the one that hurt
    "INSERT INTO window_ids (window_start, dim, id) SELECT $2::bigint, $3::smallint, x FROM unnest($1::uuid[]) AS x "
    "WHERE NOT EXISTS (SELECT 1 FROM window_ids w WHERE w.window_start = $2 AND w.dim = $3 AND w.id = x) ORDER BY x"
)


def _asyncpg_url(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _window_after_analyze(url: str, start: int) -> asyncpg.Connection:
    """A window of STORED ids written after the table's last ANALYZE, with autovacuum kept away."""
    conn = await asyncpg.connect(_asyncpg_url(url))
    # Day partitions on PostgreSQL (these windows, in 1970, land in the default one): autovacuum off on each.
    for (name,) in await conn.fetch("SELECT inhrelid::regclass::text FROM pg_inherits "
                                    "WHERE inhparent = 'window_ids'::regclass") or [("window_ids",)]:
        await conn.execute(f"ALTER TABLE {name} SET (autovacuum_enabled = false)")
    await conn.execute("INSERT INTO window_ids (window_start, dim, id) "
                       "SELECT 60, 2, md5('old' || i)::uuid FROM generate_series(1, 1000) AS i")
    await conn.execute("ANALYZE window_ids")
    await conn.execute("INSERT INTO window_ids (window_start, dim, id) "
                       "SELECT $1, 2, md5('u' || i)::uuid FROM generate_series(1, $2) AS i", start, STORED)
    return conn


def _ids_table(node: dict[str, Any]) -> bool:
    """A plan node reading window_ids, or one of its partitions on PostgreSQL (window_ids_*)."""
    return str(node.get("Relation Name", "")).startswith("window_ids")


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found, todo = [], [plan]
    while todo:
        node = todo.pop()
        found.append(node)
        todo.extend(node.get("Plans", []))
    return found


async def _plan(conn: asyncpg.Connection, statement: str, *params: Any) -> list[dict[str, Any]]:
    """The executed plan's nodes; EXPLAIN ANALYZE runs the insert, so it is rolled back."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        raw = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}", *params)
    finally:
        await transaction.rollback()
    return _nodes(json.loads(raw)[0]["Plan"])


async def test_new_ids_are_probed_one_by_one_whatever_the_statistics(pg_url: str) -> None:
    """Into a window the statistics have never seen: the old NOT EXISTS reads the window's stored ids (an
    anti-join over all of them), the flush's statement probes the primary key once per id sent and reads
    nothing else of the window."""
    start = 3600
    conn = await _window_after_analyze(pg_url, start)
    try:
        ids = [str(uuid.uuid4()) for _ in range(20)]
        before = await _plan(conn, NOT_EXISTS, ids, start, 2)
        after = await _plan(conn, _PG_INSERT_NEW_WINDOW_IDS, [], ids, start)  # users (dim 2) only
    finally:
        await conn.close()
    read_before = max(n["Actual Rows"] * n["Actual Loops"] for n in before if _ids_table(n))
    assert read_before >= STORED  # the bug: every stored id read for a 20-id flush
    probes = [n for n in after if n["Node Type"] in ("Index Only Scan", "Index Scan")]
    assert [(_ids_table(n), n["Actual Loops"]) for n in probes] == [(True, 20)]
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in probes) == 0  # all 20 are new
    assert not [n["Node Type"] for n in after if n["Node Type"] in ("Merge Join", "Hash Join", "Seq Scan")]


async def test_flush_into_a_window_the_statistics_never_saw_stores_exactly_the_new_ids(pg_url: str) -> None:
    """Through the Store: 20 ids, 5 of them already in a 200,000-id window written after the last ANALYZE;
    the window then holds 200,015 ids, and the flush reads no more than it sends."""
    start = 7200
    conn = await _window_after_analyze(pg_url, start)
    db = store.Store(pg_url)
    try:
        await db.ping()
        old = [uuid.UUID(await conn.fetchval("SELECT md5('u' || $1::int)::uuid::text", i)).int for i in range(1, 6)]
        new = [uuid.uuid4().int for _ in range(15)]
        batch = store.Batch(seq=1, windows={start: store.BatchWindow(workspaces=[], users=sorted(old + new),
                                                                      allowed=20, denied=0)},
                            events=20, watermark=start + 1.0)
        began = time.perf_counter()
        result = await db.apply_batch(batch, writer_id=uuid.uuid4(), replica_id="plan", window=3600, now=start + 10)
        elapsed = time.perf_counter() - began
        stored = await conn.fetchval("SELECT count(*) FROM window_ids WHERE window_start = $1", start)
    finally:
        await db.close()
        await conn.close()
    assert (result.applied, stored) == (True, STORED + 15)
    print(f"\n20-id flush into a {STORED:,}-id window unseen by ANALYZE: {elapsed * 1000:.1f} ms")



async def test_both_sets_are_probed_one_by_one_in_one_statement(pg_url: str) -> None:
    """The on-time insert of a large flush (workspaces and users together) probes per id sent, too."""
    start = 10800
    conn = await _window_after_analyze(pg_url, start)
    try:
        workspaces, users = [str(uuid.uuid4()) for _ in range(5)], [str(uuid.uuid4()) for _ in range(15)]
        after = await _plan(conn, _PG_INSERT_NEW_WINDOW_IDS, workspaces, users, start)
    finally:
        await conn.close()
    probes = [n for n in after if n["Node Type"] in ("Index Only Scan", "Index Scan")]
    assert sum(n["Actual Loops"] for n in probes) == 20 and all(_ids_table(n) for n in probes)
    assert sum(n["Actual Rows"] * n["Actual Loops"] for n in probes) == 0
    assert not [n["Node Type"] for n in after if n["Node Type"] in ("Merge Join", "Hash Join", "Seq Scan")]


def _flush_of(seq: int, start: int, writer: str) -> store.Batch:
    part = store.BatchWindow(workspaces=[uuid.uuid4().int for _ in range(2)],
                             users=sorted(uuid.uuid4().int for _ in range(20)), allowed=22, denied=0)
    return store.Batch(seq=seq, windows={start: part}, events=22, watermark=start + 1.0)


async def test_a_flush_of_one_window_runs_six_statements(pg_url: str) -> None:
    """Item 4 of #13: the statements of a typical flush (one window, 22 ids), besides BEGIN and COMMIT.
    Before: 13 (the sequence's insert, select-for-update and update; the window rows' insert and share lock;
    a savepoint, insert and release per set of ids; the contribution)."""
    db = store.Store(pg_url)
    seen: list[str] = []
    sa.event.listen(db.engine.sync_engine, "before_cursor_execute",
                    lambda _c, _cur, statement, *_: seen.append(" ".join(statement.split()[:2])))
    writer, start = uuid.uuid4(), 1_800_000_000
    try:
        await db.register(writer, "r", watermark=start - 1.0, now=start + 1.0)
        counts = []
        for seq in (1, 2):
            seen.clear()
            result = await db.apply_batch(_flush_of(seq, start, "r"), writer_id=writer, replica_id="r", window=60,
                                          now=start + 1.0)
            counts.append((result.applied, len(seen)))
        seen.clear()
        again = await db.apply_batch(_flush_of(2, start, "r"), writer_id=writer, replica_id="r", window=60,
                                     now=start + 1.0)
    finally:
        await db.close()
    assert counts == [(True, 6), (True, 6)]
    assert again.applied is False  # the same sequence number again: applied before, skipped


async def test_concurrent_flushes_into_one_window_create_no_multixact(pg_url: str) -> None:
    """Flushes order against the collector with advisory locks: many replicas flushing into the same window
    at once leave no MultiXact behind (FOR SHARE on the window row created one per overlapping flush)."""
    admin = await asyncpg.connect(_asyncpg_url(pg_url))

    async def next_multixact() -> int:
        await admin.execute("CHECKPOINT")
        return int(await admin.fetchval("SELECT next_multixact_id::text::bigint FROM pg_control_checkpoint()"))

    db = store.Store(pg_url, pool_size=10)
    start = 1_800_000_000
    writers = [uuid.uuid4() for _ in range(10)]
    try:
        before = await next_multixact()
        for seq in range(1, 6):
            await asyncio.gather(*(db.apply_batch(_flush_of(seq, start, f"r{k}"), writer_id=w, replica_id=f"r{k}",
                                                  window=60, now=start + 1.0) for k, w in enumerate(writers)))
        after = await next_multixact()
        stored = await admin.fetchval("SELECT count(*) FROM window_ids WHERE window_start = $1", start)
    finally:
        await db.close()
        await admin.close()
    assert stored == 50 * 22
    assert after - before == 0
