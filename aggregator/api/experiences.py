"""GET /v1/experiences: experience SLIs per window, experience and urgency, page by page of the report stream.

A read of what the collector computed: it must never compute or change an SLI itself.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends

from aggregator import api_models as models
from aggregator.api.context import Context
from aggregator.api.reports import Cursor, Limit  # by name: FastAPI resolves the annotations in these globals


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg = ctx.agg

    @routes.get("/v1/experiences", response_model=models.SliPage, responses=ctx.refusals.pull,
                dependencies=[Depends(ctx.access.authorized)])
    async def experience_slis(after: Cursor = "0", limit: Limit = 100) -> models.SliPage:
        """Experience SLIs per window, experience and urgency, page by page of the report stream."""
        page = [r.id for r in await agg.areports(after=int(after), limit=limit)]
        rows = await agg.aexperience_slis(page) if page else []
        return models.SliPage(slis=[models.SliOut(**{**row, "window_start": dt.datetime.fromtimestamp(
            row["window_start"], dt.timezone.utc)}) for row in rows], next_cursor=str(page[-1] if page else int(after)))

    return routes


__all__ = ["router"]
