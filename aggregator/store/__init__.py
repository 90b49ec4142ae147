"""The SQL store: every statement aggregator runs, for SQLite and PostgreSQL.

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
import dataclasses
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from aggregator import config, exceptions, logs, schema
from aggregator import experiences as journeys  # not .experiences below: that name is our submodule
from aggregator import meters as metering  # likewise
from aggregator import quarantine as isolation  # likewise
from aggregator.store import partitions
from aggregator.store.base import sqlstate as _sqlstate
from aggregator.store.distinct import DistinctQueries
from aggregator.store.experiences import ExperienceQueries
from aggregator.store.meters import MeterQueries
from aggregator.store.outbox import OutboxQueries
from aggregator.store.quarantine import QuarantineQueries, held

log = logs.get_logger("aggregator.store")

# A server-side limit on how long one of our transactions may sit idle holding locks (a stalled or
# partitioned holder), so that another replica can take over its work.
IDLE_IN_TRANSACTION_MS = 60_000
LOCK_TIMEOUT_MS = 30_000
# Idle time allowed to a collector holding the report-order lock (it only has inserts left to send).
REPORT_LOCK_IDLE_MS = 5_000
SQLITE_BUSY_TIMEOUT_S = 60.0
SQLITE_BUSY_SLICE_S = 0.1  # a writer waits for the lock in slices this long: see _begin_immediate
_SQLITE_CHUNK = 50_000

# Ids in sorted order, so concurrent flushes insert overlapping ids in one order and cannot deadlock.
_PG_IDS = "FROM unnest($1::uuid[]) AS x"
# The ids not stored yet, each looked up by one probe of the primary key. Not ``NOT EXISTS``: PostgreSQL
# turns that into an anti-join whose plan follows the table's statistics, and a window newer than the
# last ANALYZE looks empty to them, so a Merge Anti Join read every id already in the window (a 20-id
# flush took 1.2 s into a window of 10^6). A LATERAL ... LIMIT 1 is never flattened into a join: the
# probe is per id whatever the statistics say.
_PG_INSERT_NEW_IDS = (
    f"INSERT INTO window_ids (window_start, dim, id) SELECT $2::bigint, $3::smallint, x {_PG_IDS} "
    "LEFT JOIN LATERAL (SELECT 1 AS hit FROM window_ids w WHERE w.window_start = $2 AND w.dim = $3 "
    "AND w.id = x LIMIT 1) AS stored ON true WHERE stored.hit IS NULL ORDER BY x"
)
_PG_INSERT_IDS_ON_CONFLICT = (
    f"INSERT INTO window_ids (window_start, dim, id) SELECT $2::bigint, $3::smallint, x {_PG_IDS} "
    "ORDER BY x ON CONFLICT DO NOTHING"
)
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
# A flush's on-time ids of both sets in one statement: workspaces (dim 1) then users (dim 2), each set in
# id order. Probed one by one like _PG_INSERT_NEW_IDS, then inserted plainly (large batches: a concurrent
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


@dataclasses.dataclass(slots=True)
class BatchWindow:
    """One window's part of a flush batch: ids (``UUID.int``) not yet sent, and counter increments."""

    workspaces: list[int]
    users: list[int]
    allowed: int
    denied: int

    def is_empty(self) -> bool:
        return not (self.workspaces or self.users or self.allowed or self.denied)


@dataclasses.dataclass(slots=True)
class Batch:
    """A flush batch with the sequence number that makes its application idempotent."""

    seq: int
    windows: dict[int, BatchWindow]
    events: int
    meters: metering.MeterBatch | None = None  # record()s of declared meters
    checkpoints: list[journeys.Checkpoint] = dataclasses.field(default_factory=list)
    # The replica's clock when this batch's state was swapped out (less a slack): everything the
    # replica tracked before it is in this batch or an earlier one. Published with the batch.
    watermark: float | None = None
    final: bool = False  # a clean stop's last batch: the incarnation is marked stopped with it


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


