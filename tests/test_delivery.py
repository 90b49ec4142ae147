"""Reports through the outbox to a (fake, validating) Snowplow collector over real HTTP, faults included."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from typing import Any

import sqlalchemy as sa

from aggregator import Aggregator, schema, store
from aggregator.store.outbox import event_id
from tests.fakes.snowplow import FakeCollector
from tests.helpers import T0, FakeClock, ids, manual
from tests.test_outbox import KEY, USAGE_REPORT_1_0_0, items, queue_before_and_after_upgrade, wait_for

WINDOWS = 6


def snowplow(collector: FakeCollector, **options: Any) -> dict[str, dict[str, Any]]:
    return {"snowplow": {"collector": collector.url, "timeout": "0.3s", "batch_size": 2, **options}}


def reports_in_windows(agg: Aggregator, clock: FakeClock, n: int) -> None:
    """Track into ``n`` consecutive windows, then collect them all: ``n`` reports queued."""
    for k in range(n):
        agg.track(ids(1)[0], ids(1, k)[0], at=T0 + 60 * k + 1)
    agg.flush()
    clock.t = T0 + 60 * n + 10
    assert len(agg.collect()) == n


def keep_retrying(agg: Aggregator, clock: FakeClock, done: Any, timeout: float = 20.0) -> None:
    """Move the fake clock past every backoff and wake delivery until ``done()``."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "delivery did not finish in time"
        clock.t += 700  # beyond the longest backoff
        agg._deliverer.wake()  # type: ignore[union-attr]
        time.sleep(0.05)


def expected_ids(n: int) -> set[str]:
    return {str(event_id("usage_report", T0 + 60 * k, "snowplow")) for k in range(n)}


def test_every_report_arrives_after_faults_clear(database_url: str) -> None:
    """500, 429, a dropped connection, a timeout and a 413 in a row: once they clear, the collector's good list
    holds every report (duplicates only by event id, from the timed-out request), all valid."""
    clock = FakeClock()
    with FakeCollector() as collector:
        collector.fail(500)
        collector.fail(429, retry_after=1)
        collector.drop()
        collector.stall(1.0)  # longer than the 0.3 s timeout
        collector.fail(408)
        agg = manual(database_url, clock, pseudonym_key=KEY, writers=snowplow(collector)).start()
        try:
            reports_in_windows(agg, clock, WINDOWS)
            keep_retrying(agg, clock, lambda: set(collector.good_ids()) >= expected_ids(WINDOWS))
            wait_for(lambda: all(i["status"] == "delivered" for i in asyncio.run(items(database_url))))
        finally:
            agg.stop()
        assert set(collector.good_ids()) == expected_ids(WINDOWS)
        assert collector.invalid == []
        users = sorted(event["data"]["unique_users"] for event in collector.good)
        assert set(users) == {1}
        assert all(len(event["data"]["generated_by"]) == 64 for event in collector.good)  # hashed


def test_a_400_is_dead_lettered_with_the_response(database_url: str) -> None:
    """A 400 is not retried: the items of that POST are dead with the status and body; the rest arrive."""
    clock = FakeClock()
    with FakeCollector() as collector:
        collector.fail(400, body="schema violation: unknown field")
        agg = manual(database_url, clock, pseudonym_key=KEY, writers=snowplow(collector)).start()
        try:
            reports_in_windows(agg, clock, 4)
            wait_for(lambda: len(collector.good_ids()) == 2)
            wait_for(lambda: {i["status"] for i in asyncio.run(items(database_url))} == {"dead", "delivered"})
        finally:
            agg.stop()
        dead = asyncio.run(items(database_url, status="dead"))
        assert len(dead) == 2
        assert all("400" in row["last_error"] and "schema violation" in row["last_error"] for row in dead)
        assert collector.requests == 2  # one refused POST of two items, one accepted; no retry of the first


