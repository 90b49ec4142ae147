"""Health that tells the truth: ok, degraded or failing, with a sentence per reason, in status(), /healthz
and /metrics; on real databases (a trigger that refuses writes, a proxy that refuses connections)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from aggregator import Aggregator, api, config, exceptions, health, metrics, options
from aggregator.collector import CollectorStats
from aggregator.flush import FlushStats
from tests.faults import TcpProxy, free_port
from tests.helpers import T0, WINDOW, FakeClock, by_window, ids, manual

TOKEN = "t0ken-for-tests-0123456789"
BOUNDS = health.Bounds(overdue_after=600.0, failures_in_row=3)
WINDOW_END = T0 + WINDOW
ONLINE = {"connected": True, "ready": True, "fatal_error": None, "outage_for_s": None, "failures_in_row": 0,
          "last_error": None}


def status(*, store: dict[str, Any] | None = None, collector: CollectorStats | None = None,
           flush: FlushStats | None = None, **more: Any) -> dict[str, Any]:
    """What Aggregator.status() gives health.evaluate(): a running replica in touch, unless told otherwise."""
    return {"state": "running", "store": {**ONLINE, **(store or {})}, "collector": collector or CollectorStats(),
            "flush": flush or FlushStats(), **more}


@pytest.mark.parametrize(("given", "now", "expected"), [
    (status(), WINDOW_END + 10_000, health.Health("ok")),
    (status(collector=CollectorStats(oldest_unreported=(T0, WINDOW_END))), WINDOW_END + 600, health.Health("ok")),
    (status(collector=CollectorStats(oldest_unreported=(T0, WINDOW_END))), WINDOW_END + 601, health.Health(
        "degraded", ("window 2027-01-15T08:00:00Z ended 10m1s ago and is not reported yet, over "
                     "health_overdue_after 10m",))),
    (status(collector=CollectorStats(failures_in_row=2, last_error="StoreError: no")), 0, health.Health("ok")),
    (status(collector=CollectorStats(failures_in_row=3, last_error="StoreError: no")), 0, health.Health(
        "degraded", ("3 collections failed in a row, at or over health_failures_in_row 3: StoreError: no",))),
    (status(flush=FlushStats(failures_in_row=4, last_error="OverflowError: big")), 0, health.Health(
        "degraded", ("4 flushes failed in a row, at or over health_failures_in_row 3: OverflowError: big",))),
    (status(quarantined={"window": 1, "flush": 0}), 0, health.Health(
        "degraded", ("1 item quarantined (window 1), over 0: see `aggregator quarantine list`",))),
    (status(quarantined={"window": 1, "experience": 2, "flush": 0}), 0, health.Health(
        "degraded", ("3 items quarantined (experience 2, window 1), over 0: see `aggregator quarantine list`",))),
    (status(quarantined={"window": 0}), 0, health.Health("ok")),
    (status(quarantined=None), 0, health.Health("ok")),  # not read yet
    (status(store={"fatal_error": "schema is behind"}), 0, health.Health(
        "failing", ("the database answers but cannot be used: schema is behind",))),
    (status(store={"ready": False}), 0, health.Health(
        "failing", ("the database has not answered yet: connecting",))),
    (status(store={"connected": False, "outage_for_s": 75.2, "failures_in_row": 1, "last_error": "refused"},
            flush=FlushStats(failures_in_row=3, last_error="StoreUnavailable: refused")), 0, health.Health(
        "failing", ("the database has been unreachable for 1m15s (1 failed attempt in a row): refused",
                    "3 flushes failed in a row, at or over health_failures_in_row 3: StoreUnavailable: refused"))),
    ({**status(), "state": "stopped"}, 0, health.Health("failing", ("the Aggregator is stopped, not running",))),
    ({"state": "running", "store": ONLINE}, 0, health.Health("ok")),  # collect=False, nothing flushed yet
])
def test_evaluate_names_each_figure_and_its_bound(given: dict[str, Any], now: float,
                                                 expected: health.Health) -> None:
    """evaluate() is a pure function of the figures: failing reasons first, then degraded ones, each a sentence
    naming the figure and the bound it passed; at the bound itself a window is not yet overdue."""
    assert expected == health.evaluate(given, BOUNDS, now=now)


@pytest.mark.parametrize(("seconds", "expected"), [
    (0, "0s"), (0.25, "0.25s"), (45, "45s"), (60, "1m"), (601, "10m1s"), (3900, "1h5m"), (90_000, "1d1h")])
def test_durations_read_as_people_read_them(seconds: float, expected: str) -> None:
    """Durations in reasons are short and exact to the second or the coarser unit."""
    assert expected == health.span(seconds)


def test_the_bounds_are_options_with_defaults_that_follow_max_collect_delay(sqlite_url: str) -> None:
    """health_overdue_after defaults to max_collect_delay + grace + 2 x collect_interval (the latest a window is
    reported when all is well); both options come from the environment like every other, and are validated."""
    built = config.Settings.build(database_url=sqlite_url, window="30m", flush_interval="60s")
    assert (built.health_overdue_after, built.health_failures_in_row) == (1800 + 0 + 2 * 15, 3)
    daemon = options.load_daemon_settings({"database_url": sqlite_url}, environ={
        "AGGREGATOR_HEALTH_OVERDUE_AFTER": "10m", "AGGREGATOR_HEALTH_FAILURES_IN_ROW": "5"})
    assert (daemon.aggregator.health_overdue_after, daemon.aggregator.health_failures_in_row) == (600.0, 5)
    assert daemon.masked()["health_overdue_after"] == "600s"
    with pytest.raises(exceptions.ConfigError, match="health_failures_in_row='0'"):
        options.load_daemon_settings({"database_url": sqlite_url, "health_failures_in_row": "0"}, environ={})
    with pytest.raises(exceptions.ConfigError, match="health_overdue_after"):
        Aggregator(database_url=sqlite_url, health_overdue_after="soon")


def test_an_overdue_window_makes_health_degraded_until_it_is_reported(database_url: str, tmp_path: Path) -> None:
    """A live replica whose watermark is behind holds a window; once the window ended longer ago than
    health_overdue_after, status() says degraded with the window, its delay and the bound; reported, ok again."""
    clock = FakeClock()
    spool = {"spool_dir": str(tmp_path)}
    with manual(database_url, clock, collect=False, replica_id="holder", **spool) as holder, \
            manual(database_url, clock, replica_id="collector", health_overdue_after="2m", **spool) as collector:
        holder.track(*ids(2))
        holder.flush()  # its watermark (now) is before the window's end: it holds the window
        collector.track(*ids(2, offset=10))
        clock.past_window(T0)
        assert (collector.collect(), collector.status()["health"]) == ([], {"state": "ok", "reasons": []})
        clock.t = WINDOW_END + 121
        assert collector.collect() == []
        assert collector.status()["health"] == {"state": "degraded", "reasons": [
            "window 2027-01-15T08:00:00Z ended 2m1s ago and is not reported yet, over health_overdue_after 2m"],
        }
        holder.flush()  # its watermark passes the window's end
        assert T0 in by_window(collector.collect())
        assert collector.status()["health"] == {"state": "ok", "reasons": []}


@pytest.fixture
async def served(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, FakeClock]]:
    """The daemon's app over an embedded Aggregator on a fake clock, failing after two failures in a row."""
    settings = options.load_daemon_settings(
        {"database_url": database_url, "api_tokens": TOKEN, "window": f"{WINDOW}s"}, environ={})
    clock = FakeClock()
    async with manual(database_url, clock, health_failures_in_row=2, spool_dir=str(tmp_path)) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http, agg, clock


