"""Flush: moves what a replica tracked into the store, exactly once, and publishes its watermark.

Each flush swaps the tracker's pending state out, turns it into a numbered batch (ids already sent for
a window are left out) stamped with the moment of the swap (the watermark), and applies it in one
transaction. A batch that fails, or whose commit outcome is unknown, stays as it is and is retried
first on the next flush with the same number; the store skips it if it had in fact been committed.
Only then is new data taken. During an outage, what is queued past the memory budget goes to a local
spool (``spool.py``) and is replayed, in order and under the same numbers, when the store answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import pathlib
import time
import uuid
from collections.abc import Callable

import sqlalchemy as sa

from aggregator import busy, exceptions, experiences, health, logs, meters, spool, store, tracker

log = logs.get_logger("aggregator.flush")

# A watermark is the swap's moment less this: a call that read the clock just before the swap but
# appended just after it (a thread preempted in between) is still covered. A call stalled longer
# than this between the two is counted as late data, never lost.
WATERMARK_SLACK = 1.0


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
    watermark: float | None = None  # the last watermark the store accepted
    spilled_batches: int = 0  # batches written to the local spool (memory budget hit during an outage)
    replayed_batches: int = 0  # spooled batches applied from the spool


class Flusher:
    """Owns one replica's flush sequence and the ids it has already sent per window."""

    def __init__(self, tracker_: tracker.Tracker, store_: store.Store, *, replica_id: str,
                 clock: Callable[[], float] = time.time, recorder: meters.Recorder | None = None,
                 checkpoints: experiences.Pending | None = None, contact: health.Contact | None = None,
                 spool_dir: str | None = None) -> None:
        self.tracker = tracker_
        self.recorder = recorder
        self.checkpoints = checkpoints
        self.store = store_
        self.replica_id = replica_id
        self.writer_id = uuid.uuid4()
        self.stats = FlushStats()
        self.contact = contact or health.Contact()
        self.spool_dir = spool_dir
        self._clock = clock
        self._seq = 0
        self._unconfirmed: store.Batch | None = None
        self._unconfirmed_ids: dict[int, tuple[set[int], set[int]]] = {}
        self._sent: dict[int, tuple[set[int], set[int]]] = {}
        self._spool: spool.Spool | None = None  # this incarnation's, opened at the first spill
        self._spooled_events = 0
        self.busy = busy.Busy()  # one flush at a time; stop() waits on it, then calls it off

    @property
    def unflushed_events(self) -> int:
        """Events tracked but not yet durable in the store: spooled, unconfirmed and pending."""
        pending = (self.tracker.pending_events() + (self.recorder.pending() if self.recorder else 0)
                   + (self.checkpoints.pending() if self.checkpoints else 0))
        return (self._unconfirmed.events if self._unconfirmed else 0) + self._spooled_events + pending

    @property
    def spooled_events(self) -> int:
        return self._spooled_events

    @property
    def spool_path(self) -> str | None:
        return str(self._spool.path) if self._spool is not None else None

    async def flush(self, *, final: bool = False) -> None:
        """Make everything tracked so far durable, or raise a StoreError leaving it queued.

        ``final``: the last flush of a clean stop; the store marks this incarnation stopped with it.
        """
        async with self.busy:
            await self._replay_spool()
            if self._unconfirmed is not None:
                await self._apply()
            self._unconfirmed, self._unconfirmed_ids = self._take(final=final)
            await self._apply()

    def _take(self, *, final: bool) -> tuple[store.Batch, dict[int, tuple[set[int], set[int]]]]:
        watermark = self._clock() - WATERMARK_SLACK  # read before the swap: see WATERMARK_SLACK
        return self._build(self.tracker.take(), self.recorder.take() if self.recorder else None,
                           self.checkpoints.take() if self.checkpoints else [], watermark=watermark, final=final)

    def queued_bytes(self) -> int:
        """An estimate of the memory held by what is queued for the store (unconfirmed and pending)."""
        ids = self.tracker.pending_ids()
        if self._unconfirmed is not None:
            ids += sum(len(w.workspaces) + len(w.users) for w in self._unconfirmed.windows.values())
        return ids * spool.BYTES_PER_ID + (self.recorder.pending() if self.recorder else 0) * 200 + (
            self.checkpoints.pending() if self.checkpoints else 0) * 500

    async def spill(self) -> int:
        """Move everything queued in memory to the local spool (during an outage); returns events spooled."""
        async with self.busy:
            moved = 0
            if self._unconfirmed is not None:
                moved += self._to_spool(self._unconfirmed)
                self._unconfirmed, self._unconfirmed_ids = None, {}
            batch, _ = self._take(final=False)
            if batch.events:
                moved += self._to_spool(batch)
            if moved:
                self.stats.spilled_batches += 1
                log.warning("spooled", events=moved, spooled_events=self._spooled_events,
                            path=self.spool_path, replica_id=self.replica_id)
            return moved

    def release_spool(self) -> None:
        """At stop: let this incarnation's spool go (deleted if empty), for the next start to adopt,
        even one in this same process."""
        if self._spool is not None:
            self._spool.close(delete_if_empty=True)
            self._spool = None

    def spool_directory(self) -> pathlib.Path:
        """This database's folder in the spool directory: a spool is only ever replayed into its own database."""
        url = sa.make_url(self.store.url)
        key = f"{url.get_backend_name()}://{url.host or ''}:{url.port or ''}/{url.database or ''}"
        base = pathlib.Path(self.spool_dir) if self.spool_dir else spool.default_directory(self.store.url)
        return base / hashlib.sha256(key.encode()).hexdigest()[:16]

    def _to_spool(self, batch: store.Batch) -> int:
        if self._spool is None:
            self._spool = spool.Spool.create(self.spool_directory(), self.writer_id, self.replica_id)
        self._spool.append(batch)
        self._spooled_events += batch.events
        return batch.events

    async def _replay_spool(self) -> None:
        """Apply this incarnation's spooled batches, oldest first, before anything newer."""
        own = self._spool
        while own is not None and len(own):
            try:
                batch = own.first()
            except spool.SpoolError as exc:  # damaged on disk: keep the file for an operator, go on
                log.error("spool_unreadable", error=str(exc), events_lost=self._spooled_events,
                          path=str(own.set_aside()), replica_id=self.replica_id)
                self._spool, self._spooled_events = None, 0
                return
            if batch is None:
                break
            await self._apply_batch(batch, self.writer_id)
            own.remove(batch.seq)
            self._spooled_events -= batch.events
            self.stats.replayed_batches += 1
        if own is not None and not len(own):
            own.close(delete_if_empty=True)
            self._spool = None
            self._spooled_events = 0

    async def replay_orphans(self) -> int:
        """Apply the spools that stopped replicas left in the spool directory; returns events replayed.

        Each keeps its own incarnation id and sequence numbers, so a replay cut short and done again
        applies nothing twice; its last batch marks that incarnation stopped.
        """
        directory = self.spool_directory()
        if not directory.is_dir():
            return 0
        replayed = 0
        for orphan in spool.Spool.orphans(directory):
            try:
                events = 0
                while (batch := self._first_of(orphan)) is not None:
                    last = len(orphan) == 1
                    if last:
                        batch = dataclasses.replace(batch, final=True)
                    await self._apply_batch(batch, orphan.writer_id, replica_id=orphan.replica_id)
                    orphan.remove(batch.seq)
                    events += batch.events
                log.info("spool_replayed", events=events, path=str(orphan.path), of_replica=orphan.replica_id,
                         replica_id=self.replica_id)
                replayed += events
            finally:
                orphan.close(delete_if_empty=True)
        return replayed

    def _first_of(self, orphan: spool.Spool) -> store.Batch | None:
        """The next batch of an adopted spool; None (and the file set aside or skipped) if it cannot be read."""
        try:
            return orphan.first()
        except spool.SpoolVersionError as exc:
            log.error("spool_skipped", error=str(exc), path=str(orphan.path), replica_id=self.replica_id)
        except spool.SpoolError as exc:
            log.error("spool_unreadable", error=str(exc), path=str(orphan.set_aside()), replica_id=self.replica_id)
        return None

    def _build(self, taken: dict[int, tracker.WindowData], metered: meters.MeterBatch | None,
               checkpoints: list[experiences.Checkpoint], *, watermark: float, final: bool,
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
                           checkpoints=checkpoints, watermark=watermark, final=final), new_ids

    async def _apply(self) -> None:
        batch = self._unconfirmed
        assert batch is not None
        await self._apply_batch(batch, self.writer_id)
        self._confirm()

    async def _apply_batch(self, batch: store.Batch, writer_id: uuid.UUID, replica_id: str | None = None) -> None:
        began = time.monotonic()
        try:
            result = await self.store.apply_batch(
                batch, writer_id=writer_id, replica_id=replica_id or self.replica_id, window=self.tracker.window,
                now=self._clock(), meter_defs=self.recorder.meters if self.recorder else None,
                urgencies=self.checkpoints.urgencies if self.checkpoints else None,
            )
        except asyncio.CancelledError:  # a stop called it off: the batch stays queued (or is spooled)
            log.info("flush_called_off", seq=batch.seq, events=batch.events, replica_id=self.replica_id)
            raise
        except BaseException as exc:
            self.stats.failures += 1
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, exceptions.StoreUnavailable):
                if self.contact.failed(self.stats.last_error):
                    log.warning("store_unavailable", error=self.stats.last_error, queued_events=self.unflushed_events,
                                replica_id=self.replica_id)
                else:
                    log.debug("flush_failed", seq=batch.seq, events=batch.events, replica_id=self.replica_id,
                              retries=self.contact.failures_in_row)
            else:
                log.warning("flush_failed", seq=batch.seq, events=batch.events, error=self.stats.last_error,
                            replica_id=self.replica_id)
            raise
        duration = time.monotonic() - began
        outage = self.contact.snapshot()
        if self.contact.succeeded():
            log.info("store_recovered", retries=outage["failures_in_row"], outage_s=outage["outage_for_s"],
                     replica_id=self.replica_id)
        self.stats.flushes += 1
        self.stats.events_flushed += batch.events
        self.stats.last_duration = duration
        self.stats.last_success_at = self._clock()
        self.stats.last_error = None
        if batch.watermark is not None and writer_id == self.writer_id:
            self.stats.watermark = batch.watermark
        if result.late_windows:
            self.stats.late_batches += 1
        self.stats.meter_overflow += result.overflowed
        # Empty flushes (heartbeats that publish the watermark) log at debug only.
        emit = log.info if batch.events or not result.applied else log.debug
        emit(
            "flush", seq=batch.seq, events=batch.events, windows=len(batch.windows),
            new_ids=sum(len(w.workspaces) + len(w.users) for w in batch.windows.values()),
            duration_ms=round(duration * 1000, 2), replayed=not result.applied,
            late_windows=result.late_windows or None, late_target=result.late_target,
            meter_overflow=result.overflowed or None, checkpoints=len(batch.checkpoints) or None,
            final=batch.final or None, replica_id=replica_id or self.replica_id,
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
