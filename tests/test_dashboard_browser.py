"""The dashboard in a real browser: `aggregator run` serves known traffic, headless Chromium opens /ui, takes the
token as a person types it, and the charts in its DOM show exactly what the pull API returns.

Chromium and its driver are Debian's packages `chromium` and `chromium-driver`, driven by selenium (the WebDriver
standard's Python client). Without them the tests skip, naming the packages; under ``CI=true`` they fail. The
screenshot of the filled page is saved to ``tests/artifacts/dashboard.png``.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests import helpers
from tests.test_daemon import AUTH, TOKEN, Daemon
from tests.test_dashboard import REPORT_SERIES, SLI_SERIES

ARTIFACTS = Path(__file__).parent / "artifacts"
PACKAGES = {"chromium": "chromium", "chromedriver": "chromium-driver"}  # executable: the Debian package shipping it
WINDOW = 2  # seconds: windows close while the test runs
METERS = {"build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 2,
                            "dimensions": ["project_id", "region"]}}
REGION = '<b>"eu"&\'x'  # allowlisted, so shown in clear: markup that must stay text
# Everything the page's charts say, one entry per mark: read in one call rather than element by element.
READ_MARKS = """
return Array.from(document.querySelectorAll("[data-chart] [data-value]")).map((e) => Object.assign(
  {chart: e.closest("[data-chart]").dataset.chart, title: e.querySelector("title").textContent}, e.dataset));
"""
READ_WINDOWS = """
return Array.from(document.querySelectorAll("[data-chart=requests] g.window")).map((g) => [
  g.dataset.windowStart, Number(g.dataset.replicasMissing)]);
"""


def executables() -> dict[str, str]:
    """chromium and chromedriver; a skip naming the Debian packages when one is missing, a failure under CI."""
    return helpers.debian_executables(PACKAGES)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a profile of its own; as root it needs --no-sandbox."""
    paths = executables()
    options = webdriver.ChromeOptions()
    options.binary_location = paths["chromium"]
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=paths["chromedriver"]))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.close()


def start(tmp_path: Path, database_url: str, daemons: list[Daemon], env: dict[str, str]) -> Daemon:
    daemon = Daemon(tmp_path, "--database-url", database_url, "--window", f"{WINDOW}s", "--flush-interval", "0.3s",
                    "--grace", "0.5s", env={"AGGREGATOR_METERS": json.dumps(METERS)} | env)
    daemons.append(daemon)
    daemon.wait_for("READY=1")
    return daemon


def state(driver: webdriver.Chrome, expected: str, timeout: float = 15) -> None:
    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == expected,
        f"the page never reached state {expected}")


def ulid(n: int) -> str:
    return f"01J{n:023d}"


def iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def send_traffic(http: httpx.Client) -> None:
    """Three windows of events, meter records and journeys, then an event of the first window once it is
    reported (counted late), and wait until that late report is out."""
    for step in range(3):
        time.sleep(WINDOW - time.time() % WINDOW + 0.1)  # just after a window starts
        events = [{"workspace_id": str(uuid.UUID(int=1 + i % (step + 1))), "user_id": str(uuid.UUID(int=100 + i)),
                   "allowed": 1 + i % 3, "denied": i % 2} for i in range(5 + 3 * step)]
        records = [{"meter": "build_seconds", "value": f"{step}.25", "dimensions": {"project_id": "p1",
                                                                                  "region": REGION}},
                   {"meter": "build_seconds", "value": 2, "dimensions": {"project_id": f"p{step}", "region": "us"}}]
        now = time.time()
        journeys = [{"correlation_id": ulid(step * 10 + k), "experience_id": "http_request", "type": "web",
                     "feature_category": "ci", "urgency": "sync_fast"} for k in range(step + 1)]
        checkpoints = [j | {"checkpoint": "start", "client_timestamp": iso(now - 0.1 * (k + 1))}
                       for k, j in enumerate(journeys)]
        checkpoints += [j | {"checkpoint": "end", "client_timestamp": iso(now),
                             "outcome": "failure" if k == 1 else "success"} for k, j in enumerate(journeys)]
        for path, body in (("/v1/track", {"events": events}), ("/v1/record", {"records": records}),
                           ("/v1/checkpoints", {"checkpoints": checkpoints})):
            response = http.post(path, json=body)
            assert response.status_code == 202, response.text
    first = int(time.time() // WINDOW) * WINDOW - 2 * WINDOW
    wait_for(http, lambda reports: any(r["window_start"] == iso(first) for r in reports))
    late = {"workspace_id": str(uuid.UUID(int=77)), "user_id": str(uuid.UUID(int=777)), "allowed": 4, "time": first + 1}
    assert http.post("/v1/track", json={"events": [late]}).status_code == 202
    wait_for(http, lambda reports: any(r["late_allowed_requests"] == 4 for r in reports))


def wait_for(http: httpx.Client, done: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done(pull(http, "/v1/reports", "reports")):
            return
        time.sleep(0.2)
    raise AssertionError("the reports never showed the traffic")


def pull(http: httpx.Client, path: str, name: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    cursor = "0"
    while True:
        page = http.get(path, params={"after": cursor, "limit": 1000}).json()
        if not page[name]:
            return found
        found += page[name]
        cursor = page["next_cursor"]


def show_range(driver: webdriver.Chrome, since: str, until: str, expected: list[str]) -> None:
    """Fill the range form as UTC (datetime-local takes YYYY-MM-DDTHH:MM:SS) and wait for exactly those windows."""
    for field, value in (("since", since), ("until", until)):
        driver.execute_script("document.getElementById(arguments[0]).value = arguments[1];", field, value[:19])
    driver.find_element(By.ID, "show").click()
    state(driver, "ready")
    WebDriverWait(driver, 10).until(lambda d: [s for s, _ in d.execute_script(READ_WINDOWS)] == expected,
                                    "the charts never showed the chosen range")


def test_the_charts_in_the_browser_show_exactly_what_the_pull_api_returns(
        sqlite_url: str, tmp_path: Path, daemons: list[Daemon], browser: webdriver.Chrome) -> None:
    """The token typed once opens the page (and survives a reload); every count, each window's replicas_missing,
    late data, every meter quantity per (pseudonymized) dimension group and every SLI in the DOM equal
    /v1/reports, /v1/meters and /v1/experiences; titles show the same numbers; the console has no error
    (no CSP violation). The screenshot is saved to tests/artifacts/dashboard.png."""
    daemon = start(tmp_path, sqlite_url, daemons, {
        "AGGREGATOR_API_TOKENS": TOKEN, "AGGREGATOR_PSEUDONYM_KEY": "pseudonym-key-for-the-browser-test",
        "AGGREGATOR_PSEUDONYM_ALLOWLIST": "metadata.dimensions.region"})
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as http:
        send_traffic(http)
        reports = pull(http, "/v1/reports", "reports")
        results, slis = pull(http, "/v1/meters", "results"), pull(http, "/v1/experiences", "slis")

    browser.get(f"{daemon.url}/ui")
    state(browser, "login")
    browser.find_element(By.ID, "token").send_keys(TOKEN, Keys.ENTER)
    state(browser, "ready")
    browser.refresh()  # the token is kept for the tab: no second prompt
    state(browser, "ready")
    show_range(browser, reports[0]["window_start"], reports[-1]["window_end"], [r["window_start"] for r in reports])

    marks = browser.execute_script(READ_MARKS)
    assert [m for m in marks if f": {m['value']}" not in m["title"]] == []
    expected = {(name, r["window_start"]): r[name] for r in reports for name in REPORT_SERIES}
    assert expected == {(m["series"], m["windowStart"]): int(m["value"]) for m in marks
                        if m["chart"] in ("requests", "uniques")}
    expected_windows = [[r["window_start"], r["replicas_missing"]] for r in reports]
    assert expected_windows == browser.execute_script(READ_WINDOWS)
    expected_meters = {(r["meter"], json.dumps(r["dimensions"]), r["late"], r["window_start"]): r["quantity"]
                       for r in results}
    drawn_meters = {(m["meter"], m["dimensions"], m["late"] == "true", m["windowStart"]): float(m["value"])
                    for m in marks if m["chart"] == "meters"}
    assert expected_meters == drawn_meters
    expected_slis = {(s["experience_id"], s["urgency"], name, s["window_start"]): s[name] for s in slis
                     for name in SLI_SERIES if s[name] is not None}
    assert expected_slis == {(m["experience"], m["urgency"], m["series"], m["windowStart"]): float(m["value"])
                             for m in marks if m["chart"] == "experiences"}
    # The traffic reached every chart: late requests, a markup-laden dimension in clear, pseudonymized projects.
    shown = [json.loads(dimensions) for _, dimensions, _, _ in drawn_meters]
    reached = (any(r["late_allowed_requests"] for r in reports), any(d["region"] == REGION for d in shown),
               any(d["project_id"] in ("p0", "p1", "p2") for d in shown), len(expected_slis) > 0)
    assert reached == (True, True, False, True)

    errors = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    # The one expected: the first chart request, before the token was typed, answered 401.
    assert [message for message in errors if "status of 401" not in message] == []
    path = screenshot(browser)
    print(f"dashboard screenshot: {path}")


def screenshot(driver: webdriver.Chrome) -> Path:
    """The whole page: the window made as tall as the document (plus the window's own frame) first."""
    height = driver.execute_script("return document.documentElement.scrollHeight + outerHeight - innerHeight")
    driver.set_window_size(1280, int(height))
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "dashboard.png"
    assert driver.save_screenshot(str(path))
    return path


def test_without_tokens_the_page_asks_for_none(sqlite_url: str, tmp_path: Path, daemons: list[Daemon],
                                               browser: webdriver.Chrome) -> None:
    """A daemon without api_tokens (loopback only) serves the charts at once: the token form never shows."""
    daemon = start(tmp_path, sqlite_url, daemons, {})
    browser.get(f"{daemon.url}/ui")
    state(browser, "ready")
    shown = (browser.find_element(By.ID, "login").is_displayed(), len(browser.find_elements(By.CSS_SELECTOR,
                                                                                              "[data-chart] svg")))
    assert shown == (False, 4)
