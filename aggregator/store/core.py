"""The Store: one engine, its transactions, the window locks, and the two transactions that carry the mechanism;
the parts' queries (the modules beside this one) are mixed into it here.

Every statement runs in ``transaction()`` or ``read()``, which turn driver errors into ours: never on a bare
connection of the engine.

Two transactions carry the mechanism:

* ``apply_batch`` (a replica's flush): takes the replica's next flush sequence number, share-locks the
  windows it writes to (advisory locks on PostgreSQL: nothing is written per lock), inserts distinct ids
  (``ON CONFLICT DO NOTHING``, so the same id from two replicas is stored once), adds counters and
  publishes the replica's watermark, all in one commit. A retry of a batch whose commit outcome was
  unknown finds its number already taken and is skipped. Data for a window that is already reported is
  counted as late in the window open now.
* ``collect_window`` (the collector): locks the window row ``FOR UPDATE SKIP LOCKED``, then the window
  itself exclusively, skipping it while a flush holds it (transaction-scoped locks: they work through
  pools and are released when the holder dies), aggregates every contribution, then takes the collector
  lock row to write the report and close the window in the same commit.

On SQLite, ``BEGIN IMMEDIATE`` serialises writers across processes, which gives the same guarantees.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import dsn, exceptions, schema
from aggregator import experiences as journeys  # not .experiences below: that name is our submodule
from aggregator import meters as metering  # likewise
from aggregator import quarantine as isolation  # likewise
from aggregator.store import connect
from aggregator.store.batches import Batch, BatchResult, BatchWindow
from aggregator.store.collect import CollectQueries
from aggregator.store.distinct import DistinctQueries
from aggregator.store.errors import translate_errors, translated
from aggregator.store.experiences import ExperienceQueries
from aggregator.store.ids import WindowIdQueries
from aggregator.store.meters import MeterQueries
from aggregator.store.outbox import OutboxQueries
from aggregator.store.quarantine import QuarantineQueries
from aggregator.store.watermarks import WatermarkQueries

# A server-side limit on how long one of our transactions may sit idle holding locks (a stalled or
# partitioned holder), so that another replica can take over its work.
IDLE_IN_TRANSACTION_MS = 60_000
LOCK_TIMEOUT_MS = 30_000
# Idle time allowed to a collector holding the report-order lock (it only has inserts left to send).
REPORT_LOCK_IDLE_MS = 5_000
# Windows are locked against flushes with advisory locks keyed in a space of their own: this base + the
# window start (< 2^44 for 500,000 years), clear of the migration lock's key.
_WINDOW_LOCKS = 0x6167 << 44
# A flush's windows: create the rows, then take each window's shared lock in start order.
_PG_SHARE_WINDOWS = (
    "WITH created AS (INSERT INTO windows (window_start, window_end) SELECT s, s + $2::bigint "
    "FROM unnest($1::bigint[]) AS s ON CONFLICT DO NOTHING) "
    "SELECT count(pg_advisory_xact_lock_shared($3::bigint + s)) FROM (SELECT s FROM unnest($1::bigint[]) AS s "
    "ORDER BY s) AS ordered"
)


class _Probed(Exception):
    """Raised inside a probe's transaction to roll it back (never leaves the store)."""


POOL_SIZE = 5


