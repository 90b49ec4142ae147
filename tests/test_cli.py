"""The installed `aggregator` command, run as a subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aggregator import migrate
from tests.helpers import T0, WINDOW, FakeClock, ids, manual


def aggregator(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the console script installed beside this interpreter (the venv's), as an operator would."""
    script = Path(sys.executable).parent / "aggregator"
    command = [str(script)] if script.exists() else [shutil.which("aggregator") or "aggregator"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("empty_database_url", ["sqlite", "postgresql"], indirect=True)
def test_db_upgrade_applies_then_reports_current(empty_database_url: str) -> None:
    first = aggregator("db", "upgrade", "--database-url", empty_database_url)
    assert first.returncode == 0, first.stderr
    assert f"schema upgraded from empty to {migrate.head_revision()}" in first.stdout
    again = aggregator("db", "upgrade", env={"AGGREGATOR_DATABASE_URL": empty_database_url})
    assert (again.returncode, f"schema already at {migrate.head_revision()}" in again.stdout) == (0, True)


def test_reports_in_every_format(database_url: str) -> None:
    clock = FakeClock()
    (w,), (u1, u2) = ids(1), ids(2, offset=10)
    with manual(database_url, clock) as agg:
        agg.track(w, u1, allowed=3)
        agg.track(w, u2, allowed=0, denied=2, at=T0 + WINDOW)
        agg.flush()
        clock.past_window(T0 + WINDOW)
        agg.collect()
    as_json = aggregator("reports", "--format", "json", "--database-url", database_url)
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["window_start"], r["unique_users"], r["allowed_requests"], r["denied_requests"]) for r in rows] == [
        ("2027-01-15T08:00:00Z", 1, 3, 0), ("2027-01-15T08:01:00Z", 1, 0, 2)]
    assert {"window_end", "unique_workspaces", "replicas", "replicas_missing", "complete", "late_allowed_requests",
            "late_denied_requests", "late_unique_users", "late_unique_workspaces", "generated_at"} <= set(rows[0])
    as_csv = aggregator("reports", "--format", "csv", "--since", "2027-01-15T08:01:00Z",
                        env={"AGGREGATOR_DATABASE_URL": database_url})
    assert [r["allowed_requests"] for r in csv.DictReader(io.StringIO(as_csv.stdout))] == ["0"]
    table = aggregator("reports", "--database-url", database_url)
    assert "2027-01-15 08:00:00" in table.stdout and "workspaces" in table.stdout


def test_reports_show_replicas_missing_in_every_format(database_url: str) -> None:
    """An incomplete report shows replicas_missing in the table, JSON lines (with complete) and CSV (last column)."""
    import asyncio

    from tests.test_export import insert_report

    asyncio.run(insert_report(database_url, T0, allowed_requests=4))
    asyncio.run(insert_report(database_url, T0 + WINDOW, replicas_missing=2, allowed_requests=5))
    as_json = aggregator("reports", "--format", "json", "--database-url", database_url)
    assert as_json.returncode == 0, as_json.stderr
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    expected = [(4, 0, True), (5, 2, False)]
    assert expected == [(r["allowed_requests"], r["replicas_missing"], r["complete"]) for r in rows]
    as_csv = aggregator("reports", "--format", "csv", "--database-url", database_url).stdout
    assert as_csv.splitlines()[0].endswith(",generated_by,replicas_missing")
    expected_csv = [("4", "0"), ("5", "2")]
    assert expected_csv == [(r["allowed_requests"], r["replicas_missing"]) for r in csv.DictReader(io.StringIO(as_csv))]
    header, _rule, *lines = aggregator("reports", "--database-url", database_url).stdout.splitlines()
    assert header.split() == ["window", "start", "(UTC)", "workspaces", "users", "allowed", "denied", "replicas",
                              "missing", "late", "allowed", "late", "denied", "late", "users"]
    assert [line.split()[6:8] for line in lines] == [["1", "0"], ["1", "2"]]  # replicas, missing


def test_bad_option_value_exits_2_naming_it(sqlite_url: str) -> None:
    result = aggregator("reports", "--since", "yesterday", "--database-url", sqlite_url)
    assert result.returncode == 2
    assert "--since='yesterday' is not an ISO 8601 time" in result.stderr


