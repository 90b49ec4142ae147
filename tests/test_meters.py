"""Declared meters: exact across replicas, deduplicated by event id, capped, late-aware, billable."""

from __future__ import annotations

import asyncio
import decimal
import math
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from aggregator import Aggregator, InvalidInput, InvalidType, metrics, privacy, store
from tests.helpers import T0, WINDOW, FakeClock, manual
from tests.test_outbox import KEY, Scripted, wait_for

METERS: dict[str, dict[str, Any]] = {
    "compute_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 3, "field": "duration",
                        "dimensions": ["project_id", "namespace_id"], "billable": True,
                        "event_type": "ci_minutes"},
    "jobs": {"aggregation": "count", "unit": "jobs", "dimensions": ["project_id"]},
    "active_users": {"aggregation": "distinct", "field": "user_id", "unit": "users", "dimensions": ["project_id"]},
}


def metered(url: str, clock: FakeClock, **kwargs: Any) -> Aggregator:
    kwargs.setdefault("meters", METERS)
    return manual(url, clock, **kwargs)


def results(agg: Aggregator, meter: str) -> dict[tuple[str, ...], tuple[decimal.Decimal, bool]]:
    return {tuple(r.dimensions.values()) or ("__overflow__",): (r.quantity, r.late)
            for r in agg.meter_results(meter=meter)}


def test_results_are_exact_across_replicas_per_meter_and_group(database_url: str) -> None:
    """Three replicas record into the same groups: sums are exact to the millisecond, counts add up, and a
    user seen on two replicas counts once."""
    clock = FakeClock()
    replicas = [metered(database_url, clock).start() for _ in range(3)]
    truth = {"p1": decimal.Decimal(0), "p2": decimal.Decimal(0)}
    try:
        for n, agg in enumerate(replicas):
            for k in range(50):
                project = "p1" if k % 3 else "p2"
                seconds = decimal.Decimal(k) / 7  # many decimals: rounded to the millisecond per record
                agg.record("compute_seconds", float(seconds), {"project_id": project, "namespace_id": "ns"})
                truth[project] += decimal.Decimal(str(float(seconds))).quantize(decimal.Decimal("0.001"))
                agg.record("jobs", dimensions={"project_id": project})
                agg.record("active_users", f"user-{(k + n) % 10}", {"project_id": project})
            agg.flush()
        clock.past_window(T0)
        for agg in replicas[1:]:  # their scheduled flushes: the watermarks pass the window's end
            agg.flush()
        replicas[0].collect()
        compute = results(replicas[0], "compute_seconds")
        assert compute == {("p1", "ns"): (truth["p1"], False), ("p2", "ns"): (truth["p2"], False)}
        assert results(replicas[0], "jobs") == {("p1",): (99, False), ("p2",): (51, False)}
        (report,) = replicas[0].reports()
        assert report.replicas == 3  # replicas that only recorded meters contributed to the window too
        users_p2 = {f"user-{(k + n) % 10}" for n in range(3) for k in range(50) if k % 3 == 0}
        users_p1 = {f"user-{(k + n) % 10}" for n in range(3) for k in range(50) if k % 3}
        assert results(replicas[0], "active_users") == {("p1",): (len(users_p1), False),
                                                        ("p2",): (len(users_p2), False)}
    finally:
        for agg in replicas:
            agg.stop()


def test_an_event_id_counts_once_across_replicas_and_restarts(database_url: str) -> None:
    """A retried record (same meter and event id) is ignored whether the retry reaches the same replica, another
    one, or a restarted process; the same id on another meter is another record."""
    clock = FakeClock()
    first, second = metered(database_url, clock).start(), metered(database_url, clock).start()
    job = str(uuid.uuid4())
    dims = {"project_id": "p1", "namespace_id": "ns"}
    try:
        first.record("compute_seconds", 60, dims, event_id=job)
        first.record("compute_seconds", 60, dims, event_id=job)  # same batch
        first.flush()
        second.record("compute_seconds", 60, dims, event_id=job)  # another replica
        second.record("jobs", dimensions={"project_id": "p1"}, event_id=job)  # another meter
        second.flush()
    finally:
        first.stop()
        second.stop()
    with metered(database_url, clock) as restarted:
        restarted.record("compute_seconds", 60, dims, event_id=job)
        restarted.flush()
        clock.past_window(T0)
        restarted.collect()
        assert results(restarted, "compute_seconds") == {("p1", "ns"): (60, False)}
        assert results(restarted, "jobs") == {("p1",): (1, False)}


