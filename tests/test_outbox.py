"""The outbox: reports queued in their own commit, delivered per writer with retries, dead-lettered, revived."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
import pytest
import sqlalchemy as sa

from aggregator import ConfigError, Report, iglu, outbox, schema, store, writers
from aggregator.writers import Envelope, Outcome
from tests.helpers import T0, FakeClock, ids, manual

KEY = "k" * 32


class Scripted(writers.Writer):
    """A writer double: answers each send() with the next scripted action, then "ok"; records what it got."""

    type = "scripted"

    def __init__(self, name: str = "primary", script: Sequence[str] = (), max_batch: int = 100) -> None:
        super().__init__(name)
        self.script = list(script)
        self.max_batch = max_batch
        self.delivered: list[Envelope] = []
        self.calls = 0

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Scripted:
        return cls(name, **options)

    async def send(self, batch: Sequence[Envelope]) -> list[Outcome]:
        self.calls += 1
        action = self.script.pop(0) if self.script else "ok"
        if action == "hang":
            await asyncio.sleep(3600)
        if action == "raise":
            raise RuntimeError("writer bug")
        if action == "retry":
            return [Outcome.retry("collector answered 503")] * len(batch)
        if action == "reject":
            return [Outcome.rejected("collector answered 400: bad event")] * len(batch)
        self.delivered.extend(batch)
        return [Outcome.delivered()] * len(batch)


def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def one_report(database_url: str, clock: FakeClock, **kwargs: Any) -> Any:
    """A started Aggregator (fake clock) that has written one report: 3 users, 5 requests."""
    agg = manual(database_url, clock, pseudonym_key=KEY, **kwargs).start()
    for user in ids(3):
        agg.track(ids(1)[0], user, allowed=1)
    agg.track(ids(1)[0], ids(1)[0], allowed=2)
    agg.flush()
    clock.past_window(T0)
    assert len(agg.collect()) == 1
    return agg


USAGE_REPORT_1_0_0 = "iglu:dev.aggregator/usage_report/jsonschema/1-0-0"


async def queue_before_and_after_upgrade(db: store.Store, writers: Sequence[str], now: float) -> None:
    """Two reports queued for ``writers``: window T0 as the version before replicas_missing queued it (schema
    1-0-0, a payload without the field, a row without the column), then window T0+60 by this version
    with replicas_missing=2 (through the store's own enqueue, as collect_window does)."""
    fields = {"unique_workspaces": 1, "unique_users": 3, "allowed_requests": 5, "denied_requests": 0, "replicas": 1,
              "late_allowed_requests": 0, "late_denied_requests": 0, "late_unique_workspaces": 0,
              "late_unique_users": 0, "generated_by": "collector-1"}
    async with db.transaction() as conn:
        old = {"window_start": T0, "window_end": T0 + 60, "generated_at": T0 + 70.0, **fields}
        old["id"] = (await conn.execute(sa.insert(schema.reports).values(**old)
                                        .returning(schema.reports.c.id))).scalar_one()
        payload = {k: v for k, v in Report.from_row({**old, "replicas_missing": 0}).to_dict().items()
                   if k != "replicas_missing"}
        await conn.execute(sa.insert(schema.outbox), [
            {"writer": writer, "event_id": outbox.store.outbox.event_id("usage_report", T0, writer),
             "kind": "usage_report", "schema_uri": USAGE_REPORT_1_0_0, "occurred_at": old["generated_at"],
             "payload": json.dumps(payload, sort_keys=True), "report_id": old["id"], "status": "pending",
             "attempts": 0, "next_attempt_at": now, "created_at": now} for writer in writers])
        new = {"window_start": T0 + 60, "window_end": T0 + 120, "generated_at": T0 + 130.0, "replicas_missing": 2,
               **fields}
        new["id"] = (await conn.execute(sa.insert(schema.reports).values(**new)
                                        .returning(schema.reports.c.id))).scalar_one()
        await db._enqueue_report(conn, new, writers, now)


async def items(url: str, **kwargs: Any) -> list[dict[str, Any]]:
    db = store.Store(url)
    try:
        return await db.outbox_items(**kwargs)
    finally:
        await db.close()


def test_report_is_delivered_once_per_writer_pseudonymized_with_a_stable_event_id(database_url: str) -> None:
    """Each configured writer gets the report exactly once; generated_by is the HMAC of the collector id;
    the event id is the same UUIDv5 any replica would compute for that report and writer."""
    clock = FakeClock()
    first, second = Scripted("first"), Scripted("second")
    agg = one_report(database_url, clock, writers=[first, second])
    try:
        wait_for(lambda: len(first.delivered) == 1 and len(second.delivered) == 1)
        (report,) = agg.reports()
    finally:
        agg.stop()
    envelope = first.delivered[0]
    expected = dict(report.to_dict(), generated_by=hmac.new(KEY.encode(), report.generated_by.encode(),
                                                             hashlib.sha256).hexdigest())
    assert "replicas_missing" in expected
    assert (envelope.kind, envelope.schema, dict(envelope.data), envelope.attempt) == (
        "usage_report", "iglu:dev.aggregator/usage_report/jsonschema/1-0-1", expected, 1)
    assert envelope.event_id == outbox.store.outbox.event_id("usage_report", T0, "first") != \
        second.delivered[0].event_id
    assert [(i["writer"], i["status"], i["attempts"]) for i in asyncio.run(items(database_url))] == [
        ("first", "delivered", 1), ("second", "delivered", 1)]


def test_failing_writer_retries_with_backoff_and_never_delays_another(database_url: str) -> None:
    """A writer that hangs does not hold back a healthy one; a writer that fails is retried after a jittered,
    doubling delay, and delivers once it recovers."""
    clock = FakeClock()
    hanging, flaky, healthy = Scripted("hanging", ["hang"]), Scripted("flaky", ["retry", "raise"]), Scripted("ok")
    agg = one_report(database_url, clock, writers=[hanging, flaky, healthy],
                     outbox={"backoff_initial": "10s", "backoff_max": "1h"})
    try:
        wait_for(lambda: len(healthy.delivered) == 1 and flaky.calls == 1)
        wait_for(lambda: asyncio.run(items(database_url, writer="flaky"))[0]["attempts"] == 1)
        (row,) = asyncio.run(items(database_url, writer="flaky"))
        assert (row["status"], row["last_error"]) == ("pending", "collector answered 503")
        assert clock.t + 5 <= row["next_attempt_at"] <= clock.t + 10  # 50-100% of the first delay
        clock.t += 10
        agg._deliverer.wake()  # type: ignore[union-attr]
        wait_for(lambda: flaky.calls == 2)
        wait_for(lambda: asyncio.run(items(database_url, writer="flaky"))[0]["attempts"] == 2)
        (row,) = asyncio.run(items(database_url, writer="flaky"))
        assert "RuntimeError: writer bug" in row["last_error"]
        assert clock.t + 10 <= row["next_attempt_at"] <= clock.t + 20  # doubled
        clock.t += 20
        agg._deliverer.wake()  # type: ignore[union-attr]
        wait_for(lambda: len(flaky.delivered) == 1)
        assert hanging.delivered == []
    finally:
        agg.stop()  # the hanging writer's round is cut at drain_timeout


def test_exhausted_and_rejected_items_go_to_dead_letter_and_can_be_retried(database_url: str) -> None:
    """A rejected item is dead at once; one that keeps failing is dead after max_attempts, with its last error;
    retry_outbox makes them pending again, and they are delivered."""
    clock = FakeClock()
    rejecting, failing = Scripted("rejecting", ["reject"]), Scripted("failing", ["retry", "retry"])
    agg = one_report(database_url, clock, writers=[rejecting, failing],
                     outbox={"max_attempts": 2, "backoff_initial": "1s"})
    try:
        wait_for(lambda: failing.calls == 1 and rejecting.calls == 1)
        clock.t += 2
        agg._deliverer.wake()  # type: ignore[union-attr]
        wait_for(lambda: all(i["status"] == "dead" for i in asyncio.run(items(database_url))))
        dead = asyncio.run(items(database_url, status="dead"))
        assert [(i["writer"], i["attempts"], i["last_error"]) for i in dead] == [
            ("rejecting", 1, "collector answered 400: bad event"), ("failing", 2, "collector answered 503")]

        async def revive() -> int:
            db = store.Store(database_url)
            try:
                return await db.retry_outbox(now=clock.t, writer="failing")
            finally:
                await db.close()

        assert asyncio.run(revive()) == 1
        agg._deliverer.wake()  # type: ignore[union-attr]
        wait_for(lambda: len(failing.delivered) == 1)
        assert rejecting.delivered == []
    finally:
        agg.stop()


async def test_two_replicas_delivering_share_items_without_duplicates(database_url: str) -> None:
    """Delivery loops of several replicas lease disjoint items: with no faults, each item goes out once."""
    clock = FakeClock(T0 + 9999)
    db = store.Store(database_url)
    try:
        for n in range(40):  # 40 reports queued for one writer
            await db.apply_batch(  # a window must exist to be collected; flushing one event opens it
                store.Batch(seq=n + 1, windows={T0 + 60 * n: store.BatchWindow([1], [1], 1, 0)}, events=1),
                writer_id=uuid.UUID(int=7), replica_id="r", window=60, now=T0 + 60 * n + 1)
        for n in range(40):
            assert await db.collect_window(T0 + 60 * n, collector_id="c", now=T0 + 9999, writers=["w"])
        sinks = [Scripted("w", max_batch=3) for _ in range(3)]
        loops = [outbox.Deliverer(db, [sink], outbox.privacy.Pseudonymizer(KEY), claimer=f"replica-{k}", clock=clock)
                 for k, sink in enumerate(sinks)]

        async def drain(deliverer: outbox.Deliverer) -> None:
            # A pause between batches gives the others their turn on SQLite too, whose writers take turns.
            while await deliverer.deliver_once(deliverer.writers[0]):
                await asyncio.sleep(0.01)

        await asyncio.gather(*(drain(d) for d in loops))
        got = [e.event_id for sink in sinks for e in sink.delivered]
        assert (len(got), len(set(got))) == (40, 40)
        assert sum(1 for sink in sinks if sink.delivered) >= 2  # they did share the work, on both backends
    finally:
        await db.close()


async def test_a_lease_left_by_a_dead_deliverer_expires_and_another_delivers(database_url: str) -> None:
    """A loop that leased items and died before settling them holds them only until its lease ends."""
    clock = FakeClock(T0 + 9999)
    db = store.Store(database_url)
    try:
        await db.apply_batch(store.Batch(seq=1, windows={T0: store.BatchWindow([1], [1], 1, 0)}, events=1),
                             writer_id=uuid.UUID(int=8), replica_id="r", window=60, now=T0 + 1)
        assert await db.collect_window(T0, collector_id="c", now=clock.t, writers=["w"])
        dead = outbox.Deliverer(db, [Scripted("w", ["hang"])], outbox.privacy.Pseudonymizer(KEY), claimer="dead",
                                lease=60, clock=clock)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(dead.deliver_once(dead.writers[0]), 0.2)  # dies mid-send
        survivor_sink = Scripted("w")
        survivor = outbox.Deliverer(db, [survivor_sink], outbox.privacy.Pseudonymizer(KEY), claimer="alive",
                                    clock=clock)
        assert await survivor.deliver_once(survivor_sink) == 0  # still leased
        clock.t += 61
        assert await survivor.deliver_once(survivor_sink) == 1
        assert [i["status"] for i in await db.outbox_items()] == ["delivered"]
    finally:
        await db.close()


def test_writers_without_a_key_refuse_to_start_unless_the_field_is_allowlisted(database_url: str,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """No pseudonym key: a writer would send generated_by (and a timed-out journey's correlation_id) in clear,
    so start() refuses and names the fix; with them on the allowlist it starts and sends the collector id as
    it is."""
    monkeypatch.delenv("AGGREGATOR_PSEUDONYM_KEY", raising=False)
    agg = manual(database_url, FakeClock(), writers=[Scripted()])
    with pytest.raises(ConfigError, match="correlation_id, generated_by.*AGGREGATOR_PSEUDONYM_KEY.*allowlist"):
        agg.start()
    clock = FakeClock()
    sink = Scripted()
    agg = manual(database_url, clock, writers=[sink], pseudonym_allowlist=["generated_by", "correlation_id"]).start()
    try:
        agg.track(ids(1)[0], ids(1)[0])
        agg.flush()
        clock.past_window(T0)
        agg.collect()
        wait_for(lambda: len(sink.delivered) == 1)
        assert sink.delivered[0].data["generated_by"] == agg.replica_id
    finally:
        agg.stop()


def test_stop_delivers_what_is_due(database_url: str) -> None:
    """Items still queued when stop() is called are delivered before it returns (within drain_timeout)."""
    clock = FakeClock()
    sink = Scripted(script=["retry"])
    agg = one_report(database_url, clock, writers=[sink], outbox={"backoff_initial": "1s", "poll_interval": "1h"})
    wait_for(lambda: sink.calls == 1)
    clock.t += 2  # due again, but the loop sleeps for an hour
    agg.stop()
    assert len(sink.delivered) == 1
    assert [i["status"] for i in asyncio.run(items(database_url))] == ["delivered"]


def test_reports_and_their_outbox_items_are_written_together(database_url: str) -> None:
    """Every report has exactly one item per writer, whichever of several collectors wrote it."""
    clock = FakeClock()
    aggs = [manual(database_url, clock, pseudonym_key=KEY, writers={"a": {}, "b": {}}) for _ in range(3)]
    for agg in aggs:
        agg.start()
    try:
        for n, agg in enumerate(aggs):
            agg.track(ids(1)[0], ids(1, n)[0], at=T0 + 60 * n + 1)
            agg.flush()
        clock.t = T0 + 60 * 3 + 10
        reports: list[Report] = [r for agg in aggs for r in agg.collect()]
    finally:
        for agg in aggs:
            agg.stop()
    rows = asyncio.run(items(database_url))
    assert sorted((r["report_id"], r["writer"]) for r in rows) == sorted(
        (r.id, w) for r in reports for w in ("a", "b"))


async def test_an_item_queued_before_the_upgrade_keeps_its_schema_and_payload(database_url: str) -> None:
    """An item queued as usage_report 1-0-0 is delivered as it was queued: schema 1-0-0, no replicas_missing;
    a report queued now goes as 1-0-1 with replicas_missing. Each is valid under its own schema."""
    clock = FakeClock(T0 + 1000)
    db = store.Store(database_url)
    writer = Scripted("primary")
    try:
        await queue_before_and_after_upgrade(db, ["primary"], clock.t)
        deliverer = outbox.Deliverer(db, [writer], outbox.privacy.Pseudonymizer(KEY), claimer="me", clock=clock)
        assert await deliverer.deliver_once(writer) == 2
        delivered = [("delivered", 1)] * 2
        assert delivered == [(i["status"], i["attempts"]) for i in await db.outbox_items()]
    finally:
        await db.close()
    sent = [(e.schema, e.data["window_start"], e.data.get("replicas_missing")) for e in writer.delivered]
    expected = [(USAGE_REPORT_1_0_0, "2027-01-15T08:00:00Z", None),
                ("iglu:dev.aggregator/usage_report/jsonschema/1-0-1", "2027-01-15T08:01:00Z", 2)]
    assert expected == sent
    for envelope in writer.delivered:
        jsonschema.Draft4Validator(iglu.load(envelope.schema)).validate(dict(envelope.data))
    assert len(writer.delivered[0].data["generated_by"]) == 64  # pseudonymized like any other item


@pytest.fixture(autouse=True)
def _scripted_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let writer tables name the test double (``{"a": {}}`` builds Scripted("a"))."""
    monkeypatch.setitem(writers.TYPES, "a", f"{__name__}:Scripted")
    monkeypatch.setitem(writers.TYPES, "b", f"{__name__}:Scripted")