@dataclasses.dataclass(slots=True)
class BatchResult:
    applied: bool  # False: this batch had been committed before (an ambiguous commit), skipped now
    late_windows: list[int]  # windows of the batch that were already reported
    late_target: int | None  # the open window the late data was counted in
    overflowed: int = 0  # meter records that went to an __overflow__ group
    checkpoints: int = 0  # checkpoints applied (retries of applied ones not counted)


# SQLSTATEs (PostgreSQL's error codes) that mean the schema is not the one this version uses: a table,
# column, schema, type or unique index it needs is missing.
_SCHEMA_MISMATCH = frozenset({"42P01", "42703", "3F000", "42704", "42P10"})
# A named prepared statement already on the server connection (42P05) or gone from it (26000): a
# transaction pooler gave this transaction a server connection another client, or nobody, prepared on.
_POOLED_STATEMENT = frozenset({"42P05", "26000"})
# protocol_violation: how PgBouncer reports its own refusals (PostgreSQL only for a confused client, such
# as a Bind that reached another client's unnamed statement through a pooler).
_PROTOCOL_VIOLATION = "08P01"
_POOLER_FIX = ("a connection pooler in transaction mode (PgBouncer with pool_mode = transaction) is in front of "
               "PostgreSQL: set database_pooler = \"transaction\" (AGGREGATOR_DATABASE_POOLER=transaction, or "
               "Aggregator(database_pooler=\"transaction\")); this is not a schema problem")


@contextlib.contextmanager
def translate_errors(url: str) -> Any:
    """Turn driver and network errors into our exceptions, by what they are, without leaking the password.

    PostgreSQL's errors are told apart by SQLSTATE: a missing table or column is an outdated schema; a
    prepared statement clash is a transaction pooler the settings do not know of; a pooler's refusal
    names the pooler; any other rejected statement is reported as the server words it. Lost
    connections and timeouts are transient. Every secret of the URL (its password wherever it sits, see
    ``config.url_secrets``) is scrubbed from what the driver or server said.
    """
    masked = config.mask_url(url)
    secrets = config.url_secrets(url)
    try:
        yield
    except exceptions.AggregatorError:
        raise
    except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
        raise exceptions.StoreError(_scrub(f"database {masked} rejected the operation: {_first_line(exc)}",
                                           secrets)) from exc
    except sa.exc.DBAPIError as exc:
        translated = _translated(exc, masked, None)
        raise type(translated)(_scrub(str(translated), secrets)) from exc
    except (sa.exc.TimeoutError, OSError, TimeoutError) as exc:
        raise exceptions.StoreUnavailable(_scrub(
            f"database {masked} unavailable: {type(exc).__name__}: {_first_line(exc)}", secrets)) from exc


def _translated(exc: sa.exc.DBAPIError, masked: str, password: str | None) -> exceptions.StoreError:
    state, line = _sqlstate(exc), _first_line(exc)
    kind: type[exceptions.StoreError] = exceptions.StoreUnavailable
    if state in _SCHEMA_MISMATCH or line.startswith(("no such table", "no such column")) or (
            " has no column named " in line):  # the last two: SQLite's words, it has no SQLSTATE
        kind, message = exceptions.SchemaOutdated, (f"database {masked}: {line}; the schema is older than this "
                                                    "version of aggregator: run `aggregator db upgrade`")
    elif _value_refused(exc):
        kind, message = exceptions.StoreError, f"database {masked} driver refused a value: {line}"
    elif state in _POOLED_STATEMENT or state == _PROTOCOL_VIOLATION and line.startswith("bind message"):
        kind, message = exceptions.StoreError, f"database {masked}: {line}; {_POOLER_FIX}"
    elif state == _PROTOCOL_VIOLATION and line.startswith("unsupported startup parameter"):
        kind, message = exceptions.StoreError, (
            f"database {masked} refused the connection: {line}; a connection pooler (PgBouncer) in front of "
            "PostgreSQL refuses startup parameters it does not track: add it to its ignore_startup_parameters")
    elif state == _PROTOCOL_VIOLATION:
        message = (f"database {masked} unavailable: {line} (SQLSTATE 08P01: most likely refused by a connection "
                   "pooler in front of PostgreSQL, such as PgBouncer: see its log)")
    elif isinstance(exc, sa.exc.ProgrammingError):
        kind, message = exceptions.StoreError, f"database {masked} rejected a statement: {line}"
    else:
        message = f"database {masked} unavailable: {type(exc).__name__}: {line}"
    return kind(_scrub(message, password))


