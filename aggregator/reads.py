"""Reading back what the replicas wrote: reports, meter results, experiences and their SLIs, distinct
counts, the outbox and overflow figures. The Aggregator's read methods delegate here.

It never writes. A read of a running Aggregator runs on its loop (the connections belong to it); a
synchronous read of one that is not running opens a short-lived store of its own and closes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from aggregator import distinct as distinct_module
from aggregator import engine as engine_module
from aggregator import lifecycle as lifecycle_module
from aggregator import meters as meters_module
from aggregator import migrate, store, tracker
from aggregator.reports import Report

T = TypeVar("T")


async def read_reports(database_url: str, since: Any = None, *, pooler: str = "none") -> list[Report]:
    """Finished reports from a database, without starting an Aggregator (CLI, demo, readers)."""
    db = store.Store(database_url, pool_size=1, pooler=pooler)
    try:
        await migrate.ensure_current(db, auto_upgrade=db.dialect == "sqlite")
        rows = await db.reports(since=tracker.since_epoch(since))
    finally:
        await db.close()
    return [Report.from_row(row) for row in rows]


class Reads:
    """The queries of one Aggregator, through its engine's store and its lifecycle's loop."""

    def __init__(self, engine: engine_module.Engine, life: lifecycle_module.Lifecycle,
                 clock: Callable[[], float]) -> None:
        self._engine = engine
        self._life = life
        self._clock = clock

    # ---- reports --------------------------------------------------------------------------------

    def reports(self, since: Any = None) -> list[Report]:
        if self._life.running:
            return self._life.call(lambda: self.areports(since))
        s = self._engine.settings
        return asyncio.run(read_reports(s.database_url, since, pooler=s.database_pooler))

    async def areports(self, since: Any = None, *, after: int | None = None,
                       limit: int | None = None) -> list[Report]:
        db = self._engine.store
        if db is None:
            s = self._engine.settings
            return await read_reports(s.database_url, since, pooler=s.database_pooler)
        start = tracker.since_epoch(since)
        rows = await self._life.on_own_loop(lambda: db.reports(since=start, after_id=after, limit=limit))
        return [Report.from_row(row) for row in rows]

    async def aheld_windows(self) -> list[int]:
        self._life.require_running()
        ended_by = self._clock() - self._engine.settings.grace
        return [start for start, _ in await self._aread(lambda db: db.open_windows(ended_by=ended_by))]

    async def aping(self) -> None:
        await self._aread(lambda db: db.ping())

    # ---- meters, experiences, distinct ------------------------------------------------------------

    def meter_results(self, since: Any = None, meter: str | None = None) -> list[meters_module.Result]:
        rows = self._read(lambda db: db.meter_results(since=tracker.since_epoch(since), meter=meter))
        return self._meter_results(rows)

    async def ameter_results(self, report_ids: Sequence[int]) -> list[meters_module.Result]:
        return self._meter_results(await self._aread(lambda db: db.meter_results(report_ids=report_ids)))

    def _meter_results(self, rows: Sequence[dict[str, Any]]) -> list[meters_module.Result]:
        s = self._engine.settings
        defs = {m.name: m for m in s.meters}
        return [meters_module.Result.from_row(row, defs.get(row["meter"]), s.window_seconds) for row in rows]

    def experience(self, correlation_id: str) -> dict[str, Any] | None:
        return self._read(lambda db: db.experience(correlation_id))

    def experience_slis(self, since: Any = None) -> list[dict[str, Any]]:
        return self._read(lambda db: db.experience_slis(since=tracker.since_epoch(since)))

    async def aexperience_slis(self, report_ids: Sequence[int]) -> list[dict[str, Any]]:
        return await self._aread(lambda db: db.experience_slis(report_ids=report_ids))

    def distinct(self, start: Any, end: Any, dim: str) -> distinct_module.Distinct:
        lo, hi, name = distinct_module.check_range(start, end, dim)
        return self._read(lambda db: db.distinct(lo, hi, name))

    async def adistinct(self, start: Any, end: Any, dim: str) -> distinct_module.Distinct:
        lo, hi, name = distinct_module.check_range(start, end, dim)
        return await self._aread(lambda db: db.distinct(lo, hi, name))

    # ---- the outbox and overflow ----------------------------------------------------------------

    async def aoutbox(self) -> list[dict[str, Any]]:
        return await self._aread(lambda db: db.outbox_summary())

    async def aoverflow(self) -> list[dict[str, Any]]:
        return await self._aread(lambda db: db.meter_overflow())

    # ---- how a read runs ------------------------------------------------------------------------

    def _read(self, action: Callable[[store.Store], Coroutine[Any, Any, T]]) -> T:
        """Run a read on the running store, or on a short-lived one when the Aggregator is not running."""
        async def read() -> T:
            own = self._engine.store
            s = self._engine.settings
            db = own if own is not None else store.Store(s.database_url, pool_size=1, pooler=s.database_pooler)
            try:
                return await action(db)
            finally:
                if db is not own:
                    await db.close()

        return self._life.call(read) if self._life.running else asyncio.run(read())

    async def _aread(self, action: Callable[[store.Store], Coroutine[Any, Any, T]]) -> T:
        """Run a read on a running Aggregator's store, on its loop, from any loop."""
        self._life.require_running()
        db = self._engine.store
        assert db is not None
        return await self._life.on_own_loop(lambda: action(db))
