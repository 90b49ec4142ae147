"""`aggregator reports|meters|experiences --chart`: the installed CLI run as a subprocess against known rows;
every number drawn beside a bar is the stored figure, and off a terminal the chart is plain text."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
import sqlalchemy as sa

from aggregator import schema, store
from tests.helpers import T0, WINDOW
from tests.test_cli import PLAIN, aggregator, on_terminal
from tests.test_export import insert_report

WINDOW_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) - \d\d:\d\d:\d\d  (.*)$")
LATE_LINE = re.compile(r"^  late, of earlier windows: (.*)$")
MEASURE_LINE = re.compile(r"^  (users|workspaces|allowed|denied) +\S*.* (\d+)$")
NO_TRAFFIC = re.compile(r"^  no traffic: (\d+) users, (\d+) workspaces, (\d+) allowed, (\d+) denied$")


def when(iso: str) -> str:
    """An ISO time of the JSON output as the charts label it."""
    return iso.replace("T", " ").removesuffix("Z")


def read_reports_chart(text: str) -> dict[str, dict[str, Any]]:
    """Window start -> the header's remarks and the number beside each bar."""
    windows: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] = {}
    for line in text.splitlines():
        if match := WINDOW_LINE.match(line):
            current = windows.setdefault(match[1], {"remarks": match[2]})
        elif match := LATE_LINE.match(line):
            current["remarks"] += f"; late: {match[1]}"
        elif match := MEASURE_LINE.match(line):
            current[match[1]] = int(match[2])
        elif match := NO_TRAFFIC.match(line):
            current.update(zip(("users", "workspaces", "allowed", "denied"), map(int, match.groups()), strict=True))
    return windows


def seed_reports(url: str) -> None:
    """A complete report, an incomplete one with late data, and one of a window without traffic."""
    asyncio.run(insert_report(url, T0, unique_users=180, unique_workspaces=12, allowed_requests=2500,
                              denied_requests=75, replicas_missing=0))
    asyncio.run(insert_report(url, T0 + WINDOW, unique_users=7, unique_workspaces=3, allowed_requests=40,
                              denied_requests=0, replicas_missing=2, late_allowed_requests=9, late_denied_requests=1,
                              late_unique_users=2))
    asyncio.run(insert_report(url, T0 + 2 * WINDOW, replicas_missing=0))


def colours(text: str) -> set[int]:
    """The foreground colours that SGR escape codes in ``text`` set."""
    params = (int(p) for code in re.findall(r"\x1b\[([\d;]*)m", text) for p in code.split(";") if p.isdigit())
    return {p for p in params if 30 <= p <= 38 or 90 <= p <= 97}


