"""Watermarks and leases: when the collector may close a window, and whom it gives up on to do so.

In-process and fast (but for the clock-skew scenario), on SQLite and PostgreSQL. Replicas share a
FakeClock unless a test gives one its own; leases are judged on the database's clock, so the tests
that exercise them wait real (short) time.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from aggregator import Aggregator, Report, StoreUnavailable
from aggregator.client import new_correlation_id
from tests.faults import TcpProxy, wait_for
from tests.helpers import T0, WINDOW, FakeClock, by_window, ids, manual, total_requests

WS, USERS = ids(5), ids(50, offset=1000)
# Engine bug (aggregator/collector.py, Collector.due_windows): `overdue = now - end > self.max_delay` is not
# subject to `may_give_up` (the collector's own unbroken contact for a lease), so after an outage longer than
# max_collect_delay the first collector back closes every window that ended before it at once, before the
# other replicas (or its own replica: the scheduled collect does not flush first) have replayed what they
# queued during the outage: their data lands late and the reports count them missing.
METERS: dict[str, dict[str, Any]] = {
    "jobs": {"aggregation": "count", "unit": "jobs", "dimensions": ["project_id"]},
    "build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 3, "dimensions": ["project_id"]},
}


def figures(report: Report) -> tuple[int, ...]:
    """A report's on-time figures and completeness, in one comparable tuple."""
    return (report.unique_workspaces, report.unique_users, report.allowed_requests, report.denied_requests,
            report.replicas, report.replicas_missing)


def late(report: Report) -> tuple[int, ...]:
    return (report.late_allowed_requests, report.late_denied_requests, report.late_unique_workspaces,
            report.late_unique_users)


def collect_until_reported(collector: Aggregator, timeout: float) -> tuple[list[Report], float]:
    """Run the collector every 50 ms until it writes a report; returns them and when (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        written = collector.collect()
        if written:
            return written, time.monotonic()
        assert time.monotonic() < deadline, f"no report within {timeout}s"
        time.sleep(0.05)


# ---- a. b. live and stopped replicas -----------------------------------------------------------


def test_a_live_replica_behind_the_window_holds_it_until_its_next_flush(database_url: str) -> None:
    """A live replica whose watermark is before the window's end holds it back; its next flush, once its
    clock has passed the end, releases it, and the report is exact and complete."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="collector") as collector, \
            manual(database_url, clock, replica_id="behind", collect=False) as behind:
        collector.track(WS[0], USERS[0], allowed=2)
        behind.track(WS[1], USERS[1], allowed=3, denied=1)
        behind.track(WS[0], USERS[0], allowed=1)
        behind.flush()  # watermark T0: before the window's end
        clock.past_window(T0)
        held = [collector.collect() for _ in range(3)]
        behind.flush()  # its next scheduled flush: the watermark passes the end
        released = collector.collect()
    assert held == [[], [], []]
    assert [figures(r) for r in released] == [(2, 2, 6, 1, 2, 0)]
    assert [late(r) for r in released] == [(0, 0, 0, 0)]


def test_a_started_replica_holds_windows_before_its_first_flush(database_url: str) -> None:
    """A replica that has started but not flushed yet (its first flush is slow, or not due) already holds the
    windows it may have data of: before, the collector saw nobody and reported the window empty, the data
    arriving late with nobody missing."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="collector") as collector, \
            manual(database_url, clock, replica_id="starting", collect=False) as starting:
        collector.track(WS[0], USERS[0], allowed=1)
        starting.track(WS[1], USERS[1], allowed=3)  # its first flush is still to come
        clock.past_window(T0)
        held = [collector.collect() for _ in range(2)]
        starting.flush()  # its first flush: data and a watermark past the end
        released = collector.collect()
    assert held == [[], []]
    assert [figures(r) for r in released] == [(2, 2, 4, 0, 2, 0)]
    assert [late(r) for r in released] == [(0, 0, 0, 0)]


def test_a_started_replica_that_never_flushes_is_given_up_on_and_counted_missing(database_url: str) -> None:
    """Entered at start, silent since: given up on after the lease, and the report says it is missing."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="collector", replica_lease="1s", max_collect_delay="1h") as collector:
        silent = manual(database_url, clock, replica_id="silent", collect=False).start()
        try:
            collector.track(WS[0], USERS[0], allowed=1)
            clock.past_window(T0)
            assert collector.collect() == []
            time.sleep(1.2)  # the lease runs on the database's clock
            reported = collector.collect()
        finally:
            silent.stop()  # only now: its clean stop would have released the window
    assert [figures(r)[-1] for r in reported] == [1]


