"""The dashboard (/ui): SVG drawing (pure, property-tested), the panels drawn from reports, and the chart
endpoints in-process on SQLite and PostgreSQL, which need the pull API's token and show its numbers."""

from __future__ import annotations

import datetime as dt
import decimal
import html.parser
import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import hypothesis
import pytest
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from aggregator import api, api_models, dashboard, meters, metrics, options, privacy
from aggregator.client import new_correlation_id
from aggregator.dashboard import charts, svg
from aggregator.reports import Report, iso_utc
from aggregator.runtime import Aggregator
from tests.helpers import T0, WINDOW, FakeClock, manual
from tests.test_export import insert_report

TOKEN = "dashboard-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "pseudonym-key-for-the-dashboard-0123"
SVG = "{http://www.w3.org/2000/svg}"
CHARTS = ("requests", "uniques", "meters", "experiences")
REGION = '<eu & "west">\'s'  # an allowlisted dimension value, shown in clear: every character must be escaped
METERS = {"build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 2,
                            "dimensions": ["project_id", "region"]}}
REPORT_SERIES = ("allowed_requests", "denied_requests", "late_allowed_requests", "late_denied_requests",
                 "unique_workspaces", "unique_users", "late_unique_workspaces", "late_unique_users")
SLI_SERIES = ("succeeded", "failed", "timed_out", "duration_p50_s", "duration_p90_s", "duration_p99_s")
PROPERTY = hypothesis.settings(max_examples=150, derandomize=True, database=None, deadline=None, print_blob=False)
# Any character at all: controls, lone surrogates, U+FFFE; what XML cannot carry becomes U+FFFD.
ANY_TEXT = st.text(st.characters(), max_size=40)
NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@pytest.fixture(scope="module", autouse=True)
def hypothesis_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hypothesis caches what it scans in a `.hypothesis` directory even with no example database: keep it in tmp."""
    set_hypothesis_home_dir(tmp_path_factory.mktemp("hypothesis"))
    yield
    set_hypothesis_home_dir(None)


def clean(given: str) -> str:
    """``given`` as an XML parser reads it back from our SVG: what XML cannot carry is U+FFFD."""
    return NOT_XML.sub("\ufffd", given)


def window(n: int = 0, replicas_missing: int = 0) -> svg.Window:
    start = dt.datetime.fromtimestamp(T0 + n * WINDOW, dt.timezone.utc)
    return svg.Window(start, start + dt.timedelta(seconds=WINDOW), replicas_missing)


def marks(document: str | ET.Element) -> list[ET.Element]:
    """Every bar segment and point: the elements that carry a value."""
    root = ET.fromstring(document) if isinstance(document, str) else document
    return [e for e in root.iter() if e.get("data-value") is not None]


def title(element: ET.Element) -> str:
    found = element.find(f"{SVG}title")
    assert found is not None and found.text is not None
    return found.text


# ---- svg.py: pure drawing ---------------------------------------------------------------------------------


@PROPERTY
@hypothesis.given(name=ANY_TEXT, label=ANY_TEXT, unit=ANY_TEXT,
                  dimensions=st.dictionaries(ANY_TEXT, st.one_of(st.none(), ANY_TEXT), max_size=3))
def test_any_text_is_escaped_and_the_figure_parses_as_xml(name: str, label: str, unit: str,
                                                          dimensions: dict[str, str | None]) -> None:
    """Whatever a meter name, label, unit or dimension holds, the SVG parses; titles show the text as given
    (characters XML cannot carry shown as U+FFFD) and data-dimensions round-trips exactly."""
    series = svg.Series(name, label, [3], "#000000", data=[("meter", name), ("dimensions", json.dumps(dimensions))])
    document = svg.figure(name, [svg.Panel(name, name, unit, [window()], bars=[series], subtitle=label)])
    (mark,) = marks(document)
    unit_shown = f" {clean(unit)}" if unit else ""
    expected = (f"{clean(label)}: 3{unit_shown}, window 2027-01-15 08:00:00 to 08:01:00 UTC", clean(name), dimensions)
    assert expected == (title(mark), mark.get("data-meter"), json.loads(mark.get("data-dimensions", "")))


VALUES = st.one_of(st.integers(min_value=0, max_value=2**63 - 1),
                   st.decimals(min_value=0, max_value=10**30, allow_nan=False, allow_infinity=False, places=9),
                   st.floats(min_value=0, allow_nan=False, allow_infinity=False))


@PROPERTY
@hypothesis.given(values=st.lists(st.one_of(st.none(), VALUES), min_size=1, max_size=6))
def test_each_value_is_in_its_title_and_data_exactly(values: list[Any]) -> None:
    """Each bar and point carries its exact value (an int, a decimal as written, a float's repr) in its title
    and in data-value, which parses back to the same number; None draws nothing."""
    windows = [window(n) for n in range(len(values))]
    panel = svg.Panel("p", "p", "s", windows, bars=[svg.Series("v", "value", values, "#000000")],
                      lines=[svg.Series("w", "line", values, "#000000")])
    given = [v for v in values if v is not None]
    expected = sorted((key, svg.number(v), f"{label}: {svg.number(v)} s") for key, label in
                      (("v", "value"), ("w", "line")) for v in given)
    got = sorted((e.get("data-series"), e.get("data-value"), title(e).split(", window")[0])
                 for e in marks(svg.figure("t", [panel])))
    assert expected == got
    assert given == [type(v)(svg.number(v)) for v in given]


@pytest.mark.parametrize(("top", "expected"), [(0, (1.0, 1.0)), (68, (80.0, 20.0)), (7, (8.0, 2.0)),
                                                (1, (1.0, 0.5)), (0.15, (0.15, 0.05)), (1000, (1000.0, 500.0)),
                                                (math.inf, (1.0, 1.0))])
def test_the_axis_is_round_and_reaches_the_top(top: float, expected: tuple[float, float]) -> None:
    """The axis ends at a round number (1, 2 or 5 times a power of ten per tick) at or above the top value."""
    assert expected == pytest.approx(svg.scale(top))


@PROPERTY
@hypothesis.given(top=st.floats(min_value=1e-12, max_value=1e18))
def test_the_axis_always_covers_the_top_in_four_or_five_ticks(top: float) -> None:
    """For any positive top, the axis reaches it (to rounding) in at most 5 steps."""
    axis_max, step = svg.scale(top)
    assert (axis_max >= top * (1 - 1e-9), 1 <= round(axis_max / step) <= 5) == (True, True)


def test_bars_stack_in_a_window_and_zero_still_carries_its_number() -> None:
    """Segments of one stack pile up (each starts where the one below ends); a zero is a mark of height 0."""
    panel = svg.Panel("p", "p", "n", [window()], bars=[svg.Series("a", "a", [30], "#000000"),
                                                       svg.Series("b", "b", [0], "#000000"),
                                                       svg.Series("c", "c", [10], "#000000")])
    a, b, c = marks(svg.figure("t", [panel]))
    bottom = float(a.get("y", "")) + float(a.get("height", ""))
    expected = [("a", "30", bottom), ("b", "0", float(a.get("y", ""))), ("c", "10", float(a.get("y", "")))]
    got = [(e.get("data-series"), e.get("data-value"), float(e.get("y", "")) + float(e.get("height", "")))
           for e in (a, b, c)]
    assert expected == got
    assert (float(a.get("height", "")), float(c.get("height", ""))) == pytest.approx((120.0, 40.0))


def test_an_incomplete_window_is_marked_with_its_missing_replicas() -> None:
    """A window with replicas_missing says so: data attributes on its column and a marker with a title."""
    panel = svg.Panel("p", "p", "n", [window(0), window(1, replicas_missing=2)],
                      bars=[svg.Series("a", "a", [1, 2], "#000000")])
    root = ET.fromstring(svg.figure("t", [panel]))
    columns = [(g.get("data-replicas-missing"), g.get("data-complete")) for g in root.iter(f"{SVG}g")
               if g.get("class") == "window"]
    (marker,) = [e for e in root.iter(f"{SVG}path") if e.get("class") == "incomplete"]
    assert columns == [("0", "true"), ("2", "false")]
    assert title(marker).startswith("incomplete: 2 replicas missing, window 2027-01-15 08:01:00 to 08:02:00 UTC")


def test_a_line_breaks_where_a_window_has_no_value() -> None:
    """Points are joined within runs of values; a None leaves a gap (two polylines here, none for a lone point)."""
    panel = svg.Panel("p", "p", "s", [window(n) for n in range(6)],
                      lines=[svg.Series("p50", "p50", [1.0, 2.0, None, 3.0, 4.0, None], "#000000")])
    root = ET.fromstring(svg.figure("t", [panel]))
    assert [len(e.get("points", "").split()) for e in root.iter(f"{SVG}polyline")] == [2, 2]


def test_without_panels_the_figure_says_so() -> None:
    """No panels: the empty text; a panel without windows says there are no reports; a note shows on top."""
    empty = ET.fromstring(svg.figure("t", [], empty="no meter results in this range", note="narrow it"))
    no_windows = ET.fromstring(svg.figure("t", [svg.Panel("p", "p", "n", [])]))
    texts = [[e.text for e in root.iter(f"{SVG}text") if e.get("class") in ("empty", "note")]
             for root in (empty, no_windows)]
    assert texts == [["narrow it", "no meter results in this range"], ["no reports in this range"]]


# ---- charts.py: what is drawn from reports, meter results and SLIs ------------------------------------------


def report(n: int, **fields: int) -> Report:
    start = dt.datetime.fromtimestamp(T0 + n * WINDOW, dt.timezone.utc)
    counts = {name: 0 for name in REPORT_SERIES} | {"replicas_missing": 0} | fields
    return Report(id=n + 1, window_start=start, window_end=start + dt.timedelta(seconds=WINDOW), replicas=1,
                  generated_at=start, generated_by="c", **counts)


def test_request_and_unique_panels_carry_every_count_of_every_report() -> None:
    """Each report's counts, late ones too, are a mark in its window; uniques stand side by side."""
    found = [report(0, allowed_requests=5, denied_requests=2, unique_users=3, unique_workspaces=1),
             report(1, late_allowed_requests=4, late_unique_users=1, replicas_missing=1)]
    drawn = [*charts.requests(found), *charts.uniques(found)]
    got = {(e.get("data-series"), e.get("data-window-start")): int(e.get("data-value", ""))
           for e in marks(svg.figure("t", drawn))}
    expected = {(name, iso_utc(r.window_start)): getattr(r, name) for r in found for name in REPORT_SERIES}
    assert expected == got
    assert drawn[0].subtitle == "2 windows, 1 incomplete; allowed 5, denied 2; late allowed 4, late denied 0"


def test_meter_dimensions_are_shown_as_the_pull_api_shows_them() -> None:
    """Hashed under the key, in clear on the allowlist: data-dimensions equals /v1/meters' dimensions."""
    pseudonyms = privacy.Pseudonymizer(KEY, ["metadata.dimensions.region"])
    result = meters.Result(window_start=report(0).window_start, window_end=report(0).window_end,
                           meter="build_seconds", dimensions={"project_id": "p1", "region": REGION}, overflow=False,
                           late=False, quantity=decimal.Decimal("12.50"), unit="seconds", records=2, report_id=1)
    (panel,) = charts.meter_panels([report(0)], [result], pseudonyms)
    (mark,) = marks(svg.figure("t", [panel]))
    pulled = api_models.MeterResultOut.of(result, pseudonyms)
    assert (pulled.dimensions, pulled.quantity, "false") == (
        json.loads(mark.get("data-dimensions", "")), float(mark.get("data-value", "")), mark.get("data-late"))
    assert pulled.dimensions["project_id"] != "p1" and REGION in title(mark)


# ---- the endpoints, in-process on both databases --------------------------------------------------------


class Served:
    def __init__(self, http: httpx.AsyncClient, agg: Aggregator, clock: FakeClock, counters: metrics.Counters) -> None:
        self.http, self.agg, self.clock, self.counters = http, agg, clock, counters


async def serve(url: str, base_url: str = "http://aggregator.internal", **flags: str) -> AsyncIterator[Served]:
    settings = options.load_daemon_settings({"database_url": url, "window": f"{WINDOW}s", "listen": "127.0.0.1:8714",
                                            **flags}, environ={})
    clock, counters = FakeClock(), metrics.Counters()
    async with manual(url, clock, meters=METERS, pseudonym_key=settings.aggregator.delivery.pseudonym_key) as agg:
        app = api.build_app(agg, settings, counters)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as http:
            yield Served(http, agg, clock, counters)


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[Served]:
    """With a token and a pseudonym key; region on the allowlist."""
    async for one in serve(database_url, api_tokens=TOKEN, pseudonym_key=KEY,
                           pseudonym_allowlist="metadata.dimensions.region"):
        yield one


def at(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat().replace("+00:00", "Z")


async def seed(one: Served, database_url: str) -> None:
    """Three windows of traffic, meters and journeys; a late event counted in the fourth; an incomplete sixth."""
    agg, clock = one.agg, one.clock
    for n in range(3):
        clock.t = T0 + n * WINDOW + 1
        for i in range(n + 2):
            agg.track(f"00000000-0000-0000-0000-{i % 2 + 1:012d}", f"00000000-0000-0000-0000-{100 + i:012d}",
                      allowed=i + 1, denied=i % 2)
        agg.record("build_seconds", f"{n}.25", {"project_id": "p1", "region": REGION})
        agg.record("build_seconds", 2, {"project_id": f"p{n}", "region": "us"})
        journeys = [new_correlation_id() for _ in range(n + 1)]
        agg.checkpoint_many([{"correlation_id": j, "experience_id": "http_request", "checkpoint": point,
                              "type": "web", "feature_category": "ci", "urgency": "sync_fast",
                              "client_timestamp": at(clock.t + (0.25 * (k + 1) if point == "end" else 0)),
                              **({"outcome": "failure" if k == 0 and n == 2 else "success"} if point == "end"
                                 else {})}
                             for k, j in enumerate(journeys) for point in ("start", "end")])
        await agg.aflush()
    clock.past_window(T0 + 2 * WINDOW)
    await agg.acollect()
    clock.t = T0 + 3 * WINDOW + 1
    agg.track("00000000-0000-0000-0000-000000000009", "00000000-0000-0000-0000-000000000999", allowed=7,
              at=T0 + 1)  # of the first window, reported already: late in the fourth
    agg.record("build_seconds", "1.5", {"project_id": "p1", "region": REGION}, at=T0 + 1)
    await agg.aflush()
    clock.past_window(T0 + 3 * WINDOW)
    await agg.acollect()
    await insert_report(database_url, T0 + 5 * WINDOW, replicas_missing=2, allowed_requests=3)


async def pull(http: httpx.AsyncClient, path: str, name: str) -> list[dict[str, Any]]:
    response = await http.get(path, headers=AUTH, params={"limit": 1000})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()[name]
    return found


async def chart(http: httpx.AsyncClient, name: str, **query: object) -> ET.Element:
    response = await http.get(f"/ui/charts/{name}.svg", headers=AUTH, params=query)
    assert (response.status_code, response.headers["content-type"]) == (200, "image/svg+xml; charset=utf-8")
    return ET.fromstring(response.text)


async def test_charts_need_the_token(served: Served) -> None:
    """Without a token, or with a wrong one, every chart is a 401 Problem asking for a bearer token."""
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}):
        for name in CHARTS:
            response = await served.http.get(f"/ui/charts/{name}.svg", headers=headers)
            expected = (401, "Bearer", {"detail": "missing or wrong bearer token"})
            assert expected == (response.status_code, response.headers.get("www-authenticate"), response.json())
    assert served.counters.rejected["unauthorized"] == 8