class Store(WatermarkQueries, WindowIdQueries, CollectQueries, OutboxQueries, MeterQueries, ExperienceQueries,
            QuarantineQueries, DistinctQueries):
    """The database behind one Aggregator: an async engine and the statements it runs."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, pooler: str = "none", idle: int | None = None) -> None:
        """``pool_size``: connections kept open (``idle`` of them, if given, while nothing runs); up to
        twice ``pool_size`` at once on PostgreSQL."""
        url = dsn.resolve_database_url(url)  # plain postgresql:// and sqlite:// get async drivers
        self.url = url
        self.masked_url = dsn.mask_url(url)
        self.pooler = dsn.resolve_database_pooler(pooler)
        self.dialect = sa.make_url(url).get_backend_name()
        with translate_errors(url):
            self.engine = connect.create_engine(url, pool_size=pool_size, pooler=self.pooler, idle=idle)
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        # Reads: on SQLite a deferred BEGIN, so they run beside a writer (WAL) instead of queueing.
        self.reader = self.engine.execution_options(aggregator_read_only=True)
        # Items in the quarantine per kind, as last read (status() and /metrics show it); None: not read yet.
        self.quarantined: dict[str, int] | None = None
        self.quarantine_statuses: dict[str, dict[str, int]] = {}  # per kind and status, as last read

    async def close(self) -> None:
        await self.engine.dispose()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """One transaction; driver errors (including on commit) become our exceptions."""
        with translate_errors(self.url):
            async with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    await conn.exec_driver_sql(
                        "SELECT set_config('idle_in_transaction_session_timeout', $1, true), "
                        "set_config('lock_timeout', $2, true)",
                        (str(IDLE_IN_TRANSACTION_MS), str(LOCK_TIMEOUT_MS)),
                    )
                yield conn

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (deferred BEGIN on SQLite); driver errors become our exceptions."""
        async with translated(self.url), self.reader.connect() as conn:
            yield conn

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.execute(sa.text("SELECT 1"))

    # ---- settings shared by all replicas -------------------------------------------------------

    async def check_window(self, window: int) -> None:
        """Record the window length on first use; refuse a replica configured differently."""
        query = sa.select(schema.meta.c.value).where(schema.meta.c.key == "window_seconds")
        async with self.read() as conn:
            stored = await conn.scalar(query)
        if stored is None:
            async with self.transaction() as conn:
                await conn.execute(
                    self._insert(schema.meta).values(key="window_seconds", value=str(window)).on_conflict_do_nothing()
                )
                stored = await conn.scalar(query)
        if int(str(stored)) != window:
                raise exceptions.ConfigError(
                    f"window={window}s differs from the {stored}s window this database "
                    f"({self.masked_url}) aggregates; every replica must use window='{stored}s', "
                    "or point this one at another database"
                )

    # ---- flush -------------------------------------------------------------------------------

    async def apply_batch(self, batch: Batch, *, writer_id: uuid.UUID, replica_id: str, window: int,
                          now: float, meter_defs: Mapping[str, metering.Meter] | None = None,
                          urgencies: Mapping[str, float] | None = None, probe: bool = False,
                          set_aside: Sequence[isolation.Item] = ()) -> BatchResult:
        """Apply one flush batch exactly once (see the module docstring).

        ``probe``: do everything, then roll back; raises what applying it would raise (the flusher finds
        which part of a refused batch is at fault this way). ``set_aside``: quarantine items recorded in
        the batch's own commit (the parts left out of it), so they are set aside exactly when it applies.
        """
        result = BatchResult(applied=False, late_windows=[], late_target=None)
        try:
            async with self.transaction() as conn:
                if not await self._claim(conn, writer_id, replica_id, batch, now):
                    return result  # applied before: a retry after an unknown commit outcome
                await self._apply_parts(conn, batch, result, replica_id=replica_id, window=window, now=now,
                                        meter_defs=meter_defs, urgencies=urgencies)
                for item in set_aside:
                    await self._set_aside(conn, item, now=now, by=replica_id)
                if probe:
                    raise _Probed
        except _Probed:
            return result
        result.applied = True
        return result

    async def apply_quarantined(self, item_id: int, batch: Batch, *, replica_id: str, window: int, now: float,
                                meter_defs: Mapping[str, metering.Meter] | None = None,
                                urgencies: Mapping[str, float] | None = None) -> BatchResult | None:
        """Apply a flush part handed back from the quarantine, in the commit that deletes its row.

        None: another replica took it first (or it is held again). Its data counts as the replica's
        that first sent it; a window reported meanwhile gets it as late data, like any late flush.
        """
        result = BatchResult(applied=False, late_windows=[], late_target=None)
        async with self.transaction() as conn:
            if not await self._release(conn, kind="flush", item_id=item_id):
                return None
            await self._apply_parts(conn, batch, result, replica_id=replica_id, window=window, now=now,
                                    meter_defs=meter_defs, urgencies=urgencies)
        result.applied = True
        return result

    async def _apply_parts(self, conn: AsyncConnection, batch: Batch, result: BatchResult, *, replica_id: str,
                           window: int, now: float, meter_defs: Mapping[str, metering.Meter] | None,
                           urgencies: Mapping[str, float] | None) -> None:
        """A batch's windows, meter records and checkpoints, in the caller's transaction."""
        current = int(now // window) * window
        metered = batch.meters if batch.meters is not None and batch.meters.records else None
        meter_starts = set() if metered is None else (
            {start for start, _, _ in metered.groups} | {r.window_start for r in metered.identified.values()})
        checkpoint_starts = {journeys.window_of(c.received_at, window) for c in batch.checkpoints}
        starts = sorted(set(batch.windows) | meter_starts | checkpoint_starts | {current})
        closed = await self._share_windows(conn, starts, window)
        late_parts: list[tuple[int, BatchWindow]] = []  # for range distinct's day rollup and sketches
        for start in sorted(batch.windows):
            part = batch.windows[start]
            if part.is_empty():
                continue
            if start not in closed:
                await self._insert_window_ids(conn, start, part.workspaces, part.users)
                await self._add_contribution(conn, start, replica_id, ontime=True,
                                             allowed=part.allowed, denied=part.denied)
                continue
            # Late: the ids still join their own window's set (so they are never counted twice),
            # and what they add is reported in the window that is open now.
            if result.late_target is None:
                result.late_target = await self._open_window_from(conn, current, window, closed)
            new_workspaces = await self._insert_ids(conn, start, schema.DIM_WORKSPACE, part.workspaces,
                                                    count_new=True)
            new_users = await self._insert_ids(conn, start, schema.DIM_USER, part.users, count_new=True)
            await self._add_contribution(conn, result.late_target, replica_id, ontime=False,
                                         late_allowed=part.allowed, late_denied=part.denied,
                                         late_workspaces=new_workspaces, late_users=new_users)
            result.late_windows.append(start)
            late_parts.append((start, part))
        if late_parts:
            await self._late_distinct(conn, late_parts, now)

        async def late_target() -> int:
            if result.late_target is None:
                result.late_target = await self._open_window_from(conn, current, window, closed)
            return result.late_target

        # A replica whose data of a window is only meter records or checkpoints contributed to it too.
        for start in sorted((meter_starts | checkpoint_starts) - closed - {
                s for s, part in batch.windows.items() if not part.is_empty()}):
            await self._add_contribution(conn, start, replica_id, ontime=True, allowed=0, denied=0)
        if metered is not None:
            result.overflowed = await self._apply_meters(conn, metered, meter_defs or {}, closed=closed,
                                                         late_target=late_target, now=now)
            result.late_windows.extend(sorted(meter_starts & closed - set(result.late_windows)))
        if batch.checkpoints:
            result.checkpoints = await self._apply_checkpoints(
                conn, batch.checkpoints, urgencies or journeys.DEFAULT_URGENCIES, window=window, closed=closed,
                late_target=late_target)

    async def _add_contribution(self, conn: AsyncConnection, start: int, replica_id: str, *, ontime: bool,
                                **counts: int) -> None:
        table = schema.contributions
        statement = self._insert(table).values(window_start=start, replica_id=replica_id, ontime=ontime, **counts)
        increments: dict[str, Any] = {name: table.c[name] + statement.excluded[name] for name in counts}
        if ontime:
            increments["ontime"] = sa.true()
        await conn.execute(
            statement.on_conflict_do_update(index_elements=[table.c.window_start, table.c.replica_id],
                                            set_=increments)
        )

    # ---- windows: rows and locks (flushes share a window's lock, the collector takes it alone) ---

    async def _share_windows(self, conn: AsyncConnection, starts: Sequence[int], window: int) -> set[int]:
        """Create the window rows if needed and share-lock the windows (in order); return the closed ones.

        On PostgreSQL the lock is a transaction-scoped shared advisory lock per window, not ``FOR SHARE``
        on its row: concurrent share-lockers of a row cost a MultiXact each (millions a day with a large
        fleet, and aggressive freezing of ``windows``), an advisory lock writes nothing. The collector
        takes the same lock exclusively (``_lock_window``). The closed state is read by a statement of
        its own, after the locks are held, so it sees a collection that committed while we waited.
        """
        if self.dialect == "postgresql":
            await conn.exec_driver_sql(_PG_SHARE_WINDOWS, (sorted(starts), window, _WINDOW_LOCKS))
        else:  # SQLite's writers take turns: the rows are all there is to do
            await conn.execute(
                self._insert(schema.windows)
                .values([{"window_start": s, "window_end": s + window} for s in starts])
                .on_conflict_do_nothing()
            )
        rows = await conn.execute(
            sa.select(schema.windows.c.window_start, schema.windows.c.closed_at)
            .where(schema.windows.c.window_start.in_(starts))
        )
        return {start for start, closed_at in rows if closed_at is not None}

    async def _lock_window(self, conn: AsyncConnection, start: int, *, wait: bool) -> bool:
        """Lock a window exclusively against flushes (see ``_share_windows``); without ``wait``, False if a
        flush holds it. SQLite: its writers are serialised already (``BEGIN IMMEDIATE``)."""
        if self.dialect != "postgresql":
            return True
        if wait:
            await conn.exec_driver_sql("SELECT pg_advisory_xact_lock($1::bigint + $2::bigint)", (_WINDOW_LOCKS, start))
            return True
        return bool(await conn.scalar(sa.text("SELECT pg_try_advisory_xact_lock(CAST(:space AS bigint) + :start)"),
                                      {"space": _WINDOW_LOCKS, "start": start}))

    async def _open_window_from(self, conn: AsyncConnection, start: int, window: int, closed: set[int]) -> int:
        """The first window from ``start`` on that is not reported (normally ``start`` itself)."""
        while start in closed:
            start += window
            closed |= await self._share_windows(conn, [start], window)
        return start

    # ---- collect -----------------------------------------------------------------------------

    async def collect_window(self, start: int, *, collector_id: str, now: float, on_locked: Any = None,
                             on_ordered: Any = None, writers: Sequence[str] = (),
                             meter_defs: Mapping[str, metering.Meter] | None = None, billing: Any = None,
                             replicas_missing: int = 0) -> dict[str, Any] | None:
        """Write the report of window ``start`` and close it, if nobody has; returns the report row.

        Returns None when another collector is collecting it or it is already reported.
        ``on_locked`` (an async callable) runs once the window is locked and aggregated, ``on_ordered``
        once the report-order lock is held; tests use them to freeze or kill a collector at the worst
        moments. The report is queued in the outbox for each of ``writers`` in the same commit, so a
        written report always reaches its writers.
        """
        async with self.transaction() as conn:
            # The window row, skipped if locked (another collector is on it), then the window's lock,
            # skipped if a flush holds it.
            locked = await conn.execute(
                sa.select(schema.windows.c.closed_at, schema.windows.c.window_end)
                .where(schema.windows.c.window_start == start)
                .with_for_update(skip_locked=True)
            )
            row = locked.first()
            if row is None or row.closed_at is not None:
                return None
            if not await self._lock_window(conn, start, wait=False):
                return None  # a flush is writing to it: the next collection takes it
            report = await self._aggregate(conn, start, row.window_end)
            report.update(generated_at=now, generated_by=collector_id, replicas_missing=replicas_missing)
            if on_locked is not None:
                await on_locked()
            # Serialise report inserts until commit, so report ids (the pull cursor) follow commit order.
            # Only the report's own writes follow, and the server gives the holder little idle time: a
            # collector that freezes here is cut off soon, so it stalls other windows' reports briefly.
            if self.dialect == "postgresql":
                await conn.exec_driver_sql("SELECT set_config('idle_in_transaction_session_timeout', $1, true)",
                                           (str(REPORT_LOCK_IDLE_MS),))
            lock = schema.collector_lock
            await conn.execute(sa.update(lock).where(lock.c.id == 1).values(holder=collector_id, acquired_at=now))
            if on_ordered is not None:
                await on_ordered()
            report["id"] = await conn.scalar(sa.insert(schema.reports).values(**report).returning(schema.reports.c.id))
            await conn.execute(
                sa.update(schema.windows).where(schema.windows.c.window_start == start).values(closed_at=now)
            )
            await self._enqueue_report(conn, report, writers, now)
            # Nothing for range distinct: the collector's roll_up takes the window after this commit.
            report["meters"] = await self._collect_meters(conn, report, meter_defs or {}, billing, writers, now)
            report["experiences"] = await self._collect_slis(conn, report, writers, now)
            await self._release(conn, kind="window", refs=[str(start)])  # a retried window: reported now
        return report
