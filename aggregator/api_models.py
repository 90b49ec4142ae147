"""The HTTP API's wire format: request and response bodies, their bounds, and how pulled data is shown.

Every value a request carries is bounded here before the in-process checks see it: strings and lists by
length, integers within a signed 64-bit range, floats finite, and booleans refused wherever a number,
a time or a text is meant. Pulled reports and meter results show identifiers as the writers send them:
pseudonymized under ``pseudonym_key`` unless on ``pseudonym_allowlist``, and withheld (null) without a key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from aggregator import billing, config, meters, privacy, values
from aggregator.reports import Report

MAX_DIMENSIONS = 16  # a meter declares at most 16 (meters.Meter.from_config)
MAX_NAME = 64


def _refuse(kind: str, text: str) -> PydanticCustomError:
    # The text goes in the context: a value holding "{" must not be read as a template field.
    return PydanticCustomError(kind, "{reason}", {"reason": text})


def _amount(value: object) -> object:
    """A record's value: a number (int within +-(2**63-1), finite float), a decimal or item text, or null."""
    if value is None or type(value) is str and len(value) <= meters.MAX_DIMENSION_TEXT:
        return value
    if isinstance(value, bool):
        raise _refuse("number_type", f"{value!r} is a boolean; pass a number, or a decimal string such as "
                                     '"12.5" (for a distinct meter, the item)')
    if isinstance(value, int):
        if -values.MAX_INT <= value <= values.MAX_INT:
            return value
        raise _refuse("int_out_of_range", f"{values.shown(value)} is out of range: integers are within +-(2**63-1); "
                                          'send a larger amount as a decimal string such as "1.5e20"')
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        raise _refuse("finite_number", f"{value!r} is not a finite number; send a number or a decimal string")
    if isinstance(value, str):
        raise _refuse("string_too_long", f"{values.shown(value)} is {len(value)} characters; at most "
                                         f"{meters.MAX_DIMENSION_TEXT} (a decimal: at most {values.MAX_DECIMAL_TEXT})")
    raise _refuse("number_type", f"{values.shown(value)} is {_json_type(value)}; pass a number, or a decimal "
                                 'string such as "12.5" (for a distinct meter, the item)')


def _dimension(value: object) -> object:
    """A dimension's value: text of 1-256 characters, or an int within +-(2**63-1)."""
    if type(value) is str and 0 < len(value) <= meters.MAX_DIMENSION_TEXT:
        return value
    if type(value) is int and -values.MAX_INT <= value <= values.MAX_INT:
        return value
    if type(value) is int:
        raise _refuse("int_out_of_range", f"{values.shown(value)} is out of range: integers are within "
                                          "+-(2**63-1); send a longer id as a string")
    if type(value) is str:
        raise _refuse("string_length", f"{values.shown(value)} is {len(value)} characters; pass "
                                       f"1-{meters.MAX_DIMENSION_TEXT}")
    raise _refuse("dimension_type", f"{values.shown(value)} is {_json_type(value)}; pass a string or an integer")


def _moment(value: object) -> object:
    """An event time: ISO 8601 text or epoch seconds (not a boolean, not a huge number)."""
    if isinstance(value, bool):
        raise _refuse("time_type", f"{value!r} is a boolean; pass ISO 8601 text with a UTC offset or epoch seconds")
    if isinstance(value, int) and not -values.MAX_INT <= value <= values.MAX_INT or (
            isinstance(value, float) and not math.isfinite(value)):
        raise _refuse("time_out_of_range", f"{values.shown(value)} is not epoch seconds; pass e.g. 1767225600")
    if isinstance(value, str) and len(value) > values.MAX_TIME_TEXT:
        raise _refuse("time_parsing", f"{values.shown(value)} is not ISO 8601 (too long); e.g. 2026-01-31T12:00:00Z")
    return value