async def test_charts_show_exactly_the_pull_apis_numbers(served: Served, database_url: str) -> None:
    """Every report count (late ones too) and each window's replicas_missing, every meter quantity per dimension
    group (pseudonymized as /v1/meters shows it) and every SLI are a mark with the pulled number."""
    await seed(served, database_url)
    http = served.http
    pulled = await pull(http, "/v1/reports", "reports")
    requests, uniques = await chart(http, "requests", since=at(T0)), await chart(http, "uniques", since=at(T0))
    expected_reports = {(name, r["window_start"]): r[name] for r in pulled for name in REPORT_SERIES}
    drawn = {(e.get("data-series"), e.get("data-window-start")): int(e.get("data-value", ""))
             for e in marks(requests) + marks(uniques)}
    assert expected_reports == drawn
    columns = {g.get("data-window-start"): int(g.get("data-replicas-missing", "")) for g in requests.iter(f"{SVG}g")
               if g.get("class") == "window"}
    assert {r["window_start"]: r["replicas_missing"] for r in pulled} == columns
    assert any(r["late_allowed_requests"] for r in pulled) and any(r["replicas_missing"] for r in pulled)

    results = await pull(http, "/v1/meters", "results")
    expected_meters = {(r["meter"], json.dumps(r["dimensions"]), r["late"], r["window_start"]): r["quantity"]
                       for r in results}
    drawn_meters = {(e.get("data-meter"), e.get("data-dimensions"), e.get("data-late") == "true",
                     e.get("data-window-start")): float(e.get("data-value", ""))
                    for e in marks(await chart(http, "meters", since=at(T0)))}
    assert expected_meters == drawn_meters
    assert any(late for _, _, late, _ in expected_meters) and len({d for _, d, _, _ in expected_meters}) == 4

    slis = await pull(http, "/v1/experiences", "slis")
    expected_slis = {(s["experience_id"], s["urgency"], name, s["window_start"]): s[name] for s in slis
                     for name in SLI_SERIES if s[name] is not None}
    drawn_slis = {(e.get("data-experience"), e.get("data-urgency"), e.get("data-series"),
                   e.get("data-window-start")): float(e.get("data-value", ""))
                  for e in marks(await chart(http, "experiences", since=at(T0)))}
    assert expected_slis == drawn_slis
    assert {1, 2, 3} == {s["succeeded"] + s["failed"] for s in slis}


