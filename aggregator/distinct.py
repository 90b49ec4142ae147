"""Distinct over any range of reported windows: which data answers it, and the answer (no I/O).

Three sources, most exact first: the windows' own ids (``window_ids``, kept for ``id_retention``), the
per-day rollup (``day_ids``, kept for ``distinct_retention``; whole UTC days only), and the mergeable HLL
sketches (kept with the reports). The rollup and sketches of a window are written by the collector's
rollup after its report; until then the window keeps its ids, and they are counted besides the day or the
sketches. A range is answered exactly when every part of it is covered by retained ids or retained days,
else entirely from sketches, with error bounds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable, Sequence
from typing import Any

import datasketches

from aggregator import exceptions, schema, values

DAY = 86400
# The sets a range can be asked about, and the window_ids dimension each is kept under.
DIMS: dict[str, int] = {"workspaces": schema.DIM_WORKSPACE, "users": schema.DIM_USER}
# HLL with 2^12 buckets of 4 bits: ~2 KiB a sketch once dense (a few hundred bytes while sparse), and a
# relative standard error of 1.04 / sqrt(2^12) = 1.6% once unioned.
LG_K = 12
_TYPE = datasketches.tgt_hll_type.HLL_4
CONFIDENCE_STD_DEVS = 2  # the bounds given are +-2 standard deviations: ~95.4%
PATHS = ("ids", "daily", "sketch")


@dataclasses.dataclass(frozen=True, slots=True)
class Span:
    """Part of a range answered exactly: ids of the windows starting in [start, end), or of those days."""

    source: str  # "windows" (window_ids) or "days" (day_ids)
    start: int
    end: int


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    path: str  # one of PATHS
    spans: tuple[Span, ...] = ()  # empty on the sketch path
    # Windows counted from their ids besides the spans: not rolled up yet, so not in their day's rollup.
    also: tuple[Span, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Estimate:
    value: int
    lower: int
    upper: int


@dataclasses.dataclass(frozen=True, slots=True)
class Distinct:
    """How many distinct ``dim`` ids the reported windows starting in [start, end) saw, and how it is known.

    ``path``: "ids" (exact, from the windows' ids), "daily" (exact, from the day rollup, with windows' ids
    for partial days at the edges) or "sketch" (an estimate: ``lower``/``upper`` are its ~95% bounds and
    ``relative_standard_error`` that of the sketches). ``windows``: reported windows covered, the first
    and last of them (None when none is reported yet).
    """

    dim: str
    start: dt.datetime
    end: dt.datetime
    path: str
    value: int
    exact: bool
    lower: int
    upper: int
    relative_standard_error: float
    windows: int
    first_window: dt.datetime | None
    last_window: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: times as ISO 8601 UTC."""
        out = dataclasses.asdict(self)
        for key in ("start", "end", "first_window", "last_window"):
            out[key] = None if out[key] is None else out[key].isoformat().replace("+00:00", "Z")
        return out


def check_range(start: object, end: object, dim: object,
                names: tuple[str, str] = ("start", "end")) -> tuple[int, int, str]:
    """Validated (start, end) in whole epoch seconds and the dim; InvalidInput names what is wrong and the fix.

    ``names``: what the caller calls start and end (the API and CLI say from and to).
    """
    if not isinstance(dim, str) or dim not in DIMS:
        raise exceptions.InvalidInput(f"dim={dim!r} is not a distinct set; use one of: {', '.join(DIMS)}")
    lo = math.ceil(values.moment(start, names[0]))
    hi = math.ceil(values.moment(end, names[1]))
    if hi <= lo:
        raise exceptions.InvalidInput(f"{names[1]}={_iso(hi)} is not after {names[0]}={_iso(lo)}; pass a range "
                                      f"whose {names[1]} is later than its {names[0]}")
    return lo, hi, dim


def windows_in(start: int, end: int, window: int, since: int = 0) -> tuple[int, int]:
    """The starts [lo, hi) of the windows that start in [start, end) and not before ``since``, aligned."""
    lo = _ceil(max(start, since), window)
    return lo, max(lo, _ceil(end, window))


