"""The contract suite: each behaviour of the core, on real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from aggregator import Aggregator, ConfigError, NotRunning, StoreUnavailable, store
from tests.helpers import GRACE, T0, WINDOW, FakeClock, by_window, ids, manual, total_requests

WS, USERS = ids(3), ids(10, offset=1000)


def test_windows_are_aligned_to_the_epoch(database_url: str) -> None:
    """An event belongs to the epoch-aligned window holding the moment track() was called."""
    clock = FakeClock(T0 + 17.5)
    with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0])
        clock.t = T0 + WINDOW + 3  # next window
        agg.track(WS[0], USERS[0])
        agg.flush()
        clock.past_window(T0 + WINDOW)
        written = agg.collect()
    assert [(r.window_start, r.window_end) for r in written] == [
        (dt.datetime.fromtimestamp(T0, dt.timezone.utc), dt.datetime.fromtimestamp(T0 + WINDOW, dt.timezone.utc)),
        (dt.datetime.fromtimestamp(T0 + WINDOW, dt.timezone.utc),
         dt.datetime.fromtimestamp(T0 + 2 * WINDOW, dt.timezone.utc)),
    ]
    assert [r.allowed_requests for r in written] == [1, 1]


@pytest.mark.parametrize("how", ["clock", "at"])
def test_an_event_exactly_on_a_window_boundary_opens_the_next_window(database_url: str, how: str) -> None:
    """Windows are [start, end): the instant a window ends belongs to the next one; the instant before, to it.
    (A boundary off by one was caught only by chance before, in a CLI format test.)"""
    clock = FakeClock(T0 + 1)
    with manual(database_url, clock) as agg:
        for moment, allowed in ((T0, 1), (T0 + WINDOW - 0.001, 2), (T0 + WINDOW, 4), (T0 + 2 * WINDOW - 0.001, 8)):
            if how == "clock":
                clock.t = moment
                agg.track(WS[0], USERS[0], allowed=allowed)
            else:
                agg.track(WS[0], USERS[0], allowed=allowed, at=moment)
        clock.t = T0 + WINDOW + 1
        agg.flush()
        clock.past_window(T0 + WINDOW)
        written = agg.collect()
    assert [(int(r.window_start.timestamp()), r.allowed_requests) for r in written] == [
        (T0, 1 + 2), (T0 + WINDOW, 4 + 8)]


def test_track_during_flush_round_trip_is_not_lost(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A track() made while a flush is inside its database transaction is reported."""
    entered, release = threading.Event(), threading.Event()
    original = store.Store._add_contribution
    calls = 0

    async def slow_insert(self: store.Store, *args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            await asyncio.to_thread(release.wait, 10)
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.Store, "_add_contribution", slow_insert)
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0])
        flusher = threading.Thread(target=agg.flush)
        flusher.start()
        assert entered.wait(10)
        agg.track(WS[1], USERS[1], allowed=5, denied=2)  # while the transaction is open
        release.set()
        flusher.join(10)
        agg.flush()
        clock.past_window(T0)
        (report,) = agg.collect()
    assert (report.unique_workspaces, report.unique_users, report.allowed_requests, report.denied_requests) == (
        2, 2, 6, 2)