async def test_dimension_values_are_escaped_in_the_chart(served: Served, database_url: str) -> None:
    """An allowlisted dimension value full of markup is text in the SVG: escaped in the bytes, exact when parsed."""
    await seed(served, database_url)
    response = await served.http.get("/ui/charts/meters.svg", headers=AUTH, params={"since": at(T0)})
    titles = [e.text for e in ET.fromstring(response.text).iter(f"{SVG}title") if e.text and REGION in e.text]
    escaped = "&lt;eu &amp; &quot;west&quot;&gt;&#x27;s"
    assert ("<eu" in response.text, escaped in response.text, len(titles) >= 2) == (False, True, True)


async def test_the_range_is_since_until_or_the_last_windows(served: Served, database_url: str) -> None:
    """since/until choose windows by start; `last` counts back from the window open now; the default is 48."""
    await seed(served, database_url)  # reports of T0 .. T0+3W, and T0+5W; the clock is in the window T0+4W

    async def starts(**query: object) -> list[str | None]:
        root = await chart(served.http, "requests", **query)
        return [g.get("data-window-start") for g in root.iter(f"{SVG}g") if g.get("class") == "window"]

    expected = [[at(T0 + WINDOW), at(T0 + 2 * WINDOW)], [at(T0 + n * WINDOW) for n in (3, 5)],
                [at(T0 + n * WINDOW) for n in (2, 3, 5)], [at(T0 + n * WINDOW) for n in (0, 1, 2, 3, 5)], []]
    assert expected == [await starts(since=at(T0 + WINDOW), until=at(T0 + 3 * WINDOW)), await starts(last=1),
                        await starts(last=2), await starts(), await starts(since="2099-01-01T00:00:00+01:00")]


