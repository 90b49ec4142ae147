"""Flush: moves what a replica tracked into the store, exactly once.

Each flush swaps the tracker's pending state out, turns it into a numbered batch (ids already sent for
a window are left out), and applies it in one transaction. A batch that fails, or whose commit outcome
is unknown, stays as it is and is retried first on the next flush with the same number; the store
skips it if it had in fact been committed. Only then is new data taken.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import Callable

import structlog

from aggregator import experiences, meters, store, tracker

log = structlog.get_logger("aggregator.flush")


@dataclasses.dataclass(slots=True)
class FlushStats:
    """Figures of the last flush, and running totals, for logs and metrics."""

    flushes: int = 0
    failures: int = 0
    events_flushed: int = 0
    late_batches: int = 0
    last_duration: float = 0.0
    last_success_at: float | None = None
    last_error: str | None = None
    meter_overflow: int = 0  # meter records this replica's flushes sent to __overflow__ groups


class Flusher:
    """Owns one replica's flush sequence and the ids it has already sent per window."""

    def __init__(self, tracker_: tracker.Tracker, store_: store.Store, *, replica_id: str,
                 clock: Callable[[], float] = time.time, recorder: meters.Recorder | None = None,
                 checkpoints: experiences.Pending | None = None) -> None:
        self.tracker = tracker_
        self.recorder = recorder
        self.checkpoints = checkpoints
        self.store = store_
        self.replica_id = replica_id
        self.writer_id = uuid.uuid4()
        self.stats = FlushStats()
        self._clock = clock
        self._seq = 0
        self._unconfirmed: store.Batch | None = None
        self._unconfirmed_ids: dict[int, tuple[set[int], set[int]]] = {}
        self._sent: dict[int, tuple[set[int], set[int]]] = {}
        self.busy = asyncio.Lock()  # one flush at a time; stop() waits on it

    @property
    def unflushed_events(self) -> int:
        """Events tracked but not yet durable: the unconfirmed batch plus what is pending."""
        pending = (self.tracker.pending_events() + (self.recorder.pending() if self.recorder else 0)
                   + (self.checkpoints.pending() if self.checkpoints else 0))
        return (self._unconfirmed.events if self._unconfirmed else 0) + pending

    async def flush(self) -> None:
        """Make everything tracked so far durable, or raise a StoreError leaving it queued."""
        async with self.busy:
            if self._unconfirmed is not None:
                await self._apply()
            self._unconfirmed, self._unconfirmed_ids = self._build(
                self.tracker.take(), self.recorder.take() if self.recorder else None,
                self.checkpoints.take() if self.checkpoints else [])
            await self._apply()

    def _build(self, taken: dict[int, tracker.WindowData], metered: meters.MeterBatch | None,
               checkpoints: list[experiences.Checkpoint]
               ) -> tuple[store.Batch, dict[int, tuple[set[int], set[int]]]]:
        self._seq += 1
        windows: dict[int, store.BatchWindow] = {}
        new_ids: dict[int, tuple[set[int], set[int]]] = {}
        events = 0
        for start, data in taken.items():
            sent_workspaces, sent_users = self._sent.get(start, (set(), set()))
            workspaces = data.workspaces - sent_workspaces
            users = data.users - sent_users
            new_ids[start] = (workspaces, users)
            windows[start] = store.BatchWindow(
                workspaces=list(workspaces), users=list(users),
                allowed=data.allowed, denied=data.denied,
            )
            events += data.events
        events += (metered.records if metered else 0) + len(checkpoints)
        return store.Batch(seq=self._seq, windows=windows, events=events, meters=metered,
                           checkpoints=checkpoints), new_ids

    async def _apply(self) -> None:
        batch = self._unconfirmed
        assert batch is not None
        began = time.monotonic()
        try:
            result = await self.store.apply_batch(
                batch, writer_id=self.writer_id, replica_id=self.replica_id, window=self.tracker.window,
                now=self._clock(), meter_defs=self.recorder.meters if self.recorder else None,
                urgencies=self.checkpoints.urgencies if self.checkpoints else None,
            )
        except BaseException as exc:
            self.stats.failures += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("flush_failed", seq=batch.seq, events=batch.events, error=self.stats.last_error,
                        replica_id=self.replica_id)
            raise
        duration = time.monotonic() - began
        self._confirm()
        self.stats.flushes += 1
        self.stats.events_flushed += batch.events
        self.stats.last_duration = duration
        self.stats.last_success_at = self._clock()
        self.stats.last_error = None
        if result.late_windows:
            self.stats.late_batches += 1
        self.stats.meter_overflow += result.overflowed
        # Empty flushes (heartbeats that keep the open window known) log at debug only.
        emit = log.info if batch.events or not result.applied else log.debug
        emit(
            "flush", seq=batch.seq, events=batch.events, windows=len(batch.windows),
            new_ids=sum(len(w.workspaces) + len(w.users) for w in batch.windows.values()),
            duration_ms=round(duration * 1000, 2), replayed=not result.applied,
            late_windows=result.late_windows or None, late_target=result.late_target,
            meter_overflow=result.overflowed or None, checkpoints=len(batch.checkpoints) or None,
            replica_id=self.replica_id,
        )

    def _confirm(self) -> None:
        for start, (workspaces, users) in self._unconfirmed_ids.items():
            sent = self._sent.setdefault(start, (set(), set()))
            sent[0].update(workspaces)
            sent[1].update(users)
        self._unconfirmed, self._unconfirmed_ids = None, {}
        # Remember sent ids for the current and previous window only: resending an id is harmless
        # (the store ignores duplicates), keeping them forever is not.
        oldest = tracker.window_start(self._clock(), self.tracker.window) - self.tracker.window
        for start in [s for s in self._sent if s < oldest]:
            del self._sent[start]
