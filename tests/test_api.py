"""The HTTP API in-process (httpx's ASGI transport), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from aggregator import api, api_models, exceptions, metrics, options, reports, store
from aggregator.reports import Report
from aggregator.runtime import Aggregator
from tests.helpers import GRACE, T0, WINDOW, FakeClock, manual
from tests.test_export import insert_report

TOKEN = "t0ken-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def event(i: int = 0, **fields: object) -> dict[str, object]:
    return {"workspace_id": str(uuid.UUID(int=1 + i % 3)), "user_id": str(uuid.UUID(int=100 + i)), **fields}


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, metrics.Counters]]:
    settings = options.load_daemon_settings(
        {"database_url": database_url, "api_tokens": TOKEN, "window": f"{WINDOW}s", "max_body_bytes": "4096",
         "max_events_per_request": "20"}, environ={})
    counters = metrics.Counters()
    async with manual(database_url, FakeClock()) as agg:
        app = api.build_app(agg, settings, counters)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http, agg, counters


async def test_a_valid_batch_is_counted(client: tuple) -> None:
    http, agg, counters = client
    now = agg.now()  # event times are checked against the Aggregator's clock (a fake one here)
    response = await http.post("/v1/track", headers=AUTH, json={"events": [
        event(0), event(1, allowed=0, denied=3), event(2, time=now), event(3, time=_iso(now))]})
    assert (response.status_code, response.json()) == (202, {"accepted": 4})
    assert agg.status()["pending_events"] == 4 and counters.events_accepted == 4


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.timezone.utc).isoformat().replace("+00:00", "Z")


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"events": [event(0), event(1, user_id="nope")]}, "events[1].user_id"),
        ({"events": [event(0, workspace_id=7)]}, "events[0].workspace_id"),
        ({"events": [event(0, allowed=-1)]}, "events[0].allowed"),
        ({"events": [event(0, denied=1.5)]}, "events[0].denied"),
        ({"events": [event(0, denied=True)]}, "events[0].denied"),
        ({"events": [event(0, allowed="2")]}, "events[0].allowed"),
        ({"events": [event(0), event(1, extra=1)]}, "events[1].extra"),
        ({"events": [{"user_id": str(uuid.UUID(int=5))}]}, "events[0].workspace_id"),
        ({"events": [event(0, time=1.0)]}, "events[0].time"),  # 1970: older than max_event_age
        ({"events": [event(0, time=time.time() + 3600)]}, "events[0].time"),  # an hour ahead
        ({"events": [event(0, time="2026-11-24T12:00:00")]}, "events[0].time"),  # no UTC offset
        ({"events": []}, "events"),
        ({"events": [event(i) for i in range(21)]}, "events"),
        ([event(0)], "body"),
    ],
)
async def test_each_invalid_field_is_422_naming_index_and_field_and_counts_nothing(
        client: tuple, body: object, loc: str) -> None:
    http, agg, _ = client
    response = await http.post("/v1/track", headers=AUTH, json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(loc)
    assert agg.status()["pending_events"] == 0


async def test_malformed_json_is_422(client: tuple) -> None:
    http, agg, _ = client
    response = await http.post("/v1/track", headers=AUTH | {"Content-Type": "application/json"},
                               content=b'{"events": [')
    assert response.status_code == 422 and "json" in response.json()["detail"].lower()
    assert agg.status()["pending_events"] == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token-0123456789"},
                                     {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}])
async def test_missing_or_wrong_token_is_401_and_counts_nothing(client: tuple, headers: dict) -> None:
    http, agg, counters = client
    response = await http.post("/v1/track", headers=headers, json={"events": [event(0)]})
    assert (response.status_code, response.headers.get("www-authenticate")) == (401, "Bearer")
    assert (await http.get("/v1/reports", headers=headers)).status_code == 401
    assert agg.status()["pending_events"] == 0 and counters.rejected["unauthorized"] == 2


async def test_oversized_body_is_413_declared_or_streamed(client: tuple) -> None:
    http, agg, _ = client
    big = {"events": [event(i) for i in range(60)]}  # well over 4096 bytes
    assert (await http.post("/v1/track", headers=AUTH, json=big)).status_code == 413

    async def stream() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 1000

    response = await http.post("/v1/track", headers=AUTH | {"Content-Type": "application/json"}, content=stream())
    assert response.status_code == 413
    assert agg.status()["pending_events"] == 0


async def test_unknown_path_is_404(client: tuple) -> None:
    http, _, _ = client
    assert (await http.get("/v2/anything", headers=AUTH)).status_code == 404


async def test_reports_are_pulled_in_order_with_a_cursor(client: tuple) -> None:
    """Each page continues after the cursor; the same cursor gives the same page; the end is stable."""
    http, agg, _ = client
    clock: FakeClock = agg._clock
    for w in range(5):
        agg.track(uuid.UUID(int=1), uuid.UUID(int=10 + w), allowed=w + 1, at=T0 + w * WINDOW)
    await agg.aflush()
    clock.past_window(T0 + 4 * WINDOW)
    await agg.acollect()
    first = (await http.get("/v1/reports", params={"limit": 2}, headers=AUTH)).json()
    again = (await http.get("/v1/reports", params={"limit": 2, "after": "0"}, headers=AUTH)).json()
    assert first == again
    pages, cursor = [first], first["next_cursor"]
    while True:
        page = (await http.get("/v1/reports", params={"after": cursor, "limit": 2}, headers=AUTH)).json()
        if not page["reports"]:
            assert page["next_cursor"] == cursor
            break
        pages.append(page)
        cursor = page["next_cursor"]
    pulled = [r for page in pages for r in page["reports"]]
    assert [r["allowed_requests"] for r in pulled] == [1, 2, 3, 4, 5]
    assert [r["id"] for r in pulled] == sorted({r["id"] for r in pulled})
    assert (await http.get("/v1/reports", params={"after": "-1"}, headers=AUTH)).status_code == 422
    assert GRACE  # windows were due only after their grace


async def test_a_pulled_report_says_how_many_replicas_it_misses_and_whether_it_is_complete(
        client: tuple, database_url: str) -> None:
    """Each report carries replicas_missing and complete (replicas_missing == 0), also in the OpenAPI schema."""
    http, _, _ = client
    complete = await insert_report(database_url, T0)
    incomplete = await insert_report(database_url, T0 + WINDOW, replicas_missing=2)
    page = (await http.get("/v1/reports", headers=AUTH)).json()
    assert [(complete, 0, True), (incomplete, 2, False)] == [
        (r["id"], r["replicas_missing"], r["complete"]) for r in page["reports"]]
    # No pseudonym_key here: the replica id is withheld (tests/test_http_hygiene.py shows it pseudonymized).
    expected = {"window_start": "2027-01-15T08:01:00Z", "replicas": 1, "generated_by": None}
    assert expected == {k: page["reports"][1][k] for k in expected}
    spec = (await http.get("/openapi.json")).json()
    report = spec["components"]["schemas"]["ReportOut"]
    assert {"replicas_missing", "complete"} <= set(report["required"])
    assert (report["properties"]["replicas_missing"]["type"], report["properties"]["complete"]["type"]) == (
        "integer", "boolean")
    assert spec["components"]["schemas"]["ReportPage"]["properties"]["reports"]["items"] == {
        "$ref": "#/components/schemas/ReportOut"}


def test_the_report_model_has_every_report_field_and_complete() -> None:
    """The API's report model follows Report: a field added there must be added here."""
    assert {*reports.FIELDS, "complete"} == set(api_models.ReportOut.model_fields)


