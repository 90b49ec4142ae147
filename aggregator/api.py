"""The daemon's HTTP API: batch ingest, report pull with a cursor, health, metrics, OpenAPI.

Ingest is all or nothing: the whole body is read (within the size limit) and validated before the
first event is tracked, so a request either counts every event or none. Every refusal is a Problem
body; a 422 also lists each bad value in `errors`. The wire format is in api_models, the checks every
request passes before a handler reads it (no browser, a local Host, strict JSON) in http_guard.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hmac
import re
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, TypeAdapter, ValidationError

from aggregator import api_models as models
from aggregator import config, dashboard, distinct, exceptions, http_guard, logs, metrics, reports, values
from aggregator.api_models import Event, MeterRecord
from aggregator.runtime import Aggregator

log = logs.get_logger("aggregator.api")


class Problem(BaseModel):
    """Why a request was refused; on a 422, `errors` lists each bad value (`loc`, `message`, `type`)."""

    detail: str
    errors: list[dict[str, Any]] = []


# Query parameters of the report-stream pages (module level: FastAPI resolves these annotations by name).
Cursor = Annotated[str, Query(pattern=r"^[0-9]{1,18}$", description="cursor from a previous page; 0 for the start")]
Limit = Annotated[int, Query(ge=1, le=1000, description="reports (windows) per page")]

_ADAPTERS: dict[str, TypeAdapter[Any]] = {name: TypeAdapter(model) for name, model in models.BATCHES.items()}
_BEARER = HTTPBearer(auto_error=False, description="a token from api_tokens (AGGREGATOR_API_TOKENS)")
_BROWSERS = "a request with an Origin header: browsers are not served (use a server-side client)"
_FOREIGN_HOST = "the Host header names another server (no api_tokens: only the listen address and localhost)"
MAX_ERRORS = 100  # entries of `errors` in one 422; a batch of 10,000 bad items gets a bounded answer
_DETAILED = 10  # errors named in `detail`
# An in-process message that starts with the item it is about: "records[3]: ..." or "checkpoints[0].urgency=...".
_INDEXED = re.compile(r"(?P<list>records|checkpoints)\[(?P<index>[0-9]+)\](?:\.(?P<field>[a-z_]+))?")


def build_app(agg: Aggregator, settings: config.DaemonSettings, counters: metrics.Counters) -> FastAPI:
    app = FastAPI(title="aggregator", version="1", summary="Exactly-once usage aggregation",
                  docs_url=None, redoc_url=None)
    tokens = [(token.encode(), types) for token, types in config.token_scopes(settings.api_tokens)]
    limit = settings.max_body_bytes
    tally = metrics.ReportTally()  # the report stream's completeness, counted on as /metrics is scraped
    pseudonyms = models.pseudonymizer(settings.aggregator.delivery)  # as the writers show identifiers
    # /metrics is open: a meter group's dimension is a label only when the allowlist shows it in clear; the
    # rest (hashes included, which would still tell one project's usage from another's) is withheld.
    open_labels = models.pseudonymizer(dataclasses.replace(settings.aggregator.delivery, pseudonym_key=None))
    # Without tokens (loopback only, see config) a Host naming another server is refused: DNS rebinding.
    hosts = None if tokens else http_guard.local_hosts(settings.listen[0])
    app.add_middleware(http_guard.Guard, hosts=hosts, counters=counters)
    guarded: dict[int | str, dict[str, Any]] = {403: _problem_response(_BROWSERS)}
    if not tokens:
        guarded[421] = _problem_response(_FOREIGN_HOST)
    pull_problems = guarded | {422: _problem_response("invalid query; `errors` names each bad parameter"),
                               503: _problem_response("shutting down, or the database is unavailable; retry")}
    if tokens:
        pull_problems |= {401: _problem_response("missing or wrong bearer token"),
                          403: _problem_response(f"the token is limited to sending checkpoints; {_BROWSERS}")}
    ingest_problems = pull_problems | {
        413: _problem_response("body larger than max_body_bytes"),
        415: _problem_response("Content-Type is not application/json (UTF-8)"),
        422: _problem_response("invalid body: not strict JSON (a repeated key, too deep, NaN), or an invalid "
                               "value; `errors` names each one")}

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

    def invalid(errors: list[dict[str, Any]]) -> HTTPException:
        counters.rejected["invalid"] += 1
        return HTTPException(422, _problem(errors))

    async def items(request: Request, name: str) -> list[Any]:
        """The body's list ``name``: JSON (else 415), parsed strictly and validated (else 422 naming each value)."""
        unsupported = http_guard.content_type_problem(request.headers.get("content-type"))
        if unsupported is not None:
            counters.rejected["unsupported_media_type"] += 1
            raise HTTPException(415, unsupported)
        body = await _read_limited(request, limit, counters)
        try:
            data = http_guard.parse(body)
        except http_guard.BodyError as exc:
            raise invalid([exc.as_error()]) from None
        given = data.get(name) if isinstance(data, dict) else None
        if isinstance(given, list) and len(given) > settings.max_events_per_request:  # before validating each
            raise invalid([{"loc": name, "type": "too_long",
                            "message": f"{len(given)} items, at most {settings.max_events_per_request} per request "
                                       "(max_events_per_request); split the batch"}])
        try:
            batch = _ADAPTERS[name].validate_python(data)
        except ValidationError as exc:
            raise invalid([_describe(e) for e in exc.errors(include_url=False, include_input=False)]) from None
        found: list[Any] = getattr(batch, name)
        return found

    @app.post("/v1/track", status_code=202, response_model=models.Accepted, responses=ingest_problems,
              dependencies=[Depends(authorized)], openapi_extra=_body("TrackBatch"))
    async def track(request: Request) -> models.Accepted:
        """Count a batch of events; all or nothing."""
        events: list[Event] = await items(request, "events")
        moments = _check_times(events, agg, counters)
        for event, moment in zip(events, moments, strict=True):
            agg.track(event.workspace_id, event.user_id, event.allowed, event.denied, at=moment)
        counters.events_accepted += len(events)
        return models.Accepted(accepted=len(events))

    @app.post("/v1/record", status_code=202, response_model=models.Accepted, responses=ingest_problems,
              dependencies=[Depends(authorized)], openapi_extra=_body("RecordBatch"))
    async def record(request: Request) -> models.Accepted:
        """Record a batch of meter records; all or nothing. A retried record with an event_id counts once."""
        records: list[MeterRecord] = await items(request, "records")
        moments = _check_times(records, agg, counters, "records")
        try:
            agg.record_many([{"meter": r.meter, "value": r.value, "dimensions": r.dimensions, "event_id": r.event_id,
                              "at": moment} for r, moment in zip(records, moments, strict=True)])
        except exceptions.InvalidInput as exc:
            raise invalid([_refused(exc, "records")]) from None
        counters.records_accepted += len(records)
        return models.Accepted(accepted=len(records))

    @app.post("/v1/checkpoints", status_code=202, response_model=models.CheckpointsAccepted, responses=ingest_problems
              | {403: _problem_response(f"the token may not send checkpoints of this type; {_BROWSERS}")},
              openapi_extra=_body("CheckpointBatch"))
    async def checkpoints(request: Request,
                          types: frozenset[str] | None = Depends(scope)) -> models.CheckpointsAccepted:  # noqa: B008
        """Report checkpoints of experiences; all or nothing. A retried checkpoint changes nothing."""
        found: list[models.CheckpointIn] = await items(request, "checkpoints")
        if types is not None:
            refused = sorted({c.type for c in found} - types)
            if refused:
                counters.rejected["forbidden"] += 1
                raise HTTPException(403, f"this token may not send checkpoints of type(s) {', '.join(refused)}; "
                                         f"it is limited to {', '.join(sorted(types))}")
        try:
            # meta as parsed (already plain JSON values): dumping it again would cost as much as parsing it.
            accepted_at = agg.checkpoint_many([c.model_dump(exclude_none=True, exclude={"meta"})
                                               | ({} if c.meta is None else {"meta": c.meta}) for c in found])
        except exceptions.InvalidInput as exc:
            raise invalid([_refused(exc, "checkpoints")]) from None
        counters.checkpoints_accepted += len(found)
        return models.CheckpointsAccepted(accepted=len(found),
                                          server_timestamp=reports.iso_utc(accepted_at, "milliseconds"))

    @app.get("/v1/reports", response_model=models.ReportPage, responses=pull_problems,
             dependencies=[Depends(authorized)])
    async def pull(after: Cursor = "0", limit: Limit = 100) -> models.ReportPage:
        """Finished reports in stream order, after the cursor. Retrying with the same cursor is safe.

        An empty page says in `next_report` when the report of the window open now is due.
        """
        found = await agg.areports(after=int(after), limit=limit)
        return models.ReportPage(reports=[models.ReportOut.of(r, pseudonyms) for r in found],
                                 next_cursor=str(found[-1].id if found else int(after)),
                                 next_report=None if found else models.NextReportOut.due(
                                     agg.settings, agg.now(), first=int(after) == 0))

    @app.get("/v1/meters", response_model=models.MeterPage, responses=pull_problems,
             dependencies=[Depends(authorized)])
    async def meter_results(after: Cursor = "0", limit: Limit = 100) -> models.MeterPage:
        """Meter results, page by page of the report stream: the results of the next `limit` reports."""
        page = [r.id for r in await agg.areports(after=int(after), limit=limit)]
        found = await agg.ameter_results(page) if page else []
        return models.MeterPage(results=[models.MeterResultOut.of(r, pseudonyms) for r in found],
                                next_cursor=str(page[-1] if page else int(after)))

    @app.get("/v1/experiences", response_model=models.SliPage, responses=pull_problems,
             dependencies=[Depends(authorized)])
    async def experience_slis(after: Cursor = "0", limit: Limit = 100) -> models.SliPage:
        """Experience SLIs per window, experience and urgency, page by page of the report stream."""
        page = [r.id for r in await agg.areports(after=int(after), limit=limit)]
        rows = await agg.aexperience_slis(page) if page else []
        return models.SliPage(slis=[models.SliOut(**{**row, "window_start": dt.datetime.fromtimestamp(
            row["window_start"], dt.timezone.utc)}) for row in rows], next_cursor=str(page[-1] if page else int(after)))

    @app.get("/v1/distinct", response_model=models.DistinctOut, responses=pull_problems,
             dependencies=[Depends(authorized)])
    async def distinct_range(start: Annotated[str, Query(max_length=64, alias="from",
                                                          description="ISO 8601 with offset, or epoch seconds")],
                             end: Annotated[str, Query(max_length=64, alias="to", description="likewise; exclusive")],
                             dim: Annotated[str, Query(max_length=64, description="workspaces or users")] = "users",
                             ) -> models.DistinctOut:
        """Distinct workspaces or users over the reported windows starting in [from, to): exact while the ids
        are kept, else estimated from sketches; the answer says which, and the windows it covers."""
        try:
            lo, hi, name = distinct.check_range(_moment_text(start), _moment_text(end), dim, names=("from", "to"))
        except exceptions.InvalidInput as exc:
            raise invalid([{"loc": f"query.{str(exc).partition('=')[0]}", "message": str(exc)}]) from None
        found = await agg.adistinct(lo, hi, name)
        return models.DistinctOut(**dataclasses.asdict(found))

    def health_body(states: list[str], required: list[str]) -> dict[str, Any]:
        text = {"type": "string"}
        return {"application/json": {"schema": {
            "type": "object", "required": required,
            "properties": {"status": {"type": "string", "enum": states}, "database": text, "detail": text,
                           "reasons": {"type": "array", "items": text}}}}}

    @app.get("/healthz", response_model=None, responses={
        200: {"description": "ok; or degraded: serving, but reports are late or at risk (reasons say why)",
              "content": health_body(["ok", "degraded"], ["status"])},
        503: {"description": "failing: the database cannot be used (reasons say why)",
              "content": health_body(["failing"], ["status", "detail", "reasons"])}})
    async def health() -> JSONResponse:
        """Open: 200 ok or degraded, 503 failing, with a sentence per reason (README: Reading health).

        A load balancer acts on the status code: only failing takes a replica out. Degraded (a late
        window, failures in a row) is for alerts: every replica would say it, and taking them all out
        would stop ingest without bringing a report any sooner.
        """
        found = agg.status()["health"]
        state, reasons = found["state"], list(found["reasons"])
        if state != "failing":
            try:  # the figures are as of the last flush; the probe asks the database now
                await agg.aping()
            except exceptions.StoreError as exc:
                state, reasons = "failing", [f"the database does not answer: {exc}", *reasons]
        if state == "failing":
            return JSONResponse({"status": state, "detail": reasons[0], "reasons": reasons}, status_code=503)
        return JSONResponse({"status": state, "database": "ok", **({"reasons": reasons} if reasons else {})})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> Response:
        """Open: Prometheus text exposition (no secrets; of identifiers, only those on the pseudonym allowlist)."""
        outbox: list[dict[str, Any]] | None
        overflow: list[dict[str, Any]] | None
        shown: metrics.ReportTally | None = tally
        try:
            outbox, overflow = await agg.aoutbox(), await agg.aoverflow()
            await tally.catch_up(lambda after, limit: agg.areports(after=after, limit=limit), agg.ameter_results,
                                 lambda dimensions: models.shown_dimensions(dimensions, open_labels))
        except exceptions.StoreError:
            # The database is away: the other figures still say so (flush lag, errors).
            outbox = overflow = shown = None
        return PlainTextResponse(metrics.render(agg.status(), counters, outbox, overflow, shown),
                                 media_type=metrics.CONTENT_TYPE)

    @app.exception_handler(HTTPException)
    async def problem(_request: Request, exc: HTTPException) -> JSONResponse:
        content: dict[str, Any] = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        if exc.status_code == 422:  # one shape for every 422, whoever raised it
            errors = content.get("errors") or [{"loc": "body", "message": str(content["detail"])}]
            content = {"detail": content["detail"], "errors": [{"type": "value_error", **e} for e in errors]}
        return JSONResponse(content, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_query(_request: Request, exc: RequestValidationError) -> JSONResponse:
        counters.rejected["invalid"] += 1
        return JSONResponse(_problem([_describe(e) for e in exc.errors()]), status_code=422)

    @app.exception_handler(exceptions.NotRunning)
    async def stopping(_request: Request, _exc: exceptions.NotRunning) -> JSONResponse:
        return JSONResponse({"detail": "shutting down; retry on another replica"}, status_code=503)

    @app.exception_handler(exceptions.StoreError)
    async def unavailable(_request: Request, exc: exceptions.StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable: {exc}; retry later"}, status_code=503)

    app.include_router(dashboard.router(agg, pseudonyms, Depends(authorized)))  # /ui: outside the OpenAPI document
    _complete_openapi(app.openapi(), guarded, bearer=bool(tokens))
    return app


def _complete_openapi(schema: dict[str, Any], guarded: dict[int | str, dict[str, Any]], *, bearer: bool) -> None:
    """Define the request bodies (read by hand, so FastAPI does not) and add the guard's refusals everywhere.

    Without tokens no operation asks for one, and the document says so (no bearer security).
    """
    schema["components"]["schemas"].update(models.body_schemas())
    if not bearer:
        schema["components"].pop("securitySchemes", None)
    for path in schema["paths"].values():
        for operation in path.values():
            if not bearer:
                operation.pop("security", None)
            responses = operation.setdefault("responses", {})
            for code, response in guarded.items():
                responses.setdefault(str(code), {
                    "description": response["description"],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})


def _moment_text(text: str) -> str | float:
    """A query's time: epoch seconds as a number, anything else as ISO 8601 text (values.moment checks both)."""
    try:
        return float(text)
    except ValueError:
        return text


def _problem_response(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


def _body(model: str) -> dict[str, Any]:
    """The operation's request body: read and validated by hand, so declared here (api_models defines it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model}"}}}}}


def _problem(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A 422 body: ``detail`` names the first few bad values, ``errors`` lists each (at most MAX_ERRORS)."""
    errors = [{"type": "value_error", **error} for error in errors]
    shown = [e["message"] if e["message"].startswith(e["loc"]) else f"{e['loc']}: {e['message']}" for e in errors]
    more = f"; and {len(shown) - _DETAILED} more (see errors)" if len(shown) > _DETAILED else ""
    listed = errors[:MAX_ERRORS]
    if len(errors) > MAX_ERRORS:
        listed.append({"loc": "body", "type": "too_many_errors",
                       "message": f"{len(errors) - MAX_ERRORS} more errors not listed; fix these first"})
    return {"detail": "; ".join(shown[:_DETAILED]) + more, "errors": listed}


def _refused(exc: exceptions.InvalidInput, name: str) -> dict[str, Any]:
    """An in-process refusal (record_many, checkpoint_many) as an entry of `errors`, at the item it names."""
    text = str(exc)
    out: dict[str, Any] = {"loc": name, "message": text,
                           "type": "invalid_type" if isinstance(exc, exceptions.InvalidType) else "invalid_input"}
    found = _INDEXED.match(text)
    if found is not None and found["list"] == name:
        out |= {"loc": found[0], "index": int(found["index"])}
        if found["field"]:
            out["field"] = found["field"]
    return out


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
    if len(loc) >= 2 and loc[0] in models.BATCHES and isinstance(loc[1], int):
        out["index"] = loc[1]
        if len(loc) >= 3:
            out["field"] = loc[2]
    return out


def _check_times(events: Sequence[Event | MeterRecord], agg: Aggregator, counters: metrics.Counters,
                 name: str = "events") -> list[float | None]:
    """Each item's time checked by the one edge (values.moment), against the Aggregator's clock and range.

    The range is narrowed by a second on both sides, so an item accepted here cannot be refused by track()
    a moment later at the edge of the range, half-way through a batch (a batch is all or nothing).
    """
    now = agg.now()
    bounds = agg.settings.time_range
    within = values.TimeRange(max(bounds.past - 1.0, 0.0), max(bounds.future - 1.0, 0.0))
    moments: list[float | None] = []
    errors = []
    for index, event in enumerate(events):
        moment: float | None = None
        if event.time is not None:
            try:
                moment = values.moment(event.time, "time", now=now, within=within)
            except exceptions.InvalidInput as exc:
                errors.append({"loc": f"{name}[{index}].time", "index": index, "field": "time",
                               "message": str(exc).removeprefix("time="), "type": "time_out_of_range"})
                continue
        moments.append(moment)
    if errors:
        counters.rejected["invalid"] += 1
        raise HTTPException(422, {"detail": "; ".join(f"{e['loc']}: {e['message']}" for e in errors[:100]),
                                  "errors": errors[:100]})
    return moments


