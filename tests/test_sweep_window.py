"""A collector's experience sweep with nothing to time out leaves no trace: no window row.

A window row made by nobody's flush is a window with no holder: a collector could close it before a
replica whose first flush is still on its way has registered, and report it without that replica's data
(found with the replicas and PostgreSQL stalled behind a slow proxy; see the closing note of #14's stop).
"""

from __future__ import annotations

from aggregator import store

NOW = 1_796_000_030.0


async def test_a_sweep_with_nothing_due_creates_no_window(database_url: str) -> None:
    """Sweeping an empty store times nothing out and leaves no open window for a collector to close."""
    db = store.Store(database_url)
    try:
        await db.ping()
        timed_out = await db.sweep_experiences(now=NOW, window=60)
        windows = await db.open_windows(ended_by=NOW + 3600)
    finally:
        await db.close()
    assert (timed_out, windows) == ([], [])
