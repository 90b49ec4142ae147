"""GET /healthz and GET /metrics: open (no token), for load balancers, alerts and Prometheus.

Being open, they must never show a secret or an identifier beyond the pseudonym allowlist (in clear only),
and /metrics must still answer, with what it knows, when the database does not.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from aggregator import api_models as models
from aggregator import exceptions, metrics
from aggregator.api.context import Context


def router(ctx: Context) -> APIRouter:
    routes = APIRouter()
    agg, counters = ctx.agg, ctx.counters
    tally = metrics.ReportTally()  # the report stream's completeness, counted on as /metrics is scraped
    # /metrics is open: a meter group's dimension is a label only when the allowlist shows it in clear; the
    # rest (hashes included, which would still tell one project's usage from another's) is withheld.
    open_labels = models.pseudonymizer(dataclasses.replace(ctx.settings.aggregator.delivery, pseudonym_key=None))

    @routes.get("/healthz", response_model=None, responses={
        200: {"description": "ok; or degraded: serving, but reports are late or at risk (reasons say why)",
              "content": _health_body(["ok", "degraded"], ["status"])},
        503: {"description": "failing: the database cannot be used (reasons say why)",
              "content": _health_body(["failing"], ["status", "detail", "reasons"])}})
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

    @routes.get("/metrics", response_class=PlainTextResponse)
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

    return routes


def _health_body(states: list[str], required: list[str]) -> dict[str, Any]:
    """The /healthz body's schema, for the states a status code carries."""
    text = {"type": "string"}
    return {"application/json": {"schema": {
        "type": "object", "required": required,
        "properties": {"status": {"type": "string", "enum": states}, "database": text, "detail": text,
                       "reasons": {"type": "array", "items": text}}}}}


__all__ = ["router"]
