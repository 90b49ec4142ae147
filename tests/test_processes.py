"""Scenarios with real processes and signals, on SQLite and PostgreSQL."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from aggregator import Aggregator
from tests import procs
from tests.helpers import (
    T0,
    WINDOW,
    FakeClock,
    assert_exact_per_window,
    collect_all,
    far_future_reader,
    ids,
    manual,
    total_requests,
)

SPAWN = multiprocessing.get_context("spawn")
WS, USERS = ids(5), ids(50, offset=1000)


def test_collectors_in_several_processes_write_one_report_per_window(database_url: str) -> None:
    """Four collector processes start together over five due windows: five reports, no more."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="writer") as writer:
        for w in range(5):
            for k in range(w + 1):
                writer.track(WS[0], USERS[k], allowed=2, at=T0 + w * WINDOW + 1)
        writer.flush()
    out = SPAWN.Queue()
    start_at = time.time() + 3
    workers = [SPAWN.Process(target=procs.collect_at_once, args=(database_url, start_at, out)) for _ in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    assert [p.exitcode for p in workers] == [0] * 4
    assert sum(out.get(timeout=5) for _ in workers) == 5
    final = manual(database_url, clock).reports()
    assert [(r.unique_users, r.allowed_requests) for r in final] == [(k, 2 * k) for k in range(1, 6)]


def test_collector_killed_holding_the_lock_loses_no_window(database_url: str, tmp_path: Path) -> None:
    """SIGKILL a collector after it took the lock: its transaction dies with it; another reports, once."""
    clock = FakeClock()
    with manual(database_url, clock, replica_id="writer") as writer:
        writer.track(WS[0], USERS[0], allowed=3)
        writer.track(WS[1], USERS[1], allowed=0, denied=1)
        writer.flush()
    clock.past_window(T0)
    ready = tmp_path / "locked"
    with manual(database_url, clock, replica_id="survivor") as survivor:
        doomed = SPAWN.Process(target=procs.hang_after_taking_the_lock, args=(database_url, str(ready)))
        doomed.start()
        try:
            deadline = time.time() + 60
            while not ready.exists() and time.time() < deadline:
                time.sleep(0.05)
            assert ready.exists(), "the collector never took the lock"
            assert survivor.reports() == []  # reads are not blocked by the lock holder
            if database_url.startswith("postgresql"):
                assert survivor.collect() == []  # the lock is held: skipped, not blocked
        finally:  # it hangs by design: a failed assertion above must not leave it holding pytest's exit
            os.kill(doomed.pid, signal.SIGKILL)
            doomed.join(10)
        written: list = []
        deadline = time.time() + 30
        while not written and time.time() < deadline:
            written = survivor.collect()
            time.sleep(0.1)
        final = survivor.reports()
    assert [(r.allowed_requests, r.denied_requests, r.unique_users, r.generated_by) for r in final] == [
        (3, 1, 2, "survivor")]


def test_sigterm_flushes_everything_tracked(database_url: str) -> None:
    """SIGTERM to a process using the default handling: every accepted track() is reported."""
    counter = SPAWN.Value("q", 0)
    child = SPAWN.Process(target=procs.track_until_signalled, args=(database_url, counter, "1h", True))
    child.start()
    deadline = time.time() + 30
    while counter.value < 20_000 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGTERM)
    child.join(30)
    assert child.exitcode == 128 + signal.SIGTERM
    with far_future_reader(database_url) as reader:
        reader.collect()
        reported = total_requests(reader.reports())
    assert counter.value >= 20_000
    assert reported == counter.value


