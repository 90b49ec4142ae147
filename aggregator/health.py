"""Health of one replica's link to its store: since when it is in touch, and the outage it is in.

The flusher and the collector report every store operation's outcome here. The collector asks it
before giving up on other replicas; ``status()``, ``/healthz`` and ``/metrics`` show it. No I/O.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class Contact:
    """Whether the database answers this process, and for how long it has (monotonic clock)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.connected_since: float | None = None  # None: not in touch (never yet, or since a failure)
        self.outage_since: float | None = None
        self.failures_in_row = 0
        self.outages = 0
        self.last_error: str | None = None

    def succeeded(self) -> bool:
        """Record an answer; returns True when it ends an outage (to log the recovery once)."""
        with self._lock:
            recovered = self.outage_since is not None
            if self.connected_since is None:
                self.connected_since = self._clock()
            self.outage_since = None
            self.failures_in_row = 0
            return recovered

    def failed(self, error: str) -> bool:
        """Record a failure to reach the store; returns True when it starts an outage (to log it once)."""
        with self._lock:
            began = self.outage_since is None
            if began:
                self.outage_since = self._clock()
                self.outages += 1
            self.connected_since = None
            self.failures_in_row += 1
            self.last_error = error
            return began

    def connected_for(self) -> float:
        """Seconds of unbroken contact with the store (0 when out of touch)."""
        since = self.connected_since
        return 0.0 if since is None else self._clock() - since

    def snapshot(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "connected": self.connected_since is not None,
            "connected_for_s": round(now - self.connected_since, 3) if self.connected_since is not None else 0.0,
            "outage_for_s": round(now - self.outage_since, 3) if self.outage_since is not None else None,
            "failures_in_row": self.failures_in_row,
            "outages": self.outages,
            "last_error": self.last_error,
        }
