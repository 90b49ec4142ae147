"""Range distinct's statements: the day rollup and sketches written with reports and late ids, and the range read.

Writes run inside the core's transactions: ``collect_window`` (a window's ids join its day's rollup and
a sketch row per set, in the report's commit) and ``apply_batch`` (late ids for a reported window join
the rollup and append a sketch row, in the flush's commit), so both stay exact and exactly once.
Sketch rows are only ever inserted, never updated: concurrent writers cannot lose each other's update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import distinct as ranges  # not `distinct`: the read below has that name
from aggregator import schema
from aggregator.store.base import StoreBase

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


class DistinctQueries:
    """Mixed into Store: range distinct's SQL."""

    # ---- writes, in the core's transactions ------------------------------------------------------

    async def _collect_distinct(self: _Base, conn: AsyncConnection, start: int, now: float) -> None:
        """In the report's commit: the window's ids join its day's rollup; a sketch per set is appended."""
        ids, day = schema.window_ids, ranges.day_of(start)
        for name, dim in ranges.DIMS.items():
            await conn.execute(
                self._insert(schema.day_ids).from_select(
                    ["day_start", "dim", "id"],
                    sa.select(sa.literal(day, sa.BigInteger), sa.literal(name, sa.String), ids.c.id)
                    .where(ids.c.window_start == start, ids.c.dim == dim).order_by(ids.c.id))
                .on_conflict_do_nothing())
            # Raw values (hex text on SQLite, a UUID on asyncpg): no UUID objects built for a large window.
            found = await conn.execute(sa.text("SELECT id FROM window_ids WHERE window_start = :s AND dim = :d"),
                                       {"s": start, "d": dim})
            hexes = [v if isinstance(v, str) else v.hex for (v,) in found]
            await DistinctQueries._append_sketch(self, conn, start, name, hexes, late=False, now=now)

    async def _late_distinct(self: _Base, conn: AsyncConnection, late: Sequence[tuple[int, Any]], now: float) -> None:
        """In a flush's commit: ids of reported windows (``(start, BatchWindow)``) join the day rollup, and
        each window gets a sketch of them appended."""
        for name, field in (("workspaces", "workspaces"), ("users", "users")):
            pairs = sorted({(ranges.day_of(start), i) for start, part in late for i in getattr(part, field)})
            if pairs:
                hexes = [i.to_bytes(16, "big").hex() for _, i in pairs]
                days = [d for d, _ in pairs]
                if self.dialect == "postgresql":
                    await conn.exec_driver_sql(_PG_INSERT_DAY_IDS, (days, hexes, name))
                else:
                    chunk = "[" + ",".join(f'[{d},"{h}"]' for d, h in zip(days, hexes, strict=True)) + "]"
                    await conn.exec_driver_sql(_SQLITE_INSERT_DAY_IDS, (name, chunk))
            for start, part in late:
                ids = getattr(part, field)
                if ids:
                    await DistinctQueries._append_sketch(
                        self, conn, start, name, [i.to_bytes(16, "big").hex() for i in ids], late=True, now=now)

    async def _append_sketch(self: _Base, conn: AsyncConnection, start: int, name: str, hexes: Sequence[str], *,
                             late: bool, now: float) -> None:
        if late and not hexes:
            return
        await conn.execute(sa.insert(schema.distinct_sketches).values(
            window_start=start, dim=name, late=late, sketch=ranges.sketch_of(hexes), created_at=now))

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
            # A window is whole if it ended at or after the ids horizon (prune drops those that ended before).
            ids_from = int(meta.get(IDS_BEFORE) or 0) - window
            plan = ranges.plan(lo, hi, ids_from=ids_from, days_from=int(meta.get(DAYS_BEFORE) or 0))
            shape = {"windows": int(count), "first": first, "last": last}
            if plan.path == "sketch":
                s = schema.distinct_sketches
                blobs = [bytes(b) for (b,) in await conn.execute(
                    sa.select(s.c.sketch).where(s.c.dim == dim, s.c.window_start >= lo, s.c.window_start < hi))]
                estimate = ranges.merge(blobs)
                return ranges.answer(dim, start, end, plan.path, estimate.value, estimate=estimate, **shape)
            value = await DistinctQueries._count_exact(self, conn, plan.spans, dim) if count else 0
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