def test_interpreter_exit_without_stop_flushes_everything(database_url: str) -> None:
    """A program that starts an Aggregator, tracks, and simply ends: atexit makes it durable."""
    script = (
        "import uuid\n"
        "from aggregator import Aggregator\n"
        f"agg = Aggregator(database_url={database_url!r}, window='60s', flush_interval='1h', collect=False)\n"
        "agg.start()\n"
        "for i in range(1000):\n"
        "    agg.track(uuid.UUID(int=1 + i % 7), uuid.UUID(int=100 + i % 13), allowed=2, denied=1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with far_future_reader(database_url) as reader:
        reader.collect()
        reports = reader.reports()
    assert total_requests(reports) == 3000
    assert sum(r.unique_users for r in reports) >= 13


def test_sigkill_loses_at_most_the_unflushed_interval(database_url: str, record_property: object) -> None:
    """SIGKILL can only lose what was tracked since the last flush; measured, never over-counted."""
    flush_interval = 0.5
    counter = SPAWN.Value("q", 0)
    child = SPAWN.Process(target=procs.track_until_signalled,
                          args=(database_url, counter, f"{flush_interval}s", False))
    child.start()
    deadline = time.time() + 30
    while counter.value < 1000 and time.time() < deadline:
        time.sleep(0.05)
    began, before = time.time(), counter.value
    time.sleep(3)
    rate = (counter.value - before) / (time.time() - began)
    os.kill(child.pid, signal.SIGKILL)
    child.join(10)
    tracked = counter.value
    with far_future_reader(database_url) as reader:
        collect_all(reader)
        reports = reader.reports()
        reported = total_requests(reports)
    lost = tracked - reported
    print(f"\nSIGKILL: tracked {tracked}, reported {reported}, lost {lost} "
          f"({lost / rate:.2f}s of traffic at {rate:.0f} events/s, flush interval {flush_interval}s)")
    assert 0 <= lost <= rate * (flush_interval + 1.0)
    assert any(r.replicas_missing == 1 for r in reports), "the window the killed replica was in says so"


def test_fork_child_starts_empty_and_nothing_is_duplicated(database_url: str) -> None:
    """After fork, the child has a new replica id and none of the parent's unflushed data."""
    clock = FakeClock()
    agg = manual(database_url, clock).start()
    agg.track(WS[0], USERS[0], allowed=5)  # unflushed at fork time
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(read)
            agg.track(WS[1], USERS[1], allowed=7)
            agg.flush()  # restarts the child's own background thread
            os.write(write, agg.replica_id.encode())
            agg.stop()
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child_replica = os.read(read, 200).decode()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    agg.stop()
    clock.past_window(T0)
    with manual(database_url, clock) as reader:
        (report,) = reader.collect()
    assert child_replica and child_replica != agg.replica_id
    assert (report.allowed_requests, report.unique_users, report.replicas) == (12, 2, 2)


@pytest.mark.slow
def test_stress_processes_threads_short_windows(database_url: str) -> None:
    """3 processes x 4 threads for 20 s, 2 s windows, 0.25 s flushes, every process collecting:
    every report equals the ground truth the test recorded, and each window has exactly one report."""
    window, duration = 2, 20.0
    out = SPAWN.Queue()
    workers = [SPAWN.Process(target=procs.stress_replica, args=(database_url, i, 4, window, duration, out))
               for i in range(3)]
    for p in workers:
        p.start()
    truths = [out.get(timeout=duration + 120) for _ in workers]
    for p in workers:
        p.join(30)
    assert [p.exitcode for p in workers] == [0] * 3
    reader = Aggregator(database_url=database_url, window=f"{window}s", grace="4s", flush_interval="1h",
                        collect_interval="1h", clock=lambda: time.time() + 60, handle_sigterm=False)
    with reader:
        reader.collect()
        reports = reader.reports()
    assert_exact_per_window(truths, reports)


@pytest.mark.slow
def test_meters_from_processes_and_threads_are_exact(database_url: str) -> None:
    """3 processes x 3 threads record for 8 s with 2 s windows: each job id counts once whichever process
    recorded it (sums per project equal the truth), and distinct users per window and project are exact."""
    window, duration = 2, 8.0
    out = SPAWN.Queue()
    workers = [SPAWN.Process(target=procs.meter_replica, args=(database_url, i, window, duration, out))
               for i in range(3)]
    for p in workers:
        p.start()
    parts = [out.get(timeout=duration + 120) for _ in workers]
    for p in workers:
        p.join(30)
    assert [p.exitcode for p in workers] == [0] * 3
    users: dict[str, set[int]] = {}
    jobs: set[int] = set()
    for part_users, part_jobs in parts:
        jobs.update(part_jobs)
        for key, values in part_users.items():
            users.setdefault(key, set()).update(values)
    reader = Aggregator(database_url=database_url, window=f"{window}s", grace="3s", flush_interval="1h",
                        collect_interval="1h", clock=lambda: time.time() + 60, meters=procs.PROCESS_METERS,
                        handle_sigterm=False)
    with reader:
        reader.collect()
        results = reader.meter_results()
    work: dict[str, int] = {}
    for r in results:
        if r.meter == "work":
            work[r.dimensions["project"]] = work.get(r.dimensions["project"], 0) + int(r.quantity)
    truth = {f"p{p}": sum(k % 97 + 1 for k in jobs if k % 5 == p) for p in range(5)}
    assert work == truth
    got_users = {f"{int(r.window_start.timestamp())}/{r.dimensions['project']}": int(r.quantity)
                 for r in results if r.meter == "users" and not r.late}
    assert got_users == {key: len(values) for key, values in users.items()}
    assert [r for r in results if r.late] == []


def test_stale_experiences_time_out_exactly_once_with_sweepers_in_several_processes(database_url: str,
                                                                                   tmp_path: Path) -> None:
    """300 journeys that never end; 4 processes sweep at the same moment: each journey times out exactly once
    and gets exactly one failure event in the outbox."""
    import asyncio

    import sqlalchemy as sa

    from aggregator import schema, store
    from aggregator.client import new_correlation_id
    from tests.helpers import T0, FakeClock, manual

    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.checkpoint_many([{"correlation_id": new_correlation_id(), "experience_id": "job", "checkpoint": "start",
                              "type": "worker", "feature_category": "ci", "urgency": "sync_fast",
                              "client_timestamp": "2027-01-15T08:00:01Z"} for _ in range(300)])
        agg.flush()
    out = SPAWN.Queue()
    start_at = time.time() + 3
    sweepers = [SPAWN.Process(target=procs.sweep_at_once,
                              args=(database_url, start_at, T0 + 30, str(tmp_path / f"out{n}"), out))
                for n in range(4)]
    for p in sweepers:
        p.start()
    counts = [out.get(timeout=120) for _ in sweepers]
    for p in sweepers:
        p.join(30)
    assert [p.exitcode for p in sweepers] == [0] * 4
    assert sum(counts) == 300

    async def stored() -> tuple[int, int, int]:
        db = store.Store(database_url)
        try:
            async with db.read() as conn:
                timed_out = await conn.scalar(sa.select(sa.func.count()).where(
                    schema.experiences.c.status == "timed_out"))
                events = await conn.scalar(sa.select(sa.func.count(sa.distinct(schema.outbox.c.event_id))).where(
                    schema.outbox.c.kind == "experience_failure"))
                rows = await conn.scalar(sa.select(sa.func.count()).where(schema.outbox.c.kind == "experience_failure"))
            return int(timed_out or 0), int(events or 0), int(rows or 0)
        finally:
            await db.close()

    assert asyncio.run(stored()) == (300, 300, 300)  # timed out; failure events, all distinct