@pytest.mark.parametrize(("table", "what"), [("reports", "collections"), ("flush_sequences", "flushes")])
async def test_failures_in_a_row_make_healthz_degraded_but_still_200(
        served: tuple[httpx.AsyncClient, Aggregator, FakeClock], database_url: str, table: str, what: str) -> None:
    """A table renamed away under a running replica (the database answers; the schema does not fit) fails each
    collection, or each flush; at health_failures_in_row in a row /healthz stays 200 (the replica serves) but
    says degraded with the count, the bound and the error, and /metrics shows it; one success and it is ok."""
    http, agg, clock = served
    agg.track(*ids(2))
    clock.past_window(T0)
    await _rename(database_url, table, f"{table}_away")
    attempt = agg.acollect if what == "collections" else agg.aflush
    for _ in range(2):
        agg.track(*ids(2, offset=5))
        with pytest.raises(exceptions.SchemaOutdated, match=table):
            await attempt()
    response = await http.get("/healthz")
    body = response.json()
    assert (response.status_code, body["status"], len(body["reasons"])) == (200, "degraded", 1)
    assert body["reasons"][0].startswith(f"2 {what} failed in a row, at or over health_failures_in_row 2: "
                                         "SchemaOutdated: ")
    text = (await http.get("/metrics")).text
    assert 'aggregator_health{state="degraded"} 1\n' in text and 'aggregator_health{state="ok"} 0\n' in text
    await _rename(database_url, f"{table}_away", table)
    assert len(await agg.acollect()) == 1
    response = await http.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok", "database": "ok"})
    assert 'aggregator_health{state="ok"} 1\n' in (await http.get("/metrics")).text


