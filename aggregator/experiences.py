"""Experiences: user-facing journeys reported as start/intermediate/end checkpoints, timed out when stale.

A service reports checkpoints (``Aggregator.checkpoint()`` or ``POST /v1/checkpoints``); each is
validated here, kept in memory like ``track()`` data, and applied by the next flush, exactly once (the
flush batch's sequence number) and idempotently (a duplicate checkpoint changes nothing). The store keeps
one row per experience; a sweeper times out the open ones past their urgency's lifetime as failures;
each window's report carries SLIs per experience and urgency (``sli()``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from aggregator import exceptions, reports, tracker, values

CHECKPOINTS = ("start", "intermediate", "end")
OUTCOMES = ("success", "failure")
# Expected lifetimes; an experience open longer than its urgency's is timed out as a failure.
DEFAULT_URGENCIES: dict[str, float] = {"sync_fast": 10.0, "sync_slow": 60.0, "async_fast": 300.0,
                                       "async_low": 3600.0}
MAX_META_BYTES = 4096
MAX_CATEGORIES = 100  # distinct checkpoint_category values kept per experience_id; more are stored as OTHER
OTHER = "__other__"
FAILURE_KIND = "experience_failure"
FAILURE_SCHEMA = "iglu:dev.aggregator/experience_failure/jsonschema/1-0-0"
SLI_KIND = "experience_sli"
SLI_SCHEMA = "iglu:dev.aggregator/experience_sli/jsonschema/1-0-0"
# What the server accepts, and aggregator.client checks before sending (a batch is refused whole).
# Both are matched whole (fullmatch): a "$" would let "name\n" through as another name.
ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")  # 26 Crockford base32 digits; a leading 8+ overflows 128 bits
NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """One validated checkpoint; ``received_at`` (server time) places it in a window."""

    correlation_id: str
    experience_id: str
    checkpoint: str
    type: str
    feature_category: str
    urgency: str
    client_timestamp: float
    received_at: float
    checkpoint_category: str = ""
    outcome: str | None = None
    meta: str | None = None  # JSON text, at most MAX_META_BYTES

    @property
    def key(self) -> tuple[str, str, str, float]:
        """What makes two checkpoints the same (a client's retry)."""
        return (self.correlation_id, self.checkpoint, self.checkpoint_category, self.client_timestamp)


def validate(fields: Mapping[str, Any], urgencies: Mapping[str, float], received_at: float,
             where: str = "checkpoint", within: values.TimeRange = values.DEFAULT_RANGE) -> Checkpoint:
    """A Checkpoint from raw fields; raises InvalidInput/InvalidType naming ``where.FIELD`` and the fix.

    ``client_timestamp`` must lie ``within`` the range around ``received_at`` (the server's clock).
    """
    known = {"correlation_id", "experience_id", "checkpoint", "checkpoint_category", "type", "feature_category",
             "urgency", "client_timestamp", "outcome", "meta"}
    if not isinstance(fields, Mapping):
        raise exceptions.InvalidType(f"{where}={values.shown(fields)} is a {type(fields).__name__}; pass a mapping")
    unknown = [key for key in fields if key not in known]
    if unknown:
        raise exceptions.InvalidInput(
            f"{where}: unknown field(s) {', '.join(values.shown(key) for key in unknown[:5])}; known: "
            f"{', '.join(sorted(known))}")

    def text(name: str, pattern: re.Pattern[str] | None = NAME, required: bool = True) -> str:
        value = fields.get(name)
        if value is None:
            if required:
                raise exceptions.InvalidInput(f"{where}.{name} is required")
            return ""
        if pattern is None:
            if not isinstance(value, str):
                raise exceptions.InvalidType(f"{where}.{name}={values.shown(value)} is a {type(value).__name__}; "
                                             "pass a string")
            return value
        return values.name(value, f"{where}.{name}", pattern, "1-64 characters of a-z, 0-9, _ . -, the first a "
                                                              "letter or digit")

    correlation_id = fields.get("correlation_id")
    if not isinstance(correlation_id, str) or not ULID.fullmatch(correlation_id.upper()):
        raise exceptions.InvalidInput(f"{where}.correlation_id={values.shown(correlation_id)} must be a ULID (26 "
                                      "characters of Crockford base32, the first 0-7, e.g. 01J9Z3K8Q6W5N2B7R4T1V0X9YC)")
    checkpoint = text("checkpoint", None)
    if checkpoint not in CHECKPOINTS:
        raise exceptions.InvalidInput(
            f"{where}.checkpoint={values.shown(checkpoint)} must be one of: {', '.join(CHECKPOINTS)}")
    urgency = text("urgency", None)
    if urgency not in urgencies:
        raise exceptions.InvalidInput(
            f"{where}.urgency={values.shown(urgency)} must be one of: {', '.join(sorted(urgencies))}")
    outcome = fields.get("outcome")
    if outcome is not None and (checkpoint != "end" or outcome not in OUTCOMES):
        raise exceptions.InvalidInput(f"{where}.outcome={values.shown(outcome)}: only an end has an outcome, "
                                      f"one of: {', '.join(OUTCOMES)}")
    return Checkpoint(
        correlation_id=correlation_id.upper(), experience_id=text("experience_id"), checkpoint=checkpoint,
        type=text("type"), feature_category=text("feature_category"), urgency=urgency,
        client_timestamp=_timestamp(fields.get("client_timestamp"), f"{where}.client_timestamp", received_at, within),
        received_at=received_at, checkpoint_category=text("checkpoint_category", required=False),
        outcome=("success" if outcome is None else outcome) if checkpoint == "end" else None,
        meta=_meta(fields.get("meta"), f"{where}.meta"))


def _timestamp(value: object, name: str, now: float, within: values.TimeRange) -> float:
    if value is None:
        raise exceptions.InvalidInput(f"{name} is required (ISO 8601 with a UTC offset)")
    if not isinstance(value, str | dt.datetime):
        raise exceptions.InvalidType(f"{name}={values.shown(value)} is a {type(value).__name__}; pass an ISO 8601 "
                                     "string")
    return values.moment(value, name, now=now, within=within)


def _meta(value: object, name: str) -> str | None:
    if value is None:
        return None
    values.json_object(value, name)  # bounded depth and size: dumps cannot recurse or run long
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise exceptions.InvalidInput(f"{name} is not JSON-serializable: {exc}") from None
    if len(text.encode()) > MAX_META_BYTES:
        raise exceptions.InvalidInput(f"{name} is {len(text.encode())} bytes as JSON; at most {MAX_META_BYTES}")
    return text


def urgencies(value: Mapping[str, Any] | None, parse: Callable[[Any, str], float]) -> dict[str, float]:
    """The configured urgency set (name → lifetime in seconds); default DEFAULT_URGENCIES."""
    if value is None:
        return dict(DEFAULT_URGENCIES)
    if not isinstance(value, Mapping) or not value:
        raise exceptions.ConfigError(
            "experience_urgencies must be a table of NAME = \"lifetime\", e.g. sync_fast = \"10s\"")
    out = {}
    for name, lifetime in value.items():
        if not isinstance(name, str) or not NAME.fullmatch(name) or len(name) > 32:
            raise exceptions.ConfigError(f"experience_urgencies: name {name!r} must be 1-32 of a-z, 0-9, _ . -")
        out[name] = parse(lifetime, f"experience_urgencies.{name}")
    return out


class Pending:
    """Checkpoints accepted in this replica and not yet flushed."""

    def __init__(self, urgencies_: Mapping[str, float], clock: Callable[[], float] = time.time,
                 within: values.TimeRange = values.DEFAULT_RANGE) -> None:
        self.urgencies = dict(urgencies_)
        self._clock = clock
        self.within = within  # client timestamps must be this close to the server's clock
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str, str, float], Checkpoint] = {}
        self._open = True

    def add_many(self, checkpoints: Iterable[Mapping[str, Any]], where: str = "checkpoints") -> float:
        """Validate every checkpoint (errors name the index), then keep them all; returns the server time."""
        if isinstance(checkpoints, str | bytes | Mapping) or not isinstance(checkpoints, Iterable):
            raise exceptions.InvalidType(f"{where}={values.shown(checkpoints)} is a {type(checkpoints).__name__}; "
                                         "pass a list of dicts")
        now = self._clock()
        valid = [validate(fields, self.urgencies, now, f"{where}[{index}]", self.within)
                 for index, fields in enumerate(checkpoints)]
        with self._lock:
            if not self._open:
                raise exceptions.NotRunning("Aggregator is stopped; nothing was kept. Create a new Aggregator")
            for item in valid:
                self._items.setdefault(item.key, item)  # a retry within one batch is dropped here
        return now

    def take(self) -> list[Checkpoint]:
        with self._lock:
            items, self._items = list(self._items.values()), {}
        return items

    def pending(self) -> int:
        with self._lock:
            return len(self._items)

    def close(self) -> None:
        with self._lock:
            self._open = False

    def reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._items = {}
        self._open = True


