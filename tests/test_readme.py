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
