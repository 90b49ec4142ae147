"""`aggregator collect`: every finished window reported now, then exit; held windows named, waited for on request."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

from aggregator import Aggregator
from tests.helpers import by_window


def _collect(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "aggregator", "collect", "--database-url", url, "--window", "2s",
                           *args], capture_output=True, text=True, timeout=120)


def _window_ago(seconds: int) -> float:
    """A moment inside the 2 s window that started about ``seconds`` ago."""
    return (int(time.time()) // 2 * 2) - seconds + 0.5


def test_collect_reports_the_last_windows_of_a_stopped_fleet(tmp_path: Path) -> None:
    """After every replica stopped, `aggregator collect` reports the windows they left open, exactly, and exits 0."""
    url = f"sqlite:///{tmp_path / 'agg.db'}"
    at = _window_ago(6)
    with Aggregator(database_url=url, window="2s", flush_interval="1h", collect=False, handle_sigterm=False) as agg:
        for k in range(5):
            agg.track(uuid.UUID(int=1), uuid.UUID(int=100 + k), allowed=2, at=at)
    done = _collect(url)
    assert (done.returncode, done.stderr) == (0, "")
    # The window tracked into, and the one the replica stopped in (empty) once it has ended too: on a
    # loaded machine the command may start after that.
    reports = Aggregator(database_url=url, window="2s").reports()
    assert f"collected {len(reports)} report(s)" in done.stdout
    report = by_window(reports)[int(at) // 2 * 2]
    assert (report.unique_users, report.allowed_requests, report.replicas_missing) == (5, 10, 0)
    assert sum(r.allowed_requests for r in reports) == 10


def test_collect_names_windows_held_by_a_live_replica_and_waits_for_its_lease(tmp_path: Path) -> None:
    """A replica that is alive but never flushes past a window holds it: collect exits 1 naming it; with
    --wait longer than --replica-lease the window is reported, saying one replica is missing."""
    url = f"sqlite:///{tmp_path / 'agg.db'}"
    live = Aggregator(database_url=url, window="2s", flush_interval="1h", collect=False, handle_sigterm=False).start()
    try:
        live.track(uuid.UUID(int=1), uuid.UUID(int=7), at=_window_ago(6))
        live.flush()  # its watermark is now; the window after it, once ended, is held by it
        time.sleep(4.5)
        held = _collect(url, "--replica-lease", "1h")
        assert held.returncode == 1 and "still held by live replicas' watermarks" in held.stderr
        waited = _collect(url, "--replica-lease", "1s", "--wait", "20s")
        assert waited.returncode == 0, waited.stderr
        assert "replica(s) missing" in waited.stdout
    finally:
        live.stop()
    reports = Aggregator(database_url=url, window="2s").reports()
    assert [r.unique_users for r in reports if r.allowed_requests] == [1]
    assert any(r.replicas_missing == 1 for r in reports)
