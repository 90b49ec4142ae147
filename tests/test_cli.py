"""The installed `aggregator` command, run as a subprocess."""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import pty
import re
import select
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator import cli, migrate, reports
from tests.helpers import T0, WINDOW, FakeClock, ids, manual

KEY = "3f9c0a7e51b2d84c6e0f1a2b3c4d5e6f"
# Not a terminal, whatever the environment running the tests says (None: the variable is removed); a fixed width.
PLAIN: dict[str, str | None] = {"FORCE_COLOR": None, "TTY_COMPATIBLE": None, "COLUMNS": "100"}


def script() -> str:
    """The console script installed beside this interpreter (the venv's)."""
    path = Path(sys.executable).parent / "aggregator"
    return str(path) if path.exists() else shutil.which("aggregator") or "aggregator"


def aggregator(*args: str, env: dict[str, str | None] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed console script as an operator would; ``env`` adds variables (None removes one)."""
    environ = {**os.environ, **(env or {})}
    return subprocess.run([script(), *args], capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in environ.items() if v is not None})


def on_terminal(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> tuple[int, str]:
    """Run the installed console script with a pseudo-terminal as stdin, stdout and stderr: its exit status and
    everything it wrote there (escape codes included)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR")}
    leader, follower = pty.openpty()
    proc = subprocess.Popen([script(), *args], stdin=follower, stdout=follower, stderr=follower,
                            env={**environ, "TERM": "xterm-256color", "COLUMNS": "100", **(env or {})})
    os.close(follower)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([leader], [], [], 1.0)[0]:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: every process holding the terminal has closed it
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(timeout=10), out.decode(errors="replace")


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
                        env={"AGGREGATOR_DATABASE_URL": database_url, "AGGREGATOR_PSEUDONYM_KEY": KEY})
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
    as_csv = aggregator("reports", "--format", "csv", "--database-url", database_url,
                        env={"AGGREGATOR_PSEUDONYM_KEY": KEY}).stdout
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


def test_reports_csv_pseudonymizes_generated_by_as_the_export_does(sqlite_url: str, tmp_path: Path) -> None:
    """The report CSV's one identifier, generated_by, is hashed with the pseudonym key exactly as in the export
    file; without a key the command refuses as export does, unless generated_by is allowlisted."""
    import asyncio

    from tests.test_export import insert_report

    asyncio.run(insert_report(sqlite_url, T0, allowed_requests=4))
    env = {"AGGREGATOR_PSEUDONYM_KEY": KEY}
    printed = aggregator("reports", "--format", "csv", "--database-url", sqlite_url, env=env)
    exported = aggregator("export", "--since", "0", "--out", str(tmp_path / "out"), "--database-url", sqlite_url,
                          env=env)
    assert (printed.returncode, exported.returncode) == (0, 0), printed.stderr + exported.stderr
    (path,) = (tmp_path / "out").iterdir()
    expected = list(csv.DictReader(io.StringIO(path.read_text())))
    assert expected == list(csv.DictReader(io.StringIO(printed.stdout)))
    assert len(expected[0]["generated_by"]) == 64
    refused = aggregator("reports", "--format", "csv", "--database-url", sqlite_url,
                         env={"AGGREGATOR_PSEUDONYM_KEY": ""})
    export_refused = aggregator("export", "--since", "0", "--out", str(tmp_path / "no"), "--database-url",
                                sqlite_url, env={"AGGREGATOR_PSEUDONYM_KEY": ""})
    expected_refusal = (2, export_refused.stderr.replace("aggregator export", "aggregator reports --format csv"))
    assert expected_refusal == (refused.returncode, refused.stderr)
    assert "generated_by" in refused.stderr and refused.stdout == ""
    clear = aggregator("reports", "--format", "csv", "--pseudonym-allowlist", "generated_by", "--database-url",
                       sqlite_url, env={"AGGREGATOR_PSEUDONYM_KEY": ""})
    in_clear = ["collector-1"]
    assert in_clear == [row["generated_by"] for row in csv.DictReader(io.StringIO(clear.stdout))]


def test_reports_of_nothing_say_when_the_next_report_is_due(sqlite_url: str, tmp_path: Path) -> None:
    """With no report yet, every form of `aggregator reports` exits 0 and tells on stderr when the next report is
    due, under the timings the daemon would run with: its config file, then AGGREGATOR_* variables."""
    daemon_config = tmp_path / "aggregator.toml"
    daemon_config.write_text('window = "2m"\nflush_interval = "10s"\n')
    env = {"AGGREGATOR_CONFIG": str(daemon_config), "AGGREGATOR_GRACE": "3s", "AGGREGATOR_COLLECT_INTERVAL": "2s",
           "AGGREGATOR_MAX_COLLECT_DELAY": "5m", "AGGREGATOR_PSEUDONYM_KEY": KEY, **PLAIN}

    def due(now: float) -> str:
        return reports.next_report(now, window=120, flush_interval=10, grace=3, collect_interval=2,
                                   max_collect_delay=300).sentence()

    for flags in (("--format", "table"), ("--format", "json"), ("--format", "csv"), ("--chart",)):
        before = time.time()
        done = aggregator("reports", *flags, "--database-url", sqlite_url, env=env)
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip() in {due(before), due(time.time())}, flags
    no_chart = ""
    assert no_chart == aggregator("reports", "--chart", "--database-url", sqlite_url, env=env).stdout


def command_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and subcommand parser under ``parser``, with its path of names."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from command_parsers(sub, (*path, name))