def test_groups_beyond_max_groups_go_to_overflow_across_replicas(database_url: str) -> None:
    """max_groups=2 holds for the window whichever replica adds the groups; the rest is counted under
    __overflow__ (nothing dropped) and reported in status and logs."""
    clock = FakeClock()
    capped = {"jobs": {"aggregation": "count", "unit": "jobs", "dimensions": ["project_id"], "max_groups": 2}}
    a, b = metered(database_url, clock, meters=capped).start(), metered(database_url, clock, meters=capped).start()
    try:
        a.record("jobs", dimensions={"project_id": "p1"})
        a.flush()
        for project in ("p1", "p2", "p3", "p4"):
            b.record("jobs", dimensions={"project_id": project})
        b.record("jobs", dimensions={"project_id": "p4"})
        b.flush()
        clock.past_window(T0)
        b.flush()
        a.collect()
        assert results(a, "jobs") == {("p1",): (2, False), ("p2",): (1, False), ("__overflow__",): (3, False)}
        assert b.status()["flush"].meter_overflow == 3
        text = metrics.render(b.status(), metrics.Counters(), None, b._call(b.aoverflow))
        assert 'aggregator_meter_overflow_records{meter="jobs"} 3\n' in text
        assert "aggregator_meter_overflow_flushed_total 3\n" in text
    finally:
        a.stop()
        b.stop()


def test_late_records_are_counted_in_the_open_window(database_url: str) -> None:
    """A record for a reported window is counted, flagged late, in the window open when it arrives; a late
    distinct value counts only if it is new to its own window."""
    clock = FakeClock()
    with metered(database_url, clock) as agg:
        agg.record("active_users", "u1", {"project_id": "p1"})
        agg.flush()
        clock.past_window(T0)
        agg.collect()
        agg.record("active_users", "u1", {"project_id": "p1"}, at=T0 + 1)  # not new to its window
        agg.record("active_users", "u2", {"project_id": "p1"}, at=T0 + 2)  # new
        agg.record("jobs", dimensions={"project_id": "p1"}, at=T0 + 3)
        agg.flush()
        clock.past_window(T0 + WINDOW)
        agg.collect()
        late = [(r.meter, r.quantity) for r in agg.meter_results() if r.late]
        assert late == [("active_users", 1), ("jobs", 1)]
        assert {r.window_start.timestamp() for r in agg.meter_results() if r.late} == {T0 + WINDOW}


