"""The quarantine's statements: set an item aside, list, count, hand back for a retry, release.

An item is one row per (kind, ref): set aside again, it keeps its first time and counts an attempt more.
A loop skips its ``held`` items (``held()`` gives the clause); ``retry`` ones it takes again, and the
commit that processes one deletes its row (``_release``), so a retried item is applied once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import quarantine, schema
from aggregator.store.base import StoreBase

_Base = StoreBase


def held(kind: str, ref: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
    """True where the item of ``kind`` whose reference is ``ref`` (a column) is held in the quarantine."""
    q = schema.quarantine
    return sa.exists().where(q.c.kind == kind, q.c.ref == ref, q.c.status == "held")


class QuarantineQueries:
    """Mixed into Store: the quarantine's SQL."""

    # What quarantine_counts() last read (the Store sets both up): totals per kind, and per kind and status.
    quarantined: dict[str, int] | None
    quarantine_statuses: dict[str, dict[str, int]]

    async def _set_aside(self: _Base, conn: AsyncConnection, item: quarantine.Item, *, now: float,
                         by: str | None = None) -> None:
        """Record ``item`` as held in the transaction of ``conn`` (again: an attempt more, the newest reason)."""
        q = schema.quarantine
        insert = self._insert(q).values(kind=item.kind, ref=item.ref[:quarantine.MAX_REF], status="held",
                                        reason=item.reason, payload=item.payload_json(), attempts=1,
                                        first_at=now, last_at=now, set_aside_by=by)
        await conn.execute(insert.on_conflict_do_update(
            index_elements=[q.c.kind, q.c.ref],
            set_={"status": "held", "reason": insert.excluded.reason, "last_at": insert.excluded.last_at,
                  "attempts": q.c.attempts + 1, "set_aside_by": insert.excluded.set_aside_by,
                  "payload": sa.func.coalesce(insert.excluded.payload, q.c.payload)}))

    async def set_aside(self: _Base, item: quarantine.Item, *, now: float, by: str | None = None) -> None:
        """Record ``item`` as held, in a transaction of its own."""
        async with self.transaction() as conn:
            await QuarantineQueries._set_aside(self, conn, item, now=now, by=by)

    async def _release(self: _Base, conn: AsyncConnection, *, kind: str, refs: Sequence[str] = (),
                       item_id: int | None = None) -> int:
        """Delete quarantine rows in a commit that processed their items: by ``refs``, or the retried ``item_id``.

        By id, only a row handed back for a retry is taken: 0 means another loop has taken it (or it was
        set aside again), and the caller must not process the item.
        """
        q = schema.quarantine
        statement = sa.delete(q).where(q.c.kind == kind)
        if item_id is not None:
            statement = statement.where(q.c.id == item_id, q.c.status == "retry")
        elif refs:
            statement = statement.where(q.c.ref.in_(list(refs)))
        else:
            return 0
        return int((await conn.execute(statement)).rowcount or 0)

    async def quarantined_items(self: _Base, *, kind: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Items in the quarantine, oldest first."""
        q = schema.quarantine
        query = sa.select(q).order_by(q.c.id).limit(limit)
        if kind is not None:
            query = query.where(q.c.kind == kind)
        async with self.read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def quarantine_retries(self: _Base, kind: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """Items of ``kind`` handed back for a retry, oldest first."""
        q = schema.quarantine
        async with self.read() as conn:
            rows = await conn.execute(sa.select(q).where(q.c.kind == kind, q.c.status == "retry")
                                      .order_by(q.c.id).limit(limit))
            return [dict(row._mapping) for row in rows]

    async def _quarantine_counts(self: _Base) -> dict[str, dict[str, int]]:
        """Per kind and status, how many items."""
        q = schema.quarantine
        async with self.read() as conn:
            rows = await conn.execute(sa.select(q.c.kind, q.c.status, sa.func.count()).group_by(q.c.kind, q.c.status))
            counts: dict[str, dict[str, int]] = {}
            for kind, status, n in rows:
                counts.setdefault(kind, {})[status] = int(n)
            return counts

    async def quarantine_counts(self: _Base) -> dict[str, dict[str, int]]:
        """Items in the quarantine per kind and status; the totals per kind (every kind, 0 if none) are kept
        as ``quarantined`` for status() and /metrics."""
        counts = await QuarantineQueries._quarantine_counts(self)
        self.quarantine_statuses = counts
        self.quarantined = {kind: sum(counts.get(kind, {}).values()) for kind in sorted({*quarantine.KINDS, *counts})}
        return counts


    async def retry_quarantined(self: _Base, *, now: float, ids: Sequence[int] | None = None) -> int:
        """Hand items back to their loops (all, or the given ids); returns how many.

        An outbox item is queued again at once (its row leaves the quarantine); the others are marked
        ``retry`` and their loop takes them at its next run, deleting the row in the commit that processes it.
        """
        q, o = schema.quarantine, schema.outbox
        chosen = sa.true() if ids is None else q.c.id.in_(list(ids))
        async with self.transaction() as conn:
            deliveries = [ref for (ref,) in await conn.execute(
                sa.select(q.c.ref).where(chosen, q.c.kind == "delivery"))]
            outbox_ids = [int(ref) for ref in deliveries if ref.isdigit()]
            if outbox_ids:
                await conn.execute(sa.update(o).where(o.c.id.in_(outbox_ids), o.c.status == "dead").values(
                    status="pending", attempts=0, next_attempt_at=now, claimed_by=None, claimed_until=None))
            released = (await conn.execute(sa.delete(q).where(chosen, q.c.kind == "delivery"))).rowcount or 0
            marked = (await conn.execute(sa.update(q).where(chosen, q.c.kind != "delivery", q.c.status == "held")
                                         .values(status="retry", last_at=now))).rowcount or 0
        return int(released) + int(marked)