def test_a_cleanly_stopped_replica_holds_nothing_back(database_url: str) -> None:
    """A replica that stopped cleanly before the window ended (its last watermark is before the end) does not
    hold the window: it is reported as soon as it is due, with the stopped replica's data and nobody missing."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="collector") as collector:
        stopped = manual(database_url, clock, replica_id="stopped", collect=False).start()
        stopped.track(WS[1], USERS[1], allowed=4)
        stopped.track(WS[2], USERS[2], denied=2, allowed=0)
        stopped.stop()  # final flush at T0 + 1: watermark T0, marked stopped
        collector.track(WS[0], USERS[0], allowed=1)
        clock.past_window(T0)
        reported = collector.collect()
    assert [figures(r) for r in reported] == [(3, 3, 5, 2, 2, 0)]


# ---- c. d. leases ------------------------------------------------------------------------------


def test_a_replica_that_stops_publishing_is_given_up_on_after_the_lease(database_url: str) -> None:
    """A replica that flushed once and then fell silent holds the window for replica_lease (database clock),
    then is given up on: the window is reported with its flushed data and replicas_missing == 1."""
    lease = 1.0
    clock = FakeClock()
    with manual(database_url, clock, replica_id="collector", replica_lease=f"{lease}s") as collector, \
            manual(database_url, clock, replica_id="silent", collect=False) as silent:
        # The collector must itself have been in touch for a lease before it may give anybody up.
        wait_for(lambda: collector.status()["store"]["connected_for_s"] > lease + 0.2, timeout=30)
        collector.track(WS[0], USERS[0], allowed=1)
        silent.track(WS[1], USERS[1], allowed=5, denied=1)
        flushed_at = time.monotonic()
        silent.flush()  # its only flush (flush_interval is 1h): watermark T0, then silence
        clock.past_window(T0)
        before_lease = collector.collect()
        checked_after = time.monotonic() - flushed_at
        reported, reported_at = collect_until_reported(collector, timeout=30)
    assert (before_lease, checked_after < lease) == ([], True)
    assert reported_at - flushed_at >= lease - 0.05  # the database's clock and ours agree to a few ms
    assert [figures(r) for r in reported] == [(2, 2, 6, 1, 2, 1)]


def test_a_collector_just_connected_gives_nobody_up_before_a_lease_of_contact(database_url: str) -> None:
    """A collector that has just connected does not give up on a replica that has been silent for longer than
    the lease: the silence may be its own outage. It does so once it has been in contact for a lease."""
    lease = 2.0
    clock = FakeClock()
    with manual(database_url, clock, replica_id="silent", collect=False) as silent:
        silent.track(WS[1], USERS[1], allowed=3)
        silent.flush()
        flushed_at = time.monotonic()
        clock.past_window(T0)
        time.sleep(lease + 0.3)  # the replica is silent for longer than the lease already
        began = time.monotonic()
        with manual(database_url, clock, replica_id="fresh", replica_lease=f"{lease}s") as fresh:
            right_after_start = fresh.collect()
            checked_after = time.monotonic() - began
            reported, reported_at = collect_until_reported(fresh, timeout=30)
    assert (right_after_start, checked_after < lease) == ([], True)
    assert reported_at - began >= lease
    assert began - flushed_at > lease
    assert [figures(r) for r in reported] == [(1, 1, 3, 0, 1, 1)]


# ---- e. max_collect_delay ----------------------------------------------------------------------


def test_a_live_replica_with_a_stuck_clock_holds_the_window_only_until_max_collect_delay(database_url: str) -> None:
    """A replica that keeps flushing but whose clock never moves holds the window (its watermark never passes
    the end) until the collector's clock passes the end by max_collect_delay; then the window is reported,
    with the stuck replica counted missing."""
    lease = 3.0
    collector_clock, stuck_clock = FakeClock(), FakeClock()
    with manual(database_url, collector_clock, replica_id="collector", replica_lease=f"{lease}s",
                max_collect_delay="100s") as collector, \
            manual(database_url, stuck_clock, replica_id="stuck", collect=False) as stuck:
        # In contact for a lease: the collector may judge others, and it is not the outage that holds it back.
        wait_for(lambda: collector.status()["store"]["connected_for_s"] > lease + 0.2, timeout=30)
        stuck.track(WS[1], USERS[1], allowed=7)
        collector.track(WS[0], USERS[0], allowed=1)
        outcomes: dict[float, list[tuple[int, ...]]] = {}
        for after_end in (6, 50, 100, 101):
            collector_clock.t = T0 + WINDOW + after_end
            stuck.flush()  # alive: heard from at every step, watermark stuck at T0
            outcomes[after_end] = [figures(r) for r in collector.collect()]
    assert outcomes == {6: [], 50: [], 100: [], 101: [(2, 2, 8, 0, 2, 1)]}


def test_a_collector_back_from_an_outage_waits_a_lease_before_closing_overdue_windows(pg_url: str,
                                                                                      tmp_path: Path) -> None:
    """After an outage longer than max_collect_delay, a collector that is back before another replica does not
    close the windows that replica holds at once, although they are overdue: like a silent replica, an
    overdue window waits until the collector has been in contact for a lease, so the others can replay what
    they queued meanwhile. The report is then exact and complete, with nothing late."""
    clock = FakeClock()
    with TcpProxy.to(pg_url) as to_collector, TcpProxy.to(pg_url) as to_other, \
            manual(to_collector.url_for(pg_url), clock, replica_id="collector", replica_lease="2s",
                   max_collect_delay="10s", spool_dir=str(tmp_path), stop_timeout="5s") as collector, \
            manual(to_other.url_for(pg_url), clock, replica_id="other", collect=False, spool_dir=str(tmp_path),
                   stop_timeout="5s") as other:
        collector.track(WS[0], USERS[0], allowed=1)
        other.track(WS[1], USERS[1], allowed=2)
        collector.flush()
        other.flush()
        for proxy in (to_collector, to_other):  # the outage: the database is unreachable for both
            proxy.refuse = True
            proxy.cut_all()
        other.track(WS[2], USERS[2], allowed=4, at=T0 + 30)  # queued in the replica during the outage
        outage_flushes = []
        for agg in (collector, other):
            with pytest.raises(StoreUnavailable):
                agg.flush()
            outage_flushes.append("failed")
        clock.t = T0 + WINDOW + 11  # the outage outlasts max_collect_delay
        to_collector.refuse = False
        back_first = [figures(r) for r in collector.collect()]  # the other replica is not back yet
        to_other.refuse = False
        other.flush()
        reported, _ = collect_until_reported(collector, timeout=30) if not back_first else ([], 0.0)
        everything = collector.reports()
    assert (outage_flushes, back_first) == (["failed", "failed"], [])
    assert [figures(r) for r in reported] == [(3, 3, 7, 0, 2, 0)]
    assert total_requests(everything) == 7 and [late(r) for r in everything if any(late(r))] == []


# ---- f. a flush racing a collection of its window ----------------------------------------------


def test_a_flush_waits_for_the_collection_of_its_window_and_lands_late(database_url: str) -> None:
    """A flush carrying data of a window that is being collected waits on the window's lock (it does not
    complete while the collector holds it), then finds the window reported and counts its data late in the
    open window: the report plus the late totals equal everything tracked."""
    clock = FakeClock()
    seen: dict[str, Any] = {}
    other = manual(database_url, clock, replica_id="other", collect=False)

    def flush_other() -> None:
        try:
            other.flush()
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            seen["error"] = exc

    async def on_locked() -> None:
        if "thread" in seen:  # only the first collection (of window T0)
            return
        thread = threading.Thread(target=flush_other, name="racing-flush")
        seen["thread"] = thread
        thread.start()
        await asyncio.sleep(0.5)
        seen["completed_while_locked"] = not thread.is_alive()

    with manual(database_url, clock, replica_id="collector", on_collector_locked=on_locked) as collector, other:
        collector.track(WS[0], USERS[0], allowed=1)
        other.track(WS[1], USERS[1], allowed=2)
        other.flush()
        clock.past_window(T0)
        other.flush()  # its watermark is past T0's end: it holds nothing back
        # Data of T0 placed there after the watermark passed it: it reaches the store during the collection.
        other.track(WS[2], USERS[2], allowed=4, denied=1, at=T0 + 30)  # new to the window
        other.track(WS[0], USERS[0], allowed=8, at=T0 + 30)  # ids the report already counts
        (first,) = collector.collect()
        seen["thread"].join(60)
        finished = not seen["thread"].is_alive()
        clock.past_window(T0 + WINDOW)
        other.flush()
        (second,) = collector.collect()
        everything = collector.reports()
    assert (seen["completed_while_locked"], finished, seen.get("error")) == (False, True, None)
    assert figures(first) == (2, 2, 3, 0, 2, 0)
    assert (figures(second), late(second)) == ((0, 0, 0, 0, 0, 0), (12, 1, 1, 1))
    assert total_requests(everything) == 1 + 2 + 4 + 1 + 8


# ---- g. holes found by breaking the code ---------------------------------------------------------


@pytest.mark.parametrize("started", [True, False], ids=["started", "never-started"])
def test_stop_flushes_meter_records_and_checkpoints_with_nothing_tracked(database_url: str, started: bool) -> None:
    """stop() makes meter records and checkpoints durable even when track() has nothing pending (whether the
    replica was started or not)."""
    clock = FakeClock()
    correlation_id = new_correlation_id()
    agg = manual(database_url, clock, meters=METERS)
    if started:
        agg.start()
    for _ in range(3):
        agg.record("jobs", dimensions={"project_id": "p1"})
    agg.record("build_seconds", 1.25, {"project_id": "p1"})
    agg.checkpoint_many([{"correlation_id": correlation_id, "experience_id": "http_request", "checkpoint": "start",
                          "type": "web", "feature_category": "source_code", "urgency": "async_low",
                          "client_timestamp": "2027-01-15T08:00:01Z"}])
    pending_tracks = agg.status()["pending_events"]
    agg.stop()
    clock.past_window(T0)
    with manual(database_url, clock, meters=METERS, replica_id="reader") as reader:
        reader.collect()
        results = {(r.meter, r.dimensions["project_id"]): float(r.quantity) for r in reader.meter_results()}
        stored = reader.experience(correlation_id)
    assert pending_tracks == 0
    assert results == {("jobs", "p1"): 3.0, ("build_seconds", "p1"): 1.25}
    assert stored is not None and stored["status"] == "open"


def test_ids_remembered_as_sent_stay_bounded_over_many_windows(database_url: str) -> None:
    """The flusher remembers the ids it sent for the current and the previous window only: over 50 windows,
    each tracked and flushed, it never holds more than two windows' worth."""
    clock = FakeClock()
    sizes = []
    with manual(database_url, clock) as agg:
        for w in range(50):
            clock.t = T0 + w * WINDOW + 1
            agg.track(WS[w % 5], USERS[w % 50], allowed=1)
            agg.track(WS[0], USERS[(w + 1) % 50], allowed=1, at=T0 + (w - 1) * WINDOW + 1 if w else None)
            agg.flush()
            assert agg._flusher is not None
            sizes.append(len(agg._flusher._sent))
    assert max(sizes) <= 2
    assert sizes[-1] == 2


