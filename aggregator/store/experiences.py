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
from aggregator.store.quarantine import QuarantineQueries, held

_STATUS = {"success": "succeeded", "failure": "failed"}
_ORDER = {"start": 0, "intermediate": 1, "end": 2}  # within one client timestamp
_UPDATED = ("status", "started_at", "ended_at", "start_window", "outcome_window", "deadline", "late_end")
_CHUNK = 1000


def _chunks(values: Sequence[Any]) -> list[Sequence[Any]]:
    return [values[offset:offset + _CHUNK] for offset in range(0, len(values), _CHUNK)]


def _new_row(first: experiences.Checkpoint, urgencies: Mapping[str, float]) -> dict[str, Any]:
    """A journey's row as its first checkpoint creates it: open until its urgency's lifetime has passed."""
    lifetime = urgencies.get(first.urgency, max(urgencies.values()))
    return {"correlation_id": first.correlation_id, "experience_id": first.experience_id, "type": first.type,
            "feature_category": first.feature_category, "urgency": first.urgency, "status": "open",
            "first_seen_at": first.received_at, "deadline": first.received_at + lifetime,
            "unknown_start": first.checkpoint != "start", "late_end": False}


_Base = StoreBase


class ExperienceQueries:
    """Mixed into Store: the experiences' SQL."""

    async def _apply_checkpoints(self: _Base, conn: AsyncConnection, items: Sequence[experiences.Checkpoint],
                                 urgencies: Mapping[str, float], *, window: int, closed: set[int],
                                 late_target: Callable[[], Any]) -> int:
        """Apply new checkpoints in a flush's transaction; returns how many were new (not retries).

        In bulk, a few statements per thousand checkpoints: their dedup rows (the new ones come back), the
        journeys' rows created if missing and locked in id order, the new states computed here, one update.
        """
        c, e = schema.experience_checkpoints, schema.experiences
        ordered = sorted(await ExperienceQueries._bound_categories(self, conn, items), key=lambda i: i.key)
        fresh: set[tuple[str, str, str, float]] = set()
        # Executemany ("insertmanyvalues"): one cached statement for every batch, where a VALUES list per
        # batch would be compiled anew each time (most of the cost, measured).
        if ordered:
            inserted = await conn.execute(
                self._insert(c).on_conflict_do_nothing().returning(
                    c.c.correlation_id, c.c.checkpoint, c.c.checkpoint_category, c.c.client_timestamp),
                [{"correlation_id": i.correlation_id, "checkpoint": i.checkpoint,
                  "checkpoint_category": i.checkpoint_category, "client_timestamp": i.client_timestamp,
                  "type": i.type, "received_at": i.received_at, "outcome": i.outcome, "meta": i.meta}
                 for i in ordered])
            fresh.update((cid, point, category, ts) for cid, point, category, ts in inserted)
        journeys: dict[str, list[experiences.Checkpoint]] = collections.defaultdict(list)
        for item in ordered:
            if item.key in fresh:  # else a retry of a checkpoint already applied
                journeys[item.correlation_id].append(item)
        if not journeys:
            return 0
        ids = sorted(journeys)  # one lock order everywhere: no deadlocks
        for group in journeys.values():
            group.sort(key=lambda i: (i.client_timestamp, _ORDER[i.checkpoint]))
        await conn.execute(self._insert(e).on_conflict_do_nothing(),
                           [_new_row(journeys[cid][0], urgencies) for cid in ids])
        rows: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(ids):
            for found in await conn.execute(sa.select(e).where(e.c.correlation_id.in_(chunk))
                                            .order_by(e.c.correlation_id).with_for_update()):
                rows[found.correlation_id] = dict(found._mapping)
        updates = []
        for cid in ids:
            row, before = rows[cid], dict(rows[cid])
            for item in journeys[cid]:
                start = experiences.window_of(item.received_at, window)
                if start in closed:
                    start = await late_target()
                if item.checkpoint == "start" and row["started_at"] is None:
                    row.update(started_at=item.client_timestamp, start_window=start)
                elif item.checkpoint == "end":
                    if row["status"] == "open":
                        row.update(status=_STATUS[item.outcome or "success"], ended_at=item.client_timestamp,
                                   outcome_window=start, deadline=None)
                    elif row["status"] == "timed_out" and not row["late_end"]:
                        row.update(late_end=True, ended_at=item.client_timestamp)  # the outcome stays a failure
            if row != before:
                updates.append({"cid": cid, **{k: row[k] for k in _UPDATED}})
        if updates:
            await conn.execute(sa.update(e).where(e.c.correlation_id == sa.bindparam("cid"))
                               .values({k: sa.bindparam(k) for k in _UPDATED}), updates)
        return sum(len(group) for group in journeys.values())

    async def _bound_categories(self: _Base, conn: AsyncConnection, items: Sequence[experiences.Checkpoint]
                                ) -> list[experiences.Checkpoint]:
        """The items, their categories beyond MAX_CATEGORIES per experience_id renamed OTHER (replicas racing
        may add a few more)."""
        pairs = sorted({(i.experience_id, i.checkpoint_category) for i in items if i.checkpoint_category})
        if not pairs:
            return list(items)
        t = schema.experience_categories
        known: dict[str, set[str]] = collections.defaultdict(set)
        for chunk in _chunks(sorted({experience_id for experience_id, _ in pairs})):
            for experience_id, category in await conn.execute(
                    sa.select(t.c.experience_id, t.c.checkpoint_category).where(t.c.experience_id.in_(chunk))):
                known[experience_id].add(category)
        kept: dict[tuple[str, str], str] = {}
        added = []
        for experience_id, category in pairs:
            seen = known[experience_id]
            if category not in seen and len(seen) < experiences.MAX_CATEGORIES:
                seen.add(category)
                added.append({"experience_id": experience_id, "checkpoint_category": category})
            kept[(experience_id, category)] = category if category in seen else experiences.OTHER
        if added:
            await conn.execute(self._insert(t).on_conflict_do_nothing(), added)
        return [dataclasses.replace(i, checkpoint_category=kept[(i.experience_id, i.checkpoint_category)])
                if i.checkpoint_category else i for i in items]

    async def sweep_experiences(self: _Base, *, now: float, window: int, writers: Sequence[str] = (),
                                limit: int = 1000, only: str | None = None) -> list[dict[str, Any]]:
        """Time out open experiences past their deadline, each exactly once; returns the ones this call did.

        Experiences held in the quarantine are skipped; one handed back for a retry leaves it in the commit
        that times it out. ``only``: that experience alone (the collector isolating one that fails).
        """
        e = schema.experiences
        async with self.transaction() as conn:
            query = sa.select(e).where(*ExperienceQueries._due(now, only))
            rows = [dict(r._mapping) for r in await conn.execute(
                query.order_by(e.c.deadline).limit(limit).with_for_update(skip_locked=True))]
            if not rows:
                return []
            # Only now the window row: a sweep with nothing to time out must not create the open window's
            # row, or a collector could close that window before a replica whose first flush is still on
            # its way had registered, and report it without that replica's data.
            current = experiences.window_of(now, window)
            closed = await self._share_windows(conn, [current], window)
            target = await self._open_window_from(conn, current, window, closed)
            ids = [r["correlation_id"] for r in rows]
            await conn.execute(sa.update(e).where(e.c.correlation_id.in_(ids))
                               .values(status="timed_out", outcome_window=target, deadline=None))
            for row in rows:
                await OutboxQueries._enqueue(
                    self, conn, writers, kind=experiences.FAILURE_KIND, schema_uri=experiences.FAILURE_SCHEMA,
                    key=row["correlation_id"], payload=experiences.failure_event(row, timed_out_at=now),
                    occurred_at=now, report_id=None, now=now)
            await QuarantineQueries._release(self, conn, kind="experience", refs=ids)
        return rows

    async def due_experiences(self: _Base, *, now: float, limit: int = 1000) -> list[str]:
        """Correlation ids of the open experiences past their deadline that the sweeper may take, oldest first."""
        e = schema.experiences
        async with self.read() as conn:
            rows = await conn.execute(sa.select(e.c.correlation_id).where(*ExperienceQueries._due(now, None))
                                      .order_by(e.c.deadline).limit(limit))
            return [cid for (cid,) in rows]

    @staticmethod
    def _due(now: float, only: str | None) -> list[sa.ColumnElement[bool]]:
        e = schema.experiences
        where = [e.c.status == "open", e.c.deadline <= now, ~held("experience", e.c.correlation_id)]
        return where + ([e.c.correlation_id == only] if only is not None else [])

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
