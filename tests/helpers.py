"""Shared test helpers: a controllable clock and an Aggregator whose jobs run only when told."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from aggregator import Aggregator, Report

WINDOW = 60
T0 = 1_800_000_000  # a window start: a multiple of WINDOW
GRACE = 5


class FakeClock:
    """Epoch seconds that move only when a test moves them."""

    def __init__(self, t: float = T0 + 1) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def past_window(self, start: int) -> None:
        """Move to just after ``start``'s window has ended and its grace passed."""
        self.t = start + WINDOW + GRACE + 1


def manual(url: str, clock: FakeClock, **kwargs: Any) -> Aggregator:
    """An Aggregator on a fake clock whose scheduled jobs never fire during a test."""
    kwargs.setdefault("flush_interval", "1h")
    kwargs.setdefault("collect_interval", "1h")
    return Aggregator(database_url=url, window=f"{WINDOW}s", grace=f"{GRACE}s", clock=clock,
                      handle_sigterm=False, **kwargs)


def ids(n: int, offset: int = 0) -> list[uuid.UUID]:
    return [uuid.UUID(int=offset + i + 1) for i in range(n)]


def by_window(reports: Iterable[Report]) -> dict[int, Report]:
    return {int(r.window_start.timestamp()): r for r in reports}


def total_requests(reports: Iterable[Report]) -> int:
    return sum(r.allowed_requests + r.denied_requests + r.late_allowed_requests + r.late_denied_requests
               for r in reports)


def assert_exact_per_window(truths: Iterable[dict[int, Any]], reports: list[Report]) -> None:
    """Each window has one report, equal to the ground truth merged from ``truths`` (what replica processes
    put: window start -> (workspaces, users, allowed, denied)), and nothing came late."""
    truth: dict[int, list[Any]] = {}
    for part in truths:
        for start, (ws, users, allowed, denied) in part.items():
            t = truth.setdefault(start, [set(), set(), 0, 0])
            t[0] |= set(ws)
            t[1] |= set(users)
            t[2] += allowed
            t[3] += denied
    got = by_window(reports)
    assert len(got) == len(reports), "more than one report for a window"
    assert set(truth) <= set(got)
    mismatches = [
        (start, (r.unique_workspaces, r.unique_users, r.allowed_requests, r.denied_requests),
         (len(t[0]), len(t[1]), t[2], t[3]))
        for start, t in sorted(truth.items())
        if (r := got[start]) and (r.unique_workspaces, r.unique_users, r.allowed_requests, r.denied_requests)
        != (len(t[0]), len(t[1]), t[2], t[3])
    ]
    assert mismatches == []
    assert sum(r.late_allowed_requests + r.late_denied_requests for r in reports) == 0
    assert total_requests(reports) == sum(t[2] + t[3] for t in truth.values())


def far_future_reader(url: str) -> Aggregator:
    """A collector whose clock is past every window a test could have written; a replica that died
    without stopping holds its windows for the (short) lease of 1 s."""
    return Aggregator(database_url=url, window=f"{WINDOW}s", grace=f"{GRACE}s", flush_interval="1h",
                      collect_interval="1h", replica_lease="1s", clock=lambda: time.time() + 10 * WINDOW,
                      handle_sigterm=False)


def collect_all(reader: Aggregator, within: float = 30.0) -> None:
    """Collect until no finished window is held (a killed replica's are, for its lease)."""
    deadline = time.monotonic() + within
    reader.collect()
    while reader._call(reader.aheld_windows):
        assert time.monotonic() < deadline, "windows still held"
        time.sleep(0.2)
        reader.collect()


def reported(url: str) -> int:
    """Every request in the reports of ``url``, late fields included, after collecting every window."""
    with far_future_reader(url) as reader:
        collect_all(reader)
        return total_requests(reader.reports())


def debian_executables(packages: Mapping[str, str], extra_path: str | None = None) -> dict[str, str]:
    """The executables named in ``packages`` (executable: the Debian package shipping it), found on PATH (then
    ``extra_path``); when one is missing, a skip naming the packages to install, or a failure under CI=true."""
    found = {name: shutil.which(name) or (shutil.which(name, path=extra_path) if extra_path else None)
             for name in packages}
    absent = [name for name, path in found.items() if path is None]
    if not absent:
        return {name: str(path) for name, path in found.items()}
    needed = sorted({packages[name] for name in absent})
    named = ", ".join(f"`{package}`" for package in needed)
    message = (f"{', '.join(absent)} not found: install the Debian package{'s' if len(needed) > 1 else ''} "
               f"{named} (apt-get install -y {' '.join(needed)})")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