async def test_metrics_count_incomplete_reports_of_every_replica(client: tuple, database_url: str) -> None:
    """/metrics counts the reports in the database that miss replicas, whoever wrote them, and shows the newest
    report's replicas_missing; reports written after a scrape are counted at the next one."""
    http, _, _ = client
    text = (await http.get("/metrics")).text
    assert "aggregator_reports_incomplete_total 0\n" in text
    assert "aggregator_last_report_replicas_missing" not in text  # no report yet
    await insert_report(database_url, T0, replicas_missing=2)
    await insert_report(database_url, T0 + WINDOW)
    text = (await http.get("/metrics")).text
    assert "# TYPE aggregator_reports_incomplete_total counter\naggregator_reports_incomplete_total 1\n" in text
    assert "# TYPE aggregator_last_report_replicas_missing gauge\naggregator_last_report_replicas_missing 0\n" in text
    await insert_report(database_url, T0 + 2 * WINDOW, replicas_missing=3)
    text = (await http.get("/metrics")).text
    assert "aggregator_reports_incomplete_total 2\n" in text
    assert "aggregator_last_report_replicas_missing 3\n" in text


async def test_report_tally_reads_the_stream_once_and_shows_only_whole_figures(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A long stream is read a few pages per scrape, onwards from the last report counted; the figures are
    shown once every report is counted, and a page read twice (scrapes at once) counts once."""
    monkeypatch.setattr(metrics.ReportTally, "PAGE", 2)
    monkeypatch.setattr(metrics.ReportTally, "PAGES_PER_SCRAPE", 2)
    stream = [report(n, missing) for n, missing in enumerate([0, 1, 0, 2, 0, 0, 4], start=1)]
    reads: list[int] = []

    async def read(after: int, limit: int) -> list[Report]:
        reads.append(after)
        return [r for r in stream if r.id > after][:limit]

    tally = metrics.ReportTally()
    await tally.catch_up(read)
    assert (reads, tally.caught_up) == ([0, 2], False)
    assert "aggregator_reports_incomplete_total" not in metrics.render({"pending_events": 0}, metrics.Counters(),
                                                                       tally=tally)
    tally.add(stream[:4])  # a concurrent scrape's page: already counted
    await tally.catch_up(read)
    assert (reads[2:], tally.caught_up, tally.incomplete, tally.last_replicas_missing) == ([4, 6], True, 3, 4)
    text = metrics.render({"pending_events": 0}, metrics.Counters(), tally=tally)
    assert "aggregator_reports_incomplete_total 3\n" in text and "aggregator_last_report_replicas_missing 4\n" in text


def report(number: int, replicas_missing: int) -> Report:
    start = dt.datetime.fromtimestamp(T0 + number * WINDOW, dt.timezone.utc)
    return Report(id=number, window_start=start, window_end=start + dt.timedelta(seconds=WINDOW), unique_workspaces=1,
                  unique_users=1, allowed_requests=1, denied_requests=0, replicas=1, replicas_missing=replicas_missing,
                  late_allowed_requests=0, late_denied_requests=0, late_unique_workspaces=0, late_unique_users=0,
                  generated_at=start, generated_by="c")


async def test_health_metrics_and_openapi(client: tuple) -> None:
    http, _, _ = client
    await http.post("/v1/track", headers=AUTH, json={"events": [event(0), event(1)]})
    await http.post("/v1/track", json={"events": [event(0)]})
    assert (await http.get("/healthz")).json() == {"status": "ok", "database": "ok"}
    text = (await http.get("/metrics")).text
    assert "aggregator_events_accepted_total 2\n" in text
    assert 'aggregator_requests_rejected_total{reason="unauthorized"} 1\n' in text
    assert "aggregator_unflushed_events 2\n" in text and "aggregator_flush_lag_seconds" in text
    spec = (await http.get("/openapi.json")).json()
    assert {"/v1/track", "/v1/reports", "/healthz", "/metrics"} <= set(spec["paths"])
    assert spec["components"]["schemas"]["TrackBatch"]["properties"]["events"]["items"] == {
        "$ref": "#/components/schemas/Event"}


async def test_metrics_show_the_outbox_by_writer_and_status(client: tuple) -> None:
    """Dead-lettered and pending items of every replica show in /metrics, per writer."""
    http, agg, _ = client
    db = agg._store
    await db.apply_batch(store.Batch(seq=1, windows={T0: store.BatchWindow([1], [1], 1, 0)}, events=1),
                         writer_id=uuid.uuid4(), replica_id="r", window=WINDOW, now=T0 + 1)
    await db.collect_window(T0, collector_id="c", now=T0 + 100, writers=["jsonl", "snowplow"])
    (item,) = await db.claim_outbox("snowplow", now=T0 + 100, limit=10, claimer="me", lease=60)
    await db.settle_outbox("me", [store.outbox.Settlement(item["id"], "dead", 3, T0, "400")], now=T0 + 101)
    text = (await http.get("/metrics")).text
    assert 'aggregator_outbox_items{writer="snowplow",status="dead"} 1\n' in text
    assert 'aggregator_outbox_items{writer="jsonl",status="pending"} 1\n' in text
    assert 'aggregator_outbox_oldest_pending_seconds{writer="jsonl"}' in text


async def test_open_api_without_tokens_only_on_loopback(database_url: str) -> None:
    settings = options.load_daemon_settings({"database_url": database_url, "window": f"{WINDOW}s"}, environ={})
    async with manual(database_url, FakeClock()) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        # Without tokens only a local Host is served (tests/test_http_hygiene.py).
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8714") as http:
            assert (await http.post("/v1/track", json={"events": [event(0)]})).status_code == 202
    with pytest.raises(exceptions.ConfigError, match="not a loopback address"):
        options.load_daemon_settings({"listen": "0.0.0.0:8714"}, environ={})


async def test_invalid_query_is_422_in_the_documented_shape(client: tuple) -> None:
    http, _, _ = client
    response = await http.get("/v1/reports", params={"limit": 0}, headers=AUTH)
    assert response.status_code == 422
    body = response.json()
    assert body["detail"].startswith("limit: ") and body["errors"][0]["loc"] == "limit"


async def test_openapi_declares_bearer_auth(client: tuple) -> None:
    http, _, _ = client
    spec = (await http.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/track"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


METERS = {"build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 2, "dimensions": ["project_id"]},
          "builds": {"aggregation": "count", "unit": "builds", "dimensions": ["project_id"]}}


@pytest.fixture
async def metered(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, FakeClock]]:
    settings = options.load_daemon_settings(
        {"database_url": database_url, "api_tokens": TOKEN, "window": f"{WINDOW}s", "max_events_per_request": "20",
         "pseudonym_allowlist": "project_id"}, environ={})  # project_id in clear, as a writer would send it
    clock = FakeClock()
    async with manual(database_url, clock, meters=METERS) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http, agg, clock


async def test_records_over_http_count_once_per_event_id(metered: tuple) -> None:
    """POST /v1/record accepts a batch; the same batch retried (same event ids) changes nothing."""
    http, agg, clock = metered
    batch = {"records": [
        {"meter": "build_seconds", "value": "12.34", "dimensions": {"project_id": "p1"}, "event_id": "job-1"},
        {"meter": "build_seconds", "value": 0.66, "dimensions": {"project_id": "p1"}, "event_id": "job-2"},
        {"meter": "builds", "dimensions": {"project_id": 7}, "event_id": "job-1"}]}
    for _ in range(2):
        response = await http.post("/v1/record", headers=AUTH, json=batch)
        assert (response.status_code, response.json()) == (202, {"accepted": 3})
        await agg.aflush()
    clock.past_window(T0)
    await agg.acollect()
    results = await asyncio.to_thread(agg.meter_results)
    assert [(r.meter, r.dimensions, r.quantity) for r in results] == [
        ("build_seconds", {"project_id": "p1"}, decimal.Decimal("13.00")), ("builds", {"project_id": "7"}, 1)]


async def test_a_bad_record_rejects_the_whole_batch_naming_it(metered: tuple) -> None:
    """One record with a missing dimension: 422 naming its index and the dimension; nothing is recorded.
    No token: 401."""
    http, agg, _ = metered
    response = await http.post("/v1/record", headers=AUTH, json={"records": [
        {"meter": "builds", "dimensions": {"project_id": "p1"}},
        {"meter": "build_seconds", "value": 5}]})
    assert response.status_code == 422
    assert "records[1]" in response.json()["detail"] and "project_id" in response.json()["detail"]
    response = await http.post("/v1/record", headers=AUTH, json={"records": [
        {"meter": "build_seconds", "value": -1, "dimensions": {"project_id": "p1"}}]})
    assert response.status_code == 422 and ">= 0" in response.json()["detail"]
    unauthorized = await http.post("/v1/record", json={"records": [{"meter": "builds",
                                                                    "dimensions": {"project_id": "p"}}]})
    assert unauthorized.status_code == 401
    assert agg._recorder.pending() == 0


async def test_meter_results_and_slis_are_pulled_page_by_page_of_the_report_stream(metered: tuple) -> None:
    """GET /v1/meters and /v1/experiences return what was written with the next `limit` reports, and a cursor
    that continues after them; a pull from the last cursor is empty."""
    from aggregator.client import new_correlation_id

    http, agg, clock = metered
    journey = new_correlation_id()
    for n in range(3):  # three windows, each with one record; the second also with a journey
        clock.t = T0 + WINDOW * n + 1
        agg.record("builds", dimensions={"project_id": f"p{n}"})
        if n == 1:
            agg.checkpoint_many([{"correlation_id": journey, "experience_id": "http_request", "checkpoint": "start",
                                  "type": "web", "feature_category": "ci", "urgency": "sync_fast",
                                  "client_timestamp": "2027-01-15T08:01:01Z"}])
        await agg.aflush()
    clock.past_window(T0 + 2 * WINDOW)
    await agg.acollect()
    first = (await http.get("/v1/meters", params={"limit": 2}, headers=AUTH)).json()
    assert [r["dimensions"]["project_id"] for r in first["results"]] == ["p0", "p1"]
    second = (await http.get("/v1/meters", params={"after": first["next_cursor"]}, headers=AUTH)).json()
    assert [(r["dimensions"]["project_id"], r["quantity"]) for r in second["results"]] == [("p2", 1)]
    assert (await http.get("/v1/meters", params={"after": second["next_cursor"]}, headers=AUTH)).json() == {
        "results": [], "next_cursor": second["next_cursor"]}
    slis = (await http.get("/v1/experiences", headers=AUTH)).json()
    assert [(s["experience_id"], s["started"]) for s in slis["slis"]] == [("http_request", 1)]
    assert (await http.get("/v1/meters")).status_code == 401