def test_billable_events_carry_the_fields_and_keep_their_id_across_redelivery(database_url: str) -> None:
    """One event per billable group with quantity > 0, with a stable UUIDv7 (the same on redelivery), the
    unit, realm, timestamp and the project/namespace fields (pseudonymized); zero groups emit nothing."""
    clock = FakeClock()
    sink = Scripted("billing", ["retry"])
    agg = metered(database_url, clock, writers=[sink], pseudonym_key=KEY, billing_realm="SM",
                  billing_instance_id="instance-7", outbox={"backoff_initial": "1s"}).start()
    try:
        agg.record("compute_seconds", 90.5, {"project_id": "p1", "namespace_id": "n1"})
        agg.record("compute_seconds", 0, {"project_id": "p2", "namespace_id": "n1"})  # zero: no event
        agg.flush()
        clock.past_window(T0)
        agg.collect()
        wait_for(lambda: sink.calls == 1)
        clock.t += 2
        agg._deliverer.wake()  # type: ignore[union-attr]
        wait_for(lambda: len([e for e in sink.delivered if e.kind == "billable_usage"]) == 1)
    finally:
        agg.stop()
    (event,) = [e for e in sink.delivered if e.kind == "billable_usage"]

    async def stored() -> list[dict[str, Any]]:
        db = store.Store(database_url)
        try:
            return await db.billable_events()
        finally:
            await db.close()

    (row,) = asyncio.run(stored())
    # What leaves is the stored id keyed (privacy.Pseudonymizer.event_id), in the envelope and the event alike.
    assert event.event_id == uuid.UUID(event.data["event_id"]) == privacy.Pseudonymizer(KEY).event_id(
        "billable_usage", row["event_id"]) != row["event_id"]
    assert event.event_id.version == 7
    data = dict(event.data)
    assert (data["event_type"], data["unit_of_measure"], data["realm"], data["quantity"]) == (
        "ci_minutes", "seconds", "SM", 90.5)
    assert data["timestamp"] == "2027-01-15T08:01:00Z"
    assert len(data["project_id"]) == len(data["namespace_id"]) == len(data["instance_id"]) == 64  # hashed


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda a: a.record("nope", 1), InvalidInput, "no such meter"),
    (lambda a: a.record("unique_users", 1), InvalidInput, "built-in meter; track"),
    (lambda a: a.record("jobs", dimensions={}), InvalidInput, "missing \\['project_id'\\]"),
    (lambda a: a.record("jobs", dimensions={"project_id": "p", "x": "y"}), InvalidInput, "unexpected \\['x'\\]"),
    (lambda a: a.record("compute_seconds", -1, {"project_id": "p", "namespace_id": "n"}), InvalidInput, ">= 0"),
    (lambda a: a.record("compute_seconds", math.nan, {"project_id": "p", "namespace_id": "n"}), InvalidInput,
     "finite"),
    (lambda a: a.record("compute_seconds", math.inf, {"project_id": "p", "namespace_id": "n"}), InvalidInput,
     "finite"),
    (lambda a: a.record("compute_seconds", True, {"project_id": "p", "namespace_id": "n"}), InvalidType, "bool"),
    (lambda a: a.record("jobs", 5, {"project_id": "p"}), InvalidInput, "omit value"),
    (lambda a: a.record("jobs", dimensions={"project_id": 1.5}), InvalidType, "float"),
    (lambda a: a.record("jobs", dimensions={"project_id": "p"}, event_id=""), InvalidInput, "event_id"),
])
def test_bad_records_raise_and_record_nothing(sqlite_url: str, call: Any, error: type, message: str) -> None:
    """Each bad record raises a clear error and leaves nothing pending."""
    agg = metered(sqlite_url, FakeClock())
    with pytest.raises(error, match=message):
        call(agg)
    assert agg._recorder.pending() == 0


def test_meter_declarations_are_validated_naming_the_key() -> None:
    """A bad meter table fails when the Aggregator is built, naming meters.NAME.KEY."""
    from aggregator import ConfigError

    with pytest.raises(ConfigError, match="meters.m.aggregation='avg'"):
        Aggregator(database_url="sqlite:///x.db", meters={"m": {"aggregation": "avg", "unit": "s"}})
    with pytest.raises(ConfigError, match="meters.m.field=None: a distinct meter names the field"):
        Aggregator(database_url="sqlite:///x.db", meters={"m": {"aggregation": "distinct"}})
    with pytest.raises(ConfigError, match="built in"):
        Aggregator(database_url="sqlite:///x.db", meters={"unique_users": {"aggregation": "count"}})
    with pytest.raises(ConfigError, match="meter_dedup_horizon='1h' must be at least a day"):
        Aggregator(database_url="sqlite:///x.db", meter_dedup_horizon="1h")


def test_a_replica_declaring_a_meter_with_other_units_is_refused(database_url: str) -> None:
    """Sums are stored in the meter's units: a replica with other decimals (or aggregation) would mix them,
    so it is refused at start, naming both declarations and the way out."""
    with metered(database_url, FakeClock()):
        pass
    changed = dict(METERS, compute_seconds=dict(METERS["compute_seconds"], decimals=0))
    agg = metered(database_url, FakeClock(), meters=changed)
    from aggregator import ConfigError

    with pytest.raises(ConfigError, match="decimals=0 differ from aggregation='sum', decimals=3.*new name"):
        agg.start()


