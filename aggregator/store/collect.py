"""Around a window's report: its numbers summed (for ``collect_window``), reports read back, the id partitions
kept ahead, and what reported windows were made of pruned.

Never writes a report or closes a window: ``collect_window`` (store/core.py) does both, in one commit.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import schema
from aggregator.store import partitions
from aggregator.store.base import StoreBase
from aggregator.store.experiences import ExperienceQueries
from aggregator.store.meters import MeterQueries

_Base = StoreBase


class CollectQueries:
    """Mixed into Store: a report's numbers, the reports, and retention."""

    async def _aggregate(self: _Base, conn: AsyncConnection, start: int, end: int) -> dict[str, Any]:
        ids = schema.window_ids
        uniques: dict[int, int] = {
            dim: n for dim, n in await conn.execute(
                sa.select(ids.c.dim, sa.func.count()).where(ids.c.window_start == start).group_by(ids.c.dim)
            )
        }
        c = schema.contributions
        sums = (await conn.execute(
            sa.select(
                sa.func.coalesce(sa.func.sum(c.c.allowed), 0),
                sa.func.coalesce(sa.func.sum(c.c.denied), 0),
                sa.func.count().filter(c.c.ontime),
                sa.func.coalesce(sa.func.sum(c.c.late_allowed), 0),
                sa.func.coalesce(sa.func.sum(c.c.late_denied), 0),
                sa.func.coalesce(sa.func.sum(c.c.late_workspaces), 0),
                sa.func.coalesce(sa.func.sum(c.c.late_users), 0),
            ).where(c.c.window_start == start)
        )).one()
        return {
            "window_start": start,
            "window_end": end,
            "unique_workspaces": int(uniques.get(schema.DIM_WORKSPACE, 0)),
            "unique_users": int(uniques.get(schema.DIM_USER, 0)),
            "allowed_requests": int(sums[0]),
            "denied_requests": int(sums[1]),
            "replicas": int(sums[2]),
            "late_allowed_requests": int(sums[3]),
            "late_denied_requests": int(sums[4]),
            "late_unique_workspaces": int(sums[5]),
            "late_unique_users": int(sums[6]),
        }

    async def partition_ahead(self: _Base, now: float) -> list[str]:
        """On PostgreSQL, create the id partitions of ``now``'s day and the next ones (store/partitions.py)."""
        if self.dialect != "postgresql":
            return []
        async with self.transaction() as conn:
            return await partitions.ensure_ahead(conn, now)

    async def prune(self: _Base, *, before: float, event_ids_before: float | None = None) -> int:
        """Drop distinct ids and contributions of reported windows that ended before ``before``.

        On PostgreSQL, ids go by whole day partitions: they are kept until the end of ``before``'s day.
        Window rows stay (they are tiny) so that a very late flush still finds its window closed.
        """
        old = sa.select(schema.windows.c.window_start).where(
            schema.windows.c.closed_at.is_not(None), schema.windows.c.window_end < before
        )
        ids = schema.window_ids
        # Ids go once range distinct's rollup has them (a window not rolled up yet keeps them).
        r = schema.distinct_rollups
        rolled = sa.select(r.c.window_start).where(r.c.rolled_at.is_not(None))
        drop = sa.delete(ids).where(ids.c.window_start.in_(old.where(schema.windows.c.window_start.in_(rolled))))
        if self.dialect == "postgresql":
            async with self.transaction() as conn:  # alone: a drop locks the parent table until it commits
                if await partitions.listed(conn):
                    await partitions.drop_reported(conn, before)
                    # What is left (the default partition, a partition holding an unreported window) is
                    # deleted, but never from a day that is still partly retained.
                    drop = drop.where(ids.c.window_start < partitions.day_of(before))
        async with self.transaction() as conn:
            deleted = (await conn.execute(drop)).rowcount
            await conn.execute(sa.delete(schema.contributions).where(schema.contributions.c.window_start.in_(old)))
            await conn.execute(sa.delete(schema.flush_sequences).where(schema.flush_sequences.c.updated_at < before))
            await MeterQueries.prune_meters(self, conn, old, event_ids_before=event_ids_before or before)
            await ExperienceQueries.prune_experiences(self, conn, before=before)
        return int(deleted or 0)

    async def reports(self: _Base, *, since: int | None = None, after_id: int | None = None,
                      limit: int | None = None) -> list[dict[str, Any]]:
        """Report rows, oldest window first; ``since`` filters on window start, ``after_id`` on the cursor."""
        r = schema.reports
        query = sa.select(r)
        if since is not None:
            query = query.where(r.c.window_start >= since).order_by(r.c.window_start)
        else:
            query = query.order_by(r.c.id if after_id is not None else r.c.window_start)
        if after_id is not None:
            query = query.where(r.c.id > after_id)
        if limit is not None:
            query = query.limit(limit)
        async with self.read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]
