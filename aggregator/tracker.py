"""In-process tracking: the synchronous hot path, with no I/O and no awaits.

``track()`` validates its arguments, then adds them to the pending state of the time-aligned window
that contains the moment of the call. The flusher swaps the pending state out atomically, so a call
made while a flush is in its database round-trip lands in the next batch instead of being lost.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import threading
import time
import uuid
from collections.abc import Callable

from aggregator import exceptions

# Per-call ceiling on a count: far above any real request count, far below 64-bit overflow.
MAX_COUNT = 2**32


@dataclasses.dataclass(slots=True)
class WindowData:
    """What one replica saw in one window since its last swap; ids are ``UUID.int`` values."""

    workspaces: set[int] = dataclasses.field(default_factory=set)
    users: set[int] = dataclasses.field(default_factory=set)
    allowed: int = 0
    denied: int = 0
    events: int = 0


def window_start(moment: float, window: int) -> int:
    """Start (epoch seconds) of the ``window``-second window aligned to the epoch that holds ``moment``."""
    return int(moment // window) * window


def uuid_int(value: object, name: str) -> int:
    """``value`` (a UUID or its string form) as a 128-bit int; raises naming ``name`` otherwise."""
    if type(value) is uuid.UUID:
        return value.int
    if isinstance(value, str):
        try:
            return uuid.UUID(value).int
        except ValueError:
            raise exceptions.InvalidInput(
                f"{name}={value!r} is not a UUID; pass a uuid.UUID or a string like "
                "'123e4567-e89b-12d3-a456-426614174000'"
            ) from None
    if isinstance(value, uuid.UUID):
        return value.int
    raise exceptions.InvalidType(f"{name}={value!r} is a {type(value).__name__}, not a UUID or UUID string")


def count(value: object, name: str) -> int:
    """``value`` checked as a request count: an int (not a bool) from 0 to MAX_COUNT."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise exceptions.InvalidType(f"{name}={value!r} is a {type(value).__name__}; pass an int >= 0")
        value = int(value)
    if not 0 <= value <= MAX_COUNT:
        raise exceptions.InvalidInput(f"{name}={value!r} is out of range; pass an int from 0 to {MAX_COUNT}")
    return value


def moment(value: object) -> float:
    """An explicit event time (aware datetime or epoch seconds) as epoch seconds."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise exceptions.InvalidInput(
                f"at={value!r} is a naive datetime; pass an aware one, e.g. datetime.now(timezone.utc)"
            )
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise exceptions.InvalidInput(f"at={value!r} is not a valid epoch time in seconds")
        return float(value)
    raise exceptions.InvalidType(f"at={value!r} is a {type(value).__name__}; pass an aware datetime or epoch seconds")


class Tracker:
    """Pending per-window state of one replica, safe to call from any thread."""

    def __init__(self, window: int, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, WindowData] = {}
        self._closed = False

    def track(self, workspace_id: object, user_id: object, allowed: object = 1, denied: object = 0,
              at: object = None) -> None:
        """Record one observation; validates everything before touching state."""
        workspace = uuid_int(workspace_id, "workspace_id")
        user = uuid_int(user_id, "user_id")
        allowed_n = count(allowed, "allowed")
        denied_n = count(denied, "denied")
        start = window_start(self._clock() if at is None else moment(at), self.window)
        with self._lock:
            if self._closed:
                raise exceptions.NotRunning(
                    "Aggregator is stopped; this event was not recorded. Create a new Aggregator")
            data = self._pending.get(start)
            if data is None:
                data = self._pending[start] = WindowData()
            data.workspaces.add(workspace)
            data.users.add(user)
            data.allowed += allowed_n
            data.denied += denied_n
            data.events += 1

    def take(self) -> dict[int, WindowData]:
        """Everything pending, leaving the tracker empty; later calls go to a fresh batch."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return pending

    def close(self) -> None:
        """Refuse further calls; a call either got in before this (and is in the final take) or raises."""
        with self._lock:
            self._closed = True

    def pending_events(self) -> int:
        with self._lock:
            return sum(data.events for data in self._pending.values())

    def reset_after_fork(self) -> None:
        """In a forked child: a new lock (the parent's may be held) and no inherited data."""
        self._lock = threading.Lock()
        self._pending = {}
        self._closed = False
