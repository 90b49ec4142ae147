"""The daemon's HTTP API: batch ingest, report pull with a cursor, health, metrics, OpenAPI.

Ingest is all or nothing: the whole body is read (within the size limit) and validated before the
first event is tracked, so a request either counts every event or none.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from aggregator import config, exceptions, logs, metrics, reports, tracker
from aggregator.reports import Report
from aggregator.runtime import Aggregator

log = logs.get_logger("aggregator.api")

Count = Annotated[int, Field(strict=True, ge=0, le=tracker.MAX_COUNT)]


class Event(BaseModel):
    """One observation: a request of `user_id` in `workspace_id`."""

    model_config = ConfigDict(extra="forbid")
    workspace_id: uuid.UUID
    user_id: uuid.UUID
    allowed: Count = 1
    denied: Count = 0
    time: dt.datetime | float | None = Field(
        default=None, description="when it happened: ISO 8601 with a UTC offset, or epoch seconds; default now")


class TrackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[Event] = Field(min_length=1)


class MeterRecord(BaseModel):
    """One record of a declared meter (see `aggregator meters` and the README)."""

    model_config = ConfigDict(extra="forbid")
    meter: str = Field(min_length=1, max_length=64)
    value: Annotated[int, Field(strict=True)] | float | str | None = Field(
        default=None, description="a sum's amount (a number, or a decimal string for exactness); a distinct "
                                   "meter's item; omitted for a count")
    dimensions: dict[str, Annotated[str, Field(max_length=256)] | Annotated[int, Field(strict=True)]] = Field(
        default_factory=dict, description="exactly the meter's dimensions")
    event_id: str | None = Field(default=None, min_length=1, max_length=128,
                                 description="a record whose id this meter already counted is ignored")
    time: dt.datetime | float | None = Field(
        default=None, description="when it happened: ISO 8601 with a UTC offset, or epoch seconds; default now")


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
    client_timestamp: dt.datetime = Field(description="ISO 8601 with a UTC offset")
    outcome: Literal["success", "failure"] | None = Field(default=None, description="on end; default success")
    meta: dict[str, Any] | None = Field(default=None, description="at most 4 KiB as JSON")


class CheckpointBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoints: list[CheckpointIn] = Field(min_length=1)


class CheckpointsAccepted(BaseModel):
    accepted: int
    server_timestamp: str


class Accepted(BaseModel):
    accepted: int


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
    generated_by: str

    @classmethod
    def of(cls, report: Report) -> ReportOut:
        return cls(**{field.name: getattr(report, field.name) for field in dataclasses.fields(report)},
                   complete=report.complete)


class ReportPage(BaseModel):
    reports: list[ReportOut]
    next_cursor: str = Field(description="pass as `after` to get the reports that follow")


class MeterResultOut(BaseModel):
    window_start: dt.datetime
    window_end: dt.datetime
    meter: str
    dimensions: dict[str, str] = Field(description="empty for the __overflow__ group")
    overflow: bool
    late: bool = Field(description="data of earlier, reported windows that arrived while this one was open")
    quantity: float = Field(description="sum: exact to the meter's decimals; count: records; distinct: values")
    unit: str | None
    records: int
    report_id: int


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


class Problem(BaseModel):
    detail: str
    errors: list[dict[str, Any]] = []


# Query parameters of the report-stream pages (module level: FastAPI resolves these annotations by name).
Cursor = Annotated[str, Query(pattern=r"^[0-9]{1,18}$", description="cursor from a previous page; 0 for the start")]
Limit = Annotated[int, Query(ge=1, le=1000, description="reports (windows) per page")]

_BATCH = TypeAdapter(TrackBatch)
_RECORDS = TypeAdapter(RecordBatch)
_CHECKPOINTS = TypeAdapter(CheckpointBatch)
_BEARER = HTTPBearer(auto_error=False, description="a token from api_tokens (AGGREGATOR_API_TOKENS)")
_PROBLEMS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing or wrong bearer token"},
    403: {"model": Problem, "description": "the token is limited to sending checkpoints"},
    422: {"model": Problem, "description": "invalid input; `errors` names each bad field"},
}


def build_app(agg: Aggregator, settings: config.DaemonSettings, counters: metrics.Counters) -> FastAPI:
    app = FastAPI(title="aggregator", version="1", summary="Exactly-once usage aggregation",
                  docs_url=None, redoc_url=None)
    tokens = [(token.encode(), types) for token, types in config.token_scopes(settings.api_tokens)]
    limit = settings.max_body_bytes
    tally = metrics.ReportTally()  # the report stream's completeness, counted on as /metrics is scraped

    def scope(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)]
              ) -> frozenset[str] | None:
        """The checkpoint types the caller's token is limited to (None: any use); 401 without a valid token."""
        if not tokens:
            return None  # no tokens configured: allowed only on a loopback address (see config)
        given = credentials.credentials.encode() if credentials is not None else b""
        # Compare against every token, always, so timing says nothing about which one nearly matched.
        found: frozenset[str] | None = None
        matched = False
        for token, types in tokens:
            hit = hmac.compare_digest(given, token)
            matched |= hit
            if hit:
                found = types
        if not matched:
            counters.rejected["unauthorized"] += 1
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
        return found

    # Dependencies as defaults, not in Annotated: `scope` is local, and annotations here are strings.
    def authorized(types: frozenset[str] | None = Depends(scope)) -> None:  # noqa: B008
        """Track, record and pull need a token that is not limited to checkpoint types."""
        if types is not None:
            counters.rejected["forbidden"] += 1
            raise HTTPException(403, "this token may only send checkpoints (of types "
                                     f"{', '.join(sorted(types))})")

    async def items(request: Request, adapter: TypeAdapter[Any], name: str) -> list[Any]:
        """The body's list ``name``, validated (422 naming each bad field) and within max_events_per_request."""
        body = await _read_limited(request, limit, counters)
        try:
            found: list[Any] = getattr(adapter.validate_json(body), name)
        except ValidationError as exc:
            counters.rejected["invalid"] += 1
            errors = [_describe(e) for e in exc.errors(include_url=False, include_input=False)]
            raise HTTPException(422, {"detail": "; ".join(f"{e['loc']}: {e['message']}" for e in errors),
                                      "errors": errors}) from None
        if len(found) > settings.max_events_per_request:
            counters.rejected["invalid"] += 1
            raise HTTPException(422, f"{name}: {len(found)} items, at most {settings.max_events_per_request} "
                                     "per request (max_events_per_request)")
        return found

    @app.post("/v1/track", status_code=202, response_model=Accepted, responses=_PROBLEMS | {
        413: {"model": Problem, "description": "body larger than max_body_bytes"}},
        dependencies=[Depends(authorized)],
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/TrackBatch"}}}}})
    async def track(request: Request) -> Accepted:
        """Count a batch of events; all or nothing."""
        events: list[Event] = await items(request, _BATCH, "events")
        moments = _check_times(events, settings, counters)
        for event, moment in zip(events, moments, strict=True):
            agg.track(event.workspace_id, event.user_id, event.allowed, event.denied, at=moment)
        counters.events_accepted += len(events)
        return Accepted(accepted=len(events))

    @app.post("/v1/record", status_code=202, response_model=Accepted, responses=_PROBLEMS | {
        413: {"model": Problem, "description": "body larger than max_body_bytes"}},
        dependencies=[Depends(authorized)],
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/RecordBatch"}}}}})
    async def record(request: Request) -> Accepted:
        """Record a batch of meter records; all or nothing. A retried record with an event_id counts once."""
        records: list[MeterRecord] = await items(request, _RECORDS, "records")
        moments = _check_times(records, settings, counters, "records")
        try:
            agg.record_many([{"meter": r.meter, "value": r.value, "dimensions": r.dimensions, "event_id": r.event_id,
                              "at": moment} for r, moment in zip(records, moments, strict=True)])
        except exceptions.InvalidInput as exc:
            counters.rejected["invalid"] += 1
            raise HTTPException(422, str(exc)) from None
        counters.records_accepted += len(records)
        return Accepted(accepted=len(records))

    @app.post("/v1/checkpoints", status_code=202, response_model=CheckpointsAccepted, responses=_PROBLEMS | {
        403: {"model": Problem, "description": "the token may not send checkpoints of this type"},
        413: {"model": Problem, "description": "body larger than max_body_bytes"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/CheckpointBatch"}}}}})
    async def checkpoints(request: Request,
                          types: frozenset[str] | None = Depends(scope)) -> CheckpointsAccepted:  # noqa: B008
        """Report checkpoints of experiences; all or nothing. A retried checkpoint changes nothing."""
        found: list[CheckpointIn] = await items(request, _CHECKPOINTS, "checkpoints")
        if types is not None:
            refused = sorted({c.type for c in found} - types)
            if refused:
                counters.rejected["forbidden"] += 1
                raise HTTPException(403, f"this token may not send checkpoints of type(s) {', '.join(refused)}; "
                                         f"it is limited to {', '.join(sorted(types))}")
        try:
            accepted_at = agg.checkpoint_many([c.model_dump(exclude_none=True, mode="json") for c in found])
        except exceptions.InvalidInput as exc:
            counters.rejected["invalid"] += 1
            raise HTTPException(422, str(exc)) from None
        counters.checkpoints_accepted += len(found)
        return CheckpointsAccepted(accepted=len(found),
                                   server_timestamp=reports.iso_utc(accepted_at, "milliseconds"))

    @app.get("/v1/reports", response_model=ReportPage, responses=_PROBLEMS, dependencies=[Depends(authorized)])
    async def pull(after: Annotated[str, Query(pattern=r"^[0-9]{1,18}$",
                                               description="cursor from a previous page; 0 for the start")] = "0",
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> ReportPage:
        """Finished reports in stream order, after the cursor. Retrying with the same cursor is safe."""
        found = await agg.areports(after=int(after), limit=limit)
        return ReportPage(reports=[ReportOut.of(r) for r in found],
                          next_cursor=str(found[-1].id if found else int(after)))

    @app.get("/v1/meters", response_model=MeterPage, responses=_PROBLEMS, dependencies=[Depends(authorized)])
    async def meter_results(after: Cursor = "0", limit: Limit = 100) -> MeterPage:
        """Meter results, page by page of the report stream: the results of the next `limit` reports."""
        page = [r.id for r in await agg.areports(after=int(after), limit=limit)]
        found = await agg.ameter_results(page) if page else []
        return MeterPage(results=[MeterResultOut(**{**r.to_dict(), "window_start": r.window_start,
                                                    "window_end": r.window_end}) for r in found],
                         next_cursor=str(page[-1] if page else int(after)))

    @app.get("/v1/experiences", response_model=SliPage, responses=_PROBLEMS, dependencies=[Depends(authorized)])
    async def experience_slis(after: Cursor = "0", limit: Limit = 100) -> SliPage:
        """Experience SLIs per window, experience and urgency, page by page of the report stream."""
        page = [r.id for r in await agg.areports(after=int(after), limit=limit)]
        rows = await agg.aexperience_slis(page) if page else []
        return SliPage(slis=[SliOut(**{**row, "window_start": dt.datetime.fromtimestamp(row["window_start"],
                                                                                         dt.timezone.utc)})
                             for row in rows], next_cursor=str(page[-1] if page else int(after)))

    @app.get("/healthz", responses={503: {"model": Problem, "description": "database unreachable"}})
    async def health() -> dict[str, str]:
        """Open: the process is up and the database answers (503 with the reason otherwise)."""
        contact = agg.status()["store"]
        if contact["fatal_error"]:
            raise HTTPException(503, f"database unusable: {contact['fatal_error']}")
        if not contact["ready"]:
            raise HTTPException(503, f"database unavailable for {contact['outage_for_s'] or 0:g}s, "
                                     f"{contact['failures_in_row']} retries: {contact['last_error'] or 'connecting'}")
        try:
            await agg.aping()
        except exceptions.StoreError as exc:
            raise HTTPException(503, f"database unavailable: {exc}") from None
        return {"status": "ok", "database": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Open: Prometheus text exposition (no identifiers, no secrets)."""
        outbox: list[dict[str, Any]] | None
        overflow: list[dict[str, Any]] | None
        shown: metrics.ReportTally | None = tally
        try:
            outbox, overflow = await agg.aoutbox(), await agg.aoverflow()
            await tally.catch_up(lambda after, limit: agg.areports(after=after, limit=limit))
        except exceptions.StoreError:
            # The database is away: the other figures still say so (flush lag, errors).
            outbox = overflow = shown = None
        return PlainTextResponse(metrics.render(agg.status(), counters, outbox, overflow, shown),
                                 media_type=metrics.CONTENT_TYPE)

    @app.exception_handler(HTTPException)
    async def problem(_request: Request, exc: HTTPException) -> JSONResponse:
        content = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        return JSONResponse(content, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_query(_request: Request, exc: RequestValidationError) -> JSONResponse:
        counters.rejected["invalid"] += 1
        errors = [_describe(e) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(f"{e['loc']}: {e['message']}" for e in errors), "errors": errors},
                            status_code=422)

    @app.exception_handler(exceptions.NotRunning)
    async def stopping(_request: Request, _exc: exceptions.NotRunning) -> JSONResponse:
        return JSONResponse({"detail": "shutting down; retry on another replica"}, status_code=503)

    schema = app.openapi()
    schema["components"]["schemas"].update(
        TrackBatch.model_json_schema(ref_template="#/components/schemas/{model}").pop("$defs"))
    schema["components"]["schemas"]["TrackBatch"] = TrackBatch.model_json_schema(
        ref_template="#/components/schemas/{model}")
    schema["components"]["schemas"]["TrackBatch"].pop("$defs", None)
    return app


async def _read_limited(request: Request, limit: int, counters: metrics.Counters) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        counters.rejected["too_large"] += 1
        raise HTTPException(413, f"body of {declared} bytes is over the limit of {limit} (max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            counters.rejected["too_large"] += 1
            raise HTTPException(413, f"body is over the limit of {limit} bytes (max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(error: Any) -> dict[str, Any]:
    """A pydantic error as `events[3].user_id: message`, with the index and field separate too."""
    loc = list(error["loc"])
    if loc and loc[0] in ("query", "path", "header"):
        loc = loc[1:]
    text = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    out: dict[str, Any] = {"loc": text or "body", "message": error["msg"], "type": error["type"]}
    if len(loc) >= 2 and loc[0] == "events" and isinstance(loc[1], int):
        out["index"] = loc[1]
        if len(loc) >= 3:
            out["field"] = loc[2]
    return out


def _check_times(events: Sequence[Event | MeterRecord], settings: config.DaemonSettings,
                 counters: metrics.Counters, name: str = "events") -> list[float | None]:
    now = time.time()
    oldest, newest = now - settings.max_event_age, now + settings.max_event_future
    moments: list[float | None] = []
    errors = []
    for index, event in enumerate(events):
        moment: float | None = None
        if isinstance(event.time, dt.datetime):
            if event.time.tzinfo is None:
                errors.append({"loc": f"{name}[{index}].time", "index": index, "field": "time",
                               "message": "needs a UTC offset, e.g. 2026-01-31T12:00:00Z"})
                continue
            moment = event.time.timestamp()
        elif event.time is not None:
            moment = float(event.time)
        if moment is not None and not oldest <= moment <= newest:
            errors.append({"loc": f"{name}[{index}].time", "index": index, "field": "time",
                           "message": f"{moment:.0f} is outside the accepted range (max_event_age "
                                      f"{settings.max_event_age:g}s, max_event_future {settings.max_event_future:g}s)"})
        moments.append(moment)
    if errors:
        counters.rejected["invalid"] += 1
        raise HTTPException(422, {"detail": "; ".join(f"{e['loc']}: {e['message']}" for e in errors),
                                  "errors": errors})
    return moments


