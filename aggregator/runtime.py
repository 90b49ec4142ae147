"""The Aggregator: what a service embeds. It wires tracker → flusher → store → collector together.

Sync hosts call ``start()``: a daemon thread runs an event loop of its own with an apscheduler that
flushes every ``flush_interval`` and collects every ``collect_interval``. Asyncio hosts use
``async with Aggregator(...)``: the same jobs run on the host's loop. ``track()`` only touches memory.
A database that is down never stops the host: start() returns and the replica connects when it can;
stop() is bounded by ``stop_timeout`` and spools what it could not flush instead of dropping it.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import functools
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from aggregator import (
    beyond,
    collector,
    config,
    exceptions,
    experiences,
    flush,
    health,
    logs,
    migrate,
    signals,
    store,
    tracker,
)
from aggregator import meters as meters_module
from aggregator import outbox as outbox_module
from aggregator import writers as writers_module

# The class has a method named `reports`; the type is imported by name so annotations stay unambiguous.
from aggregator.reports import Report

log = logs.get_logger("aggregator")
T = TypeVar("T")

DRAIN_INTERVAL = 0.2  # seconds
DRAIN_EAGER = 20_000  # calls folded at once above which the next drain follows immediately
# How long start() waits for the first answer of the database before going on without it.
FIRST_CONTACT_WAIT = 5.0
CONNECT_BACKOFF_MAX = 30.0  # seconds between attempts to reach an unreachable database, at most
SPOOL_SHARE = 0.25  # of stop_timeout kept for the spool when the final flush does not get through ...
SPOOL_RESERVE_S = 1.0  # ... but no more than this
CLOSE_MIN_S = 0.2  # closing the connections gets at least this, even past the deadline


class Aggregator(beyond.MetersAndExperiences):
    """Usage aggregation for one replica (process). See the README for the full contract."""

    def __init__(
        self,
        database_url: str | None = None,
        replica_id: str | None = None,
        window: str | float = "30m",
        flush_interval: str | float = "60s",
        grace: str | float | None = None,
        collect: bool = True,
        *,
        collect_interval: str | float | None = None,
        stop_timeout: str | float = "30s",
        id_retention: str | float = "2d",
        distinct_retention: str | float = "400d",
        handle_sigterm: bool = True,
        clock: Callable[[], float] = time.time,
        on_collector_locked: Callable[[], Awaitable[None]] | None = None,
        writers: Mapping[str, Mapping[str, Any]] | Sequence[writers_module.Writer] | None = None,
        pseudonym_key: str | None = None,
        pseudonym_allowlist: Iterable[str] = (),
        outbox: Mapping[str, Any] | None = None,
        delivery: config.DeliverySettings | None = None,
        meters: Mapping[str, Mapping[str, Any]] | Sequence[meters_module.Meter] | None = None,
        billing_realm: str = "SaaS",
        billing_instance_id: str | None = None,
        meter_dedup_horizon: str | float = "2d",
        urgencies: Mapping[str, Any] | None = None,
        replica_lease: str | float | None = None,
        max_collect_delay: str | float | None = None,
        health_overdue_after: str | float | None = None,
        health_failures_in_row: int = 3,
        memory_budget: str | int = "64MiB",
        spool_dir: str | None = None,
        database_pooler: str | None = None,
        on_collector_ordered: Callable[[], Awaitable[None]] | None = None,
        max_event_age: str | float = "1d",
        max_event_future: str | float = "5m",
        idle_connections: int = 1,
    ) -> None:
        # writers: tables as in the daemon's [writers.NAME] config, or Writer objects (custom writers).
        # outbox: the retry knobs (max_attempts, backoff_initial, backoff_max, poll_interval, drain_timeout,
        # retention). delivery: all of it, validated (from_settings passes the daemon's).
        instances = list(writers) if writers is not None and not isinstance(writers, Mapping) else []
        if delivery is None:
            delivery = config.DeliverySettings.build(
                writers=writers if isinstance(writers, Mapping) else None, pseudonym_key=pseudonym_key,
                pseudonym_allowlist=tuple(pseudonym_allowlist), **dict(outbox or {}))
        self.settings = config.Settings.build(
            database_url=database_url, replica_id=replica_id, window=window, flush_interval=flush_interval,
            grace=grace, collect=collect, collect_interval=collect_interval, stop_timeout=stop_timeout,
            id_retention=id_retention, distinct_retention=distinct_retention,
            delivery=delivery, meters=meters, billing_realm=billing_realm,
            billing_instance_id=billing_instance_id, meter_dedup_horizon=meter_dedup_horizon, urgencies=urgencies,
            replica_lease=replica_lease, max_collect_delay=max_collect_delay, memory_budget=memory_budget,
            health_overdue_after=health_overdue_after, health_failures_in_row=health_failures_in_row,
            spool_dir=spool_dir, database_pooler=database_pooler, max_event_age=max_event_age,
            max_event_future=max_event_future,
        )
        # Built now, so a bad writer table fails here rather than at start().
        self._writers = instances or [writers_module.build(name, table) for name, table in delivery.writers]
        self._deliverer: outbox_module.Deliverer | None = None
        self._auto_replica_id = replica_id is None
        self._handle_sigterm = handle_sigterm
        self._clock = clock
        # Connections to PostgreSQL kept open between jobs: one (a fleet of idle replicas costs one each);
        # more open while jobs overlap, closed when they end. The daemon keeps more for its HTTP API.
        self._idle_connections = idle_connections
        self._born = clock()  # nothing tracked by this incarnation is older (but for an explicit ``at``)
        self._on_collector_locked = on_collector_locked
        self._on_collector_ordered = on_collector_ordered
        self._contact = health.Contact()
        self._ready: asyncio.Event | None = None  # set once the schema is checked and the store is usable
        self._connector: asyncio.Task[None] | None = None
        self._fatal: exceptions.AggregatorError | None = None  # the store answered, but cannot be used
        self._outcome: asyncio.Future[None] | None = None  # the first attempt's result, for start()
        within = self.settings.time_range
        self._tracker = tracker.Tracker(self.settings.window_seconds, clock, within)
        self._recorder = meters_module.Recorder(self.settings.meters, self.settings.window_seconds, clock, within)
        self._checkpoints = experiences.Pending(self.settings.urgencies, clock, within)
        self._state = "new"  # new → running → stopped
        self._mode: str | None = None  # "thread" (own loop) or "async" (host's loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._store: store.Store | None = None
        self._flusher: flush.Flusher | None = None
        self._collector: collector.Collector | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._drainer: asyncio.Task[None] | None = None
        self._retry_delay = 0.0
        self._lifecycle = threading.Lock()
        # flush() calls this first when not None: in a forked child, it restarts us.
        self._gate: Callable[[], None] | None = None
        # The hot path: calls go straight to the tracker, with no layer in between.
        self.track = self._tracker.track  # type: ignore[method-assign]
        os.register_at_fork(after_in_child=functools.partial(_after_fork_in_child, weakref.ref(self)))

    @classmethod
    def from_settings(cls, settings: config.Settings, **kwargs: Any) -> Aggregator:
        """An Aggregator from validated settings (the daemon builds them from its configuration)."""
        s = settings
        return cls(database_url=s.database_url, replica_id=s.replica_id, window=s.window,
                   flush_interval=s.flush_interval, grace=s.grace, collect=s.collect,
                   collect_interval=s.collect_interval, stop_timeout=s.stop_timeout, id_retention=s.id_retention,
                   distinct_retention=s.distinct_retention, delivery=s.delivery, meters=s.meters,
                   billing_realm=s.billing_realm,
                   billing_instance_id=s.billing_instance_id, meter_dedup_horizon=s.meter_dedup_horizon,
                   urgencies=s.urgencies, replica_lease=s.replica_lease, max_collect_delay=s.max_collect_delay,
                   health_overdue_after=s.health_overdue_after, health_failures_in_row=s.health_failures_in_row,
                   memory_budget=s.memory_budget, spool_dir=s.spool_dir, database_pooler=s.database_pooler,
                   max_event_age=s.max_event_age, max_event_future=s.max_event_future, **kwargs)

    def now(self) -> float:
        """This Aggregator's clock, in epoch seconds: what event times are placed and checked by."""
        return self._clock()

    # ---- the hot path ----------------------------------------------------------------------

    def track(self, workspace_id: object, user_id: object, allowed: int = 1, denied: int = 0, *,
              at: object = None) -> None:
        """Count one request of ``user_id`` in ``workspace_id``; never blocks on I/O.

        ``at`` (an aware datetime or epoch seconds) places the event in the window of that moment
        instead of now. Raises InvalidInput (a ValueError) or InvalidType (a TypeError) and records
        nothing when an argument is bad. (Instances bind this name to the tracker's method directly;
        this definition documents it.)
        """
        self._tracker.track(workspace_id, user_id, allowed, denied, at)

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id

    @property
    def running(self) -> bool:
        return self._state == "running"

    # ---- sync lifecycle (own thread and loop) ----------------------------------------------

    def start(self, wait: float | None = None) -> Aggregator:
        """Start flushing and collecting in a background thread; returns self.

        The database need not answer: tracking works from the first call and the replica connects
        when it can (``status()["store"]`` shows the outage). A configuration that can never work
        (a bad URL, a schema behind the code, another window length) raises at once when the
        database answers within a few seconds. ``wait``: seconds to wait for the database, raising
        StoreUnavailable (and starting nothing) if it has not answered by then.
        """
        with self._lifecycle:
            if self._state == "running":
                return self
            self._refuse_if_stopped()
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name=f"aggregator-{self.replica_id}", daemon=True)
            thread.start()
            try:
                asyncio.run_coroutine_threadsafe(self._open(wait), loop).result()
            except BaseException:
                loop.call_soon_threadsafe(loop.stop)
                thread.join()
                loop.close()
                raise
            self._loop, self._thread, self._mode, self._state = loop, thread, "thread", "running"
            _register_exit(self)
            if self._handle_sigterm:
                signals.install_sigterm_handler()
        return self

    def stop(self) -> None:
        """Flush everything tracked, finish any collection in progress, and stop. Idempotent.

        Bounded by ``stop_timeout``. What cannot be flushed in that time goes to the local spool,
        which the next start on this host replays; if even that fails, StoreUnavailable says how
        many events were lost (and they are logged as an error).
        """
        if self._state == "new" and self._has_pending():
            self.start()  # what was tracked before start() must not be lost either
        with self._lifecycle:
            if self._state != "running":
                self._state = "stopped"
                self._close_intake(finished=True)
                return
            if self._mode == "async":
                raise exceptions.AggregatorError(
                    "this Aggregator runs on an asyncio loop; stop it with `await agg.astop()`")
            loop, thread = self._loop, self._thread
            assert loop is not None and thread is not None
            _unregister_exit(self)
            closing = asyncio.run_coroutine_threadsafe(self._close(), loop)
            try:
                with signals.shielded(self.replica_id):
                    self._wait_closed(closing)
            finally:
                if thread.is_alive() and closing.done():
                    loop.call_soon_threadsafe(loop.stop)
                    thread.join(5.0)
                    if not thread.is_alive():
                        loop.close()

    def _wait_closed(self, closing: concurrent.futures.Future[None]) -> None:
        try:
            # _close() keeps its own deadline; this bound only guards against a loop that is stuck.
            closing.result(timeout=self.settings.stop_timeout + 5.0)
        except concurrent.futures.TimeoutError:
            lost = self._flusher.unflushed_events if self._flusher else self._tracker.pending_events()
            log.error("stop_timed_out", timeout_s=self.settings.stop_timeout, events_lost=lost,
                      replica_id=self.replica_id)
            self._state = "stopped"
            raise exceptions.StoreUnavailable(
                f"stop() did not finish within stop_timeout={self.settings.stop_timeout:g}s; up to {lost} "
                "tracked events were not saved") from None

    def flush(self) -> None:
        """Flush now; returns when everything tracked before the call is durable."""
        if self._gate is not None:
            self._gate()
        self._call(self._flush_now)

    def collect(self) -> list[Report]:
        """Flush, then run the collector once now (it also runs on its schedule); returns the reports it wrote."""
        return self._call(self.acollect)

    def reports(self, since: Any = None) -> list[Report]:
        """Finished reports with window_start >= ``since`` (datetime or epoch), oldest first."""
        if self._state == "running":
            return self._call(lambda: self.areports(since))
        return asyncio.run(read_reports(self.settings.database_url, since, pooler=self.settings.database_pooler))

    def __enter__(self) -> Aggregator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ---- async lifecycle (host's loop) -----------------------------------------------------

    async def astart(self, wait: float | None = None) -> Aggregator:
        """``start()`` for asyncio hosts: the jobs run on the running loop."""
        with self._lifecycle:
            if self._state == "running":
                return self
            self._refuse_if_stopped()
            self._state = "starting"
        try:
            await self._open(wait)
        except BaseException:
            self._state = "new"
            raise
        self._loop, self._mode, self._state = asyncio.get_running_loop(), "async", "running"
        return self

    async def astop(self, timeout: float | None = None) -> None:
        """``stop()`` for asyncio hosts; ``timeout`` overrides stop_timeout (the daemon gives what is left)."""
        if self._state == "new" and self._has_pending():
            await self.astart()
        if self._state != "running":
            self._state = "stopped"
            self._close_intake(finished=True)
            return
        if self._mode == "thread":
            await asyncio.to_thread(self.stop)
            return
        await self._close(timeout)

    async def aflush(self) -> None:
        self._require_running()
        await self._on_own_loop(self._flush_now)

    async def areports(self, since: Any = None, *, after: int | None = None,
                       limit: int | None = None) -> list[Report]:
        """Reports by window (``since``), or in stream order after the cursor ``after`` (a report id)."""
        db = self._store
        if db is None:
            return await read_reports(self.settings.database_url, since, pooler=self.settings.database_pooler)
        start = tracker.since_epoch(since)
        rows = await self._on_own_loop(lambda: db.reports(since=start, after_id=after, limit=limit))
        return [Report.from_row(row) for row in rows]

    async def aheld_windows(self) -> list[int]:
        """Starts of the finished windows not yet reported (held by watermarks, or not collected yet)."""
        self._require_running()
        db = self._store
        assert db is not None
        ended_by = self._clock() - self.settings.grace
        return [start for start, _ in await self._on_own_loop(lambda: db.open_windows(ended_by=ended_by))]

    async def aping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        self._require_running()
        db = self._store
        assert db is not None
        await self._on_own_loop(db.ping)

    async def acollect(self) -> list[Report]:
        """Flush, then run the collector once now; returns the reports written here.

        The flush first publishes this replica's own watermark, so what it tracked is in the reports
        and it holds no finished window back.
        """
        self._require_running()
        collector_ = self._collector
        if collector_ is None:
            raise exceptions.NotRunning("this Aggregator was created with collect=False")

        async def flush_and_collect() -> list[Report]:
            await self._flush_now()
            return await self._collect_now()

        return await self._on_own_loop(flush_and_collect)

    async def __aenter__(self) -> Aggregator:
        return await self.astart()

    async def __aexit__(self, *_exc: object) -> None:
        await self.astop()

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Figures for health checks and metrics; "health" is what health.evaluate() makes of the rest."""
        out: dict[str, Any] = {"state": self._state, "replica_id": self.replica_id,
                               "pending_events": self._tracker.pending_events()}
        store_ = self._contact.snapshot()
        store_["ready"] = self._ready is not None and self._ready.is_set()
        store_["fatal_error"] = str(self._fatal) if self._fatal is not None else None
        out["store"] = store_
        if self._flusher is not None:
            out["unflushed_events"] = self._flusher.unflushed_events
            out["spooled_events"] = self._flusher.spooled_events
            out["flush"] = self._flusher.stats
        if self._collector is not None:
            out["collector"] = self._collector.stats
        if self._deliverer is not None:
            out["delivery"] = self._deliverer.stats
        # Items set aside per kind, as the last flush or collection read them (None: not read yet).
        out["quarantined"] = self._store.quarantined if self._store is not None else None
        bounds = health.Bounds(self.settings.health_overdue_after, self.settings.health_failures_in_row)
        out["health"] = health.evaluate(out, bounds, now=self._clock()).as_dict()
        return out

    # ---- inside the loop ----------------------------------------------------------------------

    async def _open(self, wait: float | None) -> None:
        """Build the parts and start the jobs, then make the first contact with the database.

        Nothing here needs the database except the first contact, which is awaited for at most
        FIRST_CONTACT_WAIT (or ``wait``); the connector goes on trying in the background after that.
        """
        s = self.settings
        db = store.Store(s.database_url, pooler=s.database_pooler,  # a URL that cannot work fails here
                         idle=self._idle_connections)
        self._store = db
        self._ready = asyncio.Event()
        self._fatal = None
        self._flusher = flush.Flusher(self._tracker, db, replica_id=s.replica_id, clock=self._clock,
                                      recorder=self._recorder, checkpoints=self._checkpoints, contact=self._contact,
                                      spool_dir=s.spool_dir)
        if s.collect:
            self._collector = collector.Collector(
                db, collector_id=s.replica_id, grace=s.grace, id_retention=s.id_retention, clock=self._clock,
                lease=s.replica_lease, max_delay=s.max_collect_delay, contact=self._contact,
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
                    await asyncio.wait_for(self._ready.wait(), wait)  # cancelled on timeout: nothing left pending
                except TimeoutError:
                    raise exceptions.StoreUnavailable(
                        f"database {db.masked_url} did not answer within wait={wait:g}s: "
                        f"{self._contact.last_error or 'no answer yet'}") from None
            if self._fatal is not None:
                raise self._fatal
        except BaseException:
            self._connector.cancel()
            with contextlib.suppress(asyncio.CancelledError, exceptions.AggregatorError):
                await self._connector
            if self._deliverer is not None:
                with contextlib.suppress(exceptions.AggregatorError):
                    await self._deliverer.stop(0.0)
                self._deliverer = None
            await db.close()
            self._store = self._flusher = self._collector = None
            raise
        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        scheduler.add_job(self._scheduled_flush, "interval", seconds=s.flush_interval, id="flush",
                          max_instances=1, coalesce=True, misfire_grace_time=None)
        if self._collector is not None:
            scheduler.add_job(self._scheduled_collect, "interval", seconds=s.collect_interval, id="collect",
                              jitter=s.collect_interval / 2, max_instances=1, coalesce=True,
                              misfire_grace_time=None)
        scheduler.start()
        self._scheduler = scheduler
        self._drainer = asyncio.create_task(self._drain_forever(), name="aggregator-drain")
        log.info("started", replica_id=s.replica_id, database=db.masked_url, window_s=s.window_seconds,
                 flush_interval_s=s.flush_interval, replica_lease_s=s.replica_lease,
                 max_collect_delay_s=s.max_collect_delay, grace_s=s.grace, collect=s.collect,
                 store_ready=self._ready.is_set())

    async def _connect(self, first: asyncio.Future[None]) -> None:
        """Check the schema and shared settings, start delivery, then replay spools: retried until done.

        An unreachable database is retried with backoff and logged once per outage. A database that
        answers but cannot be used (schema behind, another window length) is a configuration error:
        reported to start() if it is still waiting, otherwise logged and retried slowly, since an
        operator may fix it (run the upgrade) while we keep tracking.
        """
        s, db = self.settings, self._store
        assert db is not None and self._ready is not None and self._flusher is not None
        delay = 0.25
        while True:
            try:
                await migrate.ensure_current(db, auto_upgrade=db.dialect == "sqlite")
                await db.check_window(s.window_seconds)
                await db.check_meters(s.meters)
                if self._writers and self._deliverer is None:  # refuses to start without a pseudonym key
                    deliverer = outbox_module.Deliverer.from_settings(db, self._writers, s, clock=self._clock)
                    await deliverer.start()
                    self._deliverer = deliverer
                    if self._collector is not None:
                        self._collector._on_written = deliverer.wake
                # Last: a start refused above leaves no incarnation for the collectors to wait on.
                await self._flusher.register(since=self._born)
                break
            except exceptions.StoreUnavailable as exc:
                self._fatal = None
                if self._contact.failed(str(exc)):
                    log.warning("store_unavailable", error=str(exc), replica_id=self.replica_id,
                                retrying_every_s=f"up to {CONNECT_BACKOFF_MAX:g}")
            except exceptions.AggregatorError as exc:  # answered, but unusable as configured
                if self._fatal is None or str(self._fatal) != str(exc):
                    log.error("store_unusable", error=str(exc), replica_id=self.replica_id)
                self._fatal = exc
            if not first.done():
                first.set_result(None)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, CONNECT_BACKOFF_MAX)
        self._fatal = None
        outage = self._contact.snapshot()
        if self._contact.succeeded():
            log.info("store_recovered", retries=outage["failures_in_row"], outage_s=outage["outage_for_s"],
                     replica_id=self.replica_id)
        self._ready.set()
        if not first.done():
            first.set_result(None)
        try:
            await self._flusher.replay_orphans()
        except exceptions.StoreError as exc:  # left on disk; the next start (or flush) tries again
            log.warning("spool_replay_failed", error=str(exc), replica_id=self.replica_id)

    async def _drain_forever(self) -> None:
        """Fold buffered calls into per-window sets often, so the buffer stays small between flushes.

        Also keeps the memory held for an unreachable store within ``memory_budget``.
        """
        while True:
            try:
                folded = await asyncio.to_thread(self._tracker.drain)
            except RuntimeError:  # the interpreter is exiting: no more worker threads; fold here
                folded = self._tracker.drain()
            await self._within_budget()
            # Under heavy tracking, drain again at once: the buffer (~100 bytes a call) stays small.
            await asyncio.sleep(0 if folded >= DRAIN_EAGER else DRAIN_INTERVAL)

    async def _within_budget(self) -> None:
        """Past the memory budget: flush now if the store answers, else move what is queued to the spool."""
        flusher = self._flusher
        if flusher is None or flusher.queued_bytes() <= self.settings.memory_budget:
            return
        if self._ready is not None and self._ready.is_set() and self._contact.connected_since is not None:
            with contextlib.suppress(exceptions.StoreError):
                await flusher.flush()
                return
        try:
            await flusher.spill()
        except exceptions.StoreError as exc:  # the spool is unusable (disk full?): keep it in memory
            log.error("spool_failed", error=str(exc), queued_events=flusher.unflushed_events,
                      replica_id=self.replica_id)

    async def _close(self, timeout: float | None = None) -> None:
        """Stop within ``timeout`` (default stop_timeout): jobs in progress, final flush, else the spool.

        The last SPOOL_SHARE of the time (at most SPOOL_RESERVE_S) is kept for the spool: a job still
        running when the flush's share is up is called off, and so is a final flush still waiting on
        the database; what they had not confirmed is spooled, never dropped.
        """
        assert self._store is not None and self._flusher is not None
        budget = self.settings.stop_timeout if timeout is None else timeout
        deadline = time.monotonic() + budget
        flush_by = deadline - min(SPOOL_RESERVE_S, budget * SPOOL_SHARE)
        self._close_intake(finished=False)
        self._state = "stopping"
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
                for busy in (self._collector.busy if self._collector else None, self._flusher.busy):
                    if busy is not None and not await busy.settle(flush_by):
                        log.warning("job_would_not_stop", replica_id=self.replica_id)
                self._scheduler.shutdown(wait=False)
            await self._final_flush(flush_by, budget)
        finally:
            if self._connector is not None:
                self._connector.cancel()
                with contextlib.suppress(asyncio.CancelledError, exceptions.AggregatorError):
                    await self._connector
            if self._deliverer is not None:
                try:
                    await self._deliverer.stop(min(self.settings.delivery.drain_timeout,
                                                   max(0.0, deadline - time.monotonic())))
                except exceptions.AggregatorError as exc:  # items stay queued; the database is what failed
                    log.warning("delivery_stop_failed", error=str(exc))
            self._tracker.finish()
            self._flusher.release_spool()
            # A database that does not answer cannot hold the exit either: its connections are dropped.
            with contextlib.suppress(exceptions.AggregatorError, OSError, TimeoutError):
                async with asyncio.timeout(max(CLOSE_MIN_S, deadline - time.monotonic())):
                    await self._store.close()
            self._state = "stopped"
            log.info("stopped", replica_id=self.replica_id)

    async def _final_flush(self, flush_by: float, budget: float) -> None:
        """Flush and mark this incarnation stopped, retrying until ``flush_by``; then spool what is left.

        Each attempt is cut off at ``flush_by``: a database that does not answer (a lock held, a
        network black hole) must not hold the stop.
        """
        flusher = self._flusher
        assert flusher is not None and self._ready is not None
        delay = 0.1
        error: Exception | None = None
        while True:
            try:
                if not self._ready.is_set():
                    raise exceptions.StoreUnavailable(self._contact.last_error or "the database never answered")
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

    async def _flush_now(self, *, scheduled: bool = False) -> None:
        assert self._flusher is not None and self._ready is not None
        if not self._ready.is_set():
            raise exceptions.StoreUnavailable(
                f"database {self._store.masked_url if self._store else ''} has not answered yet: "
                f"{self._fatal or self._contact.last_error or 'connecting'}")
        await self._flusher.flush(retries=not scheduled)

    async def _collect_now(self) -> list[Report]:
        assert self._collector is not None
        try:
            written = await self._collector.run_once()
        except exceptions.StoreUnavailable as exc:
            self._contact.failed(str(exc))
            raise
        self._contact.succeeded()
        return written

    async def _scheduled_flush(self) -> None:
        """The periodic flush; on failure, retry sooner than the next interval, with backoff."""
        if self._ready is None or not self._ready.is_set():
            return  # the connector is at it; the drainer keeps memory within budget meanwhile
        try:
            await self._flush_now(scheduled=True)
        except exceptions.StoreError:
            s = self.settings
            self._retry_delay = min(max(self._retry_delay * 2, 0.25), s.flush_interval)
            if self._scheduler is not None and self._state == "running" and self._retry_delay < s.flush_interval:
                self._scheduler.add_job(self._scheduled_flush, "date", id="flush-retry", replace_existing=True,
                                        run_date=_in_seconds(self._retry_delay))
            await self._within_budget()
        else:
            self._retry_delay = 0.0

    async def _scheduled_collect(self) -> None:
        if self._state != "running" or self._ready is None or not self._ready.is_set():
            return
        try:
            await self._collect_now()
        except exceptions.StoreError:
            pass  # logged by the collector; the window stays open for the next run

    # ---- plumbing -----------------------------------------------------------------------------

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on this aggregator's loop from a synchronous caller and wait for it."""
        self._require_running()
        loop = self._loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            raise exceptions.AggregatorError(
                "this call would block the event loop it needs; use the async form (aflush, areports)")
        try:
            return asyncio.run_coroutine_threadsafe(fn(), loop).result()
        except concurrent.futures.CancelledError:  # a stop called it off (see busy.py)
            raise exceptions.StoreUnavailable(
                "called off: the Aggregator is stopping and the database did not answer in time; what this call "
                "was saving stays queued for the final flush, or the spool") from None

    async def _on_own_loop(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Await ``fn()`` on this aggregator's loop (its connections belong to it), from any loop."""
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop():
            return await fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), loop))

    def _has_pending(self) -> bool:
        """Anything tracked, recorded or checkpointed and not yet flushed."""
        return bool(self._tracker.pending_events() or self._recorder.pending() or self._checkpoints.pending())

    def _close_intake(self, *, finished: bool) -> None:
        """Refuse further track(), record() and checkpoint(); ``finished``: no final flush will follow."""
        self._tracker.close()
        self._recorder.close()
        self._checkpoints.close()
        if finished:
            self._tracker.finish()

    def _require_running(self) -> None:
        if self._state != "running":
            raise exceptions.NotRunning(
                f"Aggregator is {self._state}; call start() (or use `with`/`async with`) first")

    def _refuse_if_stopped(self) -> None:
        if self._state not in ("new",):
            raise exceptions.NotRunning(
                f"Aggregator is {self._state} and cannot be restarted; create a new Aggregator")

    def _restart_after_fork(self) -> None:
        with self._lifecycle:
            if self._gate is None:
                return
            self._gate = None
            self.track = self._tracker.track  # type: ignore[method-assign]
        self.start()

    def _track_after_fork(self, *args: Any, **kwargs: Any) -> None:
        """track() in a forked child of a started Aggregator: start this replica, then track."""
        self._restart_after_fork()
        self._tracker.track(*args, **kwargs)

    def _at_exit(self) -> None:
        """At interpreter exit: stop, bounded by stop_timeout; never raises or prints a traceback."""
        if self._state != "running" or self._mode != "thread":
            return
        try:
            self.stop()
        except exceptions.AggregatorError as exc:
            log.error("stop_at_exit_failed", error=str(exc), replica_id=self.replica_id)

    def _reset_in_child(self) -> None:
        """After fork: forget the parent's data, thread and connections; new replica identity."""
        _running.discard(self)  # without the lock: a thread of the parent may have held it at fork
        was_running_thread = self._state == "running" and self._mode == "thread"
        self._tracker.reset_after_fork()
        self._born = self._clock()
        self._recorder.reset_after_fork()
        self._checkpoints.reset_after_fork()
        self._lifecycle = threading.Lock()
        if self._auto_replica_id:
            self.settings = _replace_replica_id(self.settings, config.new_replica_id())
        # The parent's loop, thread and pooled connections belong to the parent; drop them unclosed.
        self._loop = self._thread = self._store = self._flusher = self._collector = self._scheduler = None
        self._drainer = self._deliverer = self._connector = None
        self._ready = None
        self._contact = health.Contact()
        self._mode = None
        self._state = "new"
        self._gate = self._restart_after_fork if was_running_thread else None
        self.track = self._track_after_fork if was_running_thread else self._tracker.track  # type: ignore[method-assign]


