"""Distinct over a range of reported windows: exact from ids or the day rollup, else from sketches; on SQLite
and PostgreSQL, against the ground truth."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import Aggregator, InvalidInput, api, config, distinct, metrics, store
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
    settings_ = config.load_daemon_settings(
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