def test_one_user_on_two_replicas_counts_once(database_url: str) -> None:
    """Distinct counts are exact across replicas: never a sum of per-replica uniques."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="a") as a, manual(database_url, clock, replica_id="b") as b:
        a.track(WS[0], USERS[0])
        b.track(WS[0], USERS[0])
        b.track(WS[1], USERS[1])
        a.flush()
        b.flush()
        clock.past_window(T0)
        b.flush()  # b's watermark passes the window's end (its scheduled flush would): it holds it no more
        (report,) = a.collect()
    assert (report.unique_workspaces, report.unique_users, report.allowed_requests, report.replicas) == (2, 2, 3, 2)


def test_users_flushed_separately_by_one_replica_count_separately(database_url: str) -> None:
    """Users A then B on one replica, flushed in between, count 2; A again counts nothing new."""
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0])
        agg.flush()
        agg.track(WS[0], USERS[1])
        agg.flush()
        agg.track(WS[0], USERS[0])
        agg.flush()
        clock.past_window(T0)
        (report,) = agg.collect()
    assert (report.unique_users, report.allowed_requests) == (2, 3)


def test_database_error_during_flush_is_retried_without_loss(database_url: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that fails mid-transaction is rolled back, kept, and retried; new data goes after it."""
    original = store.Store._add_contribution
    failures = iter([True])

    async def failing(self: store.Store, *args: object, **kwargs: object) -> None:
        if next(failures, False):
            raise sa.exc.OperationalError("INSERT ...", {}, ConnectionResetError("connection reset by peer"))
        await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.Store, "_add_contribution", failing)
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0], allowed=2)
        with pytest.raises(StoreUnavailable, match="connection reset"):
            agg.flush()
        assert agg.status()["unflushed_events"] == 1
        agg.track(WS[1], USERS[1], allowed=3)
        agg.flush()
        assert agg.status()["unflushed_events"] == 0
        clock.past_window(T0)
        (report,) = agg.collect()
    assert (report.unique_workspaces, report.unique_users, report.allowed_requests) == (2, 2, 5)


def test_postgresql_connection_killed_mid_flush_is_retried_without_loss(pg_url: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A real failure: the server terminates the flush's connection inside its transaction."""
    original = store.Store._add_contribution
    kills = iter([True])

    async def killed(self: store.Store, conn: object, *args: object, **kwargs: object) -> None:
        if next(kills, False):
            await conn.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))  # type: ignore[attr-defined]
        await original(self, conn, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.Store, "_add_contribution", killed)
    clock = FakeClock()
    with manual(pg_url, clock) as agg:
        agg.track(WS[0], USERS[0], allowed=4)
        with pytest.raises(StoreUnavailable):
            agg.flush()
        agg.flush()  # a new pooled connection; the same batch, applied once
        clock.past_window(T0)
        (report,) = agg.collect()
    assert (report.allowed_requests, report.unique_users) == (4, 1)


def test_scheduled_flush_recovers_from_an_error_by_itself(database_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed scheduled flush, a retry comes sooner than the next interval, with no caller."""
    original = store.Store.apply_batch
    failures = iter([True])

    async def flaky(self: store.Store, *args: object, **kwargs: object) -> store.BatchResult:
        if next(failures, False):
            raise StoreUnavailable("database restarting")
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.Store, "apply_batch", flaky)
    clock = FakeClock()
    with manual(database_url, clock, flush_interval="2s") as agg:
        agg.track(WS[0], USERS[0], allowed=9)
        deadline = time.monotonic() + 10
        while agg.status()["flush"].failures == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        failed_at = time.monotonic()
        while agg.status()["unflushed_events"] and time.monotonic() < deadline:
            time.sleep(0.01)
        recovered_after = time.monotonic() - failed_at
        assert agg.status()["flush"].failures == 1
        assert agg.status()["unflushed_events"] == 0
    assert recovered_after < 1.5  # the first retry comes after 0.5 s, not after the 2 s interval


def test_commit_that_reports_an_error_is_not_applied_twice(database_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit that succeeds but reaches the client as an error: the retry is recognised and skipped."""
    original = store.Store.apply_batch
    ambiguous = iter([True])

    async def lost_ack(self: store.Store, *args: object, **kwargs: object) -> store.BatchResult:
        result = await original(self, *args, **kwargs)  # type: ignore[arg-type]
        if next(ambiguous, False):
            raise StoreUnavailable("connection lost while waiting for COMMIT to be acknowledged")
        return result

    monkeypatch.setattr(store.Store, "apply_batch", lost_ack)
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0], allowed=7, denied=1)
        with pytest.raises(StoreUnavailable):
            agg.flush()
        with capture_logs() as logs:
            agg.flush()
        clock.past_window(T0)
        (report,) = agg.collect()
    assert (report.allowed_requests, report.denied_requests) == (7, 1)
    assert [e["replayed"] for e in logs if e["event"] == "flush"][0] is True


