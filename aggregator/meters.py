"""Meters: declared sum/count/distinct measures with dimensions, recorded next to track().

A meter has a name, an aggregation, a unit and the dimensions its results are grouped by. Sums are
exact: values are fixed-point integers in units of ``10**-decimals`` (``decimals=3`` counts
milliseconds of a ``seconds`` meter), never floats, so totals across replicas add up to the unit.
``record()`` validates everything before anything is kept; an ``event_id`` makes a record idempotent
(the store remembers ids for the dedup horizon, across replicas and restarts).

The boundary-usage numbers of ``track()`` are the built-in meters (``BUILTIN``): they are listed with
the others, come from ``track()`` only, and keep their own report.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from aggregator import exceptions, reports, tracker, values

Aggregation = Literal["sum", "count", "distinct"]
OVERFLOW = "__overflow__"  # the group that takes records beyond a meter's max_groups in a window
_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")  # matched whole
MAX_DIMENSION_TEXT = 256
MAX_EVENT_ID = 128
DEFAULT_MAX_GROUPS = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Meter:
    """One declared meter."""

    name: str
    aggregation: Aggregation
    unit: str
    dimensions: tuple[str, ...] = ()
    field: str | None = None  # sum: what the value measures (e.g. "duration"); distinct: what is counted
    decimals: int = 0  # sum: values are kept in units of 10**-decimals
    billable: bool = False
    event_type: str | None = None  # billable events' event_type; default: the meter's name
    max_groups: int = DEFAULT_MAX_GROUPS  # distinct dimension combinations per window; more go to OVERFLOW
    builtin: bool = False

    @classmethod
    def build(cls, name: str, options: Mapping[str, Any]) -> Meter:
        """A meter from a ``[meters.NAME]`` table (or keyword arguments); errors name ``meters.NAME.KEY``."""
        key = f"meters.{name}"
        known = {"aggregation", "unit", "dimensions", "field", "decimals", "billable", "event_type", "max_groups"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise exceptions.ConfigError(
                f"{key}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise exceptions.ConfigError(f"meter name {name!r} must be lower case letters, digits and _ (max 63)")
        if name in BUILTIN_NAMES:
            raise exceptions.ConfigError(f"meter name {name!r} is built in (track() records it); choose another")
        aggregation = options.get("aggregation")
        if aggregation not in ("sum", "count", "distinct"):
            raise exceptions.ConfigError(f"{key}.aggregation={aggregation!r} must be one of: sum, count, distinct")
        unit = options.get("unit", "1" if aggregation != "sum" else None)
        if not isinstance(unit, str) or not 0 < len(unit) <= 64:
            raise exceptions.ConfigError(f"{key}.unit={unit!r} must name the unit, e.g. \"seconds\" or \"requests\"")
        dimensions = options.get("dimensions", ())
        if not isinstance(dimensions, list | tuple) or not all(isinstance(d, str) and _NAME.fullmatch(d)
                                                                for d in dimensions):
            raise exceptions.ConfigError(
                f"{key}.dimensions={dimensions!r} must be a list of field names (lower case letters, digits, _)")
        if len(set(dimensions)) != len(dimensions) or len(dimensions) > 16:
            raise exceptions.ConfigError(f"{key}.dimensions={dimensions!r} must be at most 16 distinct names")
        field = options.get("field")
        if aggregation == "distinct" and (not isinstance(field, str) or not _NAME.fullmatch(field)):
            raise exceptions.ConfigError(f"{key}.field={field!r}: a distinct meter names the field it counts, "
                                         "e.g. field = \"user_id\"")
        if field is not None and (not isinstance(field, str) or not _NAME.fullmatch(field) or field in dimensions):
            raise exceptions.ConfigError(f"{key}.field={field!r} must be a field name that is not a dimension")
        decimals = options.get("decimals", 0)
        if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 9 or (
                decimals and aggregation != "sum"):
            raise exceptions.ConfigError(f"{key}.decimals={decimals!r} must be 0-9, and only sums have decimals")
        billable = options.get("billable", False)
        if not isinstance(billable, bool):
            raise exceptions.ConfigError(f"{key}.billable={billable!r} must be true or false")
        event_type = options.get("event_type")
        if event_type is not None and (not isinstance(event_type, str) or not 0 < len(event_type) <= 128):
            raise exceptions.ConfigError(f"{key}.event_type={event_type!r} must be a string of 1-128 characters")
        max_groups = options.get("max_groups", DEFAULT_MAX_GROUPS)
        if isinstance(max_groups, bool) or not isinstance(max_groups, int) or not 1 <= max_groups <= 10_000_000:
            raise exceptions.ConfigError(f"{key}.max_groups={max_groups!r} must be a whole number from 1 to 10000000")
        return cls(name=name, aggregation=aggregation, unit=unit, dimensions=tuple(dimensions), field=field,
                   decimals=decimals, billable=billable, event_type=event_type, max_groups=max_groups)

    def to_units(self, value: object) -> int:
        """A sum meter's value as an exact integer count of ``10**-decimals``; raises naming the meter."""
        number = values.decimal_number(value, f"record({self.name!r}): value")
        with decimal.localcontext(decimal.Context(prec=100)):  # exact for any bounded number
            units = int(number.scaleb(self.decimals).to_integral_value(decimal.ROUND_HALF_EVEN))
        if units > values.MAX_COUNT * 1000:
            raise exceptions.InvalidInput(f"record({self.name!r}): value={value!r} is out of range for one record; "
                                          f"at most {values.MAX_COUNT * 1000 / 10**self.decimals:g}")
        return units

    def from_units(self, units: int) -> decimal.Decimal:
        return decimal.Decimal(units).scaleb(-self.decimals)