def test_help_lists_every_command_in_plain_text() -> None:
    """`aggregator --help` names every command, each command's help names its subcommands, and no help shows
    reST markup (double backquotes)."""
    top = aggregator("--help", env={"COLUMNS": "100"})
    assert top.returncode == 0, top.stderr
    parsers = dict(command_parsers(cli.build_parser()))
    helps = {(): top.stdout, **{path: sub.format_help() for path, sub in parsers.items()}}
    expected: list[tuple[str, ...]] = []
    assert expected == [path for path in parsers if not re.search(rf"^\s+{path[-1]}\b", helps[path[:-1]], re.M)]
    assert {"meters", "experiences", "quarantine", "outbox", "demo", "export", "reports"} <= {p[0] for p in parsers}
    assert expected == [path for path, text in helps.items() if "``" in text]


def test_help_names_the_environment_variables() -> None:
    out = aggregator("demo", "--help").stdout + aggregator("reports", "--help").stdout
    for name in ("AGGREGATOR_DEMO_REPLICAS", "AGGREGATOR_WINDOW", "AGGREGATOR_DEMO_DURATION",
                 "AGGREGATOR_DATABASE_URL", "AGGREGATOR_FORMAT"):
        assert name in out


DEMO = ("demo", "--replicas", "3", "--window", "2s", "--duration", "5s", "--flush-interval", "0.5s")
DEMO_ROW = re.compile(r"^(\d\d:\d\d:\d\d)–\S+ +workspaces +(\d+)/\d+ +users +(\d+)/\d+ +allowed +(\d+)/\d+ +"
                      r"denied +(\d+)/\d+ .* exact$")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, float]:
    """One `aggregator demo` with piped output and its own state directory: the result, that directory, and
    how long it ran."""
    state = tmp_path_factory.mktemp("state")
    started = time.monotonic()
    result = aggregator(*DEMO, env={"XDG_STATE_HOME": str(state), "STATE_DIRECTORY": "",
                                    "AGGREGATOR_DEMO_DATABASE_URL": ""}, timeout=180)
    return result, state, time.monotonic() - started


@pytest.mark.slow
def test_demo_prints_only_exact_reports(demo_run: tuple[subprocess.CompletedProcess, Path, float]) -> None:
    """Each window's report equals the ground truth; piped, progress is a plain line at most every few seconds."""
    from aggregator import demo

    result, _, took = demo_run
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "workspaces" in line and "/" in line]
    assert len(lines) >= 2 and all(line.endswith("exact") and "NOT" not in line for line in lines)
    assert "all reports exact" in result.stdout
    progress = [line for line in result.stdout.splitlines() if line.startswith("... ")]
    assert 2 <= len(progress) <= took / demo.PLAIN_EVERY + 1
    assert any("replicas tracking" in line and "closes in" in line for line in progress)
    assert "\x1b" not in result.stdout


@pytest.mark.slow
def test_demo_keeps_its_database_and_prints_the_command_that_charts_it(
        demo_run: tuple[subprocess.CompletedProcess, Path, float]) -> None:
    """After the demo its database is kept in the state directory, and the command it prints charts every
    window it showed, with the figures it reported."""
    result, state, _ = demo_run
    assert (state / "aggregator" / "demo" / "demo.db").is_file()
    (command,) = [line.removeprefix("chart it:").strip() for line in result.stdout.splitlines()
                  if line.startswith("chart it:")]
    program, *args = shlex.split(command)
    assert (program, args[:2]) == ("aggregator", ["reports", "--chart"])
    assert str(state / "aggregator" / "demo" / "demo.db") in command
    chart = aggregator(*args, env=PLAIN)
    assert chart.returncode == 0, chart.stderr
    from tests.test_charts import read_reports_chart

    drawn = {start[-8:]: figures for start, figures in read_reports_chart(chart.stdout).items()}
    shown = {m[1]: dict(zip(("workspaces", "users", "allowed", "denied"), map(int, m.groups()[1:]), strict=True))
             for line in result.stdout.splitlines() if (m := DEMO_ROW.match(line))}
    assert len(shown) >= 2
    assert shown == {start: {k: drawn[start][k] for k in ("workspaces", "users", "allowed", "denied")}
                     for start in shown}


@pytest.mark.slow
def test_demo_on_a_terminal_shows_live_progress(tmp_path: Path) -> None:
    """On a terminal the demo keeps a live status line (replicas, events so far, when the window closes) under
    the reports it prints, and still ends exact."""
    status, text = on_terminal(*DEMO, env={"XDG_STATE_HOME": str(tmp_path), "STATE_DIRECTORY": "",
                                           "AGGREGATOR_DEMO_DATABASE_URL": ""})
    assert status == 0, text
    assert "replicas tracking" in text and "closes in" in text and "events so far" in text
    assert "all reports exact" in text and "chart it:" in text
    assert "\x1b[" in text  # the live region is redrawn in place


def test_export_writes_an_idempotent_csv_and_names_the_next_cursor(database_url: str, tmp_path: Path) -> None:
    """`aggregator export` twice with the same cursor: the same file, byte for byte; generated_by hashed."""
    clock = FakeClock()
    with manual(database_url, clock) as agg:
        agg.track(ids(1)[0], ids(1)[0], allowed=4)
        agg.flush()
        clock.past_window(T0)
        (report,) = agg.collect()
    env = {"AGGREGATOR_PSEUDONYM_KEY": KEY}
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
