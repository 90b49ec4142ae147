"""PostgreSQL's window ids in day partitions: the conversion of a filled database, routing, upkeep, retention.

Real PostgreSQL only (SQLite keeps one table). The database is filled by the library itself at the schema
before the conversion (0007), converted, then used and pruned by the same library.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from aggregator import Aggregator, migrate, store
from aggregator.store import partitions
from tests.faults import blocking
from tests.helpers import T0, WINDOW, FakeClock, ids, manual

DAY = partitions.DAY
WS, USERS = ids(30), ids(300, offset=1000)


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    db = store.Store(url)
    try:
        async with db.read() as conn:
            return [tuple(row) for row in await conn.execute(sa.text(sql))]
    finally:
        await db.close()


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    return blocking(_rows(url, sql))


def ids_digest(url: str) -> list[tuple[Any, ...]]:
    """Every stored id, per window and dimension, as a count and a digest of the sorted ids."""
    return rows(url, "SELECT window_start, dim, count(*), md5(string_agg(id::text, ',' ORDER BY id)) "
                     "FROM window_ids GROUP BY 1, 2 ORDER BY 1, 2")


def placement(url: str) -> dict[int, str]:
    """Window start -> the partition its ids are in."""
    found = rows(url, "SELECT DISTINCT window_start, tableoid::regclass::text FROM window_ids")
    return {int(start): str(name) for start, name in found}


def listed(url: str) -> list[partitions.Partition]:
    async def run() -> list[partitions.Partition]:
        db = store.Store(url)
        try:
            async with db.read() as conn:
                return await partitions.listed(conn)
        finally:
            await db.close()
    return blocking(run())


def figures(url: str) -> dict[int, tuple[int, ...]]:
    """Window start -> the report's unique workspaces and users, allowed and denied requests."""
    found = rows(url, "SELECT window_start, unique_workspaces, unique_users, allowed_requests, denied_requests "
                      "FROM reports")
    return {int(start): tuple(int(v) for v in figures) for start, *figures in found}


def track_window(agg: Aggregator, clock: FakeClock, start: int, workspaces: range, users: range,
                 allowed: int = 1) -> None:
    clock.t = start + 1
    for w in workspaces:
        for u in users:
            agg.track(WS[w], USERS[u], allowed=allowed)


