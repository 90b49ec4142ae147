"""The engine of an Aggregator: the parts that move data (store, flusher, collector, deliverer) and the
jobs that drive them on the Aggregator's event loop: connect, drain, scheduled flush and collection, close.

Runs only on that loop and never on the host's thread; a database that does not answer never holds a
stop past its deadline: what could not be flushed goes to the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from aggregator import collector, config, exceptions, experiences, flush, health, logs, migrate, store, tracker
from aggregator import meters as meters_module
from aggregator import outbox as outbox_module
from aggregator import writers as writers_module
from aggregator.reports import Report

log = logs.get_logger("aggregator")

DRAIN_INTERVAL = 0.2  # seconds
DRAIN_EAGER = 20_000  # calls folded at once above which the next drain follows immediately
# How long start() waits for the first answer of the database before going on without it.
FIRST_CONTACT_WAIT = 5.0
CONNECT_BACKOFF_MAX = 30.0  # seconds between attempts to reach an unreachable database, at most
SPOOL_SHARE = 0.25  # of stop_timeout kept for the spool when the final flush does not get through ...
SPOOL_RESERVE_S = 1.0  # ... but no more than this
CLOSE_MIN_S = 0.2  # closing the connections gets at least this, even past the deadline


class Engine:
    """Builds the parts at open(), runs the jobs while open, and closes them within a deadline.

    The intake (tracker, recorder, checkpoints) is handed in and outlives an open/close; the parts
    built at open() exist only while open (None before, and again in a forked child).
    """

    def __init__(
        self,
        settings: config.Settings,
        intake: tuple[tracker.Tracker, meters_module.Recorder, experiences.Pending],
        writers: Sequence[writers_module.Writer],
        *,
        clock: Callable[[], float],
        running: Callable[[], bool],
        idle_connections: int,
        on_collector_locked: Callable[[], Awaitable[None]] | None,
        on_collector_ordered: Callable[[], Awaitable[None]] | None,
    ) -> None:
        self.settings = settings
        self.tracker, self.recorder, self.checkpoints = intake
        self._writers = writers
        self._clock = clock
        self._running = running  # whether the Aggregator is running: scheduled jobs stand down otherwise
        # Connections to PostgreSQL kept open between jobs: one (a fleet of idle replicas costs one each);
        # more open while jobs overlap, closed when they end. The daemon keeps more for its HTTP API.
        self._idle_connections = idle_connections
        self._on_collector_locked = on_collector_locked
        self._on_collector_ordered = on_collector_ordered
        self._born = clock()  # nothing tracked by this incarnation is older (but for an explicit ``at``)
        self._forget_parts()

    def _forget_parts(self) -> None:
        self.contact = health.Contact()
        self.ready: asyncio.Event | None = None  # set once the schema is checked and the store is usable
        self.fatal: exceptions.AggregatorError | None = None  # the store answered, but cannot be used
        self.store: store.Store | None = None
        self.flusher: flush.Flusher | None = None
        self.collector: collector.Collector | None = None
        self.deliverer: outbox_module.Deliverer | None = None
        self._connector: asyncio.Task[None] | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._retry_delay = 0.0

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id

    # ---- the intake -------------------------------------------------------------------------------

    def has_pending(self) -> bool:
        """Anything tracked, recorded or checkpointed and not yet flushed."""
        return bool(self.tracker.pending_events() or self.recorder.pending() or self.checkpoints.pending())

    def close_intake(self, *, finished: bool) -> None:
        """Refuse further track(), record() and checkpoint(); ``finished``: no final flush will follow."""
        self.tracker.close()
        self.recorder.close()
        self.checkpoints.close()
        if finished:
            self.tracker.finish()

    def unsaved_events(self) -> int:
        """Tracked events not yet durable, for a stop that gave up."""
        return self.flusher.unflushed_events if self.flusher else self.tracker.pending_events()

    def reset_in_child(self, replica_id: str | None) -> None:
        """After fork: forget the parent's data and parts (its loop and connections: dropped unclosed)."""
        self.tracker.reset_after_fork()
        self._born = self._clock()
        self.recorder.reset_after_fork()
        self.checkpoints.reset_after_fork()
        if replica_id is not None:
            self.settings = dataclasses.replace(self.settings, replica_id=replica_id)
        self._forget_parts()

    def status(self) -> dict[str, Any]:
        """The engine's figures for Aggregator.status()."""
        out: dict[str, Any] = {"pending_events": self.tracker.pending_events()}
        store_ = self.contact.snapshot()
        store_["ready"] = self.ready is not None and self.ready.is_set()
        store_["fatal_error"] = str(self.fatal) if self.fatal is not None else None
        out["store"] = store_
        if self.flusher is not None:
            out["unflushed_events"] = self.flusher.unflushed_events
            out["spooled_events"] = self.flusher.spooled_events
            out["flush"] = self.flusher.stats
        if self.collector is not None:
            out["collector"] = self.collector.stats
        if self.deliverer is not None:
            out["delivery"] = self.deliverer.stats
        # Items set aside per kind, as the last flush or collection read them (None: not read yet).
        out["quarantined"] = self.store.quarantined if self.store is not None else None
        return out

    # ---- open -------------------------------------------------------------------------------------

    async def open(self, wait: float | None) -> None:
        """Build the parts and start the jobs, then make the first contact with the database.

        Nothing here needs the database except the first contact, which is awaited for at most
        FIRST_CONTACT_WAIT (or ``wait``); the connector goes on trying in the background after that.
        """
        s = self.settings
        db = store.Store(s.database_url, pooler=s.database_pooler,  # a URL that cannot work fails here
                         idle=self._idle_connections)
        self.store = db
        self.ready = asyncio.Event()
        self.fatal = None
        self.flusher = flush.Flusher(self.tracker, db, replica_id=s.replica_id, clock=self._clock,
                                     recorder=self.recorder, checkpoints=self.checkpoints, contact=self.contact,
                                     spool_dir=s.spool_dir)
        if s.collect:
            self.collector = collector.Collector(
                db, collector_id=s.replica_id, grace=s.grace, id_retention=s.id_retention, clock=self._clock,
                lease=s.replica_lease, max_delay=s.max_collect_delay, contact=self.contact,
                on_locked=self._on_collector_locked, on_ordered=self._on_collector_ordered,
                writers=[w.name for w in self._writers], outbox_retention=s.delivery.retention,
                meter_defs=s.meters, billing=collector.Billing(s.billing_realm, s.billing_instance_id),
                dedup_horizon=s.meter_dedup_horizon, window=s.window_seconds,
                distinct_retention=s.distinct_retention,
            )
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connector = asyncio.create_task(self._connect(first), name="aggregator-connect")
        try:
            if wait is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(first), FIRST_CONTACT_WAIT)
            else:
                try:
                    await asyncio.wait_for(self.ready.wait(), wait)  # cancelled on timeout: nothing left pending
                except TimeoutError:
                    raise exceptions.StoreUnavailable(
                        f"database {db.masked_url} did not answer within wait={wait:g}s: "
                        f"{self.contact.last_error or 'no answer yet'}") from None
            if self.fatal is not None:
                raise self.fatal
        except BaseException:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, exceptions.AggregatorError):
                await self._connector
            if self.deliverer is not None:
                with contextlib.suppress(exceptions.AggregatorError):
                    await self.deliverer.stop(0.0)
                self.deliverer = None
            await db.close()
            self.store = self.flusher = self.collector = None
            raise
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        scheduler.add_job(self._scheduled_flush, "interval", seconds=s.flush_interval, id="flush",
                          max_instances=1, coalesce=True, misfire_grace_time=None)
        if self.collector is not None:
            scheduler.add_job(self._scheduled_collect, "interval", seconds=s.collect_interval, id="collect",
                              jitter=s.collect_interval / 2, max_instances=1, coalesce=True,
                              misfire_grace_time=None)
        scheduler.start()
        self._scheduler = scheduler
        self._drainer = asyncio.create_task(self._drain_forever(), name="aggregator-drain")
        log.info("started", replica_id=s.replica_id, database=db.masked_url, window_s=s.window_seconds,
                 flush_interval_s=s.flush_interval, replica_lease_s=s.replica_lease,
                 max_collect_delay_s=s.max_collect_delay, grace_s=s.grace, collect=s.collect,
                 store_ready=self.ready.is_set())

    async def _connect(self, first: asyncio.Future[None]) -> None:
        """Check the schema and shared settings, start delivery, then replay spools: retried until done.

        An unreachable database is retried with backoff and logged once per outage. A database that
        answers but cannot be used (schema behind, another window length) is a configuration error:
        reported to start() if it is still waiting, otherwise logged and retried slowly, since an
        operator may fix it (run the upgrade) while we keep tracking.
        """
        s, db = self.settings, self.store
        assert db is not None and self.ready is not None and self.flusher is not None
        delay = 0.25
        while True:
            try:
                await migrate.ensure_current(db, auto_upgrade=db.dialect == "sqlite")
                await db.check_window(s.window_seconds)
                await db.check_meters(s.meters)
                if self._writers and self.deliverer is None:  # refuses to start without a pseudonym key
                    deliverer = outbox_module.Deliverer.from_settings(db, self._writers, s, clock=self._clock)
                    await deliverer.start()
                    self.deliverer = deliverer
                    if self.collector is not None:
                        self.collector._on_written = deliverer.wake
                # Last: a start refused above leaves no incarnation for the collectors to wait on.
                await self.flusher.register(since=self._born)
                break
            except exceptions.StoreUnavailable as exc:
                self.fatal = None
                if self.contact.failed(str(exc)):
                    log.warning("store_unavailable", error=str(exc), replica_id=self.replica_id,
                                retrying_every_s=f"up to {CONNECT_BACKOFF_MAX:g}")
            except exceptions.AggregatorError as exc:  # answered, but unusable as configured
                if self.fatal is None or str(self.fatal) != str(exc):
                    log.error("store_unusable", error=str(exc), replica_id=self.replica_id)
                self.fatal = exc
            if not first.done():
                first.set_result(None)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        self.fatal = None
        outage = self.contact.snapshot()
        if self.contact.succeeded():
            log.info("store_recovered", retries=outage["failures_in_row"], outage_s=outage["outage_for_s"],
                     replica_id=self.replica_id)
        self.ready.set()
        if not first.done():
            first.set_result(None)
        try:
            await self.flusher.replay_orphans()
        except exceptions.StoreError as exc:  # left on disk; the next start (or flush) tries again
            log.warning("spool_replay_failed", error=str(exc), replica_id=self.replica_id)

    # ---- the jobs ---------------------------------------------------------------------------------

    async def flush_now(self, *, scheduled: bool = False) -> None:
        assert self.flusher is not None and self.ready is not None
        if not self.ready.is_set():
            raise exceptions.StoreUnavailable(
                f"database {self.store.masked_url if self.store else ''} has not answered yet: "
                f"{self.fatal or self.contact.last_error or 'connecting'}")
        await self.flusher.flush(retries=not scheduled)

    async def collect_now(self) -> list[Report]:
        assert self.collector is not None
        try:
            written = await self.collector.run_once()
        except exceptions.StoreUnavailable as exc:
            self.contact.failed(str(exc))
            raise
        self.contact.succeeded()
        return written

    async def _scheduled_flush(self) -> None:
        """The periodic flush; on failure, retry sooner than the next interval, with backoff."""
        if self.ready is None or not self.ready.is_set():
            return  # the connector is at it; the drainer keeps memory within budget meanwhile
        try:
            await self.flush_now(scheduled=True)
        except exceptions.StoreError:
            s = self.settings
            self._retry_delay = min(max(self._retry_delay * 2, 0.25), s.flush_interval)
            if self._scheduler is not None and self._running() and self._retry_delay < s.flush_interval:
                self._scheduler.add_job(self._scheduled_flush, "date", id="flush-retry", replace_existing=True,
                                        run_date=_in_seconds(self._retry_delay))
            await self._within_budget()
        else:
            self._retry_delay = 0.0

    async def _scheduled_collect(self) -> None:
        if not self._running() or self.ready is None or not self.ready.is_set():
            return
        try:
            await self.collect_now()
        except exceptions.StoreError:
            pass  # logged by the collector; the window stays open for the next run

    async def _drain_forever(self) -> None:
        """Fold buffered calls into per-window sets often, so the buffer stays small between flushes.

        Also keeps the memory held for an unreachable store within ``memory_budget``.
        """
        while True:
            try:
                folded = await asyncio.to_thread(self.tracker.drain)
            except RuntimeError:  # the interpreter is exiting: no more worker threads; fold here
                folded = self.tracker.drain()
            await self._within_budget()
            # Under heavy tracking, drain again at once: the buffer (~100 bytes a call) stays small.
            await asyncio.sleep(0 if folded >= DRAIN_EAGER else DRAIN_INTERVAL)

    async def _within_budget(self) -> None:
        """Past the memory budget: flush now if the store answers, else move what is queued to the spool."""
        flusher = self.flusher
        if flusher is None or flusher.queued_bytes() <= self.settings.memory_budget:
            return
        if self.ready is not None and self.ready.is_set() and self.contact.connected_since is not None:
            with contextlib.suppress(exceptions.StoreError):
                await flusher.flush()
                return
        try:
            await flusher.spill()
        except exceptions.StoreError as exc:  # the spool is unusable (disk full?): keep it in memory
            log.error("spool_failed", error=str(exc), queued_events=flusher.unflushed_events,
                      replica_id=self.replica_id)

    # ---- close ------------------------------------------------------------------------------------

    async def close(self, timeout: float | None = None) -> None:
        """Stop within ``timeout`` (default stop_timeout): jobs in progress, final flush, else the spool.

        The caller has closed the intake. The last SPOOL_SHARE of the time (at most SPOOL_RESERVE_S) is
        kept for the spool: a job still running when the flush's share is up is called off, and so is a
        final flush still waiting on the database; what they had not confirmed is spooled, never dropped.
        """
        assert self.store is not None and self.flusher is not None
        budget = self.settings.stop_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        flush_by = deadline - min(SPOOL_RESERVE_S, budget * SPOOL_SHARE)
        if self._drainer is not None:
            self._drainer.cancel()  # a fold in progress finishes in its thread; take() waits for it
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
        try:
            if self._scheduler is not None:
                # apscheduler cancels running jobs on shutdown: pause it, let a flush or collection in
                # progress finish (until the flush's share of the time is up; then it is called off),
                # and only then shut it down.
                self._scheduler.pause()
                for busy in (self.collector.busy if self.collector else None, self.flusher.busy):
                    if busy is not None and not await busy.settle(flush_by):
                        log.warning("job_would_not_stop", replica_id=self.replica_id)
                self._scheduler.shutdown(wait=False)
            await self._final_flush(flush_by, budget)
        finally:
            if self._connector is not None:
                self._connector.cancel()
                with contextlib.suppress(asyncio.CancelledError, exceptions.AggregatorError):
                    await self._connector
            if self.deliverer is not None:
                try:
                    await self.deliverer.stop(min(self.settings.delivery.drain_timeout,
                                                  max(0.0, deadline - time.monotonic())))
                except exceptions.AggregatorError as exc:  # items stay queued; the database is what failed
                    log.warning("delivery_stop_failed", error=str(exc))
            self.tracker.finish()
            self.flusher.release_spool()
            # A database that does not answer cannot hold the exit either: its connections are dropped.
            with contextlib.suppress(exceptions.AggregatorError, OSError, TimeoutError):
                async with asyncio.timeout(max(CLOSE_MIN_S, deadline - time.monotonic())):
                    await self.store.close()

    async def _final_flush(self, flush_by: float, budget: float) -> None:
        """Flush and mark this incarnation stopped, retrying until ``flush_by``; then spool what is left.

        Each attempt is cut off at ``flush_by``: a database that does not answer (a lock held, a
        network black hole) must not hold the stop.
        """
        flusher = self.flusher
        assert flusher is not None and self.ready is not None
        delay = 0.1
        error: Exception | None = None
        while True:
            try:
                if not self.ready.is_set():
                    raise exceptions.StoreUnavailable(self.contact.last_error or "the database never answered")
                attempt = asyncio.ensure_future(flusher.flush(final=True))
                attempt.add_done_callback(_retrieved)
                await asyncio.wait({attempt}, timeout=max(0.0, flush_by - time.monotonic()))
                if not attempt.done():
                    await flusher.busy.settle(time.monotonic())  # call it off; what it held stays queued
                    attempt.cancel()
                    error = exceptions.StoreUnavailable(
                        f"the database did not answer the final flush within stop_timeout={budget:g}s")
                    break
                attempt.result()
                return
            except exceptions.StoreError as exc:
                error = exc
                if time.monotonic() + delay > flush_by:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        try:
            spooled = await flusher.spill()
        except exceptions.AggregatorError as exc:
            lost = flusher.unflushed_events - flusher.spooled_events
            log.error("final_flush_failed", events_lost=lost, error=f"{error}; spool: {exc}",
                      replica_id=self.replica_id)
            raise exceptions.StoreUnavailable(
                f"stop(): the final flush failed within {budget:g}s and the spool could not take the rest: "
                f"{lost} tracked events were not saved: {error}; {exc}") from exc
        log.warning("final_flush_spooled", events=flusher.spooled_events, newly_spooled=spooled,
                    path=flusher.spool_path, error=str(error), replica_id=self.replica_id,
                    hint="the next start of a replica on this host with the same spool_dir replays them")


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A task called off is not awaited: take its outcome so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()


def _in_seconds(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