def test_late_flush_counts_in_the_open_window(database_url: str) -> None:
    """Data flushed after its window was reported is counted as late in the window open when it lands."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="slow") as slow, manual(database_url, clock, replica_id="fast") as fast:
        fast.track(WS[0], USERS[0], allowed=1)
        fast.flush()
        clock.past_window(T0)  # now inside the next window
        slow.flush()  # slow's watermark is past the window: it holds nothing more for it, as far as it knows
        (first,) = fast.collect()
        # Events of the reported window that slow places there after its watermark passed it: late.
        slow.track(WS[0], USERS[0], allowed=2, denied=1, at=T0 + 1)  # same user as fast: not new to the window
        slow.track(WS[2], USERS[2], allowed=4, at=T0 + 1)  # a workspace and a user the window never saw
        slow.flush()  # late
        fast.track(WS[1], USERS[1], allowed=10)
        fast.flush()
        clock.past_window(T0 + WINDOW)
        slow.flush()
        (second,) = fast.collect()
        everything = fast.reports()
    assert (first.allowed_requests, first.unique_users, first.late_allowed_requests) == (1, 1, 0)
    assert (second.allowed_requests, second.unique_users, second.replicas) == (10, 1, 1)
    assert (second.late_allowed_requests, second.late_denied_requests) == (6, 1)
    assert (second.late_unique_users, second.late_unique_workspaces) == (1, 1)
    assert total_requests(everything) == 1 + 2 + 1 + 4 + 10


def test_stop_flushes_everything_from_many_threads(database_url: str) -> None:
    """stop() makes everything tracked durable; track() after stop() raises and records nothing."""
    clock = FakeClock()
    agg = manual(database_url, clock).start()

    def work(offset: int) -> None:
        for i in range(500):
            agg.track(WS[i % 3], USERS[(offset + i) % 10], allowed=1, denied=i % 2)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agg.stop()
    agg.stop()  # idempotent
    with pytest.raises(NotRunning):
        agg.track(WS[0], USERS[0])
    clock.past_window(T0)
    with manual(database_url, clock) as reader:
        (report,) = reader.collect()
    assert (report.allowed_requests, report.denied_requests, report.unique_users) == (2000, 1000, 10)


def test_events_tracked_before_start_are_flushed_by_stop(database_url: str) -> None:
    """Tracking before start() buffers; stop() still delivers it."""
    clock = FakeClock()
    agg = manual(database_url, clock)
    agg.track(WS[0], USERS[0], allowed=3)
    agg.stop()
    clock.past_window(T0)
    with manual(database_url, clock) as reader:
        (report,) = reader.collect()
    assert report.allowed_requests == 3


def test_collectors_in_threads_write_one_report_per_window(database_url: str) -> None:
    """Many collectors racing over the same due windows: exactly one report each, with full data."""
    clock = FakeClock()
    aggs = [manual(database_url, clock, replica_id=f"r{i}").start() for i in range(4)]
    try:
        for k, agg in enumerate(aggs):
            for w in range(3):
                agg.track(WS[0], USERS[k], allowed=1, at=T0 + w * WINDOW + 1)
            agg.flush()
        clock.past_window(T0 + 2 * WINDOW)
        barrier = threading.Barrier(len(aggs))
        written: list[list] = []

        def collect(agg: Aggregator) -> None:
            barrier.wait()
            written.append(agg.collect())

        threads = [threading.Thread(target=collect, args=(a,)) for a in aggs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        final = aggs[0].reports()
    finally:
        for agg in aggs:
            agg.stop()
    assert sum(len(w) for w in written) == 3
    assert [(r.unique_users, r.allowed_requests, r.replicas) for r in final] == [(4, 4, 4)] * 3


def test_reports_since_filters_by_window_start(database_url: str) -> None:
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        for w in range(3):
            agg.track(WS[0], USERS[0], at=T0 + w * WINDOW)
        agg.flush()
        clock.past_window(T0 + 2 * WINDOW)
        agg.collect()
        since = dt.datetime.fromtimestamp(T0 + WINDOW, dt.timezone.utc)
        assert [r.window_start for r in agg.reports(since=since)] == [
            since, since + dt.timedelta(seconds=WINDOW)]
    assert len(manual(database_url, clock).reports()) == 3  # readable without start()


def test_a_replica_with_another_window_is_refused(database_url: str) -> None:
    """Replicas must agree on the window; the error names both values and the fix."""
    clock = FakeClock()
    with manual(database_url, clock):
        pass
    other = Aggregator(database_url=database_url, window="120s", handle_sigterm=False)
    with pytest.raises(ConfigError, match=r"window=120s differs from the 60s window.*window='60s'"):
        other.start()


async def test_asyncio_host_runs_on_its_own_loop(database_url: str) -> None:
    """`async with` runs flush and collection on the host's loop."""
    clock = FakeClock()
    async with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0], allowed=2)
        await agg.aflush()
        clock.past_window(T0)
        (report,) = await agg.acollect()
        assert [r.allowed_requests for r in await agg.areports()] == [2]
        with pytest.raises(Exception, match="use the async form"):
            agg.flush()
    assert report.allowed_requests == 2


