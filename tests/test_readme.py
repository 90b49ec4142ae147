"""The README's examples work as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_runner_example_writes_billable_events_to_jsonl(tmp_path: Path) -> None:
    """The CI-runner example, run as written in a fresh directory, leaves one billable event per project
    in billing/*.jsonl: projects hashed, the namespace in clear, each with its own event id."""
    text = README.read_text()
    code = re.search(r"<!-- runner-example -->\n```python\n(.*?)```", text, re.S)
    assert code is not None, "the runner example is missing from the README"
    script = tmp_path / "runner.py"
    script.write_text(code.group(1) + "\nimport json as _j\nprint(_j.dumps({'recorded': 'ok'}))\n")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for f in sorted((tmp_path / "billing").glob("*.jsonl"))
             for line in f.read_text().splitlines()]
    billable = [line["data"] for line in lines if line["kind"] == "billable_usage"]
    assert len({event["project_id"] for event in billable}) == 3
    assert all(len(event["project_id"]) == 64 and event["namespace_id"] == "group-1" for event in billable)
    assert all(event["unit_of_measure"] == "seconds" and event["quantity"] > 0 for event in billable)
    assert len({event["event_id"] for event in billable}) == len(billable)


def test_the_journey_example_turns_a_missing_end_into_a_timeout(tmp_path: Path) -> None:
    """The experiences example, run as written: 3 started, 2 succeeded, and the third timed out, reported in the
    window after the one it started in."""
    code = re.search(r"<!-- journey-example -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert code is not None, "the journey example is missing from the README"
    script = tmp_path / "journeys.py"
    script.write_text(code.group(1))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [row for row in (line.split() for line in result.stdout.splitlines())
            if len(row) == 9 and row[0].isdigit() and row[1] == "http_request"]
    started = sum(int(r[4]) for r in rows)
    succeeded = sum(int(r[6]) for r in rows)
    timed_out = [(int(r[0]), int(r[8])) for r in rows if int(r[8])]
    assert (started, succeeded, sum(n for _, n in timed_out)) == (3, 2, 1)
    assert timed_out[0][0] == max(int(r[0]) for r in rows if int(r[4])) + 5  # in the next window's report
