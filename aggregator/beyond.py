"""The Aggregator's face beyond track(): meters (record), experiences (checkpoint), and what they produce.

A mixin of ``runtime.Aggregator``, kept apart so the lifecycle module stays about the lifecycle.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from aggregator import config, experiences, store, tracker
from aggregator import distinct as distinct_module
from aggregator import meters as meters_module

T = TypeVar("T")


class MetersAndExperiences:
    """Methods of Aggregator for declared meters and experience checkpoints."""

    settings: config.Settings
    _recorder: meters_module.Recorder
    _checkpoints: experiences.Pending
    _store: store.Store | None
    _state: str
    _clock: Callable[[], float]

    if TYPE_CHECKING:  # defined by Aggregator
        def _call(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T: ...

        async def _on_own_loop(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T: ...

        def _require_running(self) -> None: ...

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
        return self._read(lambda db: db.experience(correlation_id))

    def meters(self) -> list[meters_module.Meter]:
        """The built-in meters (track()) and the declared ones."""
        return [*meters_module.BUILTIN, *self.settings.meters]

    def meter_results(self, since: Any = None, meter: str | None = None) -> list[meters_module.Result]:
        """Per-window meter results of reported windows (with window_start >= ``since``), oldest first."""
        defs = {m.name: m for m in self.settings.meters}
        rows = self._read(lambda db: db.meter_results(since=tracker.since_epoch(since), meter=meter))
        return [meters_module.Result.from_row(row, defs.get(row["meter"]), self.settings.window_seconds)
                for row in rows]

    async def ameter_results(self, report_ids: Sequence[int]) -> list[meters_module.Result]:
        """Meter results written with the given reports (a page of the report stream), for the HTTP pull."""
        self._require_running()
        db = self._store
        assert db is not None
        defs = {m.name: m for m in self.settings.meters}
        rows = await self._on_own_loop(lambda: db.meter_results(report_ids=report_ids))
        return [meters_module.Result.from_row(row, defs.get(row["meter"]), self.settings.window_seconds)
                for row in rows]

    async def aexperience_slis(self, report_ids: Sequence[int]) -> list[dict[str, Any]]:
        """SLI rows written with the given reports (a page of the report stream), for the HTTP pull."""
        self._require_running()
        db = self._store
        assert db is not None
        return await self._on_own_loop(lambda: db.experience_slis(report_ids=report_ids))

    def experience_slis(self, since: Any = None) -> list[dict[str, Any]]:
        """SLIs per window, experience and urgency of reported windows (window_start >= ``since``), oldest first."""
        return self._read(lambda db: db.experience_slis(since=tracker.since_epoch(since)))

    def distinct(self, start: Any, end: Any, dim: str = "users") -> distinct_module.Distinct:
        """Distinct workspaces or users (``dim``) of the reported windows starting in [start, end).

        Exact while the ids are kept (``path`` "ids" or "daily"), else estimated from sketches ("sketch",
        with bounds); windows not reported yet are left out, and the answer names those it covers.
        """
        lo, hi, name = distinct_module.check_range(start, end, dim)
        return self._read(lambda db: db.distinct(lo, hi, name))

    async def adistinct(self, start: Any, end: Any, dim: str = "users") -> distinct_module.Distinct:
        """distinct() for a running Aggregator, from any event loop (the HTTP API)."""
        lo, hi, name = distinct_module.check_range(start, end, dim)
        self._require_running()
        db = self._store
        assert db is not None
        return await self._on_own_loop(lambda: db.distinct(lo, hi, name))

    def _read(self, action: Callable[[store.Store], Coroutine[Any, Any, T]]) -> T:
        """Run a read on this aggregator's store, or on a short-lived one when it is not running."""
        async def read() -> T:
            db = self._store if self._store is not None else store.Store(self.settings.database_url, pool_size=1,
                                                                                pooler=self.settings.database_pooler)
            try:
                return await action(db)
            finally:
                if db is not self._store:
                    await db.close()

        return self._call(read) if self._state == "running" else asyncio.run(read())

    async def aoutbox(self) -> list[dict[str, Any]]:
        """The outbox per writer and status: item counts and the oldest item's creation time."""
        self._require_running()
        db = self._store
        assert db is not None
        return await self._on_own_loop(db.outbox_summary)

    async def aoverflow(self) -> list[dict[str, Any]]:
        """Per meter: records that went to its __overflow__ group, over the windows the database keeps."""
        self._require_running()
        db = self._store
        assert db is not None
        return await self._on_own_loop(db.meter_overflow)
