"""GET /v1/reports says on an empty page when the next report is due; on SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from aggregator import api, metrics, options
from aggregator.runtime import Aggregator
from tests.helpers import T0, WINDOW, FakeClock, manual

TOKEN = "next-report-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, FakeClock]]:
    settings = options.load_daemon_settings({"database_url": database_url, "api_tokens": TOKEN,
                                            "window": f"{WINDOW}s"}, environ={})
    clock = FakeClock(T0 + 25)
    # flush 10s, grace 5s, collection every 2s, closed at the latest 600s after the end
    async with manual(database_url, clock, flush_interval="10s", collect_interval="2s",
                      max_collect_delay="600s") as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http, agg, clock


async def test_an_empty_stream_says_when_the_first_report_is_due(client: tuple) -> None:
    """With no report yet, the page names the window open now (its end in the future, on a window boundary),
    when its report is expected (end + flush interval + grace + 1.5 collection intervals) and due at the
    latest (end + max_collect_delay + 1.5 collection intervals), and says so in a sentence."""
    http, agg, _ = client
    page = (await http.get("/v1/reports", headers=AUTH)).json()
    due = page.pop("next_report")
    assert page == {"reports": [], "next_cursor": "0"}
    message = due.pop("message")
    assert due == {"window_start": "2027-01-15T08:00:00Z", "window_end": "2027-01-15T08:01:00Z",
                   "expected_by": "2027-01-15T08:01:18Z", "at_latest": "2027-01-15T08:11:03Z"}
    assert agg.now() < T0 + WINDOW and T0 % WINDOW == 0
    assert message.startswith("no report yet: the window 2027-01-15T08:00:00Z - 2027-01-15T08:01:00Z closes at ")
    assert "expected by 2027-01-15T08:01:18Z" in message


async def test_a_page_with_reports_has_no_next_report_and_the_end_of_the_stream_has_one(client: tuple) -> None:
    """A page with reports carries next_report null; the empty page after the last cursor names the window
    open now again, as a new report (the reader has the earlier ones)."""
    http, agg, clock = client
    agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=T0 + 1)
    await agg.aflush()
    clock.past_window(T0)
    await agg.acollect()
    page = (await http.get("/v1/reports", headers=AUTH)).json()
    assert (len(page["reports"]), page["next_report"]) == (1, None)
    end = (await http.get("/v1/reports", params={"after": page["next_cursor"]}, headers=AUTH)).json()
    assert (end["reports"], end["next_report"]["window_end"]) == ([], "2027-01-15T08:02:00Z")
    assert end["next_report"]["message"].startswith("no new report yet: the window 2027-01-15T08:01:00Z - ")


async def test_the_openapi_document_describes_next_report(client: tuple) -> None:
    """The page's next_report and every field of it carry a description in /openapi.json."""
    http, _, _ = client
    schemas = (await http.get("/openapi.json")).json()["components"]["schemas"]
    field = schemas["ReportPage"]["properties"]["next_report"]
    assert "empty page" in field["description"]
    fields = schemas["NextReportOut"]["properties"]
    assert {"window_start", "window_end", "expected_by", "at_latest", "message"} == set(fields)
    assert [name for name, spec in fields.items() if not spec.get("description")] == []
