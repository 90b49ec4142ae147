"""The report-order lock is short: a collector frozen while holding it stalls other windows' reports briefly."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

from tests import procs_lock
from tests.helpers import T0, WINDOW, FakeClock, ids, manual

SPAWN = multiprocessing.get_context("spawn")


def test_a_collector_frozen_holding_the_report_lock_stalls_others_for_seconds_not_a_minute(
        pg_url: str, tmp_path: Path) -> None:
    """A collector freezes right after taking the report-order lock for window 1. Another collector skips window 1
    (its row is locked) and reports window 2 once the server cuts the frozen session off (5 s idle), not after
    the 60 s idle-in-transaction limit; window 1 is then reported too, once, exactly."""
    clock = FakeClock()
    users = ids(4, offset=100)
    with manual(pg_url, clock, replica_id="writer") as writer:
        writer.track(users[0], users[1], allowed=1, at=T0 + 1)
        writer.track(users[0], users[2], allowed=2, at=T0 + WINDOW + 1)
    ready = tmp_path / "ordered"
    frozen = SPAWN.Process(target=procs_lock.freeze_holding_the_report_lock, args=(pg_url, str(ready)))
    frozen.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the frozen collector never took the report lock"
        clock.past_window(T0 + WINDOW)
        with manual(pg_url, clock, replica_id="survivor") as survivor:
            began = time.monotonic()
            first = survivor.collect()
            waited = time.monotonic() - began
            assert [(int(r.window_start.timestamp()), r.allowed_requests) for r in first] == [(T0 + WINDOW, 2)]
            assert waited < 20, f"the frozen holder stalled another window's report for {waited:.1f} s"
            time.sleep(0.5)
            again = survivor.collect()  # window 1: its frozen collector's transaction was rolled back
            assert [(int(r.window_start.timestamp()), r.allowed_requests) for r in again] == [(T0, 1)]
            final = survivor.reports()
        assert [(r.allowed_requests, r.generated_by) for r in final] == [(1, "survivor"), (2, "survivor")]
    finally:
        if frozen.is_alive():
            os.kill(frozen.pid, signal.SIGKILL)
        frozen.join(10)
