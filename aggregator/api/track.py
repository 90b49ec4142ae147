"""POST /v1/track: count a batch of events (workspace, user, allowed, denied), all or nothing.

It must never track an event of a batch before every event of it has been validated and its time checked.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from aggregator import api_models as models
from aggregator.api import bodies
from aggregator.api.context import Context


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, counters = ctx.agg, ctx.counters

    @routes.post("/v1/track", status_code=202, response_model=models.Accepted, responses=ctx.refusals.ingest,
                 dependencies=[Depends(ctx.access.authorized)], openapi_extra=bodies.documented("TrackBatch"))
    async def track(request: Request) -> models.Accepted:
        """Count a batch of events; all or nothing."""
        events: list[models.Event] = await bodies.items(request, "events", ctx)
        moments = bodies.check_times(events, agg, counters)
        for event, moment in zip(events, moments, strict=True):
            agg.track(event.workspace_id, event.user_id, event.allowed, event.denied, at=moment)
        counters.events_accepted += len(events)
        return models.Accepted(accepted=len(events))

    return routes


__all__ = ["router"]
