"""What the collector asks about replicas: the incarnations entered, their watermarks and heartbeats (on the
database's clock), and which windows are still open; a flush publishes its watermark here (``_claim``).

Never closes a window or decides to give an incarnation up: the collector decides, ``collect_window`` closes.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import schema
from aggregator.store.base import StoreBase
from aggregator.store.batches import Batch
from aggregator.store.quarantine import held

_Base = StoreBase


@dataclasses.dataclass(frozen=True, slots=True)
class Incarnation:
    """What the collector knows of one replica incarnation that has not stopped cleanly."""

    writer_id: uuid.UUID
    replica_id: str
    watermark: float  # the replica's clock
    silent_for: float  # seconds since its last applied batch, by the database's clock


@dataclasses.dataclass(frozen=True, slots=True)
class DueWindow:
    """A window the collector may close now, and how many incarnations it gives up on to do so."""

    start: int
    end: int
    replicas_missing: int


class WatermarkQueries:
    """Mixed into Store: the replicas' incarnations (``flush_sequences``) and the open windows."""

    def _db_now(self: _Base) -> sa.ColumnElement[float]:
        """The database's clock in epoch seconds: the one clock every replica shares."""
        if self.dialect == "postgresql":
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float)
        return sa.cast((sa.func.julianday("now") - 2440587.5) * 86400.0, sa.Float)

    async def _claim(self: _Base, conn: AsyncConnection, writer_id: uuid.UUID, replica_id: str, batch: Batch,
                     now: float) -> bool:
        """Take the batch's sequence number, if it is new, and publish its watermark and liveness (and a
        clean stop): one UPDATE, which also locks the incarnation's row until the commit. False: applied before.

        The incarnation's row exists from its start (``register``); one that does not have it (a spool
        replayed for another incarnation, a row pruned after two silent days) is entered here first.
        """
        table = schema.flush_sequences
        values: dict[str, Any] = {"last_seq": batch.seq, "updated_at": now,
                                  "heartbeat_at": WatermarkQueries._db_now(self)}
        if batch.watermark is not None:
            greatest = sa.func.greatest if self.dialect == "postgresql" else sa.func.max
            values["watermark"] = sa.case((table.c.watermark.is_(None), batch.watermark),
                                          else_=greatest(table.c.watermark, batch.watermark))
        if batch.final:
            values["stopped_at"] = WatermarkQueries._db_now(self)
        claim = (sa.update(table).where(table.c.writer_id == writer_id, table.c.last_seq < batch.seq)
                 .values(**values).returning(table.c.last_seq))
        if (await conn.execute(claim)).first() is not None:
            return True
        entered = await conn.execute(
            WatermarkQueries._entry(self, writer_id, replica_id, now).returning(table.c.last_seq))
        return entered.first() is not None and (await conn.execute(claim)).first() is not None

    def _entry(self: _Base, writer_id: uuid.UUID, replica_id: str, now: float, **first: Any) -> Any:
        """The incarnation's row, at sequence number 0, unless it is there already."""
        return (self._insert(schema.flush_sequences)
                .values(writer_id=writer_id, replica_id=replica_id, last_seq=0, updated_at=now, **first)
                .on_conflict_do_nothing())

    async def register(self: _Base, writer_id: uuid.UUID, replica_id: str, *, watermark: float, now: float) -> None:
        """Enter an incarnation with a first watermark and heartbeat, ahead of its first flush.

        From this commit on the collectors wait for it (or give it up after a lease, counting it missing);
        an incarnation already entered is left as it is.
        """
        async with self.transaction() as conn:
            await conn.execute(WatermarkQueries._entry(self, writer_id, replica_id, now, watermark=watermark,
                                                       heartbeat_at=WatermarkQueries._db_now(self)))

    async def open_windows(self: _Base, *, ended_by: float) -> list[tuple[int, int]]:
        """(start, end) of the windows not yet reported that ended by ``ended_by``, oldest first.

        Windows held in the quarantine are left out: their collection failed for a reason of their own.
        """
        w = schema.windows
        async with self.read() as conn:
            rows = await conn.execute(
                sa.select(w.c.window_start, w.c.window_end)
                .where(w.c.closed_at.is_(None), w.c.window_end <= ended_by,
                       ~held("window", sa.cast(w.c.window_start, sa.String)))
                .order_by(w.c.window_start))
            return [(int(start), int(end)) for start, end in rows]

    async def incarnations(self: _Base, *, below: float) -> list[Incarnation]:
        """Incarnations not stopped cleanly whose watermark is below ``below`` (they may hold such windows).

        ``silent_for`` is measured on the database's clock, so hosts' clocks never judge each other.
        On PostgreSQL it is also counted from the server's own start at the latest: a server that was
        down did not hear anybody, and nobody who was silent because of it is given up on sooner.
        """
        f = schema.flush_sequences
        heard: sa.ColumnElement[Any]
        if self.dialect == "postgresql":
            started = sa.cast(sa.func.extract("epoch", sa.func.pg_postmaster_start_time()), sa.Float)
            heard = sa.func.greatest(sa.func.coalesce(f.c.heartbeat_at, f.c.updated_at), started)
        else:
            heard = sa.func.coalesce(f.c.heartbeat_at, f.c.updated_at)
        async with self.read() as conn:
            rows = await conn.execute(
                sa.select(f.c.writer_id, f.c.replica_id, f.c.watermark, WatermarkQueries._db_now(self) - heard)
                .where(f.c.stopped_at.is_(None), f.c.watermark < below))  # NULL: a version without watermarks
            return [Incarnation(writer_id=w, replica_id=r, watermark=float(m), silent_for=float(s or 0.0))
                    for w, r, m, s in rows]