def test_version_is_the_installed_distributions() -> None:
    from importlib import metadata

    done = aggregator("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"aggregator {metadata.version('aggregator')}")


def test_help_names_the_environment_variables() -> None:
    out = aggregator("demo", "--help").stdout + aggregator("reports", "--help").stdout
    for name in ("AGGREGATOR_DEMO_REPLICAS", "AGGREGATOR_WINDOW", "AGGREGATOR_DEMO_DURATION",
                 "AGGREGATOR_DATABASE_URL", "AGGREGATOR_FORMAT"):
        assert name in out


@pytest.mark.slow
def test_demo_prints_only_exact_reports() -> None:
    result = aggregator("demo", "--replicas", "3", "--window", "2s", "--duration", "5s", "--flush-interval",
                        "0.5s", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "workspaces" in line and "/" in line]
    assert len(lines) >= 2 and all(line.endswith("exact") and "NOT" not in line for line in lines)
    assert "all reports exact" in result.stdout


def test_export_writes_an_idempotent_csv_and_names_the_next_cursor(database_url: str, tmp_path: Path) -> None:
    """`aggregator export` twice with the same cursor: the same file, byte for byte; generated_by hashed."""
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(ids(1)[0], ids(1)[0], allowed=4)
        agg.flush()
        clock.past_window(T0)
        (report,) = agg.collect()
    env = {"AGGREGATOR_PSEUDONYM_KEY": "3f9c0a7e51b2d84c6e0f1a2b3c4d5e6f"}
    first = aggregator("export", "--format", "csv", "--since", "0", "--out", str(tmp_path / "a"),
                       "--database-url", database_url, env=env)
    again = aggregator("export", "--since", "0", "--out", str(tmp_path / "b"), "--database-url", database_url, env=env)
    assert (first.returncode, again.returncode) == (0, 0), first.stderr + again.stderr
    assert f"next cursor {report.id}" in first.stdout
    (a,), (b,) = list((tmp_path / "a").iterdir()), list((tmp_path / "b").iterdir())
    assert (a.name, a.read_bytes()) == (b.name, b.read_bytes())
    (row,) = csv.DictReader(io.StringIO(a.read_text()))
    assert (row["allowed_requests"], len(row["generated_by"])) == ("4", 64)
    refused = aggregator("export", "--since", "0", "--out", str(tmp_path / "c"), "--database-url", database_url,
                         env={"AGGREGATOR_PSEUDONYM_KEY": ""})
    assert refused.returncode == 2 and "AGGREGATOR_PSEUDONYM_KEY" in refused.stderr


def test_outbox_commands_show_and_retry_dead_items(database_url: str) -> None:
    """`outbox status` and `outbox list` show a dead-lettered item with its error; `outbox retry` revives it."""
    import asyncio

    from aggregator import store

    async def dead_item() -> None:
        db = store.Store(database_url)
        try:
            await db.apply_batch(store.Batch(seq=1, windows={T0: store.BatchWindow([1], [1], 1, 0)}, events=1),
                                 writer_id=ids(1)[0], replica_id="r", window=WINDOW, now=T0 + 1)
            await db.collect_window(T0, collector_id="c", now=T0 + 100, writers=["snowplow"])
            (item,) = await db.claim_outbox("snowplow", now=T0 + 100, limit=10, claimer="me", lease=60)
            await db.settle_outbox("me", [store.outbox.Settlement(item["id"], "dead", 12, T0 + 100,
                                                                  "collector answered 400")], now=T0 + 101)
        finally:
            await db.close()

    asyncio.run(dead_item())
    status = aggregator("outbox", "status", "--database-url", database_url)
    assert status.returncode == 0, status.stderr
    assert "snowplow" in status.stdout and "dead" in status.stdout
    listed = aggregator("outbox", "list", "--format", "json", "--database-url", database_url)
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (row["status"], row["attempts"], row["last_error"]) == ("dead", 12, "collector answered 400")
    retried = aggregator("outbox", "retry", "--writer", "snowplow", "--database-url", database_url)
    assert "1 dead item(s) queued again" in retried.stdout
    listed = aggregator("outbox", "list", "--status", "pending", "--format", "json", "--database-url", database_url)
    assert [json.loads(line)["attempts"] for line in listed.stdout.splitlines()] == [0]


def test_meters_and_billable_export_commands(database_url: str, tmp_path: Path) -> None:
    """`aggregator meters` prints each window's meter results; `export --kind billable_usage` writes the
    billable events as CSV with pseudonymized ids."""
    clock = FakeClock()
    declared = {"build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 1, "billable": True,
                                  "dimensions": ["project_id"]}}
    with manual(database_url, clock, meters=declared) as agg:
        agg.record("build_seconds", 12.5, {"project_id": "p1"})
        agg.record("build_seconds", 0.25, {"project_id": "p1"})  # rounds half to even: 0.2
        agg.flush()
        clock.past_window(T0)
        agg.collect()
    shown = aggregator("meters", "--format", "json", "--database-url", database_url)
    assert shown.returncode == 0, shown.stderr
    (row,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert (row["meter"], row["dimensions"], row["quantity"], row["records"]) == (
        "build_seconds", {"project_id": "p1"}, 12.7, 2)
    exported = aggregator("export", "--kind", "billable_usage", "--since", "0", "--out", str(tmp_path / "out"),
                          "--database-url", database_url, env={"AGGREGATOR_PSEUDONYM_KEY": "y" * 32})
    assert exported.returncode == 0, exported.stderr
    (path,) = (tmp_path / "out").iterdir()
    (event,) = csv.DictReader(io.StringIO(path.read_text()))
    assert (event["quantity"], event["unit_of_measure"], len(event["project_id"])) == ("12.7", "seconds", 64)


def test_experiences_command_prints_the_slis(database_url: str) -> None:
    """`aggregator experiences --format json` prints each window's SLIs per experience and urgency."""
    from aggregator.client import new_correlation_id

    clock = FakeClock()
    journey = new_correlation_id()
    fields = {"type": "web", "feature_category": "ci", "urgency": "sync_fast"}
    with manual(database_url, clock) as agg:
        agg.checkpoint(journey, "http_request", "start", client_timestamp="2027-01-15T08:00:01Z", **fields)
        agg.checkpoint(journey, "http_request", "end", client_timestamp="2027-01-15T08:00:03.5Z", **fields)
        agg.flush()
        clock.past_window(T0)
        agg.collect()
    shown = aggregator("experiences", "--format", "json", "--database-url", database_url)
    assert shown.returncode == 0, shown.stderr
    (row,) = [json.loads(line) for line in shown.stdout.splitlines()]
    assert (row["experience_id"], row["started"], row["succeeded"], row["duration_p50_s"]) == (
        "http_request", 1, 1, 2.5)
