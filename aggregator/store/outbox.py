"""The outbox's statements: enqueue with a report, lease due items per writer, settle, inspect, retry.

A delivery loop leases up to N due items of its writer (``claimed_by``/``claimed_until``; on PostgreSQL
``FOR UPDATE SKIP LOCKED`` so loops of several replicas take disjoint items), sends them outside any
transaction, then settles each one, if it still holds the lease. A loop that dies leaves its lease
to expire, and another loop sends the items again: delivery is at least once, with stable event ids.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import iglu, schema
from aggregator.reports import Report
from aggregator.store.base import StoreBase

# Event ids are UUIDv5 under this namespace, of "KIND/KEY/WRITER": the same item and writer always
# get the same id, on any replica and after any number of retries.
EVENT_NAMESPACE = uuid.UUID("5d1c2a8e-4f0b-5c7e-9a3d-6b2f1e0c8a47")


def event_id(kind: str, key: object, writer: str) -> uuid.UUID:
    return uuid.uuid5(EVENT_NAMESPACE, f"{kind}/{key}/{writer}")


_derived_event_id = event_id


@dataclasses.dataclass(frozen=True, slots=True)
class Settlement:
    """What a delivery loop learned about one leased item."""

    id: int
    status: str  # "delivered", "pending" (retry at next_attempt_at) or "dead"
    attempts: int
    next_attempt_at: float
    error: str | None = None


_Base = StoreBase


class OutboxQueries:
    """Mixed into Store: the outbox's SQL."""

    async def _enqueue_report(self: _Base, conn: AsyncConnection, report: dict[str, Any],
                              writers: Sequence[str], now: float) -> None:
        """Queue ``report`` for each writer, in the transaction that writes the report."""
        await OutboxQueries._enqueue(self, conn, writers, kind="usage_report", schema_uri=iglu.USAGE_REPORT,
                                     event_id=None, key=report["window_start"],
                                     payload=Report.from_row(report).to_dict(), occurred_at=report["generated_at"],
                                     report_id=report["id"], now=now)

    async def _enqueue(self: _Base, conn: AsyncConnection, writers: Sequence[str], *, kind: str, schema_uri: str,
                       payload: dict[str, Any], occurred_at: float, report_id: int | None, now: float,
                       event_id: uuid.UUID | None = None, key: object = None) -> None:
        """Queue one item for each writer; its event id is ``event_id``, or derived from ``key`` per writer."""
        if not writers:
            return
        text = json.dumps(payload, sort_keys=True)
        await conn.execute(sa.insert(schema.outbox), [
            {"writer": writer, "event_id": event_id or _derived_event_id(kind, key, writer), "kind": kind,
             "schema_uri": schema_uri, "occurred_at": occurred_at, "payload": text, "report_id": report_id,
             "status": "pending", "attempts": 0, "next_attempt_at": now, "created_at": now}
            for writer in writers
        ])

    async def enqueue_reports(self: _Base, writer: str, *, after_id: int, now: float) -> int:
        """Queue every report after ``after_id`` for ``writer`` (a writer added later); skips queued ones."""
        r, o = schema.reports, schema.outbox
        async with self.transaction() as conn:
            rows = [dict(row._mapping) for row in await conn.execute(
                sa.select(r).where(r.c.id > after_id, ~sa.exists().where(o.c.report_id == r.c.id,
                                                                          o.c.writer == writer))
                .order_by(r.c.id))]
            for row in rows:
                await OutboxQueries._enqueue_report(self, conn, row, [writer], now)
        return len(rows)

    async def claim_outbox(self: _Base, writer: str, *, now: float, limit: int, claimer: str,
                           lease: float) -> list[dict[str, Any]]:
        """Lease up to ``limit`` due items of ``writer``, oldest first."""
        o = schema.outbox
        async with self.transaction() as conn:
            due = await conn.execute(
                sa.select(o.c.id)
                .where(o.c.writer == writer, o.c.status == "pending", o.c.next_attempt_at <= now,
                       sa.or_(o.c.claimed_until.is_(None), o.c.claimed_until < now))
                .order_by(o.c.id).limit(limit).with_for_update(skip_locked=True)
            )
            ids = [item_id for (item_id,) in due]
            if not ids:
                return []
            await conn.execute(sa.update(o).where(o.c.id.in_(ids)).values(claimed_by=claimer,
                                                                           claimed_until=now + lease))
            rows = await conn.execute(sa.select(o).where(o.c.id.in_(ids)).order_by(o.c.id))
            return [dict(row._mapping) for row in rows]

    async def settle_outbox(self: _Base, claimer: str, settlements: Sequence[Settlement], *, now: float) -> int:
        """Record outcomes of items ``claimer`` still leases; returns how many it still held."""
        o = schema.outbox
        held = 0
        async with self.transaction() as conn:
            for s in settlements:
                result = await conn.execute(
                    sa.update(o).where(o.c.id == s.id, o.c.claimed_by == claimer, o.c.status == "pending")
                    .values(status=s.status, attempts=s.attempts, next_attempt_at=s.next_attempt_at,
                            last_error=s.error, claimed_by=None, claimed_until=None,
                            delivered_at=now if s.status == "delivered" else None)
                )
                held += result.rowcount or 0
        return held

    async def outbox_summary(self: _Base) -> list[dict[str, Any]]:
        """Per writer and status: how many items, and the oldest one's creation time."""
        o = schema.outbox
        async with self.read() as conn:
            rows = await conn.execute(
                sa.select(o.c.writer, o.c.status, sa.func.count().label("items"),
                          sa.func.min(o.c.created_at).label("oldest"))
                .group_by(o.c.writer, o.c.status).order_by(o.c.writer, o.c.status)
            )
            return [dict(row._mapping) for row in rows]

    async def outbox_items(self: _Base, *, status: str | None = None, writer: str | None = None,
                           limit: int = 100) -> list[dict[str, Any]]:
        o = schema.outbox
        query = sa.select(o.c.id, o.c.writer, o.c.event_id, o.c.kind, o.c.report_id, o.c.status, o.c.attempts,
                          o.c.next_attempt_at, o.c.last_error, o.c.created_at, o.c.delivered_at)
        if status is not None:
            query = query.where(o.c.status == status)
        if writer is not None:
            query = query.where(o.c.writer == writer)
        async with self.read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query.order_by(o.c.id).limit(limit))]

    async def retry_outbox(self: _Base, *, now: float, writer: str | None = None,
                           ids: Sequence[int] | None = None) -> int:
        """Send dead items again (all, one writer's, or the given ids): pending, attempts from zero.

        Those the delivery loop had set aside (they could not be rendered) leave the quarantine with it.
        """
        o, q = schema.outbox, schema.quarantine
        statement = sa.update(o).where(o.c.status == "dead").values(
            status="pending", attempts=0, next_attempt_at=now, claimed_by=None, claimed_until=None)
        if writer is not None:
            statement = statement.where(o.c.writer == writer)
        if ids is not None:
            statement = statement.where(o.c.id.in_(list(ids)))
        async with self.transaction() as conn:
            revived = int((await conn.execute(statement)).rowcount or 0)
            if revived:
                await conn.execute(sa.delete(q).where(q.c.kind == "delivery", ~sa.exists().where(
                    sa.cast(o.c.id, sa.String) == q.c.ref, o.c.status == "dead")))
            return revived

    async def prune_outbox(self: _Base, *, before: float) -> int:
        """Forget delivered items delivered before ``before``; dead and pending ones stay, whatever their age
        (a dead item waits for an operator: ``aggregator outbox retry``)."""
        o = schema.outbox
        async with self.transaction() as conn:
            result = await conn.execute(sa.delete(o).where(o.c.status == "delivered", o.c.delivered_at < before))
            return int(result.rowcount or 0)