def plan(lo: int, hi: int, *, ids_from: int, days_from: int, unrolled: Sequence[int] = (),
         window: int = DAY) -> Plan:
    """How to count the windows starting in [lo, hi) exactly, or that only sketches can.

    ``ids_from``: windows starting from then still have all their ids; ``days_from``: days starting from
    then still have all theirs, but for the ``unrolled`` windows (reported, not rolled up yet), which keep
    their ids whenever they started: a day's rollup plus their ids is the day. Whole days prefer the
    rollup (one set per day); a partial day needs its windows' ids.
    """
    if lo >= hi or lo >= ids_from:
        return Plan("ids", (Span("windows", lo, hi),) if lo < hi else ())
    spans: list[Span] = []
    also = [Span("windows", u, u + window) for u in sorted(unrolled) if lo <= u < min(hi, ids_from)]
    day = lo - lo % DAY
    while day < hi:
        a, b = max(lo, day), min(hi, day + DAY)
        whole = a == day and b == day + DAY
        if whole and day >= days_from:
            source = "days"
        elif a >= ids_from:
            source = "windows"
        else:
            return Plan("sketch")
        if spans and spans[-1].source == source and spans[-1].end == a:
            spans[-1] = Span(source, spans[-1].start, b)
        else:
            spans.append(Span(source, a, b))
        day += DAY
    path = "daily" if any(s.source == "days" for s in spans) else "ids"
    days = [s for s in spans if s.source == "days"]
    return Plan(path, tuple(spans), tuple(u for u in also if any(d.start <= u.start < d.end for d in days)))


def sketch_of(hex_ids: Iterable[str]) -> bytes:
    """A serialized HLL sketch of ids given as 32-digit lowercase hex (the same text on every backend)."""
    sketch = new_sketch()
    for item in hex_ids:
        sketch.update(item)
    return serialized(sketch)


def new_sketch() -> datasketches.hll_sketch:
    return datasketches.hll_sketch(LG_K, _TYPE)


def update_packed(sketch: datasketches.hll_sketch, packed: str) -> None:
    """Add ids given as one string of 32-digit lowercase hex ids end to end (as sketch_of would take them)."""
    update = sketch.update
    for offset in range(0, len(packed), 32):
        update(packed[offset:offset + 32])


def serialized(sketch: datasketches.hll_sketch) -> bytes:
    return bytes(sketch.serialize_compact())


def merge(sketches: Iterable[bytes]) -> Estimate:
    """The union of serialized sketches: its estimate and ~95% bounds (0 for no sketch)."""
    union = datasketches.hll_union(LG_K)
    for blob in sketches:
        union.update(datasketches.hll_sketch.deserialize(blob))
    result = union.get_result(_TYPE)
    if result.is_empty():
        return Estimate(0, 0, 0)
    return Estimate(value=round(result.get_estimate()),
                    lower=math.floor(result.get_lower_bound(CONFIDENCE_STD_DEVS)),
                    upper=math.ceil(result.get_upper_bound(CONFIDENCE_STD_DEVS)))


def relative_standard_error() -> float:
    """One standard deviation of a unioned sketch's estimate, relative (1.6% at LG_K = 12)."""
    return abs(float(datasketches.hll_sketch.get_rel_err(True, True, LG_K, 1)))


def answer(dim: str, start: int, end: int, path: str, value: int, *, windows: int, first: int | None,
           last: int | None, estimate: Estimate | None = None) -> Distinct:
    """The answer for the range; ``estimate`` on the sketch path."""
    exact = estimate is None
    return Distinct(
        dim=dim, start=_at(start), end=_at(end), path=path, value=value, exact=exact,
        lower=value if estimate is None else estimate.lower, upper=value if estimate is None else estimate.upper,
        relative_standard_error=0.0 if exact else relative_standard_error(), windows=windows,
        first_window=None if first is None else _at(first), last_window=None if last is None else _at(last))


def day_of(window_start: int) -> int:
    """The UTC day a window belongs to (windows divide a day, so a window lies in one day)."""
    return window_start - window_start % DAY


def _ceil(t: int, step: int) -> int:
    return -(-t // step) * step


def _at(t: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc)


def _iso(t: int) -> str:
    return _at(t).isoformat().replace("+00:00", "Z")
