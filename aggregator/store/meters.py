"""The meters' statements: apply a flush's meter records, write a window's meter results and billable events.

Runs inside the core's transactions (``apply_batch``, ``collect_window``), so meter data has the same
exactly-once and late-data behaviour as the boundary-usage numbers: one commit per flush batch, the
batch's sequence number making a retry a no-op, and one commit per window's report.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from aggregator import billing as billable  # not `billing`: the collectors' Billing is passed by that name
from aggregator import exceptions, meters, quarantine, schema
from aggregator.store.base import StoreBase
from aggregator.store.outbox import OutboxQueries
from aggregator.store.quarantine import QuarantineQueries

_Base = StoreBase


def billable_ref(payload: Mapping[str, Any]) -> str:
    """A billable item's quarantine reference: meter, window, late, and a digest of its group (raw dimensions)."""
    digest = hashlib.sha256(str(payload["group_key"]).encode()).hexdigest()[:16]
    return quarantine.ref(payload["meter"], payload["window_start"], "late" if payload["late"] else "ontime", digest)


class MeterQueries:
    """Mixed into Store: the meters' SQL."""

    async def check_meters(self: _Base, declared: Sequence[meters.Meter]) -> None:
        """Record each meter's aggregation and decimals on first use; refuse a replica that declares them otherwise.

        Stored figures are in the meter's units, so a change of either would mix units; dimensions, unit
        and the rest may change (new groups simply appear).
        """
        m = schema.meta
        for meter in declared:
            key, shape = f"meter:{meter.name}", f"{meter.aggregation}/{meter.decimals}"
            async with self.transaction() as conn:
                await conn.execute(self._insert(m).values(key=key, value=shape).on_conflict_do_nothing())
                stored = await conn.scalar(sa.select(m.c.value).where(m.c.key == key))
            if stored != shape:
                aggregation, _, decimals = str(stored).partition("/")
                raise exceptions.ConfigError(
                    f"meters.{meter.name}: aggregation={meter.aggregation!r}, decimals={meter.decimals} differ from "
                    f"aggregation={aggregation!r}, decimals={decimals} that this database records it with; every "
                    "replica must declare a meter alike (to change either, declare a meter with a new name)")

    async def billable_events(self: _Base, *, after_id: int = 0, until_id: int | None = None,
                              limit: int | None = None) -> list[dict[str, Any]]:
        """Billable event rows (``id``, ``event_id``, ``window_start``, ``meter``, ``payload`` JSON) by id."""
        b = schema.billable_events
        query = sa.select(b).where(b.c.id > after_id).order_by(b.c.id)
        if until_id is not None:
            query = query.where(b.c.id <= until_id)
        if limit is not None:
            query = query.limit(limit)
        async with self.read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    # ---- flush -----------------------------------------------------------------------------------

    async def _apply_meters(self: _Base, conn: AsyncConnection, batch: meters.MeterBatch,
                            defs: Mapping[str, meters.Meter], *, closed: set[int], late_target: Any,
                            now: float) -> int:
        """Apply one flush's meter records; returns how many records went to an overflow group.

        ``late_target`` is an async callable giving the open window that late data is counted in.
        """
        # Identified records count once per (meter, event id), across replicas and restarts.
        fresh = await MeterQueries._new_event_ids(self, conn, list(batch.identified.values()), now)
        groups = batch.with_fresh(fresh)
        # Where each figure goes: its own window, or (late) the window open now.
        rows: dict[tuple[int, str, str, bool], list[int]] = {}  # -> [quantity, records]
        distinct_rows: dict[tuple[int, str, str], set[uuid.UUID]] = {}
        # Late distinct values: (target window, meter, group there, their own window, group there, values).
        late_distinct: list[tuple[int, str, str, int, str, set[uuid.UUID]]] = []
        for (start, meter, group), data in sorted(groups.items(), key=lambda item: item[0]):
            late = start in closed
            target = await late_target() if late else start
            if late and data.distinct:
                late_distinct.append((target, meter, group, start, group, data.distinct))
            elif data.distinct:
                distinct_rows.setdefault((target, meter, group), set()).update(data.distinct)
            figures = rows.setdefault((target, meter, group, late), [0, 0])
            figures[0] += data.quantity
            figures[1] += data.records
        overflowed = await MeterQueries._admit_groups(self, conn, rows, distinct_rows, late_distinct, defs)
        # Late distinct values join their own window's set; what is new there is counted late now.
        for target, meter, group, start, origin_group, values in late_distinct:
            new = await MeterQueries._insert_distinct(self, conn, start, meter, origin_group, values, count_new=True)
            rows[(target, meter, group, True)][0] += new
        for (start, meter, group), values in sorted(distinct_rows.items(), key=lambda item: item[0]):
            await MeterQueries._insert_distinct(self, conn, start, meter, group, values)
        if rows:
            v = schema.meter_values
            insert = self._insert(v)
            statement = insert.on_conflict_do_update(
                index_elements=[v.c.window_start, v.c.meter, v.c.group_key, v.c.late],
                set_={"quantity": v.c.quantity + insert.excluded.quantity,
                      "records": v.c.records + insert.excluded.records})
            await conn.execute(statement, [
                {"window_start": s, "meter": m, "group_key": g, "late": late, "quantity": q, "records": r}
                for (s, m, g, late), (q, r) in sorted(rows.items())])
        return overflowed

    async def _new_event_ids(self: _Base, conn: AsyncConnection, records: list[meters.Identified],
                             now: float) -> set[tuple[str, str]]:
        """Remember the records' (meter, event id) pairs; return those not seen before."""
        if not records:
            return set()
        table = schema.meter_event_ids
        fresh: set[tuple[str, str]] = set()
        ordered = sorted({(r.meter, r.event_id) for r in records})  # one order everywhere: no deadlocks
        # Executemany: one cached statement, batched by the driver; a VALUES list is compiled anew each time.
        result = await conn.execute(self._insert(table).on_conflict_do_nothing().returning(table.c.meter,
                                                                                          table.c.event_id),
                                    [{"meter": m, "event_id": e, "recorded_at": now} for m, e in ordered])
        fresh.update((m, e) for m, e in result)
        return fresh

    async def _admit_groups(self: _Base, conn: AsyncConnection, rows: dict[tuple[int, str, str, bool], list[int]],
                            distinct_rows: dict[tuple[int, str, str], set[uuid.UUID]],
                            late_distinct: list[Any], defs: Mapping[str, meters.Meter]) -> int:
        """Enforce each meter's max_groups per window: groups beyond it are renamed __overflow__ (in place)."""
        by_window: dict[tuple[int, str], set[str]] = {}
        for start, meter, group, _late in rows:
            if group != meters.OVERFLOW:
                by_window.setdefault((start, meter), set()).add(group)
        w, v = schema.meter_windows, schema.meter_values
        redirected = 0
        for (start, meter), keys in sorted(by_window.items()):
            cap = defs[meter].max_groups if meter in defs else meters.DEFAULT_MAX_GROUPS
            await conn.execute(self._insert(w).values(window_start=start, meter=meter).on_conflict_do_nothing())
            admitted = int(await conn.scalar(
                sa.select(w.c.groups).where(w.c.window_start == start, w.c.meter == meter).with_for_update()) or 0)
            known = {g for (g,) in await conn.execute(
                sa.select(v.c.group_key).distinct().where(v.c.window_start == start, v.c.meter == meter,
                                                          v.c.group_key.in_(sorted(keys))))}
            new = sorted(keys - known)
            room = max(cap - admitted, 0)
            over = set(new[room:])
            overflow_records = 0
            if over:
                for key in [k for k in rows if k[0] == start and k[1] == meter and k[2] in over]:
                    figures = rows.pop(key)
                    overflow_records += figures[1]
                    target = rows.setdefault((start, meter, meters.OVERFLOW, key[3]), [0, 0])
                    target[0] += figures[0]
                    target[1] += figures[1]
                for dkey in [k for k in distinct_rows if k[0] == start and k[1] == meter and k[2] in over]:
                    distinct_rows.setdefault((start, meter, meters.OVERFLOW), set()).update(distinct_rows.pop(dkey))
                for index, item in enumerate(late_distinct):
                    if item[0] == start and item[1] == meter and item[2] in over:
                        late_distinct[index] = (item[0], item[1], meters.OVERFLOW, *item[3:])
                redirected += overflow_records
            await conn.execute(sa.update(w).where(w.c.window_start == start, w.c.meter == meter).values(
                groups=w.c.groups + min(len(new), room), overflowed=w.c.overflowed + overflow_records))
        return redirected

    async def _insert_distinct(self: _Base, conn: AsyncConnection, start: int, meter: str, group: str,
                               values: set[uuid.UUID], *, count_new: bool = False) -> int:
        table = schema.meter_distinct
        rows = [{"window_start": start, "meter": meter, "group_key": group, "value_hash": h} for h in sorted(values)]
        if not rows:
            return 0
        statement = self._insert(table).on_conflict_do_nothing()
        if count_new:
            return len((await conn.execute(statement.returning(table.c.value_hash), rows)).fetchall())
        await conn.execute(statement, rows)
        return 0

    # ---- collect ---------------------------------------------------------------------------------

    async def _collect_meters(self: _Base, conn: AsyncConnection, report: dict[str, Any],
                              defs: Mapping[str, meters.Meter], billing: Any, writers: Sequence[str],
                              now: float) -> list[dict[str, Any]]:
        """Write the window's meter results and billable events (queued for ``writers``); returns the results."""
        start, v, d = report["window_start"], schema.meter_values, schema.meter_distinct
        distinct = {(m, g): n for m, g, n in await conn.execute(
            sa.select(d.c.meter, d.c.group_key, sa.func.count()).where(d.c.window_start == start)
            .group_by(d.c.meter, d.c.group_key))}
        results: list[dict[str, Any]] = []
        for meter, group, late, quantity, records in await conn.execute(
                sa.select(v.c.meter, v.c.group_key, v.c.late, v.c.quantity, v.c.records)
                .where(v.c.window_start == start).order_by(v.c.meter, v.c.group_key, v.c.late)):
            definition = defs.get(meter)
            if not late and (meter, group) in distinct:
                quantity = distinct[(meter, group)]
            results.append({"window_start": start, "meter": meter, "group_key": group, "late": bool(late),
                            "report_id": report["id"], "quantity": int(quantity),
                            "decimals": definition.decimals if definition else 0, "records": int(records)})
        if results:
            await conn.execute(sa.insert(schema.meter_reports), results)
        for result in results:
            definition = defs.get(result["meter"])
            if definition is None or not definition.billable or billing is None:
                continue
            await MeterQueries._bill(self, conn, definition, result, report, billing, writers, now)
        return results

    async def _bill(self: _Base, conn: AsyncConnection, definition: meters.Meter, result: Mapping[str, Any],
                    report: Mapping[str, Any], billing: Any, writers: Sequence[str], now: float) -> None:
        """The billable event of one meter result, stored and queued; set aside (same commit) if it cannot be made."""
        async def build() -> dict[str, Any] | None:
            return billing.event(definition, result, report)  # type: ignore[no-any-return]

        async def set_aside(item: quarantine.Item) -> None:
            await QuarantineQueries._set_aside(self, conn, item, now=now, by=report.get("generated_by"))

        payload = {"meter": result["meter"], "group_key": result["group_key"], "late": bool(result["late"]),
                   "quantity": int(result["quantity"]), "window_start": report["window_start"],
                   "window_end": report["window_end"], "report_id": report["id"]}
        event = await quarantine.guard("billable", billable_ref(payload), build, set_aside=set_aside,
                                       payload=payload, report_id=report["id"])
        if event is None or isinstance(event, quarantine.SetAside):
            return
        await MeterQueries._keep_billable(self, conn, event, result["meter"], report, writers=writers, now=now)

    async def _keep_billable(self: _Base, conn: AsyncConnection, event: dict[str, Any], meter: str,
                             report: Mapping[str, Any], *, writers: Sequence[str], now: float) -> None:
        """Store a billable event and queue it for every writer, in the caller's transaction."""
        await conn.execute(sa.insert(schema.billable_events).values(
            event_id=uuid.UUID(event["event_id"]), window_start=report["window_start"], meter=meter,
            report_id=report["id"], payload=json.dumps(event, sort_keys=True)))
        await OutboxQueries._enqueue(self, conn, writers, kind=billable.KIND, schema_uri=billable.SCHEMA,
                                     event_id=uuid.UUID(event["event_id"]), payload=event,
                                     occurred_at=report["window_end"], report_id=report["id"], now=now)

    async def bill_again(self: _Base, item_id: int, payload: Mapping[str, Any], *, defs: Mapping[str, meters.Meter],
                         billing: Any, writers: Sequence[str], now: float) -> bool:
        """A billable event handed back from the quarantine, made and queued in the commit that deletes its row.

        False: another collector took it first. Raises (for the caller to set it aside again) if it still
        cannot be made, or if its meter is no longer declared billable.
        """
        definition = defs.get(str(payload.get("meter")))
        if definition is None or not definition.billable:
            raise exceptions.InvalidInput(
                f"meter {payload.get('meter')!r} of this billable item is not declared billable here; declare it "
                "(billable = true) in the collecting replicas, or delete the item from the quarantine")
        result = {"meter": payload["meter"], "group_key": payload["group_key"], "late": payload["late"],
                  "quantity": payload["quantity"]}
        report = {"window_start": payload["window_start"], "window_end": payload["window_end"],
                  "id": payload["report_id"]}
        async with self.transaction() as conn:
            if not await QuarantineQueries._release(self, conn, kind="billable", item_id=item_id):
                return False
            event = billing.event(definition, result, report)
            if event is not None:
                await MeterQueries._keep_billable(self, conn, event, result["meter"], report, writers=writers, now=now)
        return True

    async def prune_meters(self: _Base, conn: AsyncConnection, old: Any, *, event_ids_before: float) -> None:
        """Inside prune(): meter data of windows reported long ago, and event ids past the dedup horizon."""
        for table in (schema.meter_values, schema.meter_distinct, schema.meter_windows):
            await conn.execute(sa.delete(table).where(table.c.window_start.in_(old)))
        e = schema.meter_event_ids
        await conn.execute(sa.delete(e).where(e.c.recorded_at < event_ids_before))

    async def meter_results(self: _Base, *, since: int | None = None, meter: str | None = None,
                            report_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Meter results of reported windows, oldest first; or those of the given reports."""
        r = schema.meter_reports
        query = sa.select(r).order_by(r.c.window_start, r.c.meter, r.c.group_key, r.c.late)
        if since is not None:
            query = query.where(r.c.window_start >= since)
        if report_ids is not None:
            query = query.where(r.c.report_id.in_(list(report_ids)))
        if meter is not None:
            query = query.where(r.c.meter == meter)
        async with self.read() as conn:
            return [dict(row._mapping) for row in await conn.execute(query)]

    async def meter_overflow(self: _Base) -> list[dict[str, Any]]:
        """Records sent to __overflow__, per meter, over the windows still kept."""
        w = schema.meter_windows
        async with self.read() as conn:
            rows = await conn.execute(sa.select(w.c.meter, sa.func.sum(w.c.overflowed).label("records"))
                                      .group_by(w.c.meter).order_by(w.c.meter))
            return [{"meter": m, "records": int(n or 0)} for m, n in rows]
