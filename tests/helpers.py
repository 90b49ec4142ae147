"""Shared test helpers: a controllable clock and an Aggregator whose jobs run only when told."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

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
