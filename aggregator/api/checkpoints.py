"""POST /v1/checkpoints: checkpoints of experiences (user-facing journeys), all or nothing; a retry changes nothing.

The one ingest route a token limited to checkpoint types may use: it must never accept a checkpoint of a
type outside the token's scope, nor accept part of a batch.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from aggregator import api_models as models
from aggregator import exceptions, reports
from aggregator.api import bodies, problems
from aggregator.api.context import Context


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, counters, scope = ctx.agg, ctx.counters, ctx.access.scope

    @routes.post("/v1/checkpoints", status_code=202, response_model=models.CheckpointsAccepted,
                 responses=ctx.refusals.ingest | {403: problems.documented(
                     f"the token may not send checkpoints of this type; {problems.BROWSERS}")},
                 openapi_extra=bodies.documented("CheckpointBatch"))
    async def checkpoints(request: Request,
                          types: frozenset[str] | None = Depends(scope)) -> models.CheckpointsAccepted:  # noqa: B008
        """Report checkpoints of experiences; all or nothing. A retried checkpoint changes nothing."""
        found: list[models.CheckpointIn] = await bodies.items(request, "checkpoints", ctx)
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
            raise problems.invalid(counters, [problems.refused(exc, "checkpoints")]) from None
        counters.checkpoints_accepted += len(found)
        return models.CheckpointsAccepted(accepted=len(found),
                                          server_timestamp=reports.iso_utc(accepted_at, "milliseconds"))

    return routes


__all__ = ["router"]
