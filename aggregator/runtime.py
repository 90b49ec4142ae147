"""The Aggregator: what a service embeds, and the class its users import.

A facade over parts with one job each: the intake (tracker, meters.Recorder, experiences.Pending), the
engine (store, flush, collection, delivery and their jobs), the lifecycle (state, thread, loop, fork, exit)
and the reads. It only wires and delegates: track() never touches I/O, and a database that is down never
stops the host (start() returns; stop() is bounded by ``stop_timeout`` and spools what it could not flush).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from aggregator import (
    collector,
    config,
    engine,
    exceptions,
    experiences,
    health,
    lifecycle,
    reads,
    store,
    tracker,
)
from aggregator import distinct as distinct_module
from aggregator import flush as flush_module  # the class has a method named `flush`
from aggregator import meters as meters_module
from aggregator import outbox as outbox_module
from aggregator import writers as writers_module

# The class has a method named `reports`; the type is imported by name so annotations stay unambiguous.
from aggregator.reports import Report

T = TypeVar("T")

# Kept here for the CLI and the demo, which read reports without an Aggregator.
read_reports = reads.read_reports


class Aggregator:
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
        settings = config.Settings.build(
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
        self._clock = clock
        self._auto_replica_id = replica_id is None
        within = settings.time_range
        # The intake: what track(), record() and checkpoint() fill, in memory only.
        self._tracker = tracker.Tracker(settings.window_seconds, clock, within)
        self._recorder = meters_module.Recorder(settings.meters, settings.window_seconds, clock, within)
        self._checkpoints = experiences.Pending(settings.urgencies, clock, within)
        # Built now, so a bad writer table fails here rather than at start().
        writers_ = instances or [writers_module.build(name, table) for name, table in delivery.writers]
        self._engine = engine.Engine(
            settings, (self._tracker, self._recorder, self._checkpoints), writers_, clock=clock,
            running=lambda: self._life.running, idle_connections=idle_connections,
            on_collector_locked=on_collector_locked, on_collector_ordered=on_collector_ordered)
        self._life = lifecycle.Lifecycle(self._engine, handle_sigterm=handle_sigterm)
        self._reads = reads.Reads(self._engine, self._life, clock)
        # flush() calls this first when not None: in a forked child, it restarts us.
        self._gate: Callable[[], None] | None = None
        # The hot path: calls go straight to the tracker, with no layer in between.
        self.track = self._tracker.track  # type: ignore[method-assign]
        lifecycle.reset_at_fork(self, Aggregator._reset_in_child)

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
    def settings(self) -> config.Settings:
        """What this Aggregator was built with (a forked child's gets a new replica_id)."""
        return self._engine.settings

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id

    @property
    def running(self) -> bool:
        return self._life.running

    # ---- sync lifecycle (own thread and loop) ----------------------------------------------

    def start(self, wait: float | None = None) -> Aggregator:
        """Start flushing and collecting in a background thread; returns self.

        The database need not answer: tracking works from the first call and the replica connects
        when it can (``status()["store"]`` shows the outage). A configuration that can never work
        (a bad URL, a schema behind the code, another window length) raises at once when the
        database answers within a few seconds. ``wait``: seconds to wait for the database, raising
        StoreUnavailable (and starting nothing) if it has not answered by then.
        """
        self._life.start(wait)
        return self

    def stop(self) -> None:
        """Flush everything tracked, finish any collection in progress, and stop. Idempotent.

        Bounded by ``stop_timeout``. What cannot be flushed in that time goes to the local spool,
        which the next start on this host replays; if even that fails, StoreUnavailable says how
        many events were lost (and they are logged as an error).
        """
        self._life.stop()

    def flush(self) -> None:
        """Flush now; returns when everything tracked before the call is durable."""
        if self._gate is not None:
            self._gate()
        self._life.call(self._engine.flush_now)

    def collect(self) -> list[Report]:
        """Flush, then run the collector once now (it also runs on its schedule); returns the reports it wrote."""
        return self._life.call(self.acollect)

    def reports(self, since: Any = None) -> list[Report]:
        """Finished reports with window_start >= ``since`` (datetime or epoch), oldest first."""
        return self._reads.reports(since)

    def __enter__(self) -> Aggregator:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ---- async lifecycle (host's loop) -----------------------------------------------------

    async def astart(self, wait: float | None = None) -> Aggregator:
        """``start()`` for asyncio hosts: the jobs run on the running loop."""
        await self._life.astart(wait)
        return self

    async def astop(self, timeout: float | None = None) -> None:
        """``stop()`` for asyncio hosts; ``timeout`` overrides stop_timeout (the daemon gives what is left)."""
        await self._life.astop(timeout)

    async def aflush(self) -> None:
        self._life.require_running()
        await self._life.on_own_loop(self._engine.flush_now)

    async def areports(self, since: Any = None, *, after: int | None = None,
                       limit: int | None = None) -> list[Report]:
        """Reports by window (``since``), or in stream order after the cursor ``after`` (a report id)."""
        return await self._reads.areports(since, after=after, limit=limit)

    async def aheld_windows(self) -> list[int]:
        """Starts of the finished windows not yet reported (held by watermarks, or not collected yet)."""
        return await self._reads.aheld_windows()

    async def aping(self) -> None:
        """Raise StoreUnavailable unless the database answers."""
        await self._reads.aping()

    async def acollect(self) -> list[Report]:
        """Flush, then run the collector once now; returns the reports written here.

        The flush first publishes this replica's own watermark, so what it tracked is in the reports
        and it holds no finished window back.
        """
        self._life.require_running()
        if self._engine.collector is None:
            raise exceptions.NotRunning("this Aggregator was created with collect=False")

        async def flush_and_collect() -> list[Report]:
            await self._engine.flush_now()
            return await self._engine.collect_now()

        return await self._life.on_own_loop(flush_and_collect)

    async def __aenter__(self) -> Aggregator:
        return await self.astart()

    async def __aexit__(self, *_exc: object) -> None:
        await self.astop()

    # ---- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Figures for health checks and metrics; "health" is what health.evaluate() makes of the rest."""
        out: dict[str, Any] = {"state": self._life.state, "replica_id": self.replica_id, **self._engine.status()}
        bounds = health.Bounds(self.settings.health_overdue_after, self.settings.health_failures_in_row)
        out["health"] = health.evaluate(out, bounds, now=self._clock()).as_dict()
        return out

    # ---- meters ---------------------------------------------------------------------------------

    def record(self, meter: str, value: object = None, dimensions: Mapping[str, object] | None = None, *,
               event_id: object = None, at: object = None) -> None:
        """Record one observation of a declared meter; never blocks on I/O.

        ``value``: a sum meter's amount (exact to the meter's decimals), a distinct meter's item; omitted
        for a count meter. ``dimensions``: exactly the meter's dimensions. ``event_id``: a record with an
        id already recorded for this meter (within meter_dedup_horizon, on any replica) is ignored.
        Bad input raises InvalidInput/InvalidType and records nothing.
        """
        self._recorder.record(meter, value, dimensions, event_id, at)

    def record_many(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Several records (dicts of record()'s arguments: meter, value, dimensions, event_id, at), all or none."""
        return self._recorder.record_many(records)

    def meters(self) -> list[meters_module.Meter]:
        """The built-in meters (track()) and the declared ones."""
        return [*meters_module.BUILTIN, *self.settings.meters]

    def meter_results(self, since: Any = None, meter: str | None = None) -> list[meters_module.Result]:
        """Per-window meter results of reported windows (with window_start >= ``since``), oldest first."""
        return self._reads.meter_results(since, meter)

    async def ameter_results(self, report_ids: Sequence[int]) -> list[meters_module.Result]:
        """Meter results written with the given reports (a page of the report stream), for the HTTP pull."""
        return await self._reads.ameter_results(report_ids)

    async def aoverflow(self) -> list[dict[str, Any]]:
        """Per meter: records that went to its __overflow__ group, over the windows the database keeps."""
        return await self._reads.aoverflow()

    # ---- experiences ----------------------------------------------------------------------------

    def checkpoint(self, correlation_id: str, experience_id: str, checkpoint: str, *, type: str,
                   feature_category: str, urgency: str, client_timestamp: Any = None,
                   checkpoint_category: str | None = None, outcome: str | None = None,
                   meta: Mapping[str, Any] | None = None) -> float:
        """Report one checkpoint of an experience (see experiences.py); returns the server time it was accepted.

        ``client_timestamp`` defaults to now. A duplicate (same correlation id, checkpoint, category and
        client timestamp) changes nothing. Bad input raises InvalidInput/InvalidType and keeps nothing.
        """
        fields = {"correlation_id": correlation_id, "experience_id": experience_id, "checkpoint": checkpoint,
                  "type": type, "feature_category": feature_category, "urgency": urgency,
                  "client_timestamp": client_timestamp if client_timestamp is not None else
                  dt.datetime.fromtimestamp(self._clock(), dt.timezone.utc),
                  "checkpoint_category": checkpoint_category, "outcome": outcome, "meta": meta}
        return self._checkpoints.add_many([{k: v for k, v in fields.items() if v is not None}], "checkpoint")

    def checkpoint_many(self, checkpoints: Iterable[Mapping[str, Any]]) -> float:
        """Several checkpoints (dicts of the API's fields), all or none; returns the server time."""
        return self._checkpoints.add_many(checkpoints)

    def experience(self, correlation_id: str) -> dict[str, Any] | None:
        """The stored state of one experience (status, flags, times), or None."""
        return self._reads.experience(correlation_id)

    def experience_slis(self, since: Any = None) -> list[dict[str, Any]]:
        """SLIs per window, experience and urgency of reported windows (window_start >= ``since``), oldest first."""
        return self._reads.experience_slis(since)

    async def aexperience_slis(self, report_ids: Sequence[int]) -> list[dict[str, Any]]:
        """SLI rows written with the given reports (a page of the report stream), for the HTTP pull."""
        return await self._reads.aexperience_slis(report_ids)

    # ---- distinct counts and the outbox ---------------------------------------------------------

    def distinct(self, start: Any, end: Any, dim: str = "users") -> distinct_module.Distinct:
        """Distinct workspaces or users (``dim``) of the reported windows starting in [start, end).

        Exact while the ids are kept (``path`` "ids" or "daily"), else estimated from sketches ("sketch",
        with bounds); windows not reported yet are left out, and the answer names those it covers.
        """
        return self._reads.distinct(start, end, dim)

    async def adistinct(self, start: Any, end: Any, dim: str = "users") -> distinct_module.Distinct:
        """distinct() for a running Aggregator, from any event loop (the HTTP API)."""
        return await self._reads.adistinct(start, end, dim)

    async def aoutbox(self) -> list[dict[str, Any]]:
        """The outbox per writer and status: item counts and the oldest item's creation time."""
        return await self._reads.aoutbox()

    # ---- for tests and tools that look inside, and the fork --------------------------------------

    def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on this aggregator's loop from a synchronous caller and wait for it."""
        return self._life.call(fn)

    @property
    def _state(self) -> str:
        return self._life.state

    @property
    def _store(self) -> store.Store | None:
        return self._engine.store

    @property
    def _flusher(self) -> flush_module.Flusher | None:
        return self._engine.flusher

    @property
    def _collector(self) -> collector.Collector | None:
        return self._engine.collector

    @property
    def _deliverer(self) -> outbox_module.Deliverer | None:
        return self._engine.deliverer

    def _restart_after_fork(self) -> None:
        with self._life.lock:
            if self._gate is None:
                return
            self._gate = None
            self.track = self._tracker.track  # type: ignore[method-assign]
        self.start()

    def _track_after_fork(self, *args: Any, **kwargs: Any) -> None:
        """track() in a forked child of a started Aggregator: start this replica, then track."""
        self._restart_after_fork()
        self._tracker.track(*args, **kwargs)

    def _reset_in_child(self) -> None:
        """After fork: forget the parent's data, thread and connections; new replica identity."""
        restart = self._life.reset_in_child()
        self._engine.reset_in_child(config.new_replica_id() if self._auto_replica_id else None)
        self._gate = self._restart_after_fork if restart else None
        self.track = self._track_after_fork if restart else self._tracker.track  # type: ignore[method-assign]