def _value_refused(exc: BaseException) -> bool:
    """Whether a value of the statement was refused: a data exception (SQLSTATE class 22), or the driver's
    own refusal before sending it (asyncpg: a number out of int64 range, raised from an OverflowError).
    A fault of the data, never transient."""
    if (_sqlstate(exc) or "").startswith("22"):
        return True
    seen: BaseException | None = getattr(exc, "orig", None) or exc.__cause__
    for _ in range(5):  # the driver's error, and what it was raised from
        if seen is None:
            break
        if isinstance(seen, ValueError | OverflowError):
            return True
        seen = seen.__cause__
    return False


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    if type(orig).__module__.startswith("sqlalchemy") and orig.__cause__ is not None:
        orig = orig.__cause__  # the driver's own error under SQLAlchemy's adapter (2.0 prefixes the class name)
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _scrub(message: str, password: str | Sequence[str] | None) -> str:
    """``message`` with each of the secrets in ``password`` (one, or several: longest first) replaced by ``***``."""
    for secret in [password] if isinstance(password, str) else password or ():
        if secret:
            message = message.replace(secret, "***")
    return message


# asyncpg's numeric connection arguments: a URL query gives text, which asyncpg would compare with numbers.
_NUMERIC_ARGUMENTS: dict[str, type[int] | type[float]] = {
    "statement_cache_size": int, "max_cacheable_statement_size": int, "prepared_statement_cache_size": int,
    "max_cached_statement_lifetime": float, "command_timeout": float, "timeout": float,
}
_STATEMENT_CACHES = ("statement_cache_size", "prepared_statement_cache_size")  # asyncpg's, SQLAlchemy's


def _asyncpg_arguments(url: sa.URL, pooler: str) -> tuple[sa.URL, dict[str, Any]]:
    """The URL less the arguments taken from its query, and the connection arguments for asyncpg.

    Behind a transaction pooler a server connection serves one transaction, then whichever client comes
    next, so no prepared statement may be kept or named: both statement caches are off and every
    statement is the unnamed one, which asyncpg (its cache off) parses again in the same message
    sequence that executes it. Unique names instead would never clash, but a statement closed while
    another server connection served its client stays behind on the first one until that one closes.
    """
    import inspect

    import asyncpg  # type: ignore[import-untyped]  # only PostgreSQL needs it

    unknown = sorted(set(url.query) - set(inspect.signature(asyncpg.connect).parameters) - set(_STATEMENT_CACHES))
    if unknown:
        raise exceptions.ConfigError(
            f"database_url: {', '.join(unknown)} in the query {'is' if len(unknown) == 1 else 'are'} not a connection "
            "argument of asyncpg, the PostgreSQL driver; remove it (for TLS give ?ssl=require)")
    arguments: dict[str, Any] = {"timeout": 10, "command_timeout": 300,
                                 "server_settings": {"application_name": "aggregator"}}  # PgBouncer tracks it
    for key, kind in _NUMERIC_ARGUMENTS.items():
        if key not in url.query:
            continue
        given = url.query[key]
        text = given if isinstance(given, str) else given[-1]  # the last of a repeated key
        try:
            number = kind(text)
        except ValueError:
            number = -1
        if not 0 <= number < float("inf"):
            raise exceptions.ConfigError(
                f"database_url: {key}={text!r} in the query must be a {'whole ' if kind is int else ''}number "
                f"from 0 up, e.g. ?{key}={'0' if kind is int else '30'}")
        arguments[key] = number
    if pooler == "transaction":
        for key in _STATEMENT_CACHES:
            if arguments.get(key, 0) != 0:
                raise exceptions.ConfigError(
                    f"database_url: {key}={arguments[key]} in the query contradicts database_pooler='transaction', "
                    "which turns statement caches off (a pooled server connection is shared); remove it from the URL")
        arguments.update(dict.fromkeys(_STATEMENT_CACHES, 0), prepared_statement_name_func=_unnamed_statement)
    return url.difference_update_query(_NUMERIC_ARGUMENTS), arguments


