"""A window's distinct ids, stored once whoever sends them: the insert plans on PostgreSQL and SQLite.

Runs only inside a flush's transaction (``apply_batch``), under the window's shared lock; it never reads
ids back or counts them for a report (the collector's ``_aggregate`` does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import logs, schema
from aggregator.store.base import StoreBase

_Base = StoreBase

log = logs.get_logger("aggregator.store")

_SQLITE_CHUNK = 50_000

# Ids in sorted order, so concurrent flushes insert overlapping ids in one order and cannot deadlock.
_PG_IDS = "FROM unnest($1::uuid[]) AS x"
_PG_INSERT_IDS_ON_CONFLICT = (
    f"INSERT INTO window_ids (window_start, dim, id) SELECT $2::bigint, $3::smallint, x {_PG_IDS} "
    "ORDER BY x ON CONFLICT DO NOTHING"
)
# A flush's on-time ids of both sets in one statement: workspaces (dim 1) then users (dim 2), each set in
# id order. The ids not stored yet are each looked up by one probe of the primary key. Not ``NOT EXISTS``:
# PostgreSQL turns that into an anti-join whose plan follows the table's statistics, and a window newer than
# the last ANALYZE looks empty to them, so a Merge Anti Join read every id already in the window (a 20-id
# flush took 1.2 s into a window of 10^6). A LATERAL ... LIMIT 1 is never flattened into a join: the probe
# is per id whatever the statistics say. Then they are inserted plainly (large batches: a concurrent
# insert of the same id fails the statement, rolled back to a savepoint and redone with ON CONFLICT) or
# with ON CONFLICT at once (small batches: no savepoint round trips; its speculative insertion costs per id).
_PG_WINDOW_IDS = (
    "FROM (SELECT 1::smallint AS d, x FROM unnest($1::uuid[]) AS x UNION ALL "
    "SELECT 2::smallint, x FROM unnest($2::uuid[]) AS x) AS t"
)
_PG_INSERT_NEW_WINDOW_IDS = (
    f"INSERT INTO window_ids (window_start, dim, id) SELECT $3::bigint, t.d, t.x {_PG_WINDOW_IDS} "
    "LEFT JOIN LATERAL (SELECT 1 AS hit FROM window_ids w WHERE w.window_start = $3 AND w.dim = t.d "
    "AND w.id = t.x LIMIT 1) AS stored ON true WHERE stored.hit IS NULL ORDER BY t.d, t.x"
)
_PG_INSERT_WINDOW_IDS_ON_CONFLICT = (
    f"INSERT INTO window_ids (window_start, dim, id) SELECT $3::bigint, t.d, t.x {_PG_WINDOW_IDS} "
    "ORDER BY t.d, t.x ON CONFLICT DO NOTHING"
)
SAVEPOINT_FROM_IDS = 1000  # ids in a flush's window from which the plain insert (and its savepoint) pays off
# One statement per chunk: SQLite walks a JSON array of hex ids itself (~2x an executemany), in key order.
_SQLITE_INSERT_IDS = (
    "INSERT INTO window_ids (window_start, dim, id) SELECT ?, ?, value FROM json_each(?) "
    "ORDER BY value ON CONFLICT DO NOTHING"
)


def hexes(ids: Iterable[int]) -> list[str]:
    """``UUID.int`` ids as 32-digit hex text: the form SQLAlchemy's ``Uuid`` stores on SQLite, and one that
    PostgreSQL casts to ``uuid`` on its side; no UUID objects are built (4x faster than f"{i:032x}")."""
    return [i.to_bytes(16, "big").hex() for i in ids]


class WindowIdQueries:
    """Mixed into Store: the statements that insert a window's distinct ids."""

    async def _insert_ids(self: _Base, conn: AsyncConnection, start: int, dim: int, ids: Sequence[int],
                          *, count_new: bool = False) -> int:
        """Insert ``UUID.int`` ids into the window's distinct set; with ``count_new``, return how many were new.

        A flush's on-time ids take ``_insert_window_ids``; this is the path of late ids, and SQLite's.
        """
        if not ids:
            return 0
        texts = hexes(ids)
        if self.dialect != "postgresql":
            before = await conn.scalar(sa.text("SELECT total_changes()")) if count_new else 0
            for offset in range(0, len(texts), _SQLITE_CHUNK):
                chunk = '["' + '","'.join(texts[offset:offset + _SQLITE_CHUNK]) + '"]'  # hex: nothing to escape
                await conn.exec_driver_sql(_SQLITE_INSERT_IDS, (start, dim, chunk))
            after = await conn.scalar(sa.text("SELECT total_changes()")) if count_new else 0
            return int(after or 0) - int(before or 0)
        if not count_new:
            await conn.exec_driver_sql(_PG_INSERT_IDS_ON_CONFLICT, (texts, start, dim))
            return 0
        result = await conn.exec_driver_sql(_PG_INSERT_IDS_ON_CONFLICT + " RETURNING 1", (texts, start, dim))
        return len(result.fetchall())

    async def _insert_window_ids(self: _Base, conn: AsyncConnection, start: int, workspaces: Sequence[int],
                                 users: Sequence[int]) -> None:
        """A flush's on-time ids of both sets: one statement on PostgreSQL (see _PG_INSERT_NEW_WINDOW_IDS)."""
        if self.dialect != "postgresql":
            await WindowIdQueries._insert_ids(self, conn, start, schema.DIM_WORKSPACE, workspaces)
            await WindowIdQueries._insert_ids(self, conn, start, schema.DIM_USER, users)
            return
        if not (workspaces or users):
            return
        params = (hexes(workspaces), hexes(users), start)
        if len(workspaces) + len(users) < SAVEPOINT_FROM_IDS:
            await conn.exec_driver_sql(_PG_INSERT_WINDOW_IDS_ON_CONFLICT, params)
            return
        # Fast path: a plain insert of the ids not stored yet (ON CONFLICT's speculative insertion costs
        # ~70% more). If another replica inserts one of the same ids concurrently, the unique violation
        # rolls back to the savepoint and the ON CONFLICT form does the job.
        try:
            async with conn.begin_nested():
                await conn.exec_driver_sql(_PG_INSERT_NEW_WINDOW_IDS, params)
        except sa.exc.IntegrityError:
            log.debug("ids_insert_fallback", window_start=start, ids=len(workspaces) + len(users))
            await conn.exec_driver_sql(_PG_INSERT_WINDOW_IDS_ON_CONFLICT, params)
