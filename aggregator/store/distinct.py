"""Range distinct's statements: the rollup of reported windows, late ids, and the range read.

A report's commit does nothing for range distinct (it holds the window's lock, and a window of 10^7 ids
would take seconds more). The collector's ``roll_up`` then takes reported windows one per transaction:
under the window's exclusive lock, their ids join their day's rollup, a sketch per set is written, and the
window is marked rolled (``distinct_rollups``). A flush's late ids join the rollup and append a sketch row
in the flush's commit, but only for a window already rolled up: for one that is not, they are in its ids,
which its rollup reads. The flush holds the window's shared lock, so each late id is taken exactly once.
Until its rollup a window keeps its ids (retention waits for it), and the read counts them instead.
Sketch rows are only ever inserted, never updated: concurrent writers cannot lose each other's update.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import distinct as ranges  # not `distinct`: the read below has that name
from aggregator import schema
from aggregator.store.base import StoreBase
from aggregator.store.ids import hexes

_Base = StoreBase

# Late ids join the day rollup in one statement per set, in (day, id) order, so a flush and a collection
# touching the same day take the keys in one order (workspaces, then users) and cannot deadlock.
_PG_INSERT_DAY_IDS = (
    "INSERT INTO day_ids (day_start, dim, id) SELECT d, $3::varchar, x "
    "FROM unnest($1::bigint[], $2::uuid[]) AS t(d, x) ORDER BY d, x ON CONFLICT DO NOTHING"
)
_SQLITE_INSERT_DAY_IDS = (
    "INSERT INTO day_ids (day_start, dim, id) SELECT json_extract(value, '$[0]'), ?, json_extract(value, '$[1]') "
    "FROM json_each(?) ORDER BY 1, 3 ON CONFLICT DO NOTHING"
)
# Horizons in aggregator_meta, as 20-digit text so that text order is number order: windows reported before
# ``distinct_from`` have no rollup or sketch (they predate migration 0007); windows that ended before
# ``distinct_ids_before`` may have lost their ids, days before ``distinct_days_before`` their rollup.
FROM, IDS_BEFORE, DAYS_BEFORE = "distinct_from", "distinct_ids_before", "distinct_days_before"
# A window's ids for its sketch, as text, one string per slice of ids, not a row each (asyncpg builds a
# UUID object per row: 3.5 s for 10^6 ids, this 0.4 s). PostgreSQL's uuid text has dashes, taken out in
# Python; SQLite stores the 32-digit hex itself.
_PG_HEX_SLICE = ("SELECT string_agg(id::text, '') FROM window_ids WHERE window_start = $1 AND dim = $2 "
                 "AND id BETWEEN $3::uuid AND $4::uuid")
_SQLITE_HEX_SLICE = ("SELECT group_concat(id, '') FROM window_ids WHERE window_start = ? AND dim = ? "
                     "AND id BETWEEN ? AND ?")
_SLICE = 100_000  # ids in a slice, about: the rollup's day_ids insert of a slice is one commit (~1 s)


def _slices(ids: int) -> list[tuple[str, str]]:
    """Id ranges (inclusive, 32-digit hex) by leading hex digits: 1, 16, 256... of them for ``ids`` ids."""
    digits = 0
    while ids > _SLICE * 16 ** digits and digits < 3:
        digits += 1
    return [(f"{p:0{digits}x}".ljust(32, "0")[:32] if digits else "0" * 32,
             f"{p:0{digits}x}".ljust(32, "f")[:32] if digits else "f" * 32) for p in range(16 ** digits)]


class DistinctQueries:
    """Mixed into Store: range distinct's SQL."""

    # ---- the rollup, after reports -------------------------------------------------------------

    async def roll_up(self: _Base, *, now: float, limit: int,
                      on_locked: Callable[[int], Awaitable[None]] | None = None) -> list[int]:
        """Roll up to ``limit`` reported windows not rolled up yet, oldest first; returns their starts. A window
        a flush (or another collector) holds is left for the next run.

        ``on_locked`` (tests) runs with the window's start once it is locked, before it is marked.
        """
        w, r = schema.windows, schema.distinct_rollups
        async with self.read() as conn:
            due = [int(s) for (s,) in await conn.execute(
                sa.select(w.c.window_start)
                .where(w.c.closed_at.is_not(None),
                       ~sa.exists().where(r.c.window_start == w.c.window_start, r.c.rolled_at.is_not(None)))
                .order_by(w.c.window_start).limit(limit))]
        rolled = []
        for start in due:
            if (await DistinctQueries._mark_rolling(self, start, on_locked)
                    and await DistinctQueries._roll_up_window(self, start, now)):
                rolled.append(start)
        return rolled

    async def _mark_rolling(self: _Base, start: int, on_locked: Callable[[int], Awaitable[None]] | None) -> bool:
        """Mark the window as being rolled up (a ``distinct_rollups`` row, ``rolled_at`` NULL), in a short
        commit under the window's exclusive lock: late flushes into it, which share that lock, either committed
        before (their ids are in the window's ids, which the rollup reads after) or see the mark and write the
        day rollup and a sketch themselves. False: a flush or another collector holds the window."""
        w, r = schema.windows, schema.distinct_rollups
        async with self.transaction() as conn:
            if await conn.scalar(sa.select(r.c.window_start).where(r.c.window_start == start)) is not None:
                return True  # marked already (a rollup cut short): finish it
            row = (await conn.execute(sa.select(w.c.closed_at).where(w.c.window_start == start)
                                      .with_for_update(skip_locked=True))).first()
            if row is None or not await self._lock_window(conn, start, wait=False):
                return False
            if on_locked is not None:
                await on_locked(start)
            await conn.execute(self._insert(r).values(window_start=start, rolled_at=None).on_conflict_do_nothing())
        return True

    async def _roll_up_window(self: _Base, start: int, now: float) -> bool:
        """Copy a marked window's ids into its day's rollup, one slice of ids per commit (a late flush with ids
        of the same day waits for one slice at most, not for the window), then write its sketches and set
        ``rolled_at`` in one commit. Every step holds the mark's row, so collectors take turns; all are
        idempotent, so a rollup cut short is finished by the next. False: another collector is on it."""
        ids, day, rep = schema.window_ids, ranges.day_of(start), schema.reports
        async with self.read() as conn:
            counted = (await conn.execute(sa.select(rep.c.unique_workspaces, rep.c.unique_users)
                                          .where(rep.c.window_start == start))).first()
        slices = _slices(max(counted) if counted is not None else 0)
        # The sketch reads a slice per statement only to bound memory (~40 MB of text a slice at most).
        sketch_slices = _slices((max(counted) if counted is not None else 0) // 16)

        async def copy(conn: AsyncConnection, name: str, dim: int, low: str, high: str) -> None:
            await conn.execute(
                self._insert(schema.day_ids).from_select(
                    ["day_start", "dim", "id"],
                    sa.select(sa.literal(day, sa.BigInteger), sa.literal(name, sa.String), ids.c.id)
                    .where(ids.c.window_start == start, ids.c.dim == dim,
                           ids.c.id.between(uuid.UUID(low), uuid.UUID(high))).order_by(ids.c.id))
                .on_conflict_do_nothing())

        for name, dim in ranges.DIMS.items() if len(slices) > 1 else ():
            for low, high in slices:
                async with self.transaction() as conn:
                    if not await DistinctQueries._hold_mark(self, conn, start):
                        return False
                    await copy(conn, name, dim, low, high)
        async with self.transaction() as conn:
            if not await DistinctQueries._hold_mark(self, conn, start):
                return False
            for name, dim in ranges.DIMS.items():
                if len(slices) == 1:  # a small window: copied in this commit
                    await copy(conn, name, dim, *slices[0])
                sketch = await DistinctQueries._sketch_window(self, conn, start, dim, slices=sketch_slices)
                await DistinctQueries._insert_sketch(self, conn, start, name, ranges.serialized(sketch), late=False,
                                                     now=now)
            r = schema.distinct_rollups
            await conn.execute(sa.update(r).where(r.c.window_start == start).values(rolled_at=now))
        return True

    async def _hold_mark(self: _Base, conn: AsyncConnection, start: int) -> bool:
        r = schema.distinct_rollups
        return await conn.scalar(sa.select(r.c.window_start).where(r.c.window_start == start, r.c.rolled_at.is_(None))
                                 .with_for_update(skip_locked=True)) is not None

    async def _sketch_window(self: _Base, conn: AsyncConnection, start: int, dim: int, sketch: Any = None, *,
                             slices: Sequence[tuple[str, str]] = ()) -> Any:
        """A sketch of the window's ``dim`` ids (added to ``sketch`` if given), read in ``slices`` (default: 16)."""
        sketch = ranges.new_sketch() if sketch is None else sketch
        for low, high in slices or _slices(16 * _SLICE):
            if self.dialect == "postgresql":
                packed = (await conn.exec_driver_sql(_PG_HEX_SLICE, (start, dim, low, high))).scalar()
                packed = packed.replace("-", "") if packed else None
            else:
                packed = (await conn.exec_driver_sql(_SQLITE_HEX_SLICE, (start, dim, low, high))).scalar()
            if packed:
                ranges.update_packed(sketch, packed)
        return sketch

    # ---- late ids, in a flush's transaction -------------------------------------------------------

    async def _late_distinct(self: _Base, conn: AsyncConnection, late: Sequence[tuple[int, Any]], now: float) -> None:
        """In a flush's commit, which holds the windows' shared locks: ids of reported windows already rolled
        up (``(start, BatchWindow)``) join the day rollup, and each such window gets a sketch of them
        appended. A window not rolled up yet has them in its ids already: its rollup takes them."""
        r = schema.distinct_rollups
        rolled = {int(s) for (s,) in await conn.execute(
            sa.select(r.c.window_start).where(r.c.window_start.in_(sorted({s for s, _ in late}))))}
        late = [(start, part) for start, part in late if start in rolled]
        for name in ranges.DIMS:  # "workspaces" and "users": the fields of a batch's window too
            pairs = sorted({(ranges.day_of(start), i) for start, part in late for i in getattr(part, name)})
            if pairs:
                texts = hexes(i for _, i in pairs)
                days = [d for d, _ in pairs]
                if self.dialect == "postgresql":
                    await conn.exec_driver_sql(_PG_INSERT_DAY_IDS, (days, texts, name))
                else:
                    chunk = "[" + ",".join(f'[{d},"{h}"]' for d, h in zip(days, texts, strict=True)) + "]"
                    await conn.exec_driver_sql(_SQLITE_INSERT_DAY_IDS, (name, chunk))
            for start, part in late:
                ids = getattr(part, name)
                if ids:
                    await DistinctQueries._insert_sketch(self, conn, start, name, ranges.sketch_of(hexes(ids)),
                                                         late=True, now=now)

    async def _insert_sketch(self: _Base, conn: AsyncConnection, start: int, name: str, sketch: bytes, *,
                             late: bool, now: float) -> None:
        """A sketch row: written by a window's rollup, then by each late flush into it (rows are never updated)."""
        await conn.execute(sa.insert(schema.distinct_sketches).values(
            window_start=start, dim=name, late=late, sketch=sketch, created_at=now))

    # ---- prune ---------------------------------------------------------------------------------

    async def prune_distinct(self: _Base, *, ids_before: float, days_before: int) -> int:
        """Record the horizons (before anything goes, so a read never trusts ids already pruned), then drop
        the day rollup of days before ``days_before``; returns the rows deleted."""
        m, d = schema.meta, schema.day_ids
        async with self.transaction() as conn:
            for key, horizon in ((IDS_BEFORE, int(ids_before)), (DAYS_BEFORE, int(days_before))):
                statement = self._insert(m).values(key=key, value=f"{max(horizon, 0):020d}")
                await conn.execute(statement.on_conflict_do_update(
                    index_elements=[m.c.key],
                    set_={"value": sa.case((statement.excluded.value > m.c.value, statement.excluded.value),
                                           else_=m.c.value)}))
            deleted = (await conn.execute(sa.delete(d).where(d.c.day_start < days_before))).rowcount
        return int(deleted or 0)

    # ---- read ----------------------------------------------------------------------------------

    async def distinct(self: _Base, start: int, end: int, dim: str) -> ranges.Distinct:
        """Distinct ``dim`` ids of the reported windows starting in [start, end): exact where retained, else
        from the sketches (see aggregator.distinct)."""
        m, w = schema.meta, schema.windows
        async with self.read() as conn:
            if self.dialect == "postgresql":  # one snapshot for the windows counted and the ids counted
                await conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            meta = {k: v for k, v in await conn.execute(
                sa.select(m.c.key, m.c.value).where(m.c.key.in_([FROM, IDS_BEFORE, DAYS_BEFORE, "window_seconds"])))}
            window = int(meta.get("window_seconds") or ranges.DAY)
            lo, hi = ranges.windows_in(start, end, window, since=int(meta.get(FROM) or 0))
            count, first, last = (await conn.execute(
                sa.select(sa.func.count(), sa.func.min(w.c.window_start), sa.func.max(w.c.window_start))
                .where(w.c.closed_at.is_not(None), w.c.window_start >= lo, w.c.window_start < hi))).one()
            # A window is whole if it ended at or after the ids horizon (prune drops those that ended before),
            # or if it is not rolled up yet (prune keeps those).
            ids_from = int(meta.get(IDS_BEFORE) or 0) - window
            r = schema.distinct_rollups
            unrolled = [int(u) for (u,) in await conn.execute(
                sa.select(w.c.window_start).where(w.c.closed_at.is_not(None), w.c.window_start >= lo,
                                                  w.c.window_start < hi,
                                                  ~sa.exists().where(r.c.window_start == w.c.window_start,
                                                                     r.c.rolled_at.is_not(None))))]
            plan = ranges.plan(lo, hi, ids_from=ids_from, days_from=int(meta.get(DAYS_BEFORE) or 0),
                               unrolled=unrolled, window=window)
            shape = {"windows": int(count), "first": first, "last": last}
            if plan.path == "sketch":
                s = schema.distinct_sketches
                blobs = [bytes(b) for (b,) in await conn.execute(
                    sa.select(s.c.sketch).where(s.c.dim == dim, s.c.window_start >= lo, s.c.window_start < hi))]
                if unrolled:  # no sketch yet: one of their ids
                    sketch = ranges.new_sketch()
                    for u in unrolled:
                        await DistinctQueries._sketch_window(self, conn, u, ranges.DIMS[dim], sketch)
                    blobs.append(ranges.serialized(sketch))
                estimate = ranges.merge(blobs)
                return ranges.answer(dim, start, end, plan.path, estimate.value, estimate=estimate, **shape)
            value = await DistinctQueries._count_exact(self, conn, plan.spans + plan.also, dim) if count else 0
            return ranges.answer(dim, start, end, plan.path, value, **shape)

    async def _count_exact(self: _Base, conn: AsyncConnection, spans: Sequence[ranges.Span], dim: str) -> int:
        ids, days, w = schema.window_ids, schema.day_ids, schema.windows
        parts: list[sa.Select[Any]] = []
        for span in spans:
            if span.source == "days":
                parts.append(sa.select(days.c.id.label("id")).where(
                    days.c.dim == dim, days.c.day_start >= span.start, days.c.day_start < span.end))
            else:
                parts.append(sa.select(ids.c.id.label("id"))
                             .join(w, w.c.window_start == ids.c.window_start)
                             .where(ids.c.dim == ranges.DIMS[dim], ids.c.window_start >= span.start,
                                    ids.c.window_start < span.end, w.c.closed_at.is_not(None)))
        if not parts:
            return 0
        union = (parts[0] if len(parts) == 1 else sa.union(*parts)).subquery()
        return int(await conn.scalar(sa.select(sa.func.count(sa.distinct(union.c.id)))) or 0)