async def test_memory_stays_bounded_while_the_collector_is_down(database_url: str) -> None:
    """With 2,000 reports queued and nothing listening, each round leases one batch: traced memory of 30
    rounds stays far below what holding the queue would take, and every item is still pending after."""
    from aggregator import outbox, writers

    clock = FakeClock(T0 + 10**6)
    db = store.Store(database_url)
    try:
        report = {"id": 1, "window_start": T0, "window_end": T0 + 60, "unique_workspaces": 1, "unique_users": 1,
                  "allowed_requests": 1, "denied_requests": 0, "replicas": 1, "replicas_missing": 0,
                  "late_allowed_requests": 0,
                  "late_denied_requests": 0, "late_unique_workspaces": 0, "late_unique_users": 0,
                  "generated_at": T0 + 70, "generated_by": "c"}
        async with db.transaction() as conn:  # 2,000 queued items, inserted the way collect_window does
            await conn.execute(sa.insert(schema.reports), report)
            for n in range(2000):
                await db._enqueue_report(conn, dict(report, window_start=T0 + 60 * n), ["snowplow"], clock.t)
        with FakeCollector() as down:
            url = down.url  # stopped at once: connections are refused
        writer = writers.build("snowplow", {"collector": url, "timeout": "0.3s", "batch_size": 50})
        deliverer = outbox.Deliverer(db, [writer], outbox.privacy.Pseudonymizer(KEY), claimer="me", clock=clock,
                                     policy=outbox.RetryPolicy(max_attempts=1000))
        await writer.open()
        try:
            await deliverer.deliver_once(writer)  # warm up imports and caches
            tracemalloc.start()
            for _ in range(30):
                clock.t += 10**4
                assert await deliverer.deliver_once(writer) == 50
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        finally:
            await writer.close()
        assert peak < 2_000_000, f"{peak:,} bytes traced"
        summary = {(row["status"]): row["items"] for row in await db.outbox_summary()}
        assert summary == {"pending": 2000}
    finally:
        await db.close()


def test_stop_drains_queued_reports_to_the_collector(database_url: str) -> None:
    """Reports queued while delivery is asleep (no wake-up, an hour's poll) reach the collector during stop()."""
    clock = FakeClock()
    with FakeCollector() as collector:
        agg = manual(database_url, clock, pseudonym_key=KEY, writers=snowplow(collector, batch_size=50),
                     outbox={"poll_interval": "1h"}).start()
        agg._collector._on_written = None  # type: ignore[union-attr]  # no wake-up after collect
        reports_in_windows(agg, clock, 3)
        time.sleep(0.3)
        assert collector.good_ids() == []
        agg.stop()
        assert set(collector.good_ids()) == expected_ids(3)


async def test_an_item_queued_as_1_0_0_before_the_upgrade_reaches_the_collector_valid(database_url: str) -> None:
    """Across the upgrade to usage_report 1-0-1: the item queued as 1-0-0 and the new 1-0-1 one both pass the
    collector's validation (each against its own schema) and are delivered; nothing is dead-lettered."""
    from aggregator import outbox, writers

    clock = FakeClock(T0 + 1000)
    db = store.Store(database_url)
    try:
        await queue_before_and_after_upgrade(db, ["snowplow"], clock.t)
        with FakeCollector() as collector:
            writer = writers.build("snowplow", {"collector": collector.url, "timeout": "5s"})
            deliverer = outbox.Deliverer(db, [writer], outbox.privacy.Pseudonymizer(KEY), claimer="me", clock=clock)
            await writer.open()
            try:
                assert await deliverer.deliver_once(writer) == 2
            finally:
                await writer.close()
        delivered = ["delivered", "delivered"]
        assert delivered == [i["status"] for i in await db.outbox_items()]
    finally:
        await db.close()
    assert collector.invalid == []
    expected = [(USAGE_REPORT_1_0_0, None), ("iglu:dev.aggregator/usage_report/jsonschema/1-0-1", 2)]
    assert expected == [(e["schema"], e["data"].get("replicas_missing")) for e in collector.good]