@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_conversion_keeps_every_id_and_report_then_days_are_routed_and_dropped_whole(
        empty_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = empty_database_url
    asyncio.run(migrate.upgrade_url(url, "0007"))
    clock = FakeClock()
    monkeypatch.setattr(migrate, "head_revision", lambda: "0007")  # this version's code on the 0007 schema
    with manual(url, clock, replica_id="before") as agg:
        track_window(agg, clock, T0, range(0, 5), range(0, 20))
        track_window(agg, clock, T0 + WINDOW, range(3, 9), range(10, 40), allowed=2)
        track_window(agg, clock, T0 + 2 * WINDOW, range(0, 2), range(0, 5))  # left open
        clock.past_window(T0 + WINDOW)
        assert len(agg.collect()) == 2
    assert rows(url, "SELECT relkind::text FROM pg_class WHERE relname = 'window_ids'") == [("r",)]  # a plain table
    stored, reported = ids_digest(url), figures(url)
    monkeypatch.undo()

    assert asyncio.run(migrate.upgrade_url(url)) == ("0007", migrate.head_revision())

    assert ids_digest(url) == stored and figures(url) == reported
    assert reported == {T0: (5, 20, 100, 0), T0 + WINDOW: (6, 30, 360, 0)}
    bound = partitions.day_of(T0) + DAY
    assert [(p.name, p.low, p.high, p.default) for p in listed(url)] == [
        ("window_ids_legacy", None, bound, False),
        (partitions.day_name(bound), bound, bound + DAY, False),
        (partitions.day_name(bound + DAY), bound + DAY, bound + 2 * DAY, False),
        ("window_ids_default", None, None, True)]
    assert set(placement(url).values()) == {"window_ids_legacy"}

    # The open window goes on in the legacy partition; the next day's window lands in its own partition,
    # a window three days on in the default one; every report is exact.
    later = [bound + 5 * WINDOW, bound + 3 * DAY]
    with manual(url, clock, replica_id="after", id_retention="30d") as agg:  # its own prune keeps them
        track_window(agg, clock, T0 + 2 * WINDOW, range(1, 4), range(3, 8))
        for start in later:
            track_window(agg, clock, start, range(0, 3), range(0, 3))
        clock.t = later[-1] + 10 * WINDOW
        agg.collect()
    got = figures(url)
    assert got[T0 + 2 * WINDOW] == (4, 8, 10 + 15, 0)
    assert [got[s] for s in later] == [(3, 3, 9, 0)] * 2
    where = placement(url)
    assert (where[T0 + 2 * WINDOW], where[later[0]], where[later[1]]) == (
        "window_ids_legacy", partitions.day_name(bound), "window_ids_default")

    # Retention: the days entirely before the cut go whole (legacy included: all its windows are reported);
    # the default partition's old rows go by DELETE; reports stay.
    async def prune() -> None:
        db = store.Store(url)
        try:
            await db.prune(before=bound + 2 * DAY + 1)
        finally:
            await db.close()
    kept_before = {p.name for p in listed(url)}
    asyncio.run(prune())
    kept = {p.name for p in listed(url)}
    # The cut is the start of bound + 2 days: the two days before it and the legacy partition go whole.
    assert kept_before - kept == {"window_ids_legacy", partitions.day_name(bound), partitions.day_name(bound + DAY)}
    assert "window_ids_default" in kept and all(p.default or (p.low or 0) >= bound + 2 * DAY for p in listed(url))
    assert set(placement(url)) == {later[1]}
    assert figures(url) == got


@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_upkeep_creates_the_days_ahead_skips_one_whose_ids_are_in_the_default_and_never_waits(
        empty_database_url: str) -> None:
    url = empty_database_url
    asyncio.run(migrate.upgrade_url(url))
    far = partitions.day_of(T0) + 40 * DAY
    clock = FakeClock(far + DAY + 1)  # ids of the day after ``far`` arrive before its partition exists
    with manual(url, clock, replica_id="early", collect=False) as agg:
        agg.track(WS[0], USERS[0])
        agg.flush()
    assert placement(url) == {far + DAY: "window_ids_default"}

    async def upkeep(blocked: bool) -> list[str]:
        db, blocker = store.Store(url), store.Store(url)
        try:
            async with blocker.transaction() as hold:
                if blocked:  # conflicts with ATTACH, as a long DDL or a VACUUM FULL would
                    await hold.execute(sa.text("LOCK TABLE window_ids IN SHARE UPDATE EXCLUSIVE MODE"))
                return await asyncio.wait_for(db.partition_ahead(far + 1), 10)
        finally:
            await db.close()
            await blocker.close()

    assert blocking(upkeep(blocked=True)) == []  # deferred after the lock timeout, not an error
    assert blocking(upkeep(blocked=False)) == [partitions.day_name(far), partitions.day_name(far + 2 * DAY)]
    names = [p.name for p in listed(url)]
    assert partitions.day_name(far + DAY) not in names  # its ids sit in the default partition
    assert blocking(upkeep(blocked=False)) == []  # idempotent


def test_partition_bounds_are_read_from_postgresql_text() -> None:
    assert partitions.parse_bound("p", "FOR VALUES FROM (MINVALUE) TO ('1800086400')") == partitions.Partition(
        "p", None, 1800086400)
    assert partitions.parse_bound("p", "FOR VALUES FROM ('-5') TO (MAXVALUE)") == partitions.Partition("p", -5, None)
    assert partitions.parse_bound("d", "DEFAULT").default
    with pytest.raises(ValueError, match="bound this version does not read"):
        partitions.parse_bound("x", "FOR VALUES IN ('1')")