def _timestamp(value: object) -> object:
    """A checkpoint's client_timestamp: ISO 8601 text, as documented (no epoch numbers, no booleans)."""
    if type(value) is str and len(value) <= values.MAX_TIME_TEXT:
        return value
    raise _refuse("time_type", f"{values.shown(value)} is not ISO 8601 text with a UTC offset; e.g. "
                               "2026-01-31T12:00:00.250Z")


def _json_type(value: object) -> str:
    """What JSON calls ``value``'s type, with its article: "an array"."""
    names = {dict: "an object", list: "an array", str: "a string", float: "a number", int: "an integer",
             bool: "a boolean", type(None): "null"}
    return names.get(type(value), type(value).__name__)


Count = Annotated[int, Field(strict=True, ge=0, le=values.MAX_COUNT)]
Name = Annotated[str, Field(min_length=1, max_length=MAX_NAME)]
Seconds = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Moment = Annotated[dt.datetime | Seconds | None, BeforeValidator(_moment), Field(
    default=None, description="when it happened: ISO 8601 with a UTC offset, or epoch seconds; default now")]
Amount = Annotated[
    Annotated[int, Field(strict=True, ge=-values.MAX_INT, le=values.MAX_INT)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | Annotated[str, Field(max_length=meters.MAX_DIMENSION_TEXT)] | None,
    BeforeValidator(_amount)]
Dimension = Annotated[
    Annotated[str, Field(min_length=1, max_length=meters.MAX_DIMENSION_TEXT)]
    | Annotated[int, Field(strict=True, ge=-values.MAX_INT, le=values.MAX_INT)],
    BeforeValidator(_dimension)]


class Event(BaseModel):
    """One observation: a request of `user_id` in `workspace_id`."""

    model_config = ConfigDict(extra="forbid")
    workspace_id: uuid.UUID
    user_id: uuid.UUID
    allowed: Count = 1
    denied: Count = 0
    time: Moment = None


class TrackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(min_length=1)


class MeterRecord(BaseModel):
    """One record of a declared meter (see `aggregator meters` and the README)."""

    model_config = ConfigDict(extra="forbid")
    meter: Name
    value: Amount = Field(
        default=None, description="a sum's amount (a number, or a decimal string of at most "
                                  f"{values.MAX_DECIMAL_TEXT} characters for exactness); a distinct meter's item; "
                                  "omitted for a count. Never a boolean")
    dimensions: dict[Name, Dimension] = Field(default_factory=dict, max_length=MAX_DIMENSIONS,
                                              description="exactly the meter's dimensions")
    event_id: str | None = Field(default=None, min_length=1, max_length=meters.MAX_EVENT_ID,
                                 description="a record whose id this meter already counted is ignored")
    time: Moment = None


class RecordBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[MeterRecord] = Field(min_length=1)


class CheckpointIn(BaseModel):
    """One checkpoint of an experience (a user-facing journey); see the README."""

    model_config = ConfigDict(extra="forbid")
    correlation_id: str = Field(min_length=26, max_length=26, description="a ULID naming the journey")
    experience_id: str = Field(min_length=1, max_length=64, description="e.g. http_request")
    checkpoint: Literal["start", "intermediate", "end"]
    checkpoint_category: str | None = Field(default=None, min_length=1, max_length=64)
    type: str = Field(min_length=1, max_length=64, description="the sending service or component")
    feature_category: str = Field(min_length=1, max_length=64)
    urgency: str = Field(min_length=1, max_length=32, description="one of the configured experience_urgencies")
    client_timestamp: Annotated[dt.datetime, BeforeValidator(_timestamp)] = Field(
        description="ISO 8601 with a UTC offset")
    outcome: Literal["success", "failure"] | None = Field(default=None, description="on end; default success")
    meta: dict[str, Any] | None = Field(default=None, description="at most 4 KiB as JSON")


class CheckpointBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoints: list[CheckpointIn] = Field(min_length=1)


# The request bodies, by the name of the list they carry.
BATCHES: dict[str, type[BaseModel]] = {"events": TrackBatch, "records": RecordBatch, "checkpoints": CheckpointBatch}


class CheckpointsAccepted(BaseModel):
    accepted: int
    server_timestamp: str


class Accepted(BaseModel):
    accepted: int


REPORT_KIND = "usage_report"  # what writers and the export call a report (privacy.IDENTIFIER_FIELDS)
IDENTIFIER = ("pseudonymized (HMAC-SHA256 hex under pseudonym_key) unless on pseudonym_allowlist; null when no "
              "pseudonym_key is set and it is not on the allowlist")


class ReportOut(BaseModel):
    """One window's report (see the README); `id` is its position in the report stream."""

    id: int
    window_start: dt.datetime
    window_end: dt.datetime
    unique_workspaces: int
    unique_users: int
    allowed_requests: int
    denied_requests: int
    replicas: int = Field(description="replicas that contributed data of this window")
    replicas_missing: int = Field(
        ge=0, description="replica incarnations that may have held data of this window and were given up on "
                          "(silent for replica_lease, or max_collect_delay reached); their data, if it comes, "
                          "counts late in a later window")
    complete: bool = Field(description="replicas_missing is 0")
    late_allowed_requests: int
    late_denied_requests: int
    late_unique_workspaces: int
    late_unique_users: int
    generated_at: dt.datetime
    generated_by: str | None = Field(description=f"the collecting replica; {IDENTIFIER}")

    @classmethod
    def of(cls, report: Report, pseudonymizer: privacy.Pseudonymizer) -> ReportOut:
        fields = {field.name: getattr(report, field.name) for field in dataclasses.fields(report)}
        shown = pseudonymizer.apply(REPORT_KIND, {"generated_by": report.generated_by})
        return cls(**fields | shown, complete=report.complete)


class NextReportOut(BaseModel):
    """When the report of the window open now is due (reports.next_report): told on an empty page, so a first
    reader knows when to look again rather than wondering whether anything works."""

    window_start: dt.datetime = Field(description="start of the window open now")
    window_end: dt.datetime = Field(description="when the window closes: its start plus the window length "
                                                "(epoch times that are multiples of it)")
    expected_by: dt.datetime = Field(description="its report is expected by then: after the window end, a flush "
                                                 "interval, the grace and a collection run")
    at_latest: dt.datetime = Field(description="its report is written by then whatever holds it back (a silent "
                                               "replica): max_collect_delay after the window end, and a "
                                               "collection run")
    message: str = Field(description="the same as a sentence, for people")

    @classmethod
    def due(cls, settings: config.Settings, now: float, *, first: bool = True) -> NextReportOut:
        """The report due next for the Aggregator's settings, at its clock's ``now``; ``first``: from the stream's
        start (else after a cursor)."""
        found = settings.next_report(now)
        return cls(**dataclasses.asdict(found), message=found.sentence(first=first))


class ReportPage(BaseModel):
    reports: list[ReportOut]
    next_cursor: str = Field(description="pass as `after` to get the reports that follow")
    next_report: NextReportOut | None = Field(
        default=None, description="on an empty page (nothing after the cursor yet): when the report of the window "
                                  "open now is due; null on a page with reports")


class MeterResultOut(BaseModel):
    window_start: dt.datetime
    window_end: dt.datetime
    meter: str
    dimensions: dict[str, str | None] = Field(
        description=f"empty for the __overflow__ group; each value {IDENTIFIER} (as in billable usage events: "
                    "project_id, namespace_id and subject by their names, others as metadata.dimensions.NAME)")
    overflow: bool
    late: bool = Field(description="data of earlier, reported windows that arrived while this one was open")
    quantity: float = Field(description="sum: exact to the meter's decimals; count: records; distinct: values")
    unit: str | None
    records: int
    report_id: int

    @classmethod
    def of(cls, result: meters.Result, pseudonymizer: privacy.Pseudonymizer) -> MeterResultOut:
        return cls(**result.to_dict() | {"window_start": result.window_start, "window_end": result.window_end,
                                         "dimensions": shown_dimensions(result.dimensions, pseudonymizer)})


class MeterPage(BaseModel):
    results: list[MeterResultOut]
    next_cursor: str = Field(description="pass as `after` to get the results of the reports that follow")


class SliOut(BaseModel):
    window_start: dt.datetime
    experience_id: str
    urgency: str
    started: int
    succeeded: int
    failed: int
    timed_out: int
    completed: int
    duration_p50_s: float | None
    duration_p90_s: float | None
    duration_p99_s: float | None
    report_id: int


class SliPage(BaseModel):
    slis: list[SliOut]
    next_cursor: str = Field(description="pass as `after` to get the SLIs of the reports that follow")


class DistinctOut(BaseModel):
    """Distinct workspaces or users of the reported windows starting in [start, end) (aggregator.distinct)."""

    dim: Literal["workspaces", "users"]
    start: dt.datetime
    end: dt.datetime
    path: Literal["ids", "daily", "sketch"] = Field(
        description="ids: exact, from the windows' ids (kept for id_retention); daily: exact, from the per-day "
                    "rollup (kept for distinct_retention), with windows' ids for partial days at the edges; "
                    "sketch: estimated by merging the HLL sketches written by each window's rollup")
    value: int
    exact: bool
    lower: int = Field(description="~95% lower bound (2 standard deviations); the value when exact")
    upper: int = Field(description="~95% upper bound; the value when exact")
    relative_standard_error: float = Field(description="of the sketch estimate (0 when exact)")
    windows: int = Field(description="reported windows covered; windows not reported yet are left out")
    first_window: dt.datetime | None = Field(description="start of the first covered window; null if none")
    last_window: dt.datetime | None = Field(description="start of the last covered window; null if none")


class _Withholding(privacy.Pseudonymizer):
    """Without a key: what would be hashed is shown as null instead, never in clear (the allowlist still applies)."""

    def hash(self, value: object) -> None:  # type: ignore[override]  # null stands in for a hash
        return None


def pseudonymizer(delivery: config.DeliverySettings) -> privacy.Pseudonymizer:
    """How the pull API shows identifiers: as the writers do under the key and allowlist, or withheld without a key."""
    if delivery.pseudonym_key is not None:
        return privacy.Pseudonymizer(delivery.pseudonym_key, delivery.pseudonym_allowlist)
    return _Withholding(None, delivery.pseudonym_allowlist)


def shown_dimensions(dimensions: dict[str, str], pseudonymizer: privacy.Pseudonymizer) -> dict[str, str | None]:
    """A meter group's dimensions as a billable usage event carries them: the same paths, the same allowlist."""
    top = billing.TOP_LEVEL_DIMENSIONS
    event: dict[str, Any] = {name: value for name, value in dimensions.items() if name in top}
    event["metadata"] = {"dimensions": {name: value for name, value in dimensions.items() if name not in top}}
    out = pseudonymizer.apply(billing.KIND, event)
    return {name: out[name] if name in top else out["metadata"]["dimensions"][name] for name in dimensions}


def body_schemas() -> dict[str, Any]:
    """The request bodies' JSON schemas (and every model they use), for the OpenAPI document's components."""
    _, found = models_json_schema([(model, "validation") for model in BATCHES.values()],
                                  ref_template="#/components/schemas/{model}")
    return dict(found["$defs"])


__all__ = ["BATCHES", "Accepted", "CheckpointBatch", "CheckpointIn", "CheckpointsAccepted", "DistinctOut", "Event",
           "MeterPage",
           "MeterRecord", "MeterResultOut", "NextReportOut", "RecordBatch", "ReportOut", "ReportPage", "SliOut",
           "SliPage", "TrackBatch", "body_schemas", "pseudonymizer", "shown_dimensions"]
