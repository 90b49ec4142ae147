"""In-process tracking: the synchronous hot path, with no I/O and no awaits.

``track()`` validates its arguments, then adds them to the pending state of the time-aligned window
that contains the moment of the call. The flusher swaps the pending state out atomically, so a call
made while a flush is in its database round-trip lands in the next batch instead of being lost.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from collections.abc import Callable
from typing import cast

from aggregator import exceptions, values

FIELDS = 5
_UUID = uuid.UUID


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


# The checks of the one edge, under the names the hot path and older callers use.
MAX_COUNT = values.MAX_COUNT
uuid_int = values.uuid_int
count = values.count


def since_epoch(since: object) -> int | None:
    """A ``since`` filter (aware datetime or epoch seconds, or None for all) as whole epoch seconds."""
    return None if since is None else int(values.moment(since, "since"))


class Tracker:
    """Pending per-window state of one replica, safe to call from any thread.

    ``track()`` validates and appends ``workspace, user, allowed, denied, time`` to a flat buffer with
    one ``list.extend`` of a tuple, which is atomic, so it takes no lock. (Flat, rather than a list of
    tuples: the tuple is freed at once, so the calls create no objects for the garbage collector to
    walk, and a drain reads each field as one C-level slice.) ``drain()`` (a background job, and every
    flush) takes items by position (``del buffer[:n]``), so an append racing a drain lands after
    position ``n`` and is kept. ``close()`` stays exact without a lock on the hot path too: a call
    checks that the tracker is open *after* appending; one that finds it closed waits for the final
    drain, then returns if its item was taken (it is in the final flush) or removes it and raises.
    """

    def __init__(self, window: int, clock: Callable[[], float] = time.time,
                 within: values.TimeRange = values.DEFAULT_RANGE) -> None:
        self.window = window
        self._clock = clock
        self.within = within  # an explicit ``at`` must be this close to the clock
        self._buffer: list[float] = []  # FIELDS values per call; ints are ints, the time a float
        self._open = True
        self._final_drain_done = threading.Event()
        self._fold_lock = threading.Lock()  # drain(), take() and refusals: one at a time
        self._pending: dict[int, WindowData] = {}

    def track(self, workspace_id: object, user_id: object, allowed: object = 1, denied: object = 0,
              at: object = None) -> None:
        """Record one observation; validates everything before touching state."""
        # The common case (UUID objects, small non-negative ints, now) in as few steps as possible;
        # anything else takes the slow path, which validates fully and explains what is wrong.
        if (type(workspace_id) is _UUID and type(user_id) is _UUID and type(allowed) is int
                and type(denied) is int and not (allowed | denied) >> 32 and at is None):
            item = (workspace_id.int, user_id.int, allowed, denied, self._clock())
        else:
            item = (uuid_int(workspace_id, "workspace_id"), uuid_int(user_id, "user_id"),
                    count(allowed, "allowed"), count(denied, "denied"),
                    self._clock() if at is None else values.moment(at, now=self._clock(), within=self.within))
        self._buffer.extend(item)
        if not self._open:
            self._after_close(item)

    def _after_close(self, item: tuple[int, int, int, int, float]) -> None:
        """A call that raced close(): recorded if the final drain took its item, else undone and refused.

        An untaken item equal to ours may be another call's; removing either leaves the same state,
        and that call then finds none left and counts as recorded, so each equal call is one or the other.
        """
        self._final_drain_done.wait()
        values = list(item)
        with self._fold_lock:
            buffer = self._buffer
            for index in range(len(buffer) - FIELDS, -1, -FIELDS):
                if buffer[index:index + FIELDS] == values:
                    del buffer[index:index + FIELDS]
                    raise exceptions.NotRunning(
                        "Aggregator is stopped; this event was not recorded. Create a new Aggregator")

    def _take_buffer(self) -> list[float]:
        buffer = self._buffer
        n = len(buffer)  # a multiple of FIELDS: each extend() is atomic
        events = buffer[:n]
        del buffer[:n]  # appends made meanwhile sit after position n and stay
        return events

    def drain(self) -> int:
        """Fold buffered calls into per-window state (background work, off the caller's path)."""
        with self._fold_lock:
            events = self._take_buffer()
            self._fold(events)
        return len(events) // FIELDS

    def _fold(self, events: list[float]) -> None:
        if not events:
            return
        window, pending = self.window, self._pending
        # Columns of the flat buffer; all but the times hold ints (the buffer's type cannot say so).
        workspaces, users, allowed, denied = (cast("list[int]", events[i::FIELDS]) for i in range(FIELDS - 1))
        times = events[FIELDS - 1::FIELDS]
        start = int(min(times) // window) * window
        if max(times) < start + window:  # all in one window (the usual case): fold column by column
            data = pending.get(start) or pending.setdefault(start, WindowData())
            data.workspaces.update(workspaces)
            data.users.update(users)
            data.allowed += sum(allowed)
            data.denied += sum(denied)
            data.events += len(times)
            return
        for workspace, user, a, d, t in zip(workspaces, users, allowed, denied, times, strict=True):
            start = int(t // window) * window
            data = pending.get(start) or pending.setdefault(start, WindowData())
            data.workspaces.add(workspace)
            data.users.add(user)
            data.allowed += a
            data.denied += d
            data.events += 1

    def take(self) -> dict[int, WindowData]:
        """Everything tracked so far, folded, leaving the tracker empty; later calls go to a fresh batch.

        After close(), the first take() is the final drain: calls that raced close() learn from it
        whether they were included.
        """
        with self._fold_lock:
            self._fold(self._take_buffer())
            pending, self._pending = self._pending, {}
            if not self._open:
                self._final_drain_done.set()
        return pending

    def pending_events(self) -> int:
        with self._fold_lock:
            folded = sum(data.events for data in self._pending.values())
        return folded + len(self._buffer) // FIELDS

    def pending_ids(self) -> int:
        """Ids held in the folded state and the buffer (the bulk of a replica's memory between flushes)."""
        with self._fold_lock:
            folded = sum(len(data.workspaces) + len(data.users) for data in self._pending.values())
        return folded + 2 * (len(self._buffer) // FIELDS)

    def close(self) -> None:
        """Refuse further calls; each call either is in the final take() or raises."""
        self._open = False

    def finish(self) -> None:
        """After close(): no take() will follow (or it has happened); calls waiting on it decide now."""
        self._final_drain_done.set()

    def reset_after_fork(self) -> None:
        """In a forked child: new locks (the parent's may be held) and no inherited data."""
        self.__init__(self.window, self._clock, self.within)  # type: ignore[misc]
