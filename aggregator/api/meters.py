"""GET /v1/meters: meter results, page by page of the report stream (the results of the next `limit` reports).

A read: it must never show an identifier other than as the writers do (pseudonymized, allowlisted or null).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from aggregator import api_models as models
from aggregator.api.context import Context
from aggregator.api.reports import Cursor, Limit  # by name: FastAPI resolves the annotations in these globals


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, pseudonyms = ctx.agg, ctx.pseudonyms

    @routes.get("/v1/meters", response_model=models.MeterPage, responses=ctx.refusals.pull,
                dependencies=[Depends(ctx.access.authorized)])
    async def meter_results(after: Cursor = "0", limit: Limit = 100) -> models.MeterPage:
        """Meter results, page by page of the report stream: the results of the next `limit` reports."""
        page = [r.id for r in await agg.areports(after=int(after), limit=limit)]
        found = await agg.ameter_results(page) if page else []
        return models.MeterPage(results=[models.MeterResultOut.of(r, pseudonyms) for r in found],
                                next_cursor=str(page[-1] if page else int(after)))

    return routes


__all__ = ["router"]