def percentile(ordered: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted values (exact and deterministic: one of the values)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def sli(window_start: int, window_end: int, experience_id: str, urgency: str, counts: Mapping[str, int],
        durations: Sequence[float]) -> dict[str, Any]:
    """One SLI row: per experience and urgency in one window."""
    ordered = sorted(durations)
    return {"window_start": reports.iso_utc(window_start), "window_end": reports.iso_utc(window_end),
            "experience_id": experience_id,
            "urgency": urgency, "started": counts.get("started", 0), "succeeded": counts.get("succeeded", 0),
            "failed": counts.get("failed", 0), "timed_out": counts.get("timed_out", 0),
            "completed": len(ordered), "duration_p50_s": percentile(ordered, 50),
            "duration_p90_s": percentile(ordered, 90), "duration_p99_s": percentile(ordered, 99)}


def failure_event(row: Mapping[str, Any], *, timed_out_at: float) -> dict[str, Any]:
    """The failure event of a timed-out experience."""
    return {"correlation_id": row["correlation_id"], "experience_id": row["experience_id"],
            "type": row["type"], "feature_category": row["feature_category"], "urgency": row["urgency"],
            "outcome": "failure", "reason": "timed_out",
            "started_at": reports.iso_utc(row["started_at"] or row["first_seen_at"]),
            "timed_out_at": reports.iso_utc(timed_out_at)}


def window_of(moment: float, window: int) -> int:
    return tracker.window_start(moment, window)