def test_the_boundary_usage_numbers_are_the_built_in_meters(sqlite_url: str) -> None:
    """Without declarations the meters are the four boundary-usage numbers; track() and reports are as before."""
    agg = manual(sqlite_url, FakeClock())
    assert [m.name for m in agg.meters()] == ["unique_workspaces", "unique_users", "allowed_requests",
                                              "denied_requests"]
    assert all(m.builtin for m in agg.meters())


@pytest.mark.parametrize("empty_database_url", ["sqlite", "postgresql"], indirect=True)
async def test_migration_from_the_previous_schema_keeps_every_report(empty_database_url: str) -> None:
    """A database at the core schema of #2 (0001), with windows and reports written by that schema, is upgraded
    through every migration since: every report is unchanged, and meters work on it."""
    from aggregator import migrate

    url = empty_database_url
    await migrate.upgrade_url(url, revision="0001")
    db = store.Store(url)
    try:
        async with db.transaction() as conn:  # what the 0001 code wrote: windows and their reports
            for n in range(3):
                await conn.execute(sa.text(
                    "INSERT INTO windows (window_start, window_end, closed_at) VALUES (:s, :e, :c)"),
                    {"s": T0 + 60 * n, "e": T0 + 60 * n + 60, "c": T0 + 999.0})
                await conn.execute(sa.text(
                    "INSERT INTO reports (window_start, window_end, unique_workspaces, unique_users, allowed_requests,"
                    " denied_requests, replicas, late_allowed_requests, late_denied_requests, late_unique_workspaces,"
                    " late_unique_users, generated_at, generated_by) VALUES (:s, :e, 1, :u, :a, 0, 1, 0, 0, 0, 0,"
                    " :g, 'old-collector')"), {"s": T0 + 60 * n, "e": T0 + 60 * n + 60, "u": n + 1, "a": 10 * n,
                                               "g": T0 + 999.0})
        async with db.read() as conn:  # every column the 0001 schema has, as that code read them
            before = [dict(row._mapping) for row in await conn.execute(
                sa.text("SELECT * FROM reports ORDER BY window_start"))]
    finally:
        await db.close()
    assert await migrate.upgrade_url(url) == ("0001", migrate.head_revision())
    db = store.Store(url)
    try:
        after = await db.reports()
        assert [r.pop("replicas_missing") for r in after] == [0] * len(before)  # the collector then assumed all
        assert after == before
    finally:
        await db.close()
    clock = FakeClock(T0 + 60 * 3 + 1)
    async with metered(url, clock) as agg:
        agg.record("jobs", dimensions={"project_id": "p"})
        await agg.aflush()
        clock.past_window(T0 + 180)
        await agg.acollect()
        assert [r.id for r in await agg.areports()][:3] == [r["id"] for r in before]


def test_a_meter_batch_retried_after_a_database_error_counts_once(database_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush whose transaction fails after the meter records were applied is rolled back and retried with the
    same batch: identified and plain records of one group still count once each."""
    import sqlalchemy as sa

    from aggregator import StoreUnavailable
    from aggregator.store.meters import MeterQueries

    original = MeterQueries._admit_groups
    failures = iter([True])

    async def failing(self: Any, *args: Any, **kwargs: Any) -> int:
        result = await original(self, *args, **kwargs)
        if next(failures, False):
            raise sa.exc.OperationalError("UPDATE ...", {}, ConnectionResetError("connection reset by peer"))
        return result

    monkeypatch.setattr(MeterQueries, "_admit_groups", failing)
    clock = FakeClock()
    dims = {"project_id": "p1", "namespace_id": "ns"}
    with metered(database_url, clock) as agg:
        agg.record("compute_seconds", 10, dims)
        agg.record("compute_seconds", 5, dims, event_id="job-1")
        with pytest.raises(StoreUnavailable, match="connection reset"):
            agg.flush()
        agg.flush()
        clock.past_window(T0)
        agg.collect()
        assert results(agg, "compute_seconds") == {("p1", "ns"): (15, False)}
