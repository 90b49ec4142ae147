"""reports.next_report: what a reader is told while there is no report yet."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st

from aggregator import reports

UTC = dt.timezone.utc


def test_next_report_on_the_default_settings() -> None:
    """Seen at 00:10 with 30 m windows and 60 s flushes: the window closes at 00:30, the report is expected a
    flush and a collection run later, and at the latest max_collect_delay after the end."""
    now = dt.datetime(2026, 12, 5, 0, 10, tzinfo=UTC).timestamp()
    due = reports.next_report(now, window=1800, flush_interval=60, grace=0, collect_interval=15,
                              max_collect_delay=1800)
    assert (due.window_start, due.window_end, due.expected_by, due.at_latest) == (
        dt.datetime(2026, 12, 5, 0, 0, tzinfo=UTC), dt.datetime(2026, 12, 5, 0, 30, tzinfo=UTC),
        dt.datetime(2026, 12, 5, 0, 31, 22, 500000, tzinfo=UTC), dt.datetime(2026, 12, 5, 1, 0, 22, 500000, tzinfo=UTC))
    assert due.sentence() == (
        "no report yet: the window 2026-12-05T00:00:00Z - 2026-12-05T00:30:00Z closes at 2026-12-05T00:30:00Z; "
        "its report is expected by 2026-12-05T00:31:22.500000Z (at the latest 2026-12-05T01:00:22.500000Z)")
    assert due.sentence(first=False).startswith("no new report yet: the window 2026-12-05T00:00:00Z - ")


@given(now=st.floats(0, 4e9), window=st.integers(1, 86400), flush=st.floats(0.01, 3600), grace=st.floats(0, 3600),
       collect=st.floats(0.01, 60), delay=st.floats(0.01, 86400))
def test_next_report_is_the_open_windows_and_never_promised_after_its_latest(
        now: float, window: int, flush: float, grace: float, collect: float, delay: float) -> None:
    """The window holds ``now`` and is aligned to the epoch; the expected time is after the end and never after
    the latest."""
    due = reports.next_report(now, window=window, flush_interval=flush, grace=grace, collect_interval=collect,
                              max_collect_delay=delay)
    start, end = due.window_start.timestamp(), due.window_end.timestamp()
    assert (start % window, end - start) == (0, window)
    assert start <= now < end
    assert end < due.expected_by.timestamp() <= due.at_latest.timestamp()