# Aggregators to stop at interpreter exit. Stopped from threading's exit hook, which runs before
# concurrent.futures shuts its workers down and before atexit: the final flush may still use threads.
_running: weakref.WeakSet[Aggregator] = weakref.WeakSet()
_exit_hook_installed = False
_exit_lock = threading.Lock()


def _retrieved(task: asyncio.Future[Any]) -> None:
    """A task called off is not awaited: take its outcome so asyncio does not report it as lost."""
    if not task.cancelled():
        task.exception()


def _register_exit(agg: Aggregator) -> None:
    global _exit_hook_installed
    with _exit_lock:
        _running.add(agg)
        if not _exit_hook_installed:
            try:
                threading._register_atexit(_stop_all_at_exit)  # type: ignore[attr-defined]
            except (AttributeError, RuntimeError):  # another Python, or already shutting down
                atexit.register(_stop_all_at_exit)
            _exit_hook_installed = True


def _unregister_exit(agg: Aggregator) -> None:
    with _exit_lock:
        _running.discard(agg)


def _stop_all_at_exit() -> None:
    with _exit_lock:
        running = list(_running)
        _running.clear()
    for agg in running:
        agg._at_exit()


async def read_reports(database_url: str, since: Any = None, *, pooler: str = "none") -> list[Report]:
    """Finished reports from a database, without starting an Aggregator (CLI, demo, readers)."""
    db = store.Store(database_url, pool_size=1, pooler=pooler)
    try:
        await migrate.ensure_current(db, auto_upgrade=db.dialect == "sqlite")
        rows = await db.reports(since=tracker.since_epoch(since))
    finally:
        await db.close()
    return [Report.from_row(row) for row in rows]


def _replace_replica_id(settings: config.Settings, replica_id: str) -> config.Settings:
    return dataclasses.replace(settings, replica_id=replica_id)


def _after_fork_in_child(ref: weakref.ReferenceType[Aggregator]) -> None:
    agg = ref()
    if agg is not None:
        agg._reset_in_child()


def _in_seconds(seconds: float) -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)
