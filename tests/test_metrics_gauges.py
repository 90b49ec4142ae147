"""/metrics shows the last complete report's figures as gauges, and its meter groups bounded and labelled only
with the dimensions the allowlist shows in clear; on SQLite and PostgreSQL, and the tally's reads without a
database."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import AsyncIterator, Sequence

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator import api, meters, metrics, options
from aggregator.reports import Report
from aggregator.runtime import Aggregator
from tests.helpers import T0, WINDOW, FakeClock, manual
from tests.test_export import insert_report

TOKEN = "gauges-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "pseudonym-key-for-tests-0123456789"
METERS = {"build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 1, "max_groups": 3,
                            "dimensions": ["project_id", "region"]}}
LAST = "aggregator_last_complete_report_"


async def serve(url: str, **flags: str) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, FakeClock]]:
    settings = options.load_daemon_settings({"database_url": url, "api_tokens": TOKEN, "window": f"{WINDOW}s",
                                            **flags}, environ={})
    clock = FakeClock()
    delivery = settings.aggregator.delivery
    async with manual(url, clock, meters=METERS, pseudonym_key=delivery.pseudonym_key,
                      pseudonym_allowlist=delivery.pseudonym_allowlist) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            yield http, agg, clock


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Aggregator, FakeClock]]:
    async for one in serve(database_url):
        yield one


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of one scrape, parsed by Prometheus' own parser: (name, sorted labels) -> value."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def figures(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[str, float]:
    """The unlabelled last-complete-report gauges of a scrape, by the name after the prefix."""
    return {name.removeprefix(LAST): value for (name, labels), value in samples.items()
            if name.startswith(LAST) and not labels}


async def test_the_last_complete_reports_figures_are_gauges(served: tuple, database_url: str) -> None:
    """Before any report there are none; after one, its users, workspaces, allowed and denied and its window's
    start and end in full epoch seconds; an incomplete report after it changes nothing; a later complete one
    takes its place."""
    http, agg, clock = served
    assert figures(await scrape(http)) == {}
    for n in range(3):
        agg.track(uuid.UUID(int=1 + n % 2), uuid.UUID(int=10 + n), allowed=2, denied=n, at=T0 + 1)
    await agg.aflush()
    clock.past_window(T0)
    await agg.acollect()
    first = {"unique_users": 3, "unique_workspaces": 2, "allowed_requests": 6, "denied_requests": 3,
             "window_start_seconds": T0, "window_end_seconds": T0 + WINDOW}
    assert first == figures(await scrape(http))
    await insert_report(database_url, T0 + WINDOW, replicas_missing=2, unique_users=9)
    samples = await scrape(http)
    assert (first, 2) == (figures(samples), samples[("aggregator_last_report_replicas_missing", ())])
    await insert_report(database_url, T0 + 2 * WINDOW, replicas_missing=0, unique_users=4, unique_workspaces=1,
                        allowed_requests=7)
    assert figures(await scrape(http)) == {
        "unique_users": 4, "unique_workspaces": 1, "allowed_requests": 7, "denied_requests": 0,
        "window_start_seconds": T0 + 2 * WINDOW, "window_end_seconds": T0 + 3 * WINDOW}


async def _report_with_groups(http: httpx.AsyncClient, agg: Aggregator, clock: FakeClock) -> None:
    """One window of build_seconds: p1 5.0, p2 3.0, p3 2.0 (max_groups 3), then p4 1.5 and p5 7.0 in __overflow__."""
    for batch in ([("p1", "5"), ("p2", "3"), ("p3", "2")], [("p4", "1.5"), ("p5", "7")]):
        response = await http.post("/v1/record", headers=AUTH, json={"records": [
            {"meter": "build_seconds", "value": value, "dimensions": {"project_id": project, "region": "eu"}}
            for project, value in batch]})
        assert response.status_code == 202, response.text
        await agg.aflush()
    clock.past_window(T0)
    await agg.acollect()


@pytest.mark.parametrize("key", [KEY, None], ids=["key", "no-key"])
async def test_meter_groups_are_bounded_and_labelled_only_with_allowlisted_dimensions(
        database_url: str, monkeypatch: pytest.MonkeyPatch, key: str | None) -> None:
    """With two groups per meter: the two largest by rank, labelled with the dimensions the allowlist shows in
    clear (region) and never with the others, hashed or not (/metrics is open: a hash would still tell one
    project's usage from another's); and __overflow__ with the third group and the overflow group summed."""
    monkeypatch.setattr(metrics.ReportTally, "GROUPS_PER_METER", 2)
    flags = {"pseudonym_allowlist": "metadata.dimensions.region"} | ({"pseudonym_key": key} if key else {})
    async for http, agg, clock in serve(database_url, **flags):
        await _report_with_groups(http, agg, clock)
        pulled = (await http.get("/v1/meters", headers=AUTH)).json()["results"]
        regions = {r["quantity"]: r["dimensions"]["region"] for r in pulled if not r["overflow"]}
        expected = {
            (("dimension_region", regions[5]), ("group", "1"), ("meter", "build_seconds")): 5.0,
            (("dimension_region", regions[3]), ("group", "2"), ("meter", "build_seconds")): 3.0,
            (("group", "__overflow__"), ("meter", "build_seconds")): 10.5}
        samples = await scrape(http)
        assert expected == {labels: value for (name, labels), value in samples.items()
                            if name == f"{LAST}meter_quantity"}
        hashed = [r["dimensions"]["project_id"] for r in pulled if not r["overflow"]]
        assert (regions[5], all(hashed) if key else any(hashed)) == ("eu", bool(key))


def report(number: int, replicas_missing: int = 0) -> Report:
    start = dt.datetime.fromtimestamp(T0 + number * WINDOW, dt.timezone.utc)
    return Report(id=number, window_start=start, window_end=start + dt.timedelta(seconds=WINDOW), unique_workspaces=1,
                  unique_users=2, allowed_requests=3, denied_requests=4, replicas=1, replicas_missing=replicas_missing,
                  late_allowed_requests=0, late_denied_requests=0, late_unique_workspaces=0, late_unique_users=0,
                  generated_at=start, generated_by="c")


def result(report_id: int, quantity: str, dimensions: dict[str, str] | None = None, *, late: bool = False
           ) -> meters.Result:
    start = dt.datetime.fromtimestamp(T0, dt.timezone.utc)
    return meters.Result(window_start=start, window_end=start + dt.timedelta(seconds=WINDOW), meter="m",
                         dimensions=dimensions or {}, overflow=dimensions is None, late=late,
                         quantity=decimal.Decimal(quantity), unit="u", records=1, report_id=report_id)


async def test_meter_groups_are_read_once_per_new_complete_report() -> None:
    """Scrapes read the meter results of the last complete report once, not on every scrape, and again only
    when a newer complete report comes; an incomplete report does not make one."""
    stream = [report(1)]
    asked: list[list[int]] = []

    async def read(after: int, limit: int) -> list[Report]:
        return [r for r in stream if r.id > after][:limit]

    async def results(report_ids: list[int]) -> Sequence[meters.Result]:
        asked.append(report_ids)
        return [result(report_ids[0], "1", {"k": "v"})]

    tally = metrics.ReportTally()
    for _ in range(3):
        await tally.catch_up(read, results)
    stream.append(report(2, replicas_missing=1))
    await tally.catch_up(read, results)
    stream.append(report(3))
    await tally.catch_up(read, results)
    await tally.catch_up(read, results)
    assert (asked, tally.groups_of) == ([[1], [3]], 3)


async def test_groups_read_for_an_older_report_are_not_kept_when_a_newer_one_came_meanwhile() -> None:
    """Two scrapes at once: groups read for report 1 while the other scrape moved on to report 2 are dropped,
    so the gauges never pair one report's window with another's groups."""
    tally = metrics.ReportTally()

    async def read(after: int, limit: int) -> list[Report]:
        return [report(1)] if after < 1 else []

    async def results(report_ids: list[int]) -> Sequence[meters.Result]:
        tally.add([report(2)])  # the concurrent scrape's page
        return [result(1, "1", {"k": "v"})]

    await tally.catch_up(read, results)
    text = metrics.render({"pending_events": 0}, metrics.Counters(), tally=tally)
    shown = (tally.groups_of, tally.last_complete.id if tally.last_complete else None, f"{LAST}meter_quantity" in text)
    assert shown == (None, 2, False)


def test_late_data_is_left_out_and_ties_are_ranked_by_the_shown_values() -> None:
    """A group's late data (of earlier windows) is not the window's own; equal quantities rank by the values
    as shown (pseudonyms), not by the raw identifiers; withheld values leave their label out."""
    found = [result(1, "2", {"project_id": "a", "region": "x"}), result(1, "2", {"project_id": "b", "region": "y"}),
             result(1, "9", {"project_id": "c", "region": "z"}, late=True), result(1, "1")]
    shown = {"a": "hash-2", "b": "hash-1"}

    def pseudonymize(dimensions: dict[str, str]) -> dict[str, str | None]:
        return {"project_id": shown.get(dimensions["project_id"]), "region": None}

    assert [metrics.GroupFigure("m", "1", (("project_id", "hash-1"),), 2.0),
            metrics.GroupFigure("m", "2", (("project_id", "hash-2"),), 2.0),
            metrics.GroupFigure("m", "__overflow__", (), 1.0)] == metrics.meter_groups(found, pseudonymize, 5)


async def test_the_exposition_keeps_whole_numbers_whole_and_escapes_label_values() -> None:
    """Epoch times and large counts are printed in full (not 1.8e+09), and a dimension value with a quote,
    a backslash and a line feed comes back intact through Prometheus' parser."""
    odd = 'a"b\\c\nd'

    async def read(after: int, limit: int) -> list[Report]:
        return [report(1)] if after < 1 else []

    async def results(report_ids: list[int]) -> Sequence[meters.Result]:
        return [result(1, "123456789.5", {"project_id": odd})]

    tally = metrics.ReportTally()
    await tally.catch_up(read, results, shown=dict)  # in clear, as an allowlisted dimension shows
    counters = metrics.Counters(events_accepted=123_456_789)
    text = metrics.render({"pending_events": 0}, counters, tally=tally)
    assert f"{LAST}window_end_seconds {T0 + 2 * WINDOW}\n" in text
    assert "aggregator_events_accepted_total 123456789\n" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    key = (f"{LAST}meter_quantity", (("dimension_project_id", odd), ("group", "1"), ("meter", "m")))
    assert samples[key] == 123456789.5