def test_empty_window_with_a_live_replica_gets_a_zero_report(database_url: str) -> None:
    """A replica's flush marks the open window, so 'no traffic' is reported, not silently missing."""
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.flush()
        clock.past_window(T0)
        (report,) = agg.collect()
    assert (report.allowed_requests, report.unique_users, report.replicas) == (0, 0, 0)


def test_grace_delays_collection(database_url: str) -> None:
    """A window is not collected until its end plus grace has passed."""
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(WS[0], USERS[0])
        agg.flush()
        clock.t = T0 + WINDOW + GRACE - 1
        assert agg.collect() == []
        clock.t = T0 + WINDOW + GRACE
        assert len(agg.collect()) == 1
        assert agg.collect() == []
    assert by_window(agg.reports())[T0].allowed_requests == 1


def test_concurrent_flushes_of_the_same_new_ids_count_once(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replica b inserts ids replica a holds uncommitted: b's fast insert hits the unique violation,
    falls back to ON CONFLICT, and every user still counts once."""
    entered, release = threading.Event(), threading.Event()
    original = store.Store._add_contribution

    async def hold(self: store.Store, conn: object, start: int, replica_id: str, **kwargs: object) -> None:
        if replica_id == "a" and not entered.is_set():
            entered.set()  # a's ids are inserted, not committed
            await asyncio.to_thread(release.wait, 20)
        await original(self, conn, start, replica_id, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(store.Store, "_add_contribution", hold)
    clock = FakeClock()
    users = ids(3000, offset=50_000)
    with manual(pg_url, clock, replica_id="a") as a, manual(pg_url, clock, replica_id="b") as b:
        b.flush()  # the window row exists and is committed: b's wait is then on a's ids themselves
        for user in users:
            a.track(WS[0], user)
            b.track(WS[0], user)
        with capture_logs() as logs:
            first = threading.Thread(target=a.flush)
            first.start()
            assert entered.wait(20)
            second = threading.Thread(target=b.flush)
            second.start()
            time.sleep(1.0)  # b is now waiting on a's uncommitted rows
            release.set()
            first.join(20)
            second.join(20)
        clock.past_window(T0)
        b.flush()
        (report,) = a.collect()
    assert [e["event"] for e in logs if e["event"] == "ids_insert_fallback"] == ["ids_insert_fallback"]
    assert (report.unique_users, report.unique_workspaces, report.allowed_requests, report.replicas) == (
        3000, 1, 6000, 2)


def test_calls_racing_stop_are_either_reported_or_refused(database_url: str) -> None:
    """Threads track flat out while stop() runs: every call that returned is reported, every call
    that raised is not (five rounds, to give the race many chances)."""
    clock = FakeClock()
    accepted = 0
    for _ in range(5):
        agg = manual(database_url, clock).start()
        counts: list[int] = []

        def work(seed: int, agg: Aggregator = agg, counts: list[int] = counts) -> None:
            n = 0
            try:
                while True:
                    agg.track(WS[seed % 3], USERS[n % 10], allowed=1, denied=seed % 2)
                    n += 1 + seed % 2
            except NotRunning:
                counts.append(n)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        agg.stop()
        for t in threads:
            t.join(10)
        assert len(counts) == 4
        accepted += sum(counts)
    clock.past_window(T0)
    with manual(database_url, clock) as reader:
        (report,) = reader.collect()
    assert report.allowed_requests + report.denied_requests == accepted
