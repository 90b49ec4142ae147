"""Reading a batch's body: JSON only (else 415), within max_body_bytes (else 413), parsed strictly, validated whole.

Ingest is all or nothing, so this module must never hand a router part of a batch: a router tracks nothing
before items() and check_times() have accepted every item. It tracks nothing itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import HTTPException, Request
from pydantic import TypeAdapter, ValidationError

from aggregator import api_models as models
from aggregator import exceptions, http_guard, metrics, values
from aggregator.api import problems
from aggregator.api.context import Context
from aggregator.runtime import Aggregator

_ADAPTERS: dict[str, TypeAdapter[Any]] = {name: TypeAdapter(model) for name, model in models.BATCHES.items()}


def documented(model: str) -> dict[str, Any]:
    """The operation's request body: read and validated by hand, so declared here (api_models defines it)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model}"}}}}}


async def items(request: Request, name: str, ctx: Context) -> list[Any]:
    """The body's list ``name``: JSON (else 415), parsed strictly and validated (else 422 naming each value)."""
    counters, settings = ctx.counters, ctx.settings
    unsupported = http_guard.content_type_problem(request.headers.get("content-type"))
    if unsupported is not None:
        counters.rejected["unsupported_media_type"] += 1
        raise HTTPException(415, unsupported)
    body = await _read_limited(request, settings.max_body_bytes, counters)
    try:
        data = http_guard.parse(body)
    except http_guard.BodyError as exc:
        raise problems.invalid(counters, [exc.as_error()]) from None
    given = data.get(name) if isinstance(data, dict) else None
    if isinstance(given, list) and len(given) > settings.max_events_per_request:  # before validating each
        raise problems.invalid(counters, [{
            "loc": name, "type": "too_long", "message": f"{len(given)} items, at most "
            f"{settings.max_events_per_request} per request (max_events_per_request); split the batch"}])
    try:
        batch = _ADAPTERS[name].validate_python(data)
    except ValidationError as exc:
        raise problems.invalid(counters, [problems.describe(e) for e in exc.errors(include_url=False,
                                                                                  include_input=False)]) from None
    found: list[Any] = getattr(batch, name)
    return found


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


def check_times(events: Sequence[models.Event | models.MeterRecord], agg: Aggregator, counters: metrics.Counters,
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


__all__ = ["check_times", "documented", "items"]
