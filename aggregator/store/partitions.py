"""PostgreSQL keeps window ids in day partitions, created ahead and dropped whole once reported and old.

``window_ids`` is partitioned by RANGE (window_start): one partition per UTC day of window starts
(``window_ids_dYYYYMMDD``), ``window_ids_default`` for the ids of a day with no partition yet (a flush never
fails for want of one), and, on a database converted by migration 0008, ``window_ids_legacy``: the table
as it was, attached without a copy for the days up to the conversion. SQLite keeps one table.
Upkeep never stalls flushes: its DDL takes no lock that conflicts with them on the parent, and waits at
most LOCK_TIMEOUT for the ones it needs (else it tries again at the next upkeep).
"""

from __future__ import annotations

import dataclasses
import re
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import logs
from aggregator.store.base import sqlstate

log = logs.get_logger("aggregator.store")

DAY = 86400
AHEAD_DAYS = 2  # today and the next two days exist before any id of theirs arrives
LOCK_TIMEOUT = "1s"
LOCK_NOT_AVAILABLE = "55P03"
UPKEEP_LOCK = 0x61677270  # "aggp": one collector at a time creates or drops partitions; the others skip
PARENT = "window_ids"
DEFAULT = "window_ids_default"
LEGACY = "window_ids_legacy"

_BOUND = re.compile(r"FOR VALUES FROM \((MINVALUE|'(-?\d+)')\) TO \((MAXVALUE|'(-?\d+)')\)")


def day_of(t: float) -> int:
    return int(t // DAY) * DAY


def day_name(day: int) -> str:
    return f"{PARENT}_d{time.strftime('%Y%m%d', time.gmtime(day))}"


@dataclasses.dataclass(frozen=True)
class Partition:
    """One partition of ``window_ids``: window starts in [low, high); None is unbounded; both None: DEFAULT."""

    name: str
    low: int | None
    high: int | None
    default: bool = False

    def overlaps(self, day: int) -> bool:
        """Whether it holds any window start of ``day`` (the DEFAULT partition takes only the others')."""
        return not self.default and (self.low is None or self.low < day + DAY) and (
            self.high is None or day < self.high)


def parse_bound(name: str, bound: str) -> Partition:
    """A partition from ``pg_get_expr(relpartbound)``: ``DEFAULT`` or ``FOR VALUES FROM (..) TO (..)``."""
    if bound == "DEFAULT":
        return Partition(name, None, None, default=True)
    match = _BOUND.fullmatch(bound)
    if match is None:
        raise ValueError(f"partition {name} of {PARENT} has a bound this version does not read: {bound!r}")
    low, high = match.group(2), match.group(4)
    return Partition(name, None if low is None else int(low), None if high is None else int(high))


async def listed(conn: AsyncConnection) -> list[Partition]:
    """The partitions of ``window_ids`` (empty when it is a plain table), oldest first, DEFAULT last."""
    rows = await conn.execute(sa.text(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass('window_ids')"))
    # A NULL bound: a partition another collector is attaching, seen half-way by a catalog scan; skipped.
    parts = [parse_bound(str(name), str(bound)) for name, bound in rows if bound is not None]
    return sorted(parts, key=lambda p: (p.default, p.low if p.low is not None else -(2 ** 63)))


async def _upkeep_turn(conn: AsyncConnection) -> bool:
    """This transaction's turn at the partitions' DDL; False while another collector has it."""
    return bool(await conn.scalar(sa.text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": UPKEEP_LOCK}))


async def create_day(conn: AsyncConnection, day: int) -> bool:
    """Attach an empty partition for ``day``; False if the default partition already holds ids of that day
    (they stay there, and go with the DELETE of old windows)."""
    stray = await conn.scalar(
        sa.text(f"SELECT 1 FROM {DEFAULT} WHERE window_start >= :low AND window_start < :high LIMIT 1"),
        {"low": day, "high": day + DAY})
    if stray is not None:
        return False
    name = day_name(day)
    # Created apart and attached: ATTACH takes SHARE UPDATE EXCLUSIVE on the parent (flushes go on), where
    # CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE. The CHECK spares ATTACH a scan.
    await conn.exec_driver_sql(f"CREATE TABLE {name} (LIKE {PARENT} INCLUDING DEFAULTS)")
    await conn.exec_driver_sql(f"ALTER TABLE {name} ADD CONSTRAINT ck_{name}_bound "
                               f"CHECK (window_start >= {day} AND window_start < {day + DAY})")
    await conn.exec_driver_sql(f"ALTER TABLE {PARENT} ATTACH PARTITION {name} FOR VALUES FROM ({day}) TO ({day + DAY})")
    return True


async def ensure_ahead(conn: AsyncConnection, now: float) -> list[str]:
    """Create the partitions of today and the next AHEAD_DAYS days that are missing; returns their names.

    One savepoint per day: a lock not granted within LOCK_TIMEOUT gives that day up until the next upkeep.
    """
    parts = await listed(conn)
    if not parts or not await _upkeep_turn(conn):
        return []
    parts = await listed(conn)  # as left by the collector that held the turn before
    await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    created = []
    for day in range(day_of(now), day_of(now) + (AHEAD_DAYS + 1) * DAY, DAY):
        if any(p.overlaps(day) for p in parts):
            continue
        try:
            async with conn.begin_nested():
                if await create_day(conn, day):
                    created.append(day_name(day))
        except sa.exc.DBAPIError as exc:
            if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                raise
            log.info("partition_deferred", partition=day_name(day), reason="lock not granted in " + LOCK_TIMEOUT)
    return created


async def drop_reported(conn: AsyncConnection, before: float) -> list[str]:
    """Drop the partitions whose windows all started before ``before``'s day and are all reported and rolled up.

    A partition holding a window not reported yet (held, or in the quarantine), or whose range distinct
    rollup is not done, stays; its other windows go with the DELETE of old windows instead.
    """
    cut = day_of(before)
    if not await _upkeep_turn(conn):
        return []
    await conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    dropped = []
    for part in await listed(conn):
        if part.default or part.high is None or part.high > cut:
            continue
        unreported = await conn.scalar(
            sa.text("SELECT 1 FROM windows w WHERE w.window_start < :high AND w.window_start >= :low AND "
                    "(w.closed_at IS NULL OR NOT EXISTS (SELECT 1 FROM distinct_rollups r "
                    "WHERE r.window_start = w.window_start AND r.rolled_at IS NOT NULL)) LIMIT 1"),
            {"high": part.high, "low": part.low if part.low is not None else -(2 ** 63)})
        if unreported is not None:
            continue
        try:
            async with conn.begin_nested():
                await conn.exec_driver_sql(f"DROP TABLE {part.name}")
            dropped.append(part.name)
        except sa.exc.DBAPIError as exc:
            if sqlstate(exc) != LOCK_NOT_AVAILABLE:
                raise
            log.info("partition_drop_deferred", partition=part.name, reason="lock not granted in " + LOCK_TIMEOUT)
    return dropped