@pytest.mark.parametrize("query", [{"last": 0}, {"last": dashboard.MAX_WINDOWS + 1}, {"since": "2027-01-15T08:00:00"},
                                   {"until": "yesterday"}])
async def test_a_bad_range_is_a_422_problem(served: Served, query: dict[str, object]) -> None:
    """A range out of bounds, or a time without a UTC offset, is a 422 in the API's one shape, naming the parameter."""
    response = await served.http.get("/ui/charts/requests.svg", headers=AUTH, params=query)
    assert (422, list(query)) == (response.status_code, [e["loc"] for e in response.json()["errors"]])


async def test_an_empty_range_says_so(served: Served) -> None:
    """No reports yet: each chart is a figure saying what it would show, not an error."""
    texts = [[e.text for e in (await chart(served.http, name)).iter(f"{SVG}text")] for name in CHARTS]
    assert [[charts.EMPTY[name]] for name in CHARTS] == texts


class _Page(html.parser.HTMLParser):
    """What the CSP forbids, if the page had it: inline scripts, style attributes, event handler attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []
        self.links: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self._in_script = tag == "script"
        if tag == "script":
            self.scripts.append(found)
        self.inline += [f"{tag}[{name}]" for name in found if name == "style" or name.startswith("on")]
        self.links += [value for name, value in attrs if name in ("src", "href") and value]

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(f"script: {data.strip()[:40]}")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


async def test_the_page_and_its_files_are_open_and_the_page_allows_no_inline_script(served: Served) -> None:
    """/ui redirects to /ui/; the page, its script and stylesheet need no token; the page's CSP is default-src
    'self' without 'unsafe-inline', and it has no inline script, style or handler; every file it names is served."""
    http = served.http
    redirect = await http.get("/ui")
    page = await http.get("/ui/")
    assert (redirect.status_code, redirect.headers["location"]) == (307, "ui/")
    assert (page.status_code, page.headers["content-type"]) == (200, "text/html; charset=utf-8")
    policy = page.headers["content-security-policy"]
    assert ("default-src 'self'" in policy, "unsafe" in policy,
                                        page.headers["x-content-type-options"]) == (True, False, "nosniff")
    parsed = _Page()
    parsed.feed(page.text)
    assert (parsed.inline, parsed.scripts) == ([], [{"src": "dashboard.js", "defer": None}])
    types = {link: (await http.get(f"/ui/{link}")).headers["content-type"] for link in parsed.links}
    assert types == {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8",
            "favicon.svg": "image/svg+xml"}
    chart_policy = (await http.get("/ui/charts/requests.svg", headers=AUTH)).headers["content-security-policy"]
    assert chart_policy == "default-src 'none'; frame-ancestors 'none'"
    assert served.counters.rejected["unauthorized"] == 0


def test_every_file_of_the_page_ships_in_the_package() -> None:
    """The page, script, stylesheet and icon are package data (hatchling ships every file under the package)."""
    assert all(dashboard.static(name) for name in dashboard.FILES)
    assert {"index.html", "dashboard.js", "dashboard.css", "favicon.svg"} == set(dashboard.FILES)


async def test_the_guard_covers_the_dashboard(served: Served, sqlite_url: str) -> None:
    """A request with an Origin is refused (403) on the page and the charts; without tokens a foreign Host gets
    421, and a local one sees the charts with no token at all."""
    for path in ("/ui/", "/ui/charts/requests.svg"):
        response = await served.http.get(path, headers={**AUTH, "Origin": "https://evil.example"})
        assert response.status_code == 403
    async for local in serve(sqlite_url, "http://127.0.0.1:8714"):
        foreign = await local.http.get("/ui/charts/requests.svg", headers={"Host": "evil.example"})
        page = await local.http.get("/ui/", headers={"Host": "evil.example:8714"})
        open_chart = await local.http.get("/ui/charts/requests.svg")
        assert (foreign.status_code, page.status_code, open_chart.status_code) == (421, 421, 200)


async def test_the_dashboard_is_not_in_the_openapi_document(served: Served) -> None:
    """The page is for people and the charts picture the pull API: no /ui path in /openapi.json."""
    paths = (await served.http.get("/openapi.json")).json()["paths"]
    assert [path for path in paths if path.startswith("/ui")] == []
