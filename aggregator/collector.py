"""The collector: turns each finished window into exactly one report.

It runs in every replica with ``collect=True``. A window is due once every live replica incarnation
has published a watermark past its end (so it holds nothing more for it); an incarnation silent for
``lease`` is given up on, and ``max_delay`` after its end a window is closed anyway; the report counts
who was given up on. The store's locks make exactly one replica win each window, and a collector that
dies mid-way leaves its window open for the next run anywhere. A window (or experience, or billable
event) that fails for a reason of its own is set aside in the quarantine, and the run goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from aggregator import billing, busy, distinct, exceptions, health, logs, meters, quarantine, reports, store

log = logs.get_logger("aggregator.collector")

# Windows rolled up per run at most (a window of 10^6 ids takes ~13 s, in commits of ~1 s): reports come
# first, and a backlog (after an upgrade, or an outage) is worked off over the next runs.
ROLLUP_WINDOWS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class Billing:
    """How a window's meter results become billable usage events (see billing.py)."""

    realm: str = "SaaS"
    instance_id: str | None = None
    KIND: ClassVar[str] = billing.KIND
    SCHEMA: ClassVar[str] = billing.SCHEMA

    def event(self, meter: meters.Meter, result: dict[str, Any], report: dict[str, Any]) -> dict[str, Any] | None:
        """The billable event of one meter result row, or None when its quantity is zero."""
        overflow = result["group_key"] == meters.OVERFLOW
        return billing.billable_event(
            meter, window_start=report["window_start"], window_end=report["window_end"],
            dimensions={} if overflow else json.loads(result["group_key"]), quantity_units=result["quantity"],
            late=result["late"], realm=self.realm, instance_id=self.instance_id, group_key=result["group_key"])


@dataclasses.dataclass(slots=True)
class CollectorStats:
    runs: int = 0
    reports_written: int = 0
    timed_out: int = 0  # experiences this replica timed out
    failures: int = 0
    failures_in_row: int = 0  # runs failed since the last that succeeded (health.py)
    last_error: str | None = None
    # (start, end) of the oldest finished window not reported when this collector last looked (health.py)
    oldest_unreported: tuple[int, int] | None = None


