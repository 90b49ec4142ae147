"""GET /v1/distinct: distinct workspaces or users over the reported windows of a time range.

It must never answer an estimate as exact: the answer says which path it took (ids, daily, sketch).
The range is checked by aggregator.distinct, the one edge for it in-process and here.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from aggregator import api_models as models
from aggregator import distinct, exceptions
from aggregator.api import problems
from aggregator.api.context import Context


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, counters = ctx.agg, ctx.counters

    @routes.get("/v1/distinct", response_model=models.DistinctOut, responses=ctx.refusals.pull,
                dependencies=[Depends(ctx.access.authorized)])
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
            raise problems.invalid(counters, [{"loc": f"query.{str(exc).partition('=')[0]}",
                                               "message": str(exc)}]) from None
        found = await agg.adistinct(lo, hi, name)
        return models.DistinctOut(**dataclasses.asdict(found))

    return routes


def _moment_text(text: str) -> str | float:
    """A query's time: epoch seconds as a number, anything else as ISO 8601 text (values.moment checks both)."""
    try:
        return float(text)
    except ValueError:
        return text


__all__ = ["router"]