def test_a_quarantined_window_makes_health_degraded(database_url: str, tmp_path: Path) -> None:
    """A window whose report the database refuses (a trigger) is set aside by the collector; the run succeeds,
    and health says degraded, naming the quarantined item, until an operator deals with it."""
    clock = FakeClock()
    with manual(database_url, clock, spool_dir=str(tmp_path)) as agg:
        agg.track(*ids(2))
        clock.past_window(T0)
        asyncio.run(_refuse_reports(database_url))
        assert agg.collect() == []
        assert agg.status()["health"] == {"state": "degraded", "reasons": [
            "1 item quarantined (window 1), over 0: see `aggregator quarantine list`"]}


async def test_an_unreachable_database_is_failing_and_healthz_503_until_it_answers(pg_url: str,
                                                                                   tmp_path: Path) -> None:
    """PostgreSQL behind a proxy that starts refusing connections: the next flush fails, status() says failing
    and /healthz answers 503 with the reason in `detail` and `reasons`; once it answers again, ok and 200."""
    with TcpProxy.to(pg_url) as proxy:
        url = proxy.url_for(pg_url)
        settings = options.load_daemon_settings({"database_url": url, "api_tokens": TOKEN, "window": f"{WINDOW}s"},
                                               environ={})
        async with manual(url, FakeClock(), spool_dir=str(tmp_path)) as agg:
            app = api.build_app(agg, settings, metrics.Counters())
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                assert (await http.get("/healthz")).status_code == 200
                proxy.refuse = True
                proxy.cut_all()
                agg.track(*ids(2))
                with pytest.raises(exceptions.StoreUnavailable):
                    await agg.aflush()
                assert agg.status()["health"]["state"] == "failing"
                response = await http.get("/healthz")
                body = response.json()
                assert (response.status_code, body["status"]) == (503, "failing")
                assert body["detail"] == body["reasons"][0]
                assert body["reasons"][0].startswith("the database has been unreachable for ")
                assert 'aggregator_health{state="failing"} 1\n' in (await http.get("/metrics")).text
                proxy.refuse = False
                await _until_flushed(agg)
                assert agg.status()["health"] == {"state": "ok", "reasons": []}
                response = await http.get("/healthz")
                assert (response.status_code, response.json()) == (200, {"status": "ok", "database": "ok"})


async def test_a_database_that_never_answered_is_failing_from_the_start(tmp_path: Path) -> None:
    """A PostgreSQL URL on a closed port: the replica starts (tracking works) but /healthz is 503 and says why."""
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    settings = options.load_daemon_settings({"database_url": url, "api_tokens": TOKEN}, environ={})
    async with Aggregator(database_url=url, handle_sigterm=False, stop_timeout="1s", spool_dir=str(tmp_path)) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            response = await http.get("/healthz")
        assert response.status_code == 503
        assert response.json()["detail"].startswith("the database has been unreachable for ")
        assert "127.0.0.1" in response.json()["detail"]


async def _until_flushed(agg: Aggregator, within: float = 20.0) -> None:
    """Flush until the database takes it (the pool's first connections after the outage may be dead)."""
    deadline = time.monotonic() + within
    while True:
        try:
            await agg.aflush()
            return
        except exceptions.StoreUnavailable:
            assert time.monotonic() < deadline, "the database did not come back"
            await asyncio.sleep(0.2)


async def _refuse_reports(url: str) -> None:
    """Make the test's database refuse every new report, as a constraint would."""
    await _behind_the_back(
        url, sqlite="CREATE TRIGGER refuse BEFORE INSERT ON reports BEGIN SELECT RAISE(ABORT, 'refused'); END",
        postgresql="CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION "
                   "'refused' USING ERRCODE = 'check_violation'; END $$; CREATE TRIGGER refuse BEFORE INSERT "
                   "ON reports FOR EACH ROW EXECUTE FUNCTION refuse()")


async def _rename(url: str, table: str, to: str) -> None:
    """Rename a table of the test's database behind the Aggregator's back."""
    statement = f"ALTER TABLE {table} RENAME TO {to}"
    await _behind_the_back(url, sqlite=statement, postgresql=statement)


async def _behind_the_back(url: str, *, sqlite: str, postgresql: str) -> None:
    """Run a statement on the test's database over a connection of its own (not the Aggregator's)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(sa.make_url(url).database or "")
        try:
            conn.execute(sqlite)
            conn.commit()
        finally:
            conn.close()
        return
    pg = await asyncpg.connect(sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await pg.execute(postgresql)
    finally:
        await pg.close()
