"""The daemon's HTTP API: batch ingest, report pull with a cursor, health, metrics, OpenAPI, the dashboard.

build_app composes one router per resource (a module each, named for its path) over one Context. Ingest is
all or nothing (bodies); every refusal is a Problem body (problems); the token check is in auth; the wire
format is in api_models, the checks every request passes before a handler reads it (no browser, a local
Host, strict JSON) in http_guard. This module must never define a route itself, only compose them.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI

from aggregator import api_models as models
from aggregator import dashboard, http_guard, metrics, options
from aggregator.api import checkpoints, distinct, experiences, health, meters, problems, record, reports, track
from aggregator.api.context import Context
from aggregator.runtime import Aggregator

# One router per resource, in the OpenAPI document's order.
ROUTERS = (track.router, record.router, checkpoints.router, reports.router, meters.router, experiences.router,
           distinct.router, health.router)


def build_app(agg: Aggregator, settings: options.DaemonSettings, counters: metrics.Counters) -> FastAPI:
    app = FastAPI(title="aggregator", version="1", summary="Exactly-once usage aggregation",
                  docs_url=None, redoc_url=None)
    ctx = Context.of(agg, settings, counters)
    # Without tokens (loopback only, see options) a Host naming another server is refused: DNS rebinding.
    hosts = None if ctx.access.required else http_guard.local_hosts(settings.listen[0])
    app.add_middleware(http_guard.Guard, hosts=hosts, counters=counters)
    for router in ROUTERS:
        app.include_router(router(ctx))
    problems.install(app, counters)
    # /ui: outside the OpenAPI document
    app.include_router(dashboard.router(agg, ctx.pseudonyms, Depends(ctx.access.authorized)))
    _complete_openapi(app.openapi(), ctx.refusals.guarded, bearer=ctx.access.required)
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


__all__ = ["build_app"]
