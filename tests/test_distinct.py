"""Distinct over a range of reported windows: exact from ids or the day rollup, else from sketches; on SQLite
and PostgreSQL, against the ground truth."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import Aggregator, InvalidInput, api, distinct, metrics, options, store
from aggregator.store import partitions
from tests.faults import blocking
from tests.helpers import T0, WINDOW, FakeClock, manual
from tests.test_cli import aggregator

DAY = distinct.DAY
D = T0 - T0 % DAY + DAY  # a day start after T0
W0, W1, W2, W3, W4 = D - 120, D + 60, D + 3600, D + DAY + 120, D + 2 * DAY + 600  # P, D, D, D+1, D+2
TOKEN = "t0ken-for-tests-0123456789"


def users(n: int, offset: int = 0) -> list[uuid.UUID]:
    return [uuid.UUID(int=(1 << 64) + offset + i) for i in range(n)]


def workspace(i: int) -> uuid.UUID:
    return uuid.UUID(int=1 + i % 7)


def put(agg: Aggregator, clock: FakeClock, start: int, ids: Iterable[uuid.UUID], *, at: int | None = None) -> None:
    """Track ``ids`` in the window of ``start`` (or, late, at ``at`` while the clock is in ``start``), flush and
    collect it."""
    clock.t = start + 1
    for i, user in enumerate(ids):
        agg.track(workspace(i), user, at=at)
    agg.flush()
    clock.past_window(start)
    agg.collect()


def truth(*sets: Iterable[uuid.UUID]) -> int:
    return len(set().union(*sets))


def _at(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


# The ids of each window, a late addition into W1 included (tracked while W2 is open).
DATA = {W0: users(30), W1: users(40, 20), W2: users(25, 50), W3: users(60, 70), W4: users(10, 300)}
LATE_W1 = users(15, 1000) + users(5, 20)  # 15 new ids, 5 already there


def _load(url: str) -> FakeClock:
    clock = FakeClock(W0 + 1)
    with manual(url, clock, id_retention="7d") as agg:
        for start in (W0, W1):
            put(agg, clock, start, DATA[start])
        clock.t = W2 + 1
        for user in LATE_W1:
            agg.track(workspace(0), user, at=W1 + 5)  # W1 is reported: these are late
        put(agg, clock, W2, DATA[W2])
        for start in (W3, W4):
            put(agg, clock, start, DATA[start])
    return clock


def test_exact_ids_path_then_daily_path_after_ids_are_pruned(database_url: str) -> None:
    """While every window keeps its ids the range is exact from them (late ids included); once the collector's
    prune drops them, whole days answer exactly from the rollup (with kept windows' ids at the edge), and a
    range with a partial day whose ids are gone falls back to sketches, within their bounds."""
    clock = _load(database_url)
    every = [*DATA.values(), LATE_W1]
    reader = manual(database_url, clock, id_retention="1h")
    found = reader.distinct(W0, W4 + WINDOW, "users")
    assert (found.path, found.value, found.exact) == ("ids", truth(*every), True)
    in_range = [r for r in reader.reports() if _at(W0) <= r.window_start < _at(W4 + WINDOW)]  # empty ones too
    assert (found.windows, found.first_window, found.last_window) == (len(in_range), _at(W0), _at(W4))
    assert reader.distinct(W1, W1 + WINDOW, "workspaces").value == 7
    assert reader.distinct(W1, W1 + WINDOW, "users").value == truth(DATA[W1], LATE_W1)

    clock.t = W4 + 3000  # ids of windows that ended an hour before are pruned: all but W4's
    with reader:
        reader.collect()
        found = reader.distinct(D, D + 3 * DAY, "users")
        assert (found.path, found.value) == ("daily", truth(*every[1:]))
        edge = reader.distinct(D, W4 + WINDOW, "users")  # whole days D, D+1, then W4's own ids
        assert (edge.path, edge.value) == ("daily", truth(*every[1:]))
        assert reader.distinct(D + DAY, D + 3 * DAY, "users").value == truth(DATA[W3], DATA[W4])
        for start, end, expected in ((W0, W4 + WINDOW, truth(*every)), (W1, D + DAY, truth(DATA[W1], DATA[W2],
                                                                                           LATE_W1))):
            estimate = reader.distinct(start, end, "users")
            assert (estimate.path, estimate.exact) == ("sketch", False)
            assert estimate.lower <= expected <= estimate.upper
            assert estimate.relative_standard_error == pytest.approx(0.0162, abs=0.001)


def test_sketch_path_within_its_error_bound_for_thousands_of_ids(database_url: str) -> None:
    """Beyond distinct_retention only the sketches are left: the estimate is within its bounds and 3 standard
    errors of the truth, over windows on three days that overlap by half."""
    clock = FakeClock(W1 + 1)
    parts = {start: users(3000, n * 1500) for n, start in enumerate((W1, W2, W3, W4))}
    with manual(database_url, clock, id_retention="7d") as agg:
        for start, ids in parts.items():
            put(agg, clock, start, ids)
        exact = agg.distinct(D, D + 3 * DAY)
    assert (exact.path, exact.value) == ("ids", truth(*parts.values()))
    clock.t = W4 + 3 * DAY
    with manual(database_url, clock, id_retention="1h", distinct_retention="1d") as agg:
        agg.collect()  # prunes window ids and the day rollup
        found = agg.distinct(D, D + 3 * DAY)
    assert found.path == "sketch"
    assert found.lower <= exact.value <= found.upper
    assert abs(found.value - exact.value) <= 3 * found.relative_standard_error * exact.value


def test_windows_not_reported_are_left_out_and_named(database_url: str) -> None:
    """A range reaching past the last report covers the reported windows only, and says which."""
    clock = FakeClock(W1 + 1)
    with manual(database_url, clock) as agg:
        put(agg, clock, W1, users(5))
        clock.t = W1 + WINDOW + 1
        agg.track(workspace(0), users(1, 99)[0])
        agg.flush()  # in the next window, not reported yet
        found = agg.distinct(W1 - DAY, W1 + DAY, "users")
        empty = agg.distinct(W1 + DAY, W1 + 2 * DAY, "users")
    assert (found.value, found.windows, found.first_window, found.last_window) == (5, 1, _at(W1), _at(W1))
    assert (empty.value, empty.windows, empty.first_window) == (0, 0, None)


@pytest.mark.parametrize(("start", "end", "dim", "message"), [
    (T0, T0 + 60, "sessions", "dim='sessions' is not a distinct set; use one of: workspaces, users"),
    (T0, T0, "users", "end=2027-01-15T08:00:00Z is not after start=2027-01-15T08:00:00Z"),
    (dt.datetime(2027, 1, 1), T0, "users", "start=datetime.datetime(2027, 1, 1, 0, 0) is a naive datetime"),
    ("yesterday", T0, "users", "start='yesterday'"),
])
def test_bad_input_is_refused_naming_the_value_and_the_fix(start: object, end: object, dim: str,
                                                           message: str) -> None:
    """Each bad argument raises InvalidInput before any I/O, naming it."""
    with pytest.raises(InvalidInput) as caught:
        distinct.check_range(start, end, dim)
    assert str(caught.value).startswith(message)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 3000), st.integers(-100, 3100), st.integers(-100, 3100))
def test_plan_covers_the_range_with_trusted_sources_only(a: int, b: int, ids_at: int, days_at: int) -> None:
    """An exact plan covers [lo, hi) exactly, in order, with whole retained days or retained windows' ids;
    the sketch path is chosen only when some day is neither."""
    step = 1800
    lo, hi = sorted((a * step, b * step))
    ids_from, days_from = ids_at * step, days_at * DAY // 48 // DAY * DAY
    found = distinct.plan(lo, hi, ids_from=ids_from, days_from=days_from)
    if found.path == "sketch":
        day = lo - lo % DAY
        pieces = [(max(lo, d), min(hi, d + DAY), d) for d in range(day, hi, DAY)]
        assert any(not (x >= ids_from or (x == d and y == d + DAY and d >= days_from)) for x, y, d in pieces)
        return
    covered = lo
    for span in found.spans:
        assert span.start == covered and span.end > span.start
        if span.source == "days":
            assert span.start % DAY == 0 and span.end % DAY == 0 and span.start >= days_from
        else:
            assert span.start >= ids_from
        covered = span.end
    assert covered == hi or lo >= hi
    assert found.path == ("daily" if any(s.source == "days" for s in found.spans) else "ids")


@settings(max_examples=30, deadline=None)
@given(st.sets(st.integers(0, 50_000), max_size=3000), st.sets(st.integers(0, 50_000), max_size=3000))
def test_merging_sketches_equals_the_sketch_of_the_union(a: set[int], b: set[int]) -> None:
    """Union is lossless for HLL: the merge of two windows' sketches estimates exactly as one sketch of both."""
    def hexes(items: Iterable[int]) -> list[str]:
        return [f"{i:032x}" for i in items]

    merged = distinct.merge([distinct.sketch_of(hexes(a)), distinct.sketch_of(hexes(b))])
    assert merged == distinct.merge([distinct.sketch_of(hexes(a | b))])
    assert merged.lower <= len(a | b) <= merged.upper


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, FakeClock]]:
    settings_ = options.load_daemon_settings(
        {"database_url": database_url, "api_tokens": TOKEN, "window": f"{WINDOW}s"}, environ={})
    clock = FakeClock(W1 + 1)
    async with manual(database_url, clock) as agg:
        app = api.build_app(agg, settings_, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http, agg, clock


async def test_http_route_answers_with_its_path_and_bounds(client: tuple) -> None:
    """GET /v1/distinct needs the bearer token, answers the reported windows' uniques, and a bad query is a
    422 naming the parameter."""
    http, agg, clock = client
    for i, user in enumerate(users(12)):
        agg.track(workspace(i), user)
    await agg.aflush()
    clock.past_window(W1)
    await agg.acollect()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    query = {"from": _at(W1 - 3600).isoformat(), "to": str(W1 + 3600), "dim": "users"}
    assert (await http.get("/v1/distinct", params=query)).status_code == 401
    response = await http.get("/v1/distinct", params=query, headers=auth)
    assert response.status_code == 200, response.text
    body = response.json()
    assert {k: body[k] for k in ("dim", "path", "value", "exact", "lower", "upper", "windows")} == {
        "dim": "users", "path": "ids", "value": 12, "exact": True, "lower": 12, "upper": 12, "windows": 1}
    assert dt.datetime.fromisoformat(body["first_window"]) == _at(W1)
    bad = await http.get("/v1/distinct", params={**query, "dim": "teams"}, headers=auth)
    assert bad.status_code == 422 and bad.json()["errors"][0]["loc"] == "query.dim"
    bad = await http.get("/v1/distinct", params={**query, "to": query["from"]}, headers=auth)
    assert bad.status_code == 422 and "to=" in bad.json()["detail"]


def test_cli_prints_the_answer_as_json_and_table(database_url: str) -> None:
    """`aggregator distinct --from --to` prints the answer; a bad range exits 1 naming --to.

    The installed command, in its own process (as an operator runs it; it configures logging for itself)."""
    clock = FakeClock(W1 + 1)
    with manual(database_url, clock) as agg:
        put(agg, clock, W1, users(9))
    common = ["distinct", "--database-url", database_url, "--from", str(W1), "--dim", "workspaces"]
    done = aggregator(*common, "--to", _at(W1 + DAY).isoformat(), "--format", "json")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert (shown["path"], shown["value"], shown["windows"]) == ("ids", 7, 1)
    done = aggregator(*common, "--to", str(W1 + DAY))
    table = done.stdout.splitlines()
    assert done.returncode == 0 and table[0].split()[:4] == ["dim", "start", "end", "path"]
    assert table[1].split()[3] == "ids"
    done = aggregator(*common, "--to", str(W1))
    assert done.returncode == 1 and "--to=" in done.stderr


def test_prune_keeps_horizons_monotonic(database_url: str) -> None:
    """Two collectors pruning with different clocks never move a horizon back (a read would trust lost ids)."""
    async def run() -> dict[str, str]:
        db = store.Store(database_url)
        try:
            await db.prune_distinct(ids_before=2000.0, days_before=DAY * 3)
            await db.prune_distinct(ids_before=1000.0, days_before=DAY)
            async with db.read() as conn:
                from aggregator import schema
                m = schema.meta
                return {k: v for k, v in await conn.execute(
                    m.select().where(m.c.key.in_(["distinct_ids_before", "distinct_days_before"])))}
        finally:
            await db.close()

    assert asyncio.run(run()) == {"distinct_ids_before": f"{2000:020d}", "distinct_days_before": f"{3 * DAY:020d}"}


# ---- the rollup: after the report, in commits of its own ------------------------------------------------

WRITER = uuid.UUID(int=77)


async def _flush(db: store.Store, seq: int, start: int, ids: list[uuid.UUID], *, now: int) -> store.BatchResult:
    """A batch of ``ids`` (users; the first 7 also as workspaces) for ``start``'s window, applied at ``now``."""
    part = store.BatchWindow(workspaces=sorted(u.int for u in ids[:7]), users=sorted(u.int for u in ids),
                             allowed=len(ids), denied=0)
    batch = store.Batch(seq=seq, windows={start: part}, events=len(ids), watermark=float(now))
    return await db.apply_batch(batch, writer_id=WRITER, replica_id="r", window=WINDOW, now=float(now))


async def _counts(db: store.Store, start: int) -> dict[str, int]:
    """Rows of range distinct's tables, and the window's stored user ids."""
    found = {}
    async with db.read() as conn:
        for table in ("day_ids", "distinct_sketches", "distinct_rollups"):
            found[table] = int(await conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)
        found["window_ids"] = int(await conn.scalar(
            sa.text("SELECT count(*) FROM window_ids WHERE window_start = :s AND dim = 2"), {"s": start}) or 0)
    return found


async def _prune_ids(db: store.Store, before: int) -> None:
    await db.prune_distinct(ids_before=float(before), days_before=0)
    await db.prune(before=float(before))


def test_report_writes_nothing_for_range_distinct_and_the_rollup_takes_late_ids(database_url: str) -> None:
    """collect_window writes no day rollup, sketch or rollup mark (its commit holds the window's lock); ids
    flushed late before the rollup stay in the window's ids only, the rollup takes them, and once ids are
    pruned the whole day answers exactly from the rollup."""
    async def run() -> tuple[dict[str, int], ...]:
        db = store.Store(database_url)
        try:
            await db.check_window(WINDOW)
            await _flush(db, 1, W1, users(40), now=W1 + 1)
            assert await db.collect_window(W1, collector_id="c", now=W1 + WINDOW + 1.0) is not None
            reported = await _counts(db, W1)
            await _flush(db, 2, W1, users(30, 30), now=W1 + 3 * WINDOW)  # late: 20 new ids
            late = await _counts(db, W1)
            unrolled = await db.distinct(D, D + DAY, "users")
            assert await db.roll_up(now=W1 + 3 * WINDOW, limit=5) == [W1]
            assert await db.roll_up(now=W1 + 3 * WINDOW, limit=5) == []  # done once
            rolled = await _counts(db, W1)
            await _prune_ids(db, D + 2 * DAY)
            pruned = await _counts(db, W1)
            daily = await db.distinct(D, D + DAY, "users")
            return reported, late, rolled, pruned, (unrolled.path, unrolled.value), (daily.path, daily.value)
        finally:
            await db.close()

    reported, late, rolled, pruned, unrolled, daily = blocking(run())
    assert reported == {"day_ids": 0, "distinct_sketches": 0, "distinct_rollups": 0, "window_ids": 40}
    assert late == {"day_ids": 0, "distinct_sketches": 0, "distinct_rollups": 0, "window_ids": 60}
    assert unrolled == ("ids", 60)
    assert rolled == {"day_ids": 60 + 14, "distinct_sketches": 2, "distinct_rollups": 1, "window_ids": 60}
    assert pruned["window_ids"] == 0
    assert daily == ("daily", 60)


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_late_flush_racing_the_rollup_of_its_window_is_counted_once(database_url: str) -> None:
    """A late flush into a window being rolled up waits for the rollup's commit, then sees the window rolled
    and writes its ids to the day rollup itself; a rollup finding a flush on the window leaves it for the next
    run. Either way the daily answer, once the windows' ids are pruned, is exact."""
    async def run() -> tuple[Any, ...]:
        db, other = store.Store(database_url), store.Store(database_url)
        locked, go = asyncio.Event(), asyncio.Event()

        async def hold(start: int) -> None:
            locked.set()
            await go.wait()

        try:
            await db.check_window(WINDOW)
            await _flush(db, 1, W1, users(100), now=W1 + 1)
            await db.collect_window(W1, collector_id="c", now=W1 + WINDOW + 1.0)
            roller = asyncio.create_task(db.roll_up(now=W1 + 2 * WINDOW, limit=5, on_locked=hold))
            await asyncio.wait_for(locked.wait(), 10)
            flusher = asyncio.create_task(_flush(other, 2, W1, users(60, 90), now=W1 + 3 * WINDOW))
            await asyncio.sleep(0.5)
            waited = not flusher.done()  # on the window's lock, held by the rollup
            go.set()
            rolled, late = await roller, await flusher
            # The other order: a flush holds W2's shared lock; the rollup skips W2 until it is done.
            await _flush(db, 3, W2, users(50, 500), now=W2 + 1)
            await db.collect_window(W2, collector_id="c", now=W2 + WINDOW + 1.0)
            async with other.transaction() as conn:
                await other._share_windows(conn, [W2], WINDOW)
                skipped = await asyncio.wait_for(db.roll_up(now=W2 + 2 * WINDOW, limit=5), 10)
                await other._insert_ids(conn, W2, 2, sorted(u.int for u in users(10, 545)), count_new=True)
            taken = await db.roll_up(now=W2 + 2 * WINDOW, limit=5)
            await _prune_ids(db, D + 2 * DAY)
            left = await _counts(db, W1)
            daily = await db.distinct(D, D + DAY, "users")
            return waited, rolled, late.late_windows, skipped, taken, left["window_ids"], daily.path, daily.value
        finally:
            await db.close()
            await other.close()

    waited, rolled, late_windows, skipped, taken, left, path, value = blocking(run())
    assert (waited, rolled, late_windows) == (True, [W1], [W1])
    assert (skipped, taken) == ([], [W2])
    assert (left, path) == (0, "daily")
    assert value == truth(users(100), users(60, 90), users(50, 500), users(10, 545))


def test_prune_keeps_the_ids_and_partition_of_a_window_not_rolled_up(database_url: str) -> None:
    """Retention drops no id of a reported window whose rollup is not done (nor, on PostgreSQL, its day's
    partition); once rolled up, they go."""
    async def run() -> list[tuple[int, bool]]:
        db = store.Store(database_url)
        day = distinct.day_of(W1)
        seen = []

        async def state() -> tuple[int, bool]:
            async with db.read() as conn:
                names = [p.name for p in await partitions.listed(conn)] if db.dialect == "postgresql" else []
            return (await _counts(db, W1))["window_ids"], partitions.day_name(day) in names

        try:
            await db.check_window(WINDOW)
            await db.partition_ahead(float(day))  # W1's day has a partition of its own on PostgreSQL
            await _flush(db, 1, W1, users(40), now=W1 + 1)
            await db.collect_window(W1, collector_id="c", now=W1 + WINDOW + 1.0)
            seen.append(await state())
            await _prune_ids(db, day + 3 * DAY)
            seen.append(await state())
            await db.roll_up(now=day + 3 * DAY, limit=5)
            await _prune_ids(db, day + 3 * DAY)
            seen.append(await state())
        finally:
            await db.close()
        return seen

    pg = database_url.startswith("postgresql")
    assert blocking(run()) == [(40, pg), (40, pg), (0, False)]


def test_plan_counts_windows_not_rolled_up_beside_their_day() -> None:
    """A whole day whose rollup lacks a window not rolled up yet is still answered from the day, with that
    window's own ids (kept until its rollup) counted beside it; a window in a partial day is not needed."""
    found = distinct.plan(D, D + 2 * DAY, ids_from=D + 2 * DAY, days_from=0, unrolled=[D + 600, D + DAY + 60],
                          window=60)
    assert found.path == "daily"
    assert found.spans == (distinct.Span("days", D, D + 2 * DAY),)
    assert found.also == (distinct.Span("windows", D + 600, D + 660), distinct.Span("windows", D + DAY + 60,
                                                                                    D + DAY + 120))
    edge = distinct.plan(D, D + DAY + 120, ids_from=D + DAY, days_from=0, unrolled=[D + DAY + 60], window=60)
    assert (edge.spans, edge.also) == ((distinct.Span("days", D, D + DAY), distinct.Span("windows", D + DAY,
                                                                                          D + DAY + 120)), ())
