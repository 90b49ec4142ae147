"""GET /v1/reports: finished reports in stream order, page by page after a cursor; and the page's parameters.

A read: it must never change the stream or wait for a report; an empty page says when the next is due.
Cursor and Limit are the report stream's page, also of /v1/meters and /v1/experiences.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from aggregator import api_models as models
from aggregator.api.context import Context

# Module level: FastAPI resolves these annotations by name, in the globals of the module using them.
Cursor = Annotated[str, Query(pattern=r"^[0-9]{1,18}$", description="cursor from a previous page; 0 for the start")]
Limit = Annotated[int, Query(ge=1, le=1000, description="reports (windows) per page")]


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, pseudonyms = ctx.agg, ctx.pseudonyms

    @routes.get("/v1/reports", response_model=models.ReportPage, responses=ctx.refusals.pull,
                dependencies=[Depends(ctx.access.authorized)])
    async def pull(after: Cursor = "0", limit: Limit = 100) -> models.ReportPage:
        """Finished reports in stream order, after the cursor. Retrying with the same cursor is safe.

        An empty page says in `next_report` when the report of the window open now is due.
        """
        found = await agg.areports(after=int(after), limit=limit)
        return models.ReportPage(reports=[models.ReportOut.of(r, pseudonyms) for r in found],
                                 next_cursor=str(found[-1].id if found else int(after)),
                                 next_report=None if found else models.NextReportOut.due(
                                     agg.settings, agg.now(), first=int(after) == 0))

    return routes


__all__ = ["Cursor", "Limit", "router"]
