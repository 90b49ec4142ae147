"""Poison isolation: one bad row or item, whatever made it bad, is set aside and everything else goes on.

Each test plants its bad row straight into the database (or a bad item straight into a replica's pending
state, past the validation at the edge), runs the engine, and checks that the other windows' reports keep
coming and are exact, that the item is listed with its reason, counted in /metrics and logged once, and
that once fixed by hand and handed back with `aggregator quarantine retry` it is processed exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection
from structlog.testing import capture_logs

from aggregator import Aggregator, meters, metrics, quarantine, schema, spool, store
from aggregator.client import new_correlation_id
from tests.helpers import T0, WINDOW, FakeClock, by_window, ids, manual
from tests.test_cli import aggregator
from tests.test_experiences import URGENCIES, journey
from tests.test_outbox import KEY, Scripted, wait_for

# 0001-01-01T00:00:00+14:00 as epoch seconds: a year-0 instant in UTC, which no datetime can hold.
YEAR_ONE_PLUS_14 = dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=14))).timestamp()
W1900 = int(dt.datetime(1900, 6, 1, tzinfo=dt.timezone.utc).timestamp()) // WINDOW * WINDOW
REQUESTS = meters.Meter("api_requests", "count", "requests", dimensions=("region",), billable=True)


def on_db(url: str, work: Callable[[store.Store], Awaitable[Any]]) -> Any:
    """Run ``work`` with a Store of its own on ``url`` (beside any running replica), and close it."""
    async def run() -> Any:
        db = store.Store(url)
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(run())


def plant(url: str, work: Callable[[AsyncConnection], Awaitable[Any]]) -> Any:
    """Change rows by hand, in one transaction (as an operator's SQL, or an older version, would)."""
    async def run(db: store.Store) -> Any:
        async with db.transaction() as conn:
            return await work(conn)

    return on_db(url, run)


def held(url: str) -> list[dict[str, Any]]:
    return on_db(url, lambda db: db.quarantined_items())  # type: ignore[no-any-return]


def quarantine_metric(agg: Aggregator, kind: str) -> str:
    exposition = metrics.render(agg.status(), metrics.Counters())
    name = f'aggregator_quarantined_items{{kind="{kind}"}}'
    return next(line for line in exposition.splitlines() if line.startswith(name))


def set_aside_logs(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "item_quarantined"]


def retry(url: str, *item_ids: int) -> None:
    """`aggregator quarantine retry --id N`, as an operator runs it."""
    flags = [arg for item_id in item_ids for arg in ("--id", str(item_id))]
    done = aggregator("quarantine", "retry", "--database-url", url, *flags)
    assert done.returncode == 0, done.stderr
    assert f"{len(item_ids)} item(s) handed back" in done.stdout


def listed(url: str) -> list[dict[str, Any]]:
    """`aggregator quarantine list --format json`, as an operator runs it."""
    done = aggregator("quarantine", "list", "--database-url", url, "--format", "json")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_flush_of_an_out_of_range_window_does_not_block_later_events(database_url: str, tmp_path: Path) -> None:
    """An event in a window the database cannot hold (``at=1e300``, put straight into the tracker) is set aside
    with its window's part of the batch; the rest of that batch and every later one are saved, the reports are
    exact; fixed by hand and retried, the part is applied exactly once."""
    clock = FakeClock()
    agg = manual(database_url, clock, spool_dir=str(tmp_path / "spool")).start()
    workspace = ids(1)[0]
    try:
        for user in ids(3):
            agg.track(workspace, user, allowed=2)
        agg._tracker._buffer.extend((workspace.int, ids(1, 100)[0].int, 1, 0, 1e300))  # past the edge's checks
        with capture_logs() as logs:
            agg.flush()  # no error: the bad window's part is set aside, the rest applied
            agg.track(workspace, ids(1, 3)[0], allowed=0, denied=1)
            agg.flush()
        (item,) = held(database_url)
        assert (item["kind"], item["status"], item["attempts"]) == ("flush", "held", 1)
        assert "Error" in item["reason"] and len(item["reason"]) <= 500
        assert [(e["kind"], e["ref"]) for e in set_aside_logs(logs)] == [("flush", item["ref"])]
        assert quarantine_metric(agg, "flush") == 'aggregator_quarantined_items{kind="flush"} 1'
        assert agg.status()["quarantined"]["flush"] == 1

        clock.past_window(T0)
        (report,) = agg.collect()
        assert (report.unique_users, report.allowed_requests, report.denied_requests) == (4, 6, 1)

        # The fix: the operator decides the event belongs to the window after T0, and edits the part.
        (shown,) = listed(database_url)
        payload = json.loads(shown["payload"])
        part = spool.decode(base64.b64decode(payload["batch"]))
        ((_, window),) = part.windows.items()
        part.windows = {T0 + WINDOW: window}
        payload["batch"] = base64.b64encode(spool.encode(part)).decode()
        plant(database_url, lambda conn: conn.execute(
            sa.update(schema.quarantine).where(schema.quarantine.c.id == item["id"])
            .values(payload=json.dumps(payload))))
        retry(database_url, item["id"])
        agg.flush()  # takes the part handed back
        agg.flush()  # and not again
        assert held(database_url) == []
        clock.past_window(T0 + WINDOW)
        (later,) = agg.collect()
        assert (later.unique_users, later.allowed_requests, later.late_allowed_requests) == (1, 1, 0)
        assert agg.status()["quarantined"]["flush"] == 0
    finally:
        agg.stop()


def test_meter_value_out_of_range_is_set_aside_without_its_windows_requests(database_url: str) -> None:
    """A meter figure beyond 64 bits (put straight into the replica's pending records) is set aside with the meter
    records of its window (the smallest part a batch is tried in): the requests tracked in the same window, in the
    same batch, are saved and reported exact."""
    clock = FakeClock()
    agg = manual(database_url, clock, meters=[REQUESTS]).start()
    try:
        agg.track(ids(1)[0], ids(1)[0], allowed=2)
        agg.record("api_requests", dimensions={"region": "eu"})
        agg._recorder._batch.add(meters.Identified(  # past the edge's checks
            event_id="e-1", meter="api_requests", window_start=T0, group=meters.group_key({"region": "us"}),
            dimensions={"region": "us"}, quantity=2**70, distinct=None))
        with capture_logs() as logs:
            agg.flush()
        (item,) = held(database_url)
        assert (item["kind"], json.loads(item["payload"])["part"]) == ("flush", "meters")
        assert len(set_aside_logs(logs)) == 1
        clock.past_window(T0)
        (report,) = agg.collect()
        assert (report.unique_users, report.allowed_requests) == (1, 2)
        assert billed(database_url) == []  # the meter's part of the window went aside whole, with the bad figure
    finally:
        agg.stop()


def test_checkpoint_from_year_one_does_not_stop_reports(database_url: str) -> None:
    """An open experience started at 0001-01-01T00:00:00+14:00 (planted in the database) cannot become a failure
    event; it is set aside, the other stale journey times out, every window's report keeps coming; fixed by hand
    and retried, it times out exactly once."""
    clock = FakeClock()
    sink = Scripted("events")
    agg = manual(database_url, clock, urgencies=URGENCIES, writers=[sink], pseudonym_key=KEY).start()
    good, bad = new_correlation_id(), new_correlation_id()
    try:
        agg.checkpoint_many([journey(good, "start", T0 + 1)])
        agg.track(ids(1)[0], ids(1)[0], allowed=3)
        agg.flush()
        plant(database_url, lambda conn: conn.execute(sa.insert(schema.experiences).values(
            correlation_id=bad, experience_id="http_request", type="web", feature_category="source_code",
            urgency="sync_fast", status="open", first_seen_at=T0 + 1, deadline=T0 + 11,
            started_at=YEAR_ONE_PLUS_14, start_window=T0, unknown_start=False, late_end=False)))
        clock.t = T0 + 30
        with capture_logs() as logs:
            assert agg.collect() == []  # sweeps: the good journey times out, the bad one is set aside
            clock.past_window(T0)
            (first,) = agg.collect()
            agg.track(ids(1)[0], ids(2)[1], allowed=4)
            clock.past_window(T0 + WINDOW)
            (second,) = agg.collect()
        assert [(r.unique_users, r.allowed_requests) for r in (first, second)] == [(1, 3), (1, 4)]
        (item,) = held(database_url)
        assert (item["kind"], item["ref"], item["status"]) == ("experience", bad, "held")
        assert item["reason"] == "ValueError: year 0 is out of range"
        assert [(e["kind"], e["ref"]) for e in set_aside_logs(logs)] == [("experience", bad)]
        assert quarantine_metric(agg, "experience") == 'aggregator_quarantined_items{kind="experience"} 1'
        assert failures(database_url) == [good]

        plant(database_url, lambda conn: conn.execute(sa.update(schema.experiences).where(
            schema.experiences.c.correlation_id == bad).values(started_at=T0 + 1)))
        retry(database_url, item["id"])
        agg.collect()
        agg.collect()
        assert sorted(failures(database_url)) == sorted([good, bad])
        assert held(database_url) == []
        assert on_db(database_url, lambda db: db.experience(bad))["status"] == "timed_out"
        wait_for(lambda: len({e.event_id for e in sink.delivered if e.kind == "experience_failure"}) == 2)
    finally:
        agg.stop()


def failures(url: str) -> list[str]:
    """Correlation ids of the failure events queued (one writer: one row each)."""
    async def read(db: store.Store) -> list[str]:
        async with db.read() as conn:
            rows = await conn.execute(sa.select(schema.outbox.c.payload)
                                      .where(schema.outbox.c.kind == "experience_failure"))
            return [json.loads(payload)["correlation_id"] for (payload,) in rows]

    return on_db(url, read)  # type: ignore[no-any-return]


def test_billable_record_from_1900_does_not_stop_the_collector(database_url: str) -> None:
    """A billable meter figure in a window of 1900 (planted in the database) cannot become a billable event (no
    UUIDv7 time before 1970): that event is set aside, its window and every later one are reported with their
    billable events; fixed by hand and retried, it is billed exactly once."""
    clock = FakeClock()
    agg = manual(database_url, clock, meters=[REQUESTS]).start()
    group = meters.group_key({"region": "eu"})
    try:
        agg.record("api_requests", dimensions={"region": "eu"})
        agg.track(ids(1)[0], ids(1)[0])
        agg.flush()

        async def plant_1900(conn: AsyncConnection) -> None:
            await conn.execute(sa.insert(schema.windows).values(window_start=W1900, window_end=W1900 + WINDOW))
            await conn.execute(sa.insert(schema.meter_values).values(
                window_start=W1900, meter="api_requests", group_key=group, late=False, quantity=7, records=7))

        plant(database_url, plant_1900)
        clock.past_window(T0)
        with capture_logs() as logs:
            written = agg.collect()
        assert sorted(by_window(written)) == [W1900, T0]  # the collector went on past the bad figure
        assert by_window(written)[T0].allowed_requests == 1
        assert billed(database_url) == [(T0, 1)]
        (item,) = held(database_url)
        assert (item["kind"], item["status"]) == ("billable", "held")
        assert item["reason"].startswith(f"InvalidInput: window_start={W1900} must be epoch seconds from 0")
        assert [e["kind"] for e in set_aside_logs(logs)] == ["billable"]
        assert quarantine_metric(agg, "billable") == 'aggregator_quarantined_items{kind="billable"} 1'

        # The fix: the operator bills the figure in the window after T0 (a valid time), and retries.
        payload = json.loads(item["payload"])
        payload.update(window_start=T0 + WINDOW, window_end=T0 + 2 * WINDOW)
        plant(database_url, lambda conn: conn.execute(
            sa.update(schema.quarantine).where(schema.quarantine.c.id == item["id"])
            .values(payload=json.dumps(payload))))
        retry(database_url, item["id"])
        agg.collect()
        agg.collect()
        assert billed(database_url) == [(T0, 1), (T0 + WINDOW, 7)]
        assert held(database_url) == []
    finally:
        agg.stop()


def billed(url: str) -> list[tuple[int, int]]:
    rows = on_db(url, lambda db: db.billable_events())
    return sorted((row["window_start"], json.loads(row["payload"])["quantity"]) for row in rows)


def test_window_whose_report_cannot_be_written_does_not_stop_later_windows(database_url: str) -> None:
    """Two windows whose reports cannot be written (one from before year 1, one that a stray report row edited in
    by hand blocks) are set aside; the windows after them are reported, exact; the stray row deleted and the
    window retried, it gets its one report, exact."""
    clock = FakeClock()
    agg = manual(database_url, clock).start()
    ancient = -(10**11 // WINDOW) * WINDOW
    try:
        for user in ids(2):
            agg.track(ids(1)[0], user, allowed=5)
        agg.flush()

        async def plant_windows(conn: AsyncConnection) -> None:
            await conn.execute(sa.insert(schema.windows).values(window_start=ancient, window_end=ancient + WINDOW))
            await conn.execute(sa.insert(schema.contributions).values(window_start=ancient, replica_id="old",
                                                                      allowed=1, ontime=True))
            await conn.execute(sa.insert(schema.reports).values(
                window_start=T0, window_end=T0 + WINDOW, unique_workspaces=0, unique_users=0, allowed_requests=0,
                denied_requests=0, replicas=0, late_allowed_requests=0, late_denied_requests=0,
                late_unique_workspaces=0, late_unique_users=0, generated_at=T0, generated_by="by hand"))

        plant(database_url, plant_windows)
        with capture_logs() as logs:
            clock.past_window(T0)
            assert agg.collect() == []
            agg.track(ids(1)[0], ids(3)[2], allowed=0, denied=2)
            clock.past_window(T0 + WINDOW)
            (later,) = agg.collect()
            agg.collect()
        assert (later.window_start.timestamp(), later.unique_users, later.denied_requests) == (T0 + WINDOW, 1, 2)
        items = {item["ref"]: item for item in held(database_url)}
        assert sorted(items) == sorted([str(ancient), str(T0)])
        assert {item["kind"] for item in items.values()} == {"window"}
        assert "out of range" in items[str(ancient)]["reason"]
        assert items[str(T0)]["reason"].startswith("StoreError: database")
        assert sorted(e["ref"] for e in set_aside_logs(logs)) == sorted(items)
        assert quarantine_metric(agg, "window") == 'aggregator_quarantined_items{kind="window"} 2'

        plant(database_url, lambda conn: conn.execute(
            sa.delete(schema.reports).where(schema.reports.c.generated_by == "by hand")))
        retry(database_url, items[str(T0)]["id"])
        (fixed,) = agg.collect()
        assert agg.collect() == []
        assert (fixed.window_start.timestamp(), fixed.unique_users, fixed.allowed_requests) == (T0, 2, 10)
        assert sorted(by_window(agg.reports())) == [T0, T0 + WINDOW]
        assert [item["ref"] for item in held(database_url)] == [str(ancient)]
    finally:
        agg.stop()


def test_outbox_item_that_cannot_be_rendered_does_not_block_the_writer(database_url: str) -> None:
    """An outbox item whose payload is not JSON (planted) is dead-lettered with the quarantine's reason at its first
    round, and the writer gets the reports queued after it; fixed by hand and retried, it is delivered once."""
    clock = FakeClock()
    sink = Scripted("primary")
    agg = manual(database_url, clock, writers=[sink], pseudonym_key=KEY, outbox={"poll_interval": "0.05s"}).start()
    try:
        planted = plant(database_url, lambda conn: conn.scalar(sa.insert(schema.outbox).values(
            writer="primary", event_id=uuid.uuid4(), kind="usage_report", schema_uri=REPORT_SCHEMA,
            occurred_at=T0, payload="{not json", status="pending", attempts=0, next_attempt_at=0, created_at=T0)
            .returning(schema.outbox.c.id)))
        with capture_logs() as logs:
            agg.track(ids(1)[0], ids(1)[0], allowed=3)
            clock.past_window(T0)
            (report,) = agg.collect()
            wait_for(lambda: len(sink.delivered) == 1)
        assert sink.delivered[0].data["allowed_requests"] == 3
        (item,) = held(database_url)
        assert (item["kind"], item["ref"]) == ("delivery", str(planted))
        assert item["reason"].startswith("JSONDecodeError: ")
        assert [e["ref"] for e in set_aside_logs(logs)] == [str(planted)]
        dead = on_db(database_url, lambda db: db.outbox_items(status="dead"))
        assert [(d["id"], d["last_error"]) for d in dead] == [(planted, f"quarantined: {item['reason']}")]
        agg.flush()  # reads the quarantine's counts
        assert quarantine_metric(agg, "delivery") == 'aggregator_quarantined_items{kind="delivery"} 1'

        fixed = json.dumps({**report.to_dict(), "allowed_requests": 42})
        plant(database_url, lambda conn: conn.execute(
            sa.update(schema.outbox).where(schema.outbox.c.id == planted).values(payload=fixed)))
        retry(database_url, item["id"])
        agg._deliverer.wake()  # type: ignore[union-attr]
        wait_for(lambda: len(sink.delivered) == 2)
        assert sink.delivered[1].data["allowed_requests"] == 42
        assert held(database_url) == []
    finally:
        agg.stop()
    assert len(sink.delivered) == 2


REPORT_SCHEMA = "iglu:dev.aggregator/usage_report/jsonschema/1-0-1"


def test_dead_lettered_and_quarantined_items_are_never_pruned_by_retention(database_url: str) -> None:
    """Retention run far in the future forgets delivered items and reported windows' data, but keeps dead outbox
    items, every quarantined item, and what a quarantined window or experience still needs to be retried."""
    far = T0 + 10 * 365 * 86400.0
    open_window = T0 + 3 * WINDOW
    cid = new_correlation_id()

    async def scenario(db: store.Store) -> dict[str, Any]:
        async with db.transaction() as conn:
            for status, delivered_at in (("dead", None), ("dead", None), ("delivered", T0 + 1.0)):
                await conn.execute(sa.insert(schema.outbox).values(
                    writer="primary", event_id=uuid.uuid4(), kind="usage_report", schema_uri=REPORT_SCHEMA,
                    occurred_at=T0, payload="{}", status=status, attempts=12, next_attempt_at=T0, created_at=T0,
                    delivered_at=delivered_at, last_error="collector answered 400" if status == "dead" else None))
            await conn.execute(sa.insert(schema.windows), [
                {"window_start": T0, "window_end": T0 + WINDOW, "closed_at": T0 + 70.0},
                {"window_start": open_window, "window_end": open_window + WINDOW, "closed_at": None}])
            await conn.execute(sa.insert(schema.contributions), [
                {"window_start": start, "replica_id": "r", "allowed": 1, "ontime": True}
                for start in (T0, open_window)])
            await conn.execute(sa.insert(schema.experiences).values(
                correlation_id=cid, experience_id="http_request", type="web", feature_category="source_code",
                urgency="sync_fast", status="open", first_seen_at=T0, deadline=T0 + 10, started_at=YEAR_ONE_PLUS_14,
                unknown_start=False, late_end=False))
        for kind, ref in (("flush", "w/1/0"), ("window", str(open_window)), ("experience", cid),
                          ("billable", "m/0/ontime/ab"), ("delivery", "1")):
            await db.set_aside(quarantine.Item(kind, ref, "ValueError: planted", {"planted": True}), now=T0)
        pruned = await db.prune(before=far, event_ids_before=far)
        delivered = await db.prune_outbox(before=far)
        async with db.read() as conn:
            contributions = sorted(s for (s,) in await conn.execute(sa.select(schema.contributions.c.window_start)))
        return {"pruned": pruned, "delivered": delivered, "contributions": contributions,
                "outbox": sorted(i["status"] for i in await db.outbox_items(status=None)),
                "quarantine": sorted(i["kind"] for i in await db.quarantined_items()),
                "experience": (await db.experience(cid) or {}).get("status")}

    assert on_db(database_url, scenario) == {
        "pruned": 0, "delivered": 1, "contributions": [open_window], "outbox": ["dead", "dead"],
        "quarantine": sorted(["flush", "window", "experience", "billable", "delivery"]), "experience": "open"}
