"""Flush: moves what a replica tracked into the store, exactly once, and publishes its watermark.

Each flush swaps the tracker's pending state out, turns it into a numbered batch (ids already sent for
a window are left out) stamped with the moment of the swap (the watermark), and applies it in one
transaction. A batch that fails, or whose commit outcome is unknown, stays as it is and is retried
first on the next flush with the same number; the store skips it if it had in fact been committed.
Only then is new data taken. During an outage, what is queued past the memory budget goes to a local
spool (``spool/``) and is replayed, in order and under the same numbers, when the store answers.
A batch the store refuses for a reason of its own (a value out of range) is applied less the windows at
fault, which go to the quarantine in the same commit (``_isolate``): the flush never stalls on them.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import pathlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa

from aggregator import busy, exceptions, experiences, health, logs, meters, quarantine, spool, store, tracker

log = logs.get_logger("aggregator.flush")

# A watermark is the swap's moment less this: a call that read the clock just before the swap but
# appended just after it (a thread preempted in between) is still covered. A call stalled longer
# than this between the two is counted as late data, never lost.
WATERMARK_SLACK = 1.0
# How often a flusher looks for flush parts handed back from the quarantine when no count says so.
QUARANTINE_CHECK_S = 30.0


@dataclasses.dataclass(slots=True)
class FlushStats:
    """Figures of the last flush, and running totals, for logs and metrics."""

    flushes: int = 0
    failures: int = 0
    failures_in_row: int = 0  # flush attempts failed since the last that succeeded (health.py)
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
        self._quarantine_checked = time.monotonic() - QUARANTINE_CHECK_S  # the first flush looks

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

    async def register(self, *, since: float) -> None:
        """Make this incarnation known to the collectors before its first flush, holding what it tracked
        from ``since`` on: until then a window it holds data of could be closed without it."""
        await self.store.register(self.writer_id, self.replica_id, watermark=since - WATERMARK_SLACK,
                                  now=self._clock())

    async def flush(self, *, final: bool = False, retries: bool = False) -> None:
        """Make everything tracked so far durable, or raise a StoreError leaving it queued.

        ``final``: the last flush of a clean stop; the store marks this incarnation stopped with it.
        ``retries``: also look for flush parts handed back from the quarantine now (a host's flush()).
        """
        async with self.busy:
            await self._replay_spool()
            if self._unconfirmed is not None:
                await self._apply()
            self._unconfirmed, self._unconfirmed_ids = self._take(final=final)
            await self._apply()
            if not final and (retries or self._quarantine_check_due()):
                await self._retry_quarantined()

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
        apply = functools.partial(
            self.store.apply_batch, writer_id=writer_id, replica_id=replica_id or self.replica_id,
            window=self.tracker.window, now=self._clock(), meter_defs=self.recorder.meters if self.recorder else None,
            urgencies=self.checkpoints.urgencies if self.checkpoints else None)
        try:
            try:
                result = await apply(batch)
            except Exception as exc:
                if quarantine.is_transient(exc):
                    raise
                result = await self._isolate(batch, apply, exc, writer_id=writer_id,
                                             replica_id=replica_id or self.replica_id)
        except asyncio.CancelledError:  # a stop called it off: the batch stays queued (or is spooled)
            log.info("flush_called_off", seq=batch.seq, events=batch.events, replica_id=self.replica_id)
            raise
        except BaseException as exc:
            self.stats.failures += 1
            self.stats.failures_in_row += 1
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
        self.stats.failures_in_row = 0
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

    async def _isolate(self, batch: store.Batch, apply: Callable[..., Awaitable[store.BatchResult]],
                       error: Exception, *, writer_id: uuid.UUID, replica_id: str) -> store.BatchResult:
        """Apply ``batch`` less its parts the store refuses for a reason of their own, which are set aside.

        The store refused the batch, and not because it is away: each part (per window: its counts and
        ids, its meter records, its checkpoints) is tried alone in a transaction rolled back, and the parts that
        fail go to the quarantine in the commit of the rest of the batch, under the batch's number: so a
        retry after an ambiguous commit changes nothing, and each part is either applied or set aside,
        once. If the batch fails without any of its parts (nothing of the data at fault), ``error`` stands.
        """
        window = self.tracker.window
        try:
            await apply(_select(batch, window, lambda unit: False), probe=True)
        except Exception as exc:
            if quarantine.is_transient(exc):
                raise
            raise error from None
        items: list[quarantine.Item] = []
        refused: set[tuple[int, str]] = set()
        for unit in _units(batch, window):
            part = _select(batch, window, unit.__eq__)

            async def refuse(item: quarantine.Item, unit: tuple[int, str] = unit) -> None:
                items.append(item)
                refused.add(unit)

            await quarantine.guard("flush", quarantine.ref(writer_id, batch.seq, *unit),
                                   functools.partial(apply, part, probe=True), set_aside=refuse,
                                   payload=_payload(part, replica_id, writer_id, unit), announced=False)
        if not items:
            raise error
        result = await apply(_select(batch, window, lambda unit: unit not in refused), set_aside=items)
        for item in items:
            quarantine.announce(item, seq=batch.seq, replica_id=self.replica_id)
        return result

    def _quarantine_check_due(self) -> bool:
        """Whether to look for flush parts handed back (no I/O): when the counts last read (by this flusher
        or the collector) show some, else every QUARANTINE_CHECK_S; never on the flush's own path otherwise."""
        if self.store.quarantine_statuses.get("flush", {}).get("retry"):
            return True
        now = time.monotonic()
        if now - self._quarantine_checked < QUARANTINE_CHECK_S:
            return False
        self._quarantine_checked = now
        return True

    async def _retry_quarantined(self) -> None:
        """Apply the flush parts handed back from the quarantine (`aggregator quarantine retry`), each once.

        Any replica may take one: the commit that applies it deletes its row. Reads the quarantine's counts
        too (status() shows them). A database away leaves them for the next flush.
        """
        try:
            counts = await self.store.quarantine_counts()
            if not counts.get("flush", {}).get("retry"):
                return
            for item in await self.store.quarantine_retries("flush"):
                await quarantine.guard("flush", item["ref"], functools.partial(self._apply_retried, item),
                                       set_aside=self._set_aside, payload=json.loads(item["payload"] or "null"),
                                       replica_id=self.replica_id)
        except exceptions.StoreError as exc:
            log.warning("quarantine_retry_failed", error=str(exc), replica_id=self.replica_id)

    async def _apply_retried(self, item: dict[str, Any]) -> None:
        payload = json.loads(item["payload"] or "null")
        if not isinstance(payload, dict) or not isinstance(payload.get("batch"), str):
            raise exceptions.InvalidInput(f"quarantined flush item {item['id']} has no batch in its payload; it "
                                          "cannot be applied (delete it from the quarantine table)")
        part = spool.decode(base64.b64decode(payload["batch"]), source=f"quarantined flush item {item['id']}")
        result = await self.store.apply_quarantined(
            item["id"], part, replica_id=str(payload.get("replica_id") or self.replica_id),
            window=self.tracker.window, now=self._clock(), meter_defs=self.recorder.meters if self.recorder else None,
            urgencies=self.checkpoints.urgencies if self.checkpoints else None)
        if result is not None:
            log.info("quarantine_retried", kind="flush", ref=item["ref"], id=item["id"],
                     late_windows=result.late_windows or None, replica_id=self.replica_id)

    async def _set_aside(self, item: quarantine.Item) -> None:
        await self.store.set_aside(item, now=self._clock(), by=self.replica_id)

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


def _units(batch: store.Batch, window: int) -> list[tuple[int, str]]:
    """The parts a refused batch is tried in: per window, its counts and ids, meter records, checkpoints."""
    units = {(start, "usage") for start in batch.windows}
    units |= {(experiences.window_of(c.received_at, window), "checkpoints") for c in batch.checkpoints}
    if batch.meters is not None:
        units |= {(start, "meters") for start, _, _ in batch.meters.groups}
        units |= {(item.window_start, "meters") for item in batch.meters.identified.values()}
    return sorted(units)


def _select(batch: store.Batch, window: int, keep: Callable[[tuple[int, str]], bool]) -> store.Batch:
    """``batch`` with the parts ``keep`` says yes to (same number, watermark and stop)."""
    metered = None
    left_out = 0
    if batch.meters is not None:
        metered = meters.MeterBatch()
        for key, data in batch.meters.groups.items():
            if keep((key[0], "meters")):
                metered.groups[key] = data
            else:
                left_out += data.records
        for ident, item in batch.meters.identified.items():
            if keep((item.window_start, "meters")):
                metered.identified[ident] = item
            else:
                left_out += 1
    checkpoints = [c for c in batch.checkpoints if keep((experiences.window_of(c.received_at, window), "checkpoints"))]
    left_out += len(batch.checkpoints) - len(checkpoints)
    return dataclasses.replace(batch, windows={s: w for s, w in batch.windows.items() if keep((s, "usage"))},
                               meters=metered, checkpoints=checkpoints, events=max(batch.events - left_out, 0))


def _payload(part: store.Batch, replica_id: str, writer_id: uuid.UUID, unit: tuple[int, str]) -> dict[str, Any]:
    """What a retry of a flush part needs: the part in the spool's format (versioned, exact), base64."""
    payload: dict[str, Any] = {"replica_id": replica_id, "writer_id": str(writer_id), "seq": part.seq,
                               "window_start": quarantine.ref(unit[0]), "part": unit[1], "format": "spool"}
    try:
        payload["batch"] = base64.b64encode(spool.encode(dataclasses.replace(part, final=False))).decode()
    except spool.SpoolError as exc:  # kept without its data: the reason says why
        payload["unencodable"] = quarantine.reason(exc)
    return payload
