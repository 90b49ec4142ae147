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
    assert {"window_end", "unique_workspaces", "replicas", "late_allowed_requests", "late_denied_requests",
            "late_unique_users", "late_unique_workspaces", "generated_at"} <= set(rows[0])
    as_csv = aggregator("reports", "--format", "csv", "--since", "2027-01-15T08:01:00Z",
                        env={"AGGREGATOR_DATABASE_URL": database_url})
    assert [r["allowed_requests"] for r in csv.DictReader(io.StringIO(as_csv.stdout))] == ["0"]
    table = aggregator("reports", "--database-url", database_url)
    assert "2027-01-15 08:00:00" in table.stdout and "workspaces" in table.stdout


def test_bad_option_value_exits_2_naming_it(sqlite_url: str) -> None:
    result = aggregator("reports", "--since", "yesterday", "--database-url", sqlite_url)
    assert result.returncode == 2
    assert "--since='yesterday' is not an ISO 8601 time" in result.stderr


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
