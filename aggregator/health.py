"""Health of one replica: its link to the store, and whether reports keep coming.

``Contact`` records since when the database answers (the flusher and the collector report every store
operation's outcome to it; the collector asks it before giving up on other replicas). ``evaluate()``
turns ``status()`` figures into ok, degraded or failing with a sentence per reason, for ``status()``,
``/healthz`` and ``/metrics``. No I/O.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Mapping
from typing import Any, Literal

State = Literal["ok", "degraded", "failing"]
STATES: tuple[State, ...] = ("ok", "degraded", "failing")


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


@dataclasses.dataclass(frozen=True, slots=True)
class Bounds:
    """Where slow or failing turns unhealthy (settings ``health_overdue_after``, ``health_failures_in_row``)."""

    overdue_after: float  # seconds after its end that a window may stay unreported
    failures_in_row: int  # flushes, or collections, failed in a row


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    """ok, degraded (serving, but reports are late or at risk) or failing (the store cannot be used)."""

    state: State
    reasons: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "reasons": list(self.reasons)}


def evaluate(status: Mapping[str, Any], bounds: Bounds, *, now: float) -> Health:
    """The health that ``status`` (``Aggregator.status()`` without its "health") shows at ``now`` (epoch s).

    Failing: this replica cannot use its store (not running, not reached yet, in an outage, or the
    schema or settings refused). Degraded: the oldest finished window this replica's collector saw
    unreported is older than ``overdue_after`` past its end, ``failures_in_row`` collections or flushes
    failed in a row, or items are quarantined. Failing reasons come first.
    """
    failing = _failing(status)
    degraded = _degraded(status, bounds, now)
    state: State = "failing" if failing else "degraded" if degraded else "ok"
    return Health(state, tuple(failing + degraded))


def _failing(status: Mapping[str, Any]) -> list[str]:
    if status.get("state", "running") != "running":
        return [f"the Aggregator is {status['state']}, not running"]
    store = status.get("store") or {}
    if store.get("fatal_error"):
        return [f"the database answers but cannot be used: {store['fatal_error']}"]
    if store.get("outage_for_s") is not None:
        return [f"the database has been unreachable for {span(store['outage_for_s'])} "
                f"({_count(store.get('failures_in_row', 0), 'failed attempt')} in a row): {store.get('last_error')}"]
    if not store.get("ready", False):
        return [f"the database has not answered yet: {store.get('last_error') or 'connecting'}"]
    return []


def _degraded(status: Mapping[str, Any], bounds: Bounds, now: float) -> list[str]:
    reasons: list[str] = []
    collector = status.get("collector")
    if collector is not None:
        if collector.oldest_unreported is not None:
            start, end = collector.oldest_unreported
            late = now - end
            if late > bounds.overdue_after:
                reasons.append(f"window {_iso(start)} ended {span(late)} ago and is not reported yet, over "
                               f"health_overdue_after {span(bounds.overdue_after)}")
        if collector.failures_in_row >= bounds.failures_in_row:
            reasons.append(f"{_count(collector.failures_in_row, 'collection')} failed in a row, at or over "
                           f"health_failures_in_row {bounds.failures_in_row}: {collector.last_error}")
    flush = status.get("flush")
    if flush is not None and flush.failures_in_row >= bounds.failures_in_row:
        reasons.append(f"{_count(flush.failures_in_row, 'flush')} failed in a row, at or over health_failures_in_row "
                       f"{bounds.failures_in_row}: {flush.last_error}")
    # Quarantined items (poison set aside, per kind) wait for an operator: reports go on without them.
    quarantined = status.get("quarantined") or {}
    if total := sum(quarantined.values()):
        kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(quarantined.items()) if n)
        reasons.append(f"{_count(total, 'item')} quarantined ({kinds}), over 0: see `aggregator quarantine list`")
    return reasons


def span(seconds: float) -> str:
    """A duration as people read it: 45s, 14m, 1h5m, 2d3h."""
    whole = int(max(seconds, 0.0))
    if whole < 60:
        return f"{seconds:.3g}s" if seconds < 1 else f"{whole}s"
    for unit, size, smaller, small_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if whole >= size:
            big, rest = divmod(whole, size)
            return f"{big}{unit}{rest // small_size}{smaller}" if rest // small_size else f"{big}{unit}"
    raise AssertionError("unreachable")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("sh") else f"{n} {noun}s"


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