def _unnamed_statement() -> str:
    return ""  # asyncpg: the unnamed statement (a name given, so asyncpg 0.29 and 0.30 do not make one up)


class _Probed(Exception):
    """Raised inside a probe's transaction to roll it back (never leaves the store)."""


POOL_SIZE = 5


class Store(OutboxQueries, MeterQueries, ExperienceQueries, QuarantineQueries, DistinctQueries):
    """The database behind one Aggregator: an async engine and the statements it runs."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, pooler: str = "none", idle: int | None = None) -> None:
        """``pool_size``: connections kept open (``idle`` of them, if given, while nothing runs); up to
        twice ``pool_size`` at once on PostgreSQL."""
        url = config.resolve_database_url(url)  # plain postgresql:// and sqlite:// get async drivers
        self.url = url
        self.masked_url = config.mask_url(url)
        self.pooler = config.resolve_database_pooler(pooler)
        parsed = sa.make_url(url)
        self.dialect = parsed.get_backend_name()
        with translate_errors(url):
            if self.dialect == "sqlite":
                # The file holds raw ids: a directory made here is the owner's alone (the files: _sqlite_setup).
                Path(parsed.database or "").expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.engine = create_async_engine(
                    url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, pool_size=pool_size
                )
                _sqlite_setup(self.engine)
            else:
                target, connect_args = _asyncpg_arguments(parsed, self.pooler)
                # The pre-ping runs in a transaction of its own (SQLAlchemy does so for PgBouncer's sake).
                kept = pool_size if idle is None else min(idle, pool_size)
                self.engine = create_async_engine(target, pool_size=kept, max_overflow=2 * pool_size - kept,
                                                  pool_pre_ping=True, connect_args=connect_args)
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

    def _db_now(self) -> sa.ColumnElement[float]:
        """The database's clock in epoch seconds: the one clock every replica shares."""
        if self.dialect == "postgresql":
            return sa.cast(sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float)
        return sa.cast((sa.func.julianday("now") - 2440587.5) * 86400.0, sa.Float)

    async def _claim(self, conn: AsyncConnection, writer_id: uuid.UUID, replica_id: str, batch: Batch,
                     now: float) -> bool:
        """Take the batch's sequence number, if it is new, and publish its watermark and liveness (and a
        clean stop): one UPDATE, which also locks the incarnation's row until the commit. False: applied before.

        The incarnation's row exists from its start (``register``); one that does not have it (a spool
        replayed for another incarnation, a row pruned after two silent days) is entered here first.
        """
        table = schema.flush_sequences
        values: dict[str, Any] = {"last_seq": batch.seq, "updated_at": now, "heartbeat_at": self._db_now()}
        if batch.watermark is not None:
            greatest = sa.func.greatest if self.dialect == "postgresql" else sa.func.max
            values["watermark"] = sa.case((table.c.watermark.is_(None), batch.watermark),
                                          else_=greatest(table.c.watermark, batch.watermark))
        if batch.final:
            values["stopped_at"] = self._db_now()
        claim = (sa.update(table).where(table.c.writer_id == writer_id, table.c.last_seq < batch.seq)
                 .values(**values).returning(table.c.last_seq))
        if (await conn.execute(claim)).first() is not None:
            return True
        entered = await conn.execute(
            self._insert(table).values(writer_id=writer_id, replica_id=replica_id, last_seq=0, updated_at=now)
            .on_conflict_do_nothing().returning(table.c.last_seq))
        return entered.first() is not None and (await conn.execute(claim)).first() is not None

    async def register(self, writer_id: uuid.UUID, replica_id: str, *, watermark: float, now: float) -> None:
        """Enter an incarnation with a first watermark and heartbeat, ahead of its first flush.

        From this commit on the collectors wait for it (or give it up after a lease, counting it missing);
        an incarnation already entered is left as it is.
        """
        async with self.transaction() as conn:
            await conn.execute(
                self._insert(schema.flush_sequences)
                .values(writer_id=writer_id, replica_id=replica_id, last_seq=0, updated_at=now,
                        watermark=watermark, heartbeat_at=self._db_now())
                .on_conflict_do_nothing()
            )

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
            rows = await conn.execute(
                sa.select(schema.windows.c.window_start, schema.windows.c.closed_at)
                .where(schema.windows.c.window_start.in_(starts)))
            return {start for start, closed_at in rows if closed_at is not None}
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

    async def _insert_ids(self, conn: AsyncConnection, start: int, dim: int, ids: Sequence[int],
                          *, count_new: bool = False) -> int:
        """Insert ``UUID.int`` ids into the window's distinct set; with ``count_new``, return how many were new.

        Ids travel as 32-digit hex text, the form SQLAlchemy's ``Uuid`` stores on SQLite and one that
        PostgreSQL casts to ``uuid`` on its side; no UUID objects are built.
        """
        if not ids:
            return 0
        hexes = [i.to_bytes(16, "big").hex() for i in ids]  # 4x faster than f"{i:032x}"
        if self.dialect != "postgresql":
            before = await conn.scalar(sa.text("SELECT total_changes()")) if count_new else 0
            for offset in range(0, len(hexes), _SQLITE_CHUNK):
                chunk = '["' + '","'.join(hexes[offset:offset + _SQLITE_CHUNK]) + '"]'  # hex: nothing to escape
                await conn.exec_driver_sql(_SQLITE_INSERT_IDS, (start, dim, chunk))
            after = await conn.scalar(sa.text("SELECT total_changes()")) if count_new else 0
            return int(after or 0) - int(before or 0)
        if count_new:
            result = await conn.exec_driver_sql(_PG_INSERT_IDS_ON_CONFLICT + " RETURNING 1", (hexes, start, dim))
            return len(result.fetchall())
        # Fast path: a plain insert of the ids not stored yet (ON CONFLICT's speculative insertion costs
        # ~70% more). If another replica inserts one of the same ids concurrently, the unique violation
        # rolls back to the savepoint and the ON CONFLICT form does the job.
        try:
            async with conn.begin_nested():
                await conn.exec_driver_sql(_PG_INSERT_NEW_IDS, (hexes, start, dim))
        except sa.exc.IntegrityError:
            log.debug("ids_insert_fallback", window_start=start, dim=dim, ids=len(hexes))
            await conn.exec_driver_sql(_PG_INSERT_IDS_ON_CONFLICT, (hexes, start, dim))
        return 0

    async def _insert_window_ids(self, conn: AsyncConnection, start: int, workspaces: Sequence[int],
                                 users: Sequence[int]) -> None:
        """A flush's on-time ids of both sets: one statement on PostgreSQL (see _PG_INSERT_NEW_WINDOW_IDS)."""
        if self.dialect != "postgresql":
            await self._insert_ids(conn, start, schema.DIM_WORKSPACE, workspaces)
            await self._insert_ids(conn, start, schema.DIM_USER, users)
            return
        if not (workspaces or users):
            return
        params = ([i.to_bytes(16, "big").hex() for i in workspaces], [i.to_bytes(16, "big").hex() for i in users],
                  start)
        if len(workspaces) + len(users) < SAVEPOINT_FROM_IDS:
            await conn.exec_driver_sql(_PG_INSERT_WINDOW_IDS_ON_CONFLICT, params)
            return
        try:
            async with conn.begin_nested():
                await conn.exec_driver_sql(_PG_INSERT_NEW_WINDOW_IDS, params)
        except sa.exc.IntegrityError:
            log.debug("ids_insert_fallback", window_start=start, ids=len(workspaces) + len(users))
            await conn.exec_driver_sql(_PG_INSERT_WINDOW_IDS_ON_CONFLICT, params)

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

    # ---- collect -----------------------------------------------------------------------------

    async def open_windows(self, *, ended_by: float) -> list[tuple[int, int]]:
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

    async def incarnations(self, *, below: float) -> list[Incarnation]:
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
                sa.select(f.c.writer_id, f.c.replica_id, f.c.watermark, self._db_now() - heard)
                .where(f.c.stopped_at.is_(None), f.c.watermark < below))  # NULL: a version without watermarks
            return [Incarnation(writer_id=w, replica_id=r, watermark=float(m), silent_for=float(s or 0.0))
                    for w, r, m, s in rows]

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

    async def _aggregate(self, conn: AsyncConnection, start: int, end: int) -> dict[str, Any]:
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

    async def partition_ahead(self, now: float) -> list[str]:
        """On PostgreSQL, create the id partitions of ``now``'s day and the next ones (store/partitions.py)."""
        if self.dialect != "postgresql":
            return []
        async with self.transaction() as conn:
            return await partitions.ensure_ahead(conn, now)

    async def prune(self, *, before: float, event_ids_before: float | None = None) -> int:
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
            await self.prune_meters(conn, old, event_ids_before=event_ids_before or before)
            await self.prune_experiences(conn, before=before)
        return int(deleted or 0)

    # ---- read --------------------------------------------------------------------------------

    async def reports(self, *, since: int | None = None, after_id: int | None = None,
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

    async def quarantine_counts(self) -> dict[str, dict[str, int]]:
        """Items in the quarantine per kind and status; the totals per kind (every kind, 0 if none) are kept
        as ``quarantined`` for status() and /metrics."""
        counts = await self._quarantine_counts()
        self.quarantine_statuses = counts
        self.quarantined = {kind: sum(counts.get(kind, {}).values()) for kind in sorted({*isolation.KINDS, *counts})}
        return counts

    async def ping(self) -> None:
        async with self.read() as conn:
            await conn.execute(sa.text("SELECT 1"))


@contextlib.asynccontextmanager
async def translated(url: str) -> AsyncIterator[None]:
    with translate_errors(url):
        yield


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a generous busy timeout, full fsync, and ``BEGIN IMMEDIATE`` for every transaction.

    IMMEDIATE takes the write lock up front: two processes cannot both read under a shared lock and
    then deadlock upgrading it, and a flush and a collection of one window are strictly ordered.
    """

    database = engine.url.database or ""

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        # The files hold raw ids: owner only. Opening created the database file (umask 0644 at most);
        # SQLite gives its -wal and -shm the database file's mode, so narrowing it first covers them,
        # and ones left by an earlier process are narrowed too. A file of another user stays as it is.
        for path in (Path(database), Path(f"{database}-wal"), Path(f"{database}-shm")):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mode & 0o077:
                    path.chmod(0o600)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("aggregator_read_only"):
            conn.exec_driver_sql("BEGIN")
        else:
            _begin_immediate(conn.connection.dbapi_connection)


def _begin_immediate(dbapi_connection: Any) -> None:
    """``BEGIN IMMEDIATE``, waiting for another process's write lock up to SQLITE_BUSY_TIMEOUT_S.

    SQLite waits in its driver thread, where nothing can call it off (not even ``interrupt()``), so
    it waits in slices of SQLITE_BUSY_SLICE_S: between them the task is back on the event loop, where
    a stop that cannot wait any longer cancels it.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_SLICE_S * 1000)}")
        waited_until = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= waited_until:
                    raise
    finally:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

