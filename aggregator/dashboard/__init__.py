"""The dashboard at ``/ui``: a static page, and the SVG charts it shows, drawn here on the server.

Drawing on the server (``charts.py`` into ``svg.py``) keeps the page offline-capable with no JavaScript
library to ship: the page's one script fetches each chart with the bearer token, which a person types
once (kept for the tab in sessionStorage), and places the SVG in the page. Chart requests pass the
pull API's token check; the page and its files hold no data and are open. Every response sits behind
the API's guard (no Origin, a local Host without tokens) and carries a CSP that allows no inline script.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Query, params
from fastapi.responses import RedirectResponse, Response
from pydantic import AwareDatetime

from aggregator import privacy, values
from aggregator.dashboard import charts, svg
from aggregator.reports import Report, iso_utc
from aggregator.runtime import Aggregator

MAX_WINDOWS = 1000  # windows (reports) drawn per chart; a wider range shows its first MAX_WINDOWS
DEFAULT_WINDOWS = 48
PAGE_POLICY = ("default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
               "object-src 'none'")
CHART_POLICY = "default-src 'none'; frame-ancestors 'none'"  # a chart opened on its own runs nothing
_COMMON = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}
FILES = {"index.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
         "dashboard.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}

Last = Annotated[int, Query(ge=1, le=MAX_WINDOWS, description="the last N windows (when since is not given)")]
Since = Annotated[AwareDatetime | None, Query(description="first window start, ISO 8601 with an offset")]
Until = Annotated[AwareDatetime | None, Query(description="windows starting before this, ISO 8601 with an offset")]


def static(name: str) -> bytes:
    """A file of the page, as shipped in the package (``static/``)."""
    return resources.files(__name__).joinpath("static", name).read_bytes()


def router(agg: Aggregator, pseudonyms: privacy.Pseudonymizer, authorized: params.Depends) -> APIRouter:
    """The page, its files and the charts; ``authorized`` is the pull API's token check.

    Left out of the OpenAPI document: the page is for people, and the charts are pictures of what the
    pull API already documents.
    """
    routes = APIRouter(include_in_schema=False)
    files = {name: static(name) for name in FILES}  # read once: the package does not change under us

    @routes.get("/ui")
    async def to_page() -> Response:
        # Relative, so a proxy that serves the daemon under a prefix keeps it.
        return RedirectResponse("ui/", status_code=307, headers=_COMMON)

    @routes.get("/ui/")
    async def page() -> Response:
        return Response(files["index.html"], media_type=FILES["index.html"],
                        headers=_COMMON | {"Content-Security-Policy": PAGE_POLICY})

    for name in ("dashboard.js", "dashboard.css", "favicon.svg"):
        routes.add_api_route(f"/ui/{name}", _file(files[name], FILES[name]), methods=["GET"])

    async def in_range(last: int, since: dt.datetime | None, until: dt.datetime | None) -> tuple[list[Report], str]:
        """The reports of the range, oldest window first, and a note when the range held more than are drawn."""
        if since is None:
            window = agg.settings.window_seconds
            start = (agg.now() // window - last) * window
        else:
            start = since.timestamp()
        # Clamped to the times a report can have: a since in year 1 means from the first report.
        found = await agg.areports(min(max(start, values.EARLIEST), values.LATEST), limit=MAX_WINDOWS + 1)
        if until is not None:
            found = [r for r in found if r.window_start < until]
        note = ""
        if len(found) > MAX_WINDOWS:
            found = found[:MAX_WINDOWS]
            note = (f"showing the first {MAX_WINDOWS} windows of the range, to {iso_utc(found[-1].window_end)}; "
                    "narrow the range to see the rest")
        return found, note

    def chart(name: str, panels: Sequence[svg.Panel], note: str) -> Response:
        document = svg.figure(charts.TITLES[name], panels, empty=charts.EMPTY[name], note=note)
        return Response(document.encode(), media_type="image/svg+xml; charset=utf-8",
                        headers=_COMMON | {"Cache-Control": "no-store", "Content-Security-Policy": CHART_POLICY})

    @routes.get("/ui/charts/requests.svg", dependencies=[authorized])
    async def requests(last: Last = DEFAULT_WINDOWS, since: Since = None, until: Until = None) -> Response:
        found, note = await in_range(last, since, until)
        return chart("requests", charts.requests(found) if found else [], note)

    @routes.get("/ui/charts/uniques.svg", dependencies=[authorized])
    async def uniques(last: Last = DEFAULT_WINDOWS, since: Since = None, until: Until = None) -> Response:
        found, note = await in_range(last, since, until)
        return chart("uniques", charts.uniques(found) if found else [], note)

    @routes.get("/ui/charts/meters.svg", dependencies=[authorized])
    async def meter_results(last: Last = DEFAULT_WINDOWS, since: Since = None, until: Until = None) -> Response:
        found, note = await in_range(last, since, until)
        results = await agg.ameter_results([r.id for r in found]) if found else []
        return chart("meters", charts.meter_panels(found, results, pseudonyms), note)

    @routes.get("/ui/charts/experiences.svg", dependencies=[authorized])
    async def experiences(last: Last = DEFAULT_WINDOWS, since: Since = None, until: Until = None) -> Response:
        found, note = await in_range(last, since, until)
        rows = await agg.aexperience_slis([r.id for r in found]) if found else []
        return chart("experiences", charts.experience_panels(found, [charts.sli_out(row) for row in rows]), note)

    return routes


def _file(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(content, media_type=media_type, headers=_COMMON)

    return serve


__all__ = ["MAX_WINDOWS", "router", "static"]
