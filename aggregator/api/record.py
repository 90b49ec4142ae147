"""POST /v1/record: record a batch of meter records, all or nothing; a retried event_id counts once.

It must never record part of a batch: every record is validated first, and a refusal by record_many (an
unknown meter, wrong dimensions) refuses the whole batch with a 422 at the record it names.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from aggregator import api_models as models
from aggregator import exceptions
from aggregator.api import bodies, problems
from aggregator.api.context import Context


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, counters = ctx.agg, ctx.counters

    @routes.post("/v1/record", status_code=202, response_model=models.Accepted, responses=ctx.refusals.ingest,
                 dependencies=[Depends(ctx.access.authorized)], openapi_extra=bodies.documented("RecordBatch"))
    async def record(request: Request) -> models.Accepted:
        """Record a batch of meter records; all or nothing. A retried record with an event_id counts once."""
        records: list[models.MeterRecord] = await bodies.items(request, "records", ctx)
        moments = bodies.check_times(records, agg, counters, "records")
        try:
            agg.record_many([{"meter": r.meter, "value": r.value, "dimensions": r.dimensions, "event_id": r.event_id,
                              "at": moment} for r, moment in zip(records, moments, strict=True)])
        except exceptions.InvalidInput as exc:
            raise problems.invalid(counters, [problems.refused(exc, "records")]) from None
        counters.records_accepted += len(records)
        return models.Accepted(accepted=len(records))

    return routes


__all__ = ["router"]