# ---- h. clock skew -----------------------------------------------------------------------------


def _tracker_loop(agg: Aggregator, clock: Callable[[], float], window: int, seed: int, until: float,
                  truth: dict[int, list[Any]]) -> None:
    """Track at a modest rate until ``until`` (wall clock), keeping the truth per window by ``clock``."""
    rng = random.Random(seed)
    while time.time() < until:
        for _ in range(20):
            ws, user = rng.randrange(20) + 1, rng.randrange(400) + 1000
            allowed, denied = rng.randrange(3), rng.randrange(2)
            at = clock()
            agg.track(uuid.UUID(int=ws), uuid.UUID(int=user), allowed=allowed, denied=denied, at=at)
            t = truth.setdefault(int(at // window) * window, [set(), set(), 0, 0])
            t[0].add(ws)
            t[1].add(user)
            t[2] += allowed
            t[3] += denied
        time.sleep(rng.uniform(0.003, 0.008))


@pytest.mark.parametrize("skew", [-4.0, 4.0], ids=["behind-4s", "ahead-4s"])
def test_replicas_with_skewed_clocks_are_exact_and_never_given_up(database_url: str, skew: float) -> None:
    """Two replicas whose clocks differ by 4 s track for ~8 s into 2 s windows, each placing events by its own
    clock: every window's report equals the merged truth, nothing is late and nobody is missing; the lease,
    judged on the database's clock, never takes the skewed replica for a silent one."""
    window, duration = 2, 8.0
    skewed_clock: Callable[[], float] = lambda: time.time() + skew  # noqa: E731
    common = {"database_url": database_url, "window": f"{window}s", "flush_interval": "0.25s",
              "collect_interval": "0.25s", "replica_lease": "1s", "handle_sigterm": False,
              # max_collect_delay is judged on each collector's own clock, so it must exceed the skew: the
              # default here (4 x lease = 4 s) does not, and a collector 4 s ahead (or the exact one, with the
              # other 4 s behind) would close windows the other replica still holds, counting it missing.
              "max_collect_delay": "30s"}
    exact = Aggregator(replica_id="exact", clock=time.time, **common)
    skewed = Aggregator(replica_id="skewed", clock=skewed_clock, **common)
    truths: list[dict[int, list[Any]]] = [{}, {}]
    with exact, skewed:
        until = time.time() + duration
        workers = [threading.Thread(target=_tracker_loop, args=(agg, clock, window, n, until, truths[n]))
                   for n, (agg, clock) in enumerate([(exact, time.time), (skewed, skewed_clock)])]
        for w in workers:
            w.start()
        for w in workers:
            w.join(duration + 30)
    reader = Aggregator(replica_id="reader", clock=lambda: time.time() + 3 * window + abs(skew), **{
        **common, "flush_interval": "1h", "collect_interval": "1h"})
    with reader:
        reader.collect()
        reports = reader.reports()
    merged: dict[int, tuple[int, int, int, int]] = {}
    for start in set(truths[0]) | set(truths[1]):
        parts = [t.get(start, [set(), set(), 0, 0]) for t in truths]
        merged[start] = (len(parts[0][0] | parts[1][0]), len(parts[0][1] | parts[1][1]),
                         parts[0][2] + parts[1][2], parts[0][3] + parts[1][3])
    got = by_window(reports)
    assert len(got) == len(reports), "more than one report for a window"
    assert set(merged) <= set(got)
    assert {start: (r.unique_workspaces, r.unique_users, r.allowed_requests, r.denied_requests)
            for start, r in got.items()} == {start: merged.get(start, (0, 0, 0, 0)) for start in got}
    assert [late(r) for r in reports if any(late(r))] == []
    assert [(int(r.window_start.timestamp()), r.replicas_missing) for r in reports if r.replicas_missing] == []
    assert len(merged) >= duration / window
