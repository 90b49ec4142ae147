"""The shipped Grafana dashboard: a dashboard Grafana imports, whose every query names metrics /metrics exposes."""

from __future__ import annotations

import json
import re
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator import api, metrics, options
from tests.helpers import T0, FakeClock, manual
from tests.test_metrics_gauges import AUTH, KEY, METERS, TOKEN

DASHBOARD = resources.files("aggregator") / "grafana" / "dashboard.json"
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# What a PromQL expression holds besides metric names: strings, label matchers, ranges, grouping label lists,
# Grafana variables; then functions and aggregations (a name before "(") and keywords.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLES = re.compile(r"\$\{?\w+\}?")
_NAMES = re.compile(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows too."""
    return [p for top in board["panels"] for p in (top, *top.get("panels", []))]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = expr
    for pattern in (_STRINGS, _MATCHERS, _RANGES, _GROUPING, _VARIABLES):
        text = pattern.sub(" ", text)
    return {name for name, call in _NAMES.findall(text) if not call and name.lower() not in _KEYWORDS}


def test_metric_names_are_read_from_promql() -> None:
    """The extraction sees through functions, aggregations, matchers, ranges, grouping and arithmetic."""
    expr = ('sum by (writer) (rate(aggregator_a_total{status="x(y)"}[$__rate_interval])) / on (job) '
            "max(aggregator_b) * 1e3 - time() + aggregator_c offset 5m")
    assert {"aggregator_a_total", "aggregator_b", "aggregator_c"} == metric_names(expr)


def test_the_dashboard_has_grafanas_shape() -> None:
    """A dashboard to import: schemaVersion, a title and uid, the Prometheus datasource as the DS_PROMETHEUS
    input used by every panel and query, unique panel ids, and each panel on the 24-column grid."""
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["title"] and board["uid"] and board["id"] is None
    inputs = [(i["name"], i["type"], i["pluginId"]) for i in board["__inputs"]]
    assert inputs == [("DS_PROMETHEUS", "datasource", "prometheus")]
    found = panels(board)
    ids = [p["id"] for p in found]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for panel in found:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} == set(grid) and all(isinstance(v, int) for v in grid.values()), panel["title"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"] and all(t["datasource"] == DATASOURCE and t["expr"] for t in panel["targets"])
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]


@pytest.fixture
async def exposed(sqlite_url: str, tmp_path: Path) -> set[str]:
    """The metric names one scrape of a busy replica exposes (a complete report with meter groups, a writer):
    the names its `# TYPE` lines declare; the text must parse with Prometheus' own parser."""
    writers = json.dumps({"files": {"type": "jsonl", "directory": str(tmp_path / "out")}})
    settings = options.load_daemon_settings(
        {"database_url": sqlite_url, "api_tokens": TOKEN, "window": "60s", "pseudonym_key": KEY,
         "writers": writers}, environ={})
    clock = FakeClock()
    async with manual(sqlite_url, clock, meters=METERS, delivery=settings.aggregator.delivery) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            agg.track(uuid.UUID(int=1), uuid.UUID(int=2), at=T0 + 1)
            response = await http.post("/v1/record", headers=AUTH, json={"records": [
                {"meter": "build_seconds", "value": "1", "dimensions": {"project_id": "p", "region": "eu"}}]})
            assert response.status_code == 202
            await agg.aflush()
            clock.past_window(T0)
            assert [r.complete for r in await agg.acollect()] == [True]
            text = (await http.get("/metrics")).text
    assert list(text_string_to_metric_families(text))
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def test_every_query_reads_only_metrics_that_metrics_exposes(exposed: set[str]) -> None:
    """Each panel query's metric names are among those /metrics exposes: a renamed metric fails here, not as
    an empty panel in production."""
    used = {(panel["title"], name) for panel in panels(dashboard()) for target in panel.get("targets", [])
            for name in metric_names(target["expr"])}
    assert used and {name for _, name in used} >= {"aggregator_health", "aggregator_flushes_total",
                                                    "aggregator_last_complete_report_unique_users"}
    assert sorted((title, name) for title, name in used if name not in exposed) == []


def test_the_dashboard_ships_in_the_package() -> None:
    """The JSON sits inside the package (hatchling puts every file under aggregator/ in the wheel)."""
    assert Path(str(DASHBOARD)).resolve().parent.parent == Path(str(resources.files("aggregator"))).resolve()