BUILTIN = (
    Meter("unique_workspaces", "distinct", "workspaces", field="workspace_id", builtin=True),
    Meter("unique_users", "distinct", "users", field="user_id", builtin=True),
    Meter("allowed_requests", "sum", "requests", field="allowed", builtin=True),
    Meter("denied_requests", "sum", "requests", field="denied", builtin=True),
)
BUILTIN_NAMES = frozenset(m.name for m in BUILTIN)


def declare(tables: Mapping[str, Mapping[str, Any]] | Iterable[Meter]) -> tuple[Meter, ...]:
    """Meters from ``[meters.NAME]`` tables or Meter objects; names must be unique and not built in."""
    if isinstance(tables, Mapping):
        declared = [Meter.build(name, table) for name, table in tables.items()]
    else:
        declared = list(tables)
    names = [m.name for m in declared]
    for m in declared:
        if m.name in BUILTIN_NAMES:
            raise exceptions.ConfigError(f"meter name {m.name!r} is built in (track() records it); choose another")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise exceptions.ConfigError(f"meter(s) {', '.join(duplicates)} declared twice")
    return tuple(declared)


def group_key(dimensions: Mapping[str, str]) -> str:
    """The stable text of a dimension combination: its JSON with sorted keys."""
    return json.dumps(dimensions, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def value_hash(value: str) -> uuid.UUID:
    """128 bits of SHA-256 of a distinct meter's value: what its distinct set stores."""
    return uuid.UUID(bytes=hashlib.sha256(value.encode()).digest()[:16])


@dataclasses.dataclass(slots=True)
class GroupData:
    """One meter's pending figures for one dimension combination in one window."""

    dimensions: dict[str, str]
    quantity: int = 0  # sum: units; count: records
    records: int = 0
    distinct: set[uuid.UUID] = dataclasses.field(default_factory=set)

    def add(self, item: Identified) -> None:
        self.quantity += item.quantity
        self.records += 1
        if item.distinct is not None:
            self.distinct.add(item.distinct)

    def copy(self) -> GroupData:
        return GroupData(dict(self.dimensions), self.quantity, self.records, set(self.distinct))


@dataclasses.dataclass(slots=True)
class Identified:
    """A validated record; one with an event id travels alone to the store, which drops ids it has seen."""

    event_id: str  # "" when the record has none
    meter: str
    window_start: int
    group: str
    dimensions: dict[str, str]
    quantity: int
    distinct: uuid.UUID | None


@dataclasses.dataclass(slots=True)
class MeterBatch:
    """What record() gathered since the last take: per (window, meter, group) figures, and identified records."""

    groups: dict[tuple[int, str, str], GroupData] = dataclasses.field(default_factory=dict)
    # The first record of each (meter, event id).
    identified: dict[tuple[str, str], Identified] = dataclasses.field(default_factory=dict)

    @property
    def records(self) -> int:
        return sum(g.records for g in self.groups.values()) + len(self.identified)

    def add(self, item: Identified) -> None:
        """Keep one record: an identified one as it is (the first of its id), others folded into its group."""
        if item.event_id:
            # A retry within the same batch is dropped here; across batches and replicas, by the store.
            self.identified.setdefault((item.meter, item.event_id), item)
        else:
            _fold(self.groups, item)

    def with_fresh(self, fresh: set[tuple[str, str]]) -> dict[tuple[int, str, str], GroupData]:
        """The groups with the identified records whose (meter, event id) is in ``fresh`` folded in.

        The batch itself is left as it is: a flush that fails is retried with the same batch, and the
        store decides again which ids are fresh.
        """
        groups = {key: data.copy() for key, data in self.groups.items()}
        for key, item in self.identified.items():
            if key in fresh:
                _fold(groups, item)
        return groups


def _fold(groups: dict[tuple[int, str, str], GroupData], item: Identified) -> None:
    key = (item.window_start, item.meter, item.group)
    data = groups.get(key)
    if data is None:
        data = groups[key] = GroupData(item.dimensions)
    data.add(item)


@dataclasses.dataclass(frozen=True, slots=True)
class Result:
    """One meter's figure for one dimension group in one reported window."""

    window_start: dt.datetime
    window_end: dt.datetime
    meter: str
    dimensions: dict[str, str]  # empty for the overflow group
    overflow: bool  # the group of records beyond max_groups
    late: bool  # data of earlier, already reported windows that arrived while this one was open
    quantity: decimal.Decimal  # sum: exact to the meter's decimals; count: records; distinct: values
    unit: str | None
    records: int
    report_id: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any], meter: Meter | None, window: int) -> Result:
        overflow = row["group_key"] == OVERFLOW
        start = dt.datetime.fromtimestamp(row["window_start"], tz=dt.timezone.utc)
        dimensions: dict[str, str] = {} if overflow else json.loads(row["group_key"])
        if meter is not None:  # in the declared order (the stored key is sorted)
            dimensions = {d: dimensions[d] for d in meter.dimensions if d in dimensions}
        return cls(window_start=start, window_end=start + dt.timedelta(seconds=window), meter=row["meter"],
                   dimensions=dimensions, overflow=overflow,
                   late=bool(row["late"]), quantity=decimal.Decimal(row["quantity"]).scaleb(-row["decimals"]),
                   unit=meter.unit if meter else None, records=row["records"], report_id=row["report_id"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 UTC, the quantity as a JSON number."""
        out = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in ("window_start", "window_end"):
            out[name] = reports.iso_utc(out[name])
        quantity = self.quantity
        out["quantity"] = int(quantity) if quantity == quantity.to_integral_value() else float(quantity)
        return out


class Recorder:
    """Pending meter records of one replica; record() is validated, then kept under a short lock."""

    def __init__(self, meters: Iterable[Meter], window: int, clock: Callable[[], float] = time.time,
                 within: values.TimeRange = values.DEFAULT_RANGE) -> None:
        self.meters = {m.name: m for m in meters}
        self.window = window
        self._clock = clock
        self.within = within  # an explicit ``at`` must be this close to the clock
        self._lock = threading.Lock()
        self._batch = MeterBatch()
        self._open = True

    def record(self, meter: object, value: object = None, dimensions: Mapping[str, object] | None = None,
               event_id: object = None, at: object = None) -> None:
        self._keep([self.prepare(meter, value, dimensions, event_id, at)])

    def record_many(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Several records, all or none: each is validated (errors name its index) before any is kept."""
        if isinstance(records, str | bytes | Mapping) or not isinstance(records, Iterable):
            raise exceptions.InvalidType(f"record_many(): records={values.shown(records)} is a "
                                         f"{type(records).__name__}; pass a list of dicts")
        prepared = []
        for index, fields in enumerate(records):
            if not isinstance(fields, Mapping):
                raise exceptions.InvalidType(f"records[{index}]={values.shown(fields)} is a {type(fields).__name__}; "
                                             "pass a dict of record()'s arguments")
            try:
                prepared.append(self.prepare(**fields))
            except TypeError as exc:
                if isinstance(exc, exceptions.AggregatorError):
                    raise type(exc)(f"records[{index}]: {exc}") from None
                raise exceptions.InvalidType(f"records[{index}]: {exc}") from None
            except exceptions.AggregatorError as exc:
                raise type(exc)(f"records[{index}]: {exc}") from None
        self._keep(prepared)
        return len(prepared)

    def prepare(self, meter: object, value: object = None, dimensions: Mapping[str, object] | None = None,
                event_id: object = None, at: object = None) -> Identified:
        """One record validated and placed in its window and group; nothing is kept yet."""
        m = self._meter(meter)
        dims = self._dimensions(m, dimensions)
        quantity, distinct = 1, None
        if m.aggregation == "sum":
            quantity = m.to_units(value)
        elif m.aggregation == "distinct":
            distinct = value_hash(_text(value, f"record({m.name!r}): value ({m.field})"))
            quantity = 0
        elif value is not None and value != 1:
            raise exceptions.InvalidInput(
                f"record({m.name!r}): a count meter counts records; omit value (got {values.shown(value)})")
        eid = "" if event_id is None else _event_id(event_id, m.name)
        moment = self._clock() if at is None else values.moment(at, now=self._clock(), within=self.within)
        return Identified(eid, m.name, tracker.window_start(moment, self.window), group_key(dims), dims, quantity,
                          distinct)

    def _keep(self, prepared: list[Identified]) -> None:
        with self._lock:
            if not self._open:
                raise exceptions.NotRunning("Aggregator is stopped; this record was not kept. Create a new Aggregator")
            for item in prepared:
                self._batch.add(item)

    def take(self) -> MeterBatch:
        with self._lock:
            batch, self._batch = self._batch, MeterBatch()
        return batch

    def pending(self) -> int:
        with self._lock:
            return self._batch.records

    def close(self) -> None:
        with self._lock:
            self._open = False

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._batch = MeterBatch()
        self._open = True

    def _meter(self, name: object) -> Meter:
        if not isinstance(name, str):
            raise exceptions.InvalidType(f"record(): meter={values.shown(name)} is a {type(name).__name__}; pass a "
                                         "meter name")
        meter = self.meters.get(name)
        if meter is None:
            if name in BUILTIN_NAMES:
                raise exceptions.InvalidInput(f"record({name!r}): a built-in meter; track() records it")
            known = ", ".join(sorted(self.meters)) or "none are declared"
            raise exceptions.InvalidInput(f"record({values.shown(name)}): no such meter; declared meters: {known}")
        return meter

    @staticmethod
    def _dimensions(m: Meter, given: Mapping[str, object] | None) -> dict[str, str]:
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            raise exceptions.InvalidType(f"record({m.name!r}): dimensions={values.shown(given)} must be a mapping")
        missing = [d for d in m.dimensions if d not in given]
        extra = [key for key in given if key not in m.dimensions]
        if missing or extra:
            unexpected = "[" + ", ".join(values.shown(key) for key in extra[:5]) + (", ...]" if len(extra) > 5 else "]")
            raise exceptions.InvalidInput(
                f"record({m.name!r}): dimensions must be exactly {list(m.dimensions)}"
                + (f"; missing {missing}" if missing else "") + (f"; unexpected {unexpected}" if extra else ""))
        return {d: _text(given[d], f"record({m.name!r}): dimension {d}") for d in m.dimensions}


def _text(value: object, what: str) -> str:
    """A dimension or distinct value as text: strings, ints and UUIDs; nothing lossy, unbounded or ambiguous."""
    text = values.text(value, what, maximum=MAX_DIMENSION_TEXT)
    if text == OVERFLOW:
        raise exceptions.InvalidInput(f"{what}={value!r} is reserved ({OVERFLOW!r} is the overflow group); rename it")
    return text


def _event_id(value: object, meter: str) -> str:
    if isinstance(value, uuid.UUID):
        return str(value)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_EVENT_ID or not value.isprintable():
        raise exceptions.InvalidInput(
            f"record({meter!r}): event_id={values.shown(value)} must be a UUID or a printable string of "
            f"1-{MAX_EVENT_ID} chars")
    return value