def json_lines(*args: str, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    done = aggregator(*args, "--format", "json", env=env)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_reports_chart_shows_each_reports_numbers(database_url: str) -> None:
    """Every window's users, workspaces, allowed and denied beside its bars equal the report's; the header marks
    an incomplete report with its missing replicas and names what came late into it."""
    seed_reports(database_url)
    chart = aggregator("reports", "--chart", "--database-url", database_url, env=PLAIN)
    assert chart.returncode == 0, chart.stderr
    expected = {when(r["window_start"]): {
        "users": r["unique_users"], "workspaces": r["unique_workspaces"], "allowed": r["allowed_requests"],
        "denied": r["denied_requests"]} for r in json_lines("reports", "--database-url", database_url)}
    drawn = read_reports_chart(chart.stdout)
    assert expected == {start: {k: v for k, v in window.items() if k != "remarks"} for start, window in drawn.items()}
    remarks = [window["remarks"] for window in drawn.values()]
    expected_remarks = [
        "1 replica(s), complete",
        "1 replica(s), INCOMPLETE: 2 replica(s) missing; late: 9 allowed, 1 denied, 2 users",
        "1 replica(s), complete"]
    assert expected_remarks == remarks


def test_reports_chart_off_a_terminal_is_plain_text_of_the_given_width(sqlite_url: str) -> None:
    """Piped, the chart has no escape codes and no trailing blanks, fits COLUMNS, and a bar is as long as its share
    of the largest value on its scale."""
    seed_reports(sqlite_url)
    text = aggregator("reports", "--chart", "--database-url", sqlite_url, env={**PLAIN, "COLUMNS": "72"}).stdout
    assert "\x1b" not in text
    too_wide_or_padded: list[str] = []
    assert too_wide_or_padded == [line for line in text.splitlines() if len(line) > 72 or line != line.rstrip()]
    first = text.split("2027-01-15 08:01:00")[0]  # 180 users, 12 workspaces, 2500 allowed, 75 denied
    bars = {m[1]: m[2] for line in first.splitlines() if (m := re.match(r"^  (\w+) +([█▏▎▍▌▋▊▉]*)", line))}
    full = len(bars["users"])  # the largest value on its scale fills the bar's column
    assert (full, full) == (bars["users"].count("█"), len(bars["allowed"]))
    assert abs(len(bars["workspaces"]) - 12 / 180 * full) <= 1
    assert 1 <= len(bars["denied"]) <= 75 / 2500 * full + 1  # a small count still shows


def test_reports_chart_in_ascii_where_the_output_cannot_encode_blocks(sqlite_url: str) -> None:
    """With an ASCII-only stdout the bars are drawn with '#', and the numbers are the same."""
    seed_reports(sqlite_url)
    text = aggregator("reports", "--chart", "--database-url", sqlite_url,
                      env={**PLAIN, "PYTHONIOENCODING": "ascii"}).stdout
    assert text.isascii() and "#" in text
    expected = {"users": 180, "workspaces": 12, "allowed": 2500, "denied": 75}
    assert expected == {k: v for k, v in read_reports_chart(text)["2027-01-15 08:00:00"].items() if k != "remarks"}


def test_reports_chart_on_a_terminal_is_styled_and_respects_no_color(sqlite_url: str) -> None:
    """On a terminal the chart has colours; with NO_COLOR it keeps only bold and dim, and the same text."""
    seed_reports(sqlite_url)

    chart = ("reports", "--chart", "--database-url", sqlite_url)
    (status, coloured), (again, plain) = on_terminal(*chart), on_terminal(*chart, env={"NO_COLOR": "1"})
    assert (status, again) == (0, 0), coloured + plain
    assert colours(coloured) and "\x1b[1m" in plain
    assert set() == colours(plain)
    strip = re.compile(r"\x1b\[[\d;]*m")
    assert read_reports_chart(strip.sub("", coloured).replace("\r", "")) == read_reports_chart(
        strip.sub("", plain).replace("\r", ""))


async def insert_rows(url: str, report_id: int, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    db = store.Store(url)
    try:
        async with db.transaction() as conn:
            await conn.execute(sa.insert(table), [{**row, "report_id": report_id} for row in rows])
    finally:
        await db.close()


def test_meters_chart_shows_each_groups_quantity_per_window(database_url: str) -> None:
    """Per meter and group, every window's quantity and records beside its bar equal the stored result (in the
    meter's decimals); late results and the overflow group are marked."""
    first, second = (asyncio.run(insert_report(database_url, start)) for start in (T0, T0 + WINDOW))

    def result(start: int, meter: str, group: str, quantity: int, records: int, late: bool = False) -> dict[str, Any]:
        return {"window_start": start, "meter": meter, "group_key": group, "late": late, "quantity": quantity,
                "decimals": 1 if meter == "build_seconds" else 0, "records": records}

    p1, p2 = json.dumps({"project_id": "p1"}), json.dumps({"project_id": "p2"})
    asyncio.run(insert_rows(database_url, first, schema.meter_reports, [
        result(T0, "build_seconds", p1, 127, 2), result(T0, "build_seconds", p2, 3, 1),
        result(T0, "artifacts", "__overflow__", 40, 4)]))
    asyncio.run(insert_rows(database_url, second, schema.meter_reports, [
        result(T0 + WINDOW, "build_seconds", p1, 5000, 9), result(T0 + WINDOW, "build_seconds", p2, 25, 1, late=True)]))
    chart = aggregator("meters", "--chart", "--database-url", database_url, env=PLAIN)
    assert chart.returncode == 0, chart.stderr
    drawn, meter, group = [], "", ""
    for line in chart.stdout.splitlines():
        if match := re.match(r"^(\w+)  \(", line):
            meter = match[1]
        elif match := re.match(r"^  (\S.*)$", line):
            group = match[1]
        elif match := re.match(r"^    (\S+ \S+) .* (\S+) (\d+) record\(s\)(, late)?$", line):
            drawn.append((meter, group, match[1], match[2], int(match[3]), bool(match[4])))
    expected = sorted(
        (r["meter"], "(overflow: groups past the meter's limit)" if r["overflow"] else
         ", ".join(f"{k}={v}" for k, v in r["dimensions"].items()), when(r["window_start"]), str(r["quantity"]),
         r["records"], r["late"]) for r in json_lines("meters", "--database-url", database_url))
    assert expected == sorted(drawn)
    assert ("build_seconds", "project_id=p1", "2027-01-15 08:01:00", "500", 9, False) in drawn


def test_experiences_chart_shows_outcomes_and_percentiles_per_window(database_url: str) -> None:
    """Per experience and urgency, every window's started, succeeded, failed and timed-out journeys and its
    p50/p90/p99 durations equal the stored SLIs; a percentile without completed journeys shows as '-'."""
    first, second = (asyncio.run(insert_report(database_url, start)) for start in (T0, T0 + WINDOW))

    def sli(start: int, experience: str, started: int, ok: int, failed: int, timed_out: int,
            p50: float | None, p90: float | None, p99: float | None) -> dict[str, Any]:
        return {"window_start": start, "experience_id": experience, "urgency": "sync_fast", "started": started,
                "succeeded": ok, "failed": failed, "timed_out": timed_out, "completed": ok + failed + timed_out,
                "duration_p50_s": p50, "duration_p90_s": p90, "duration_p99_s": p99}

    asyncio.run(insert_rows(database_url, first, schema.experience_slis, [
        sli(T0, "http_request", 12, 9, 2, 1, 0.25, 1.5, 4.75), sli(T0, "ci_pipeline", 3, 0, 0, 0, None, None, None)]))
    asyncio.run(insert_rows(database_url, second, schema.experience_slis, [
        sli(T0 + WINDOW, "http_request", 5, 1, 0, 4, 2.5, 10.0, 10.0)]))
    chart = aggregator("experiences", "--chart", "--database-url", database_url, env=PLAIN)
    assert chart.returncode == 0, chart.stderr
    drawn, group = [], ""
    for line in chart.stdout.splitlines():
        if match := re.match(r"^(\S+) \((\S+)\)$", line):
            group = match[1]
        elif match := re.match(r"^  (\S+ \S+) .*?(\d+) started +(\d+) ok +(\d+) failed +(\d+) timed out +"
                               r"p50 (\S+) +p90 (\S+) +p99 (\S+)$", line):
            drawn.append((group, match[1], *map(int, match.groups()[1:5]), *match.groups()[5:]))

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:g}s"

    expected = sorted((r["experience_id"], when(r["window_start"]), r["started"], r["succeeded"], r["failed"],
                       r["timed_out"], seconds(r["duration_p50_s"]), seconds(r["duration_p90_s"]),
                       seconds(r["duration_p99_s"])) for r in json_lines("experiences", "--database-url", database_url))
    assert expected == sorted(drawn)
    assert len(drawn) == 3


@pytest.mark.parametrize("command", ["meters", "experiences"])
def test_charts_of_nothing_say_so(sqlite_url: str, command: str) -> None:
    """Without rows, `meters --chart` and `experiences --chart` print the same line as their tables, and exit 0."""
    table, chart = (aggregator(command, *flags, "--database-url", sqlite_url, env=PLAIN)
                    for flags in ((), ("--chart",)))
    assert (0, table.stdout) == (chart.returncode, chart.stdout)
    assert table.stdout.startswith("no ")