class Collector:
    def __init__(self, store_: store.Store, *, collector_id: str, grace: float, id_retention: float,
                 lease: float, max_delay: float, contact: health.Contact | None = None,
                 clock: Callable[[], float] = time.time,
                 on_locked: Callable[[], Awaitable[None]] | None = None,
                 on_ordered: Callable[[], Awaitable[None]] | None = None, writers: Sequence[str] = (),
                 on_written: Callable[[], None] | None = None, outbox_retention: float = 7 * 86400.0,
                 meter_defs: Sequence[meters.Meter] = (), billing: Billing | None = None,
                 dedup_horizon: float = 2 * 86400.0, window: int | None = None,
                 distinct_retention: float = 400 * 86400.0) -> None:
        self.store = store_
        self.collector_id = collector_id
        self.grace = grace
        self.lease = lease
        self.max_delay = max_delay
        # Whether this process has been in touch with the database long enough to judge others silent.
        self.contact = contact or health.Contact()
        self._on_ordered = on_ordered
        self.id_retention = id_retention
        self.stats = CollectorStats()
        self._clock = clock
        self._on_locked = on_locked
        self.writers = list(writers)  # each report is queued for these, in its own commit
        self._on_written = on_written
        self.outbox_retention = outbox_retention
        self.meter_defs = {m.name: m for m in meter_defs}
        self.billing = billing
        self.dedup_horizon = dedup_horizon
        self.distinct_retention = distinct_retention  # the per-day id rollup of range distinct
        self.window = window  # set: this collector also times out stale experiences
        self.busy = busy.Busy()  # held while a run is in progress; stop() waits on it, then calls it off
        self._last_prune = 0.0
        self._unreported: list[tuple[int, int]] = []  # as of due_windows(), less what run_once() wrote since

    async def run_once(self) -> list[reports.Report]:
        """Collect every due window this replica can; returns the reports it wrote."""
        async with self.busy:
            self.stats.runs += 1
            written: list[reports.Report] = []
            try:
                await self._sweep()
                await self._bill_again()
                for due in await self.due_windows():
                    began = time.monotonic()
                    row = await quarantine.guard("window", str(due.start), functools.partial(self._collect, due),
                                                 set_aside=self._set_aside, payload={"window_start": due.start},
                                                 collector_id=self.collector_id)
                    if row is None or isinstance(row, quarantine.SetAside):
                        continue
                    report = reports.Report.from_row(row)
                    written.append(report)
                    self.stats.reports_written += 1
                    self._unreported = [w for w in self._unreported if w[0] != due.start]
                    self.stats.oldest_unreported = self._unreported[0] if self._unreported else None
                    log.info("collect", window_start=report.window_start.isoformat(),
                             unique_workspaces=report.unique_workspaces, unique_users=report.unique_users,
                             allowed=report.allowed_requests, denied=report.denied_requests,
                             replicas=report.replicas, replicas_missing=due.replicas_missing or None,
                             late_allowed=report.late_allowed_requests,
                             late_denied=report.late_denied_requests,
                             duration_ms=round((time.monotonic() - began) * 1000, 2),
                             collector_id=self.collector_id, queued_for=self.writers)
                if written and self._on_written is not None:
                    self._on_written()
                await self._roll_up()
                await self._prune_now_and_then()
                await self.store.quarantine_counts()
            except Exception as exc:
                self.stats.failures += 1
                self.stats.failures_in_row += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("collect_failed", error=self.stats.last_error, collector_id=self.collector_id)
                raise
            self.stats.failures_in_row = 0
            return written

    async def due_windows(self) -> list[store.DueWindow]:
        """The windows that may be closed now, oldest first, each with the incarnations given up on.

        A window waits while any incarnation that has not stopped cleanly, and whose watermark is
        before the window's end, is live: heard from within ``lease`` by the database's clock. Only a
        collector that has itself been in touch with the database for ``lease`` gives anybody up:
        after an outage, everybody's silence was the outage, and replicas get a lease to catch up.
        ``max_delay`` after its end (by this collector's clock, once it has been in touch for ``lease``) a
        window is closed whatever holds it.
        A given-up incarnation counts as missing from a window if it may have lived into it: its
        watermark (its last word) is less than a lease before the window's start.
        """
        now = self._clock()
        windows = await self.store.open_windows(ended_by=now - self.grace)
        self._unreported = list(windows)
        self.stats.oldest_unreported = windows[0] if windows else None
        if not windows:
            return []
        holders = await self.store.incarnations(below=windows[-1][1])
        may_give_up = self.contact.connected_for() >= self.lease
        due: list[store.DueWindow] = []
        for start, end in windows:
            held = [i for i in holders if i.watermark < end]
            live = [i for i in held if not may_give_up or i.silent_for < self.lease]
            # Even max_delay waits for this collector's own lease of contact: right after an outage
            # its clock says every window is late, and the replicas have not yet had a chance to flush.
            overdue = may_give_up and now - end > self.max_delay
            if live and not overdue:
                log.debug("window_held", window_start=start, by=sorted({i.replica_id for i in live})[:10],
                          live=len(live), collector_id=self.collector_id)
                break  # later windows end later: every holder of this one holds them too
            missing = sum(1 for i in held if i in live or i.watermark + self.lease > start)
            if missing:
                log.warning("window_given_up_on", window_start=start, replicas_missing=missing,
                            replicas=sorted({i.replica_id for i in held})[:10], overdue=overdue,
                            collector_id=self.collector_id)
            due.append(store.DueWindow(start=start, end=end, replicas_missing=missing))
        return due

    async def _collect(self, due: store.DueWindow) -> dict[str, Any] | None:
        return await self.store.collect_window(
            due.start, collector_id=self.collector_id, now=self._clock(), on_locked=self._on_locked,
            on_ordered=self._on_ordered, writers=self.writers, meter_defs=self.meter_defs,
            billing=self.billing, replicas_missing=due.replicas_missing,
        )

    async def _set_aside(self, item: quarantine.Item) -> None:
        await self.store.set_aside(item, now=self._clock(), by=self.collector_id)

    async def _sweep(self) -> None:
        """Time out stale experiences (before collecting, so a window's SLIs include what timed out in it).

        If a sweep fails for another reason than the database, the due experiences are taken one at a time
        and the ones that fail are set aside (quarantine.py), so one bad row never stops the sweeper.
        """
        if self.window is None:
            return
        while True:
            try:
                timed_out = await self.store.sweep_experiences(now=self._clock(), window=self.window,
                                                               writers=self.writers)
            except Exception as exc:
                if quarantine.is_transient(exc):
                    raise
                timed_out = await self._sweep_one_by_one()
            for row in timed_out:
                log.info("experience_timed_out", experience_id=row["experience_id"], urgency=row["urgency"],
                         type=row["type"], collector_id=self.collector_id)
            self.stats.timed_out += len(timed_out)
            if timed_out and self._on_written is not None:
                self._on_written()
            if len(timed_out) < 1000:
                return

    async def _sweep_one_by_one(self) -> list[dict[str, Any]]:
        assert self.window is not None
        window = self.window
        timed_out: list[dict[str, Any]] = []
        for cid in await self.store.due_experiences(now=self._clock()):
            rows = await quarantine.guard(
                "experience", cid, functools.partial(self.store.sweep_experiences, now=self._clock(), window=window,
                                                     writers=self.writers, only=cid),
                set_aside=self._set_aside, payload={"correlation_id": cid}, collector_id=self.collector_id)
            if not isinstance(rows, quarantine.SetAside):
                timed_out.extend(rows)
        return timed_out

    async def _bill_again(self) -> None:
        """Billable events handed back from the quarantine (`aggregator quarantine retry`): made and queued once."""
        if self.billing is None:
            return
        for item in await self.store.quarantine_retries("billable"):
            payload = json.loads(item["payload"] or "{}")
            await quarantine.guard(
                "billable", item["ref"], functools.partial(
                    self.store.bill_again, item["id"], payload, defs=self.meter_defs, billing=self.billing,
                    writers=self.writers, now=self._clock()),
                set_aside=self._set_aside, payload=payload, collector_id=self.collector_id)

    async def _roll_up(self) -> None:
        """Range distinct's rollup of a few reported windows, oldest first, each in its own commit: after the
        reports, so that no report waits for it; before the prune, which keeps the ids of windows not rolled."""
        began = time.monotonic()
        rolled = await self.store.roll_up(now=self._clock(), limit=ROLLUP_WINDOWS)
        if rolled:
            log.info("distinct_rollup", windows=len(rolled), first=rolled[0], last=rolled[-1],
                     duration_ms=round((time.monotonic() - began) * 1000, 2), collector_id=self.collector_id)

    async def _prune_now_and_then(self) -> None:
        now = self._clock()
        if now - self._last_prune < min(self.id_retention / 4, 3600):
            return
        self._last_prune = now
        try:  # a day without its partition still takes ids (the default one): never a reason to stop
            created = await self.store.partition_ahead(now)
        except (exceptions.StoreError, ValueError) as exc:
            log.warning("partitions_not_created", error=str(exc), collector_id=self.collector_id)
        else:
            if created:
                log.info("partitions_created", partitions=created, collector_id=self.collector_id)
        # First: it records the horizons that range distinct trusts before anything goes.
        deleted = await self.store.prune_distinct(ids_before=now - self.id_retention,
                                                  days_before=distinct.day_of(int(now - self.distinct_retention)))
        deleted += await self.store.prune(before=now - self.id_retention,
                                         event_ids_before=now - max(self.dedup_horizon, self.id_retention))
        delivered = await self.store.prune_outbox(before=now - self.outbox_retention)
        if deleted or delivered:
            log.info("prune", ids_deleted=deleted, outbox_deleted=delivered, collector_id=self.collector_id)
