"""Reports: the durable result of one window, and how it is printed (table, JSON lines, CSV).

``allowed_requests`` and the other plain counts are the window's own traffic. ``late_*`` counts are
traffic of earlier, already reported windows that reached the database while this window was open:
the sum over all reports of ``allowed_requests + late_allowed_requests`` equals everything tracked.
``late_unique_*`` count ids that were new to the window they belong to. ``replicas_missing`` counts
replica incarnations that may have held data of the window and were given up on before it was closed;
a report is complete when it is 0 (their data, if it comes, is counted late in a later window).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
from collections.abc import Iterable, Mapping
from typing import Any

UTC = dt.timezone.utc


def to_datetime(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=UTC)


def iso_utc(moment: float | dt.datetime, timespec: str = "auto") -> str:
    """An epoch time or aware datetime as ISO 8601 UTC with a ``Z``: how times leave aggregator."""
    when = moment if isinstance(moment, dt.datetime) else to_datetime(moment)
    return when.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """One window's report; ``id`` is the position in the report stream (a pull cursor)."""

    id: int
    window_start: dt.datetime
    window_end: dt.datetime
    unique_workspaces: int
    unique_users: int
    allowed_requests: int
    denied_requests: int
    replicas: int
    replicas_missing: int
    late_allowed_requests: int
    late_denied_requests: int
    late_unique_workspaces: int
    late_unique_users: int
    generated_at: dt.datetime
    generated_by: str

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Report:
        values = {field.name: row[field.name] for field in dataclasses.fields(cls)}
        for name in ("window_start", "window_end", "generated_at"):
            values[name] = to_datetime(values[name])
        return cls(**values)

    @property
    def complete(self) -> bool:
        """No replica that may have held data of the window was given up on."""
        return self.replicas_missing == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: datetimes as ISO 8601 UTC strings. The fields only (the event payload): no ``complete``."""
        out = dataclasses.asdict(self)
        for name in ("window_start", "window_end", "generated_at"):
            out[name] = iso_utc(out[name])
        return out


# CSV columns (``reports --format csv`` and the export): the first release's in their order, then the
# fields added since, appended in the order they came, so no column ever moves.
_ADDED = ("replicas_missing",)
FIELDS = [field.name for field in dataclasses.fields(Report) if field.name not in _ADDED] + list(_ADDED)
_TABLE_COLUMNS = [
    ("window_start", "window start (UTC)"), ("unique_workspaces", "workspaces"), ("unique_users", "users"),
    ("allowed_requests", "allowed"), ("denied_requests", "denied"), ("replicas", "replicas"),
    ("replicas_missing", "missing"), ("late_allowed_requests", "late allowed"),
    ("late_denied_requests", "late denied"), ("late_unique_users", "late users"),
]


def format_json(reports: Iterable[Report]) -> str:
    """One JSON object per line: the fields, and ``complete``."""
    return "".join(json.dumps({**r.to_dict(), "complete": r.complete}, sort_keys=True) + "\n" for r in reports)


def format_csv(reports: Iterable[Report]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for report in reports:
        writer.writerow(report.to_dict())
    return buffer.getvalue()


def format_table(reports: Iterable[Report]) -> str:
    rows = [[_cell(getattr(r, name)) for name, _ in _TABLE_COLUMNS] for r in reports]
    header = [title for _, title in _TABLE_COLUMNS]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)) for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _cell(value: object) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class NextReport:
    """When the report of the window open at ``now`` is due: what a first-time reader is told while there is
    nothing to read yet.

    The window closes at ``window_end``; its report is written once every live replica has flushed past
    that end (about one flush interval, plus grace, plus a collection run later: ``expected_by``), and at
    the latest ``max_collect_delay`` after the end, whatever holds it back (``at_latest``).
    """

    window_start: dt.datetime
    window_end: dt.datetime
    expected_by: dt.datetime
    at_latest: dt.datetime

    def sentence(self, *, first: bool = True) -> str:
        """For people; ``first``: nothing has been reported at all (else: nothing after what the reader has)."""
        lead = "no report yet" if first else "no new report yet"
        return (f"{lead}: the window {iso_utc(self.window_start)} - {iso_utc(self.window_end)} closes at "
                f"{iso_utc(self.window_end)}; its report is expected by {iso_utc(self.expected_by)} "
                f"(at the latest {iso_utc(self.at_latest)})")


def next_report(now: float, *, window: float, flush_interval: float, grace: float, collect_interval: float,
                max_collect_delay: float) -> NextReport:
    """The report due next for windows of ``window`` seconds, seen at epoch time ``now``."""
    start = int(now // window) * int(window)
    end = start + int(window)
    # A collection run comes every collect_interval, give or take half of it (config.Settings.build).
    run = 1.5 * collect_interval
    at_latest = end + max(max_collect_delay, grace) + run
    return NextReport(window_start=to_datetime(start), window_end=to_datetime(end),
                      expected_by=to_datetime(min(end + flush_interval + grace + run, at_latest)),
                      at_latest=to_datetime(at_latest))
