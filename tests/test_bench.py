"""The benchmark harness in its smoke mode: `python -m bench --quick`, run as a real process.

The full benchmark is not run in CI (minutes, and its figures depend on the machine); this checks
that every row still measures, prints and records, against a real PostgreSQL server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ISSUE_ROWS = ["caller_cost", "total_cpu", "threads_8", "pg_flush", "pg_collect", "memory", "daemon_ingest"]
# and rows of later issues:
ROWS = [*ISSUE_ROWS, "pg_checkpoints", "report_latency", "spool", "worst_request", "pg_flush_by_window",
        "range_distinct", "range_distinct_collect"]


@pytest.mark.slow
def test_quick_run_prints_one_table_and_writes_every_row(pg_admin_url: str, tmp_path: Path) -> None:
    """Every row runs without error, appears in the table with a verdict, and is in the JSON file."""
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--database-url", pg_admin_url, "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = [line for line in done.stdout.splitlines() if " | " in line]
    assert table[0].split(" | ")[0].strip() == "benchmark"
    assert [line.split(" | ")[0].strip() for line in table[1:] if line.split(" | ")[0].strip()] == ROWS
    assert all(line.rstrip().endswith(("PASS", "MISS", "n/c")) for line in table if line.startswith(tuple(ISSUE_ROWS)))
    assert "PASS" in next(line for line in table if line.startswith("report_latency")) or any(
        "reports exact" in line and line.rstrip().endswith("PASS") for line in table)
    results = json.loads(out.read_text())
    assert list(results["rows"]) == ROWS
    assert [row["error"] for row in results["rows"].values()] == [None] * len(ROWS)
    assert all(row["ours"]["median"] > 0 for row in results["rows"].values())
    assert results["quick"] is True
