"""The experiences' statements: apply checkpoints (in a flush), time out stale journeys, write SLIs (in a collect).

Each experience is one row, changed under its row lock, so checkpoints of one journey arriving through
several replicas apply one at a time. A checkpoint seen before (same correlation id, checkpoint, category
and client timestamp) is ignored. The sweeper takes due rows ``FOR UPDATE SKIP LOCKED`` and moves them
from open to timed out in the commit that queues their failure event, so each times out exactly once.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import experiences, schema
from aggregator.store.base import StoreBase
from aggregator.store.outbox import OutboxQueries

_STATUS = {"success": "succeeded", "failure": "failed"}


_Base = StoreBase


class ExperienceQueries:
    """Mixed into Store: the experiences' SQL."""

    async def _apply_checkpoints(self: _Base, conn: AsyncConnection, items: Sequence[experiences.Checkpoint],
                                 urgencies: Mapping[str, float], *, window: int, closed: set[int],
                                 late_target: Callable[[], Any]) -> int:
        """Apply new checkpoints in a flush's transaction; returns how many were new (not retries)."""
        c, e = schema.experience_checkpoints, schema.experiences
        applied = 0
        for item in sorted(items, key=lambda i: i.key):  # one lock order everywhere: no deadlocks
            if item.checkpoint_category:
                category = await ExperienceQueries._bounded_category(self, conn, item.experience_id,
                                                                     item.checkpoint_category)
                item = dataclasses.replace(item, checkpoint_category=category)
            inserted = await conn.execute(self._insert(c).values(
                correlation_id=item.correlation_id, checkpoint=item.checkpoint,
                checkpoint_category=item.checkpoint_category, client_timestamp=item.client_timestamp,
                type=item.type, received_at=item.received_at, outcome=item.outcome, meta=item.meta,
            ).on_conflict_do_nothing().returning(c.c.correlation_id))
            if inserted.first() is None:
                continue  # a retry of a checkpoint already applied
            applied += 1
            start = experiences.window_of(item.received_at, window)
            if start in closed:
                start = await late_target()
            lifetime = urgencies.get(item.urgency, max(urgencies.values()))
            await conn.execute(self._insert(e).values(
                correlation_id=item.correlation_id, experience_id=item.experience_id, type=item.type,
                feature_category=item.feature_category, urgency=item.urgency, status="open",
                first_seen_at=item.received_at, deadline=item.received_at + lifetime,
                unknown_start=item.checkpoint != "start",
            ).on_conflict_do_nothing())
            row = (await conn.execute(sa.select(e).where(e.c.correlation_id == item.correlation_id)
                                      .with_for_update())).one()._mapping
            changes: dict[str, Any] = {}
            if item.checkpoint == "start" and row["started_at"] is None:
                changes.update(started_at=item.client_timestamp, start_window=start)
            elif item.checkpoint == "end":
                if row["status"] == "open":
                    changes.update(status=_STATUS[item.outcome or "success"], ended_at=item.client_timestamp,
                                   outcome_window=start, deadline=None)
                elif row["status"] == "timed_out" and not row["late_end"]:
                    changes.update(late_end=True, ended_at=item.client_timestamp)  # the outcome stays a failure
            if changes:
                await conn.execute(sa.update(e).where(e.c.correlation_id == item.correlation_id).values(**changes))
        return applied

    async def _bounded_category(self: _Base, conn: AsyncConnection, experience_id: str, category: str) -> str:
        """``category``, or OTHER once the experience has MAX_CATEGORIES others (replicas racing may add a few)."""
        t = schema.experience_categories
        known = await conn.scalar(sa.select(sa.func.count()).where(t.c.experience_id == experience_id,
                                                                   t.c.checkpoint_category == category))
        if known:
            return category
        count = await conn.scalar(sa.select(sa.func.count()).where(t.c.experience_id == experience_id))
        if int(count or 0) >= experiences.MAX_CATEGORIES:
            return experiences.OTHER
        await conn.execute(self._insert(t).values(experience_id=experience_id, checkpoint_category=category)
                           .on_conflict_do_nothing())
        return category

    async def sweep_experiences(self: _Base, *, now: float, window: int, writers: Sequence[str] = (),
                                limit: int = 1000) -> list[dict[str, Any]]:
        """Time out open experiences past their deadline, each exactly once; returns the ones this call did."""
        e = schema.experiences
        async with self.transaction() as conn:
            current = experiences.window_of(now, window)
            closed = await self._share_windows(conn, [current], window)
            target = await self._open_window_from(conn, current, window, closed)
            rows = [dict(r._mapping) for r in await conn.execute(
                sa.select(e).where(e.c.status == "open", e.c.deadline <= now)
                .order_by(e.c.deadline).limit(limit).with_for_update(skip_locked=True))]
            if not rows:
                return []
            await conn.execute(sa.update(e).where(e.c.correlation_id.in_([r["correlation_id"] for r in rows]))
                               .values(status="timed_out", outcome_window=target, deadline=None))
            for row in rows:
                await OutboxQueries._enqueue(
                    self, conn, writers, kind=experiences.FAILURE_KIND, schema_uri=experiences.FAILURE_SCHEMA,
                    key=row["correlation_id"], payload=experiences.failure_event(row, timed_out_at=now),
                    occurred_at=now, report_id=None, now=now)
        return rows

    async def _collect_slis(self: _Base, conn: AsyncConnection, report: Mapping[str, Any], writers: Sequence[str],
                            now: float) -> list[dict[str, Any]]:
        """Write the window's SLIs per experience and urgency with its report, and queue them for writers."""
        e, start = schema.experiences, report["window_start"]
        counts: dict[tuple[str, str], collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for experience_id, urgency, n in await conn.execute(
                sa.select(e.c.experience_id, e.c.urgency, sa.func.count()).where(e.c.start_window == start)
                .group_by(e.c.experience_id, e.c.urgency)):
            counts[(experience_id, urgency)]["started"] += n
        durations: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for experience_id, urgency, status, started_at, ended_at in await conn.execute(
                sa.select(e.c.experience_id, e.c.urgency, e.c.status, e.c.started_at, e.c.ended_at)
                .where(e.c.outcome_window == start)):
            counts[(experience_id, urgency)][status] += 1
            if status in ("succeeded", "failed") and started_at is not None and ended_at is not None:
                durations[(experience_id, urgency)].append(max(ended_at - started_at, 0.0))
        rows = [experiences.sli(start, report["window_end"], experience_id, urgency, counts[(experience_id, urgency)],
                                durations[(experience_id, urgency)])
                for experience_id, urgency in sorted(counts)]
        if rows:
            await conn.execute(sa.insert(schema.experience_slis), [
                {**{k: v for k, v in row.items() if k not in ("window_start", "window_end")},
                 "window_start": start, "report_id": report["id"]} for row in rows])
        for row in rows:
            await OutboxQueries._enqueue(
                self, conn, writers, kind=experiences.SLI_KIND, schema_uri=experiences.SLI_SCHEMA,
                key=f"{start}/{row['experience_id']}/{row['urgency']}", payload=row,
                occurred_at=report["window_end"], report_id=report["id"], now=now)
        return rows

    async def experience_slis(self: _Base, *, since: int | None = None,
                              report_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """SLI rows of reported windows, oldest first; or those of the given reports."""
        s = schema.experience_slis
        query = sa.select(s).order_by(s.c.window_start, s.c.experience_id, s.c.urgency)
        if since is not None:
            query = query.where(s.c.window_start >= since)
        if report_ids is not None:
            query = query.where(s.c.report_id.in_(list(report_ids)))
        async with self.read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def experience(self: _Base, correlation_id: str) -> dict[str, Any] | None:
        """One experience's row (status, flags, times), or None."""
        e = schema.experiences
        async with self.read() as conn:
            row = (await conn.execute(sa.select(e).where(e.c.correlation_id == correlation_id.upper()))).first()
            return None if row is None else dict(row._mapping)

    async def prune_experiences(self: _Base, conn: AsyncConnection, *, before: float) -> None:
        """Inside prune(): finished experiences and checkpoint ids older than ``before``."""
        e, c = schema.experiences, schema.experience_checkpoints
        await conn.execute(sa.delete(e).where(e.c.status != "open", e.c.first_seen_at < before))
        await conn.execute(sa.delete(c).where(c.c.received_at < before))
