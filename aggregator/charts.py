"""What the short commands show: charts of reports, meter results and experience SLIs over windows, and the
plain listings (table or JSON lines) of the other commands.

Pure functions from rows to rich renderables or text, no I/O: the caller's Console decides colour, escape
codes (none when stdout is not a terminal, none with NO_COLOR) and width (``COLUMNS``), in one place.
Every chart shows each figure as an exact number beside its bar; a bar only helps the eye compare windows.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from aggregator import meters, reports

# Fills of a bar's parts, in part order: (block character, where the console cannot show blocks).
_FILLS = (("█", "#"), ("▒", "x"), ("░", "."))
_EIGHTHS = " ▏▎▍▌▋▊▉"


class Bar:
    """A horizontal bar as wide as its cell, of one or more parts stacked left to right, on a scale of ``top``.

    A part above zero always shows (a sliver at least), so that a small count is never drawn as none; a
    part of a stacked bar fills whole cells, so the parts keep their own characters without colour.
    """

    def __init__(self, parts: Sequence[tuple[float, str]], top: float) -> None:
        self.parts = [(max(float(value), 0.0), style) for value, style in parts]  # (value, style)
        self.top = float(top)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        ascii_only = options.ascii_only
        if self.top <= 0:
            return
        if len(self.parts) == 1 and not ascii_only:
            ((value, style),) = self.parts
            eighths = max(round(value / self.top * width * 8), 1 if value > 0 else 0)
            full, rest = divmod(min(eighths, width * 8), 8)
            yield Segment(_FILLS[0][0] * full + (_EIGHTHS[rest] if rest else ""), Style.parse(style))
            return
        cells = [max(round(value / self.top * width), 1 if value > 0 else 0) for value, _ in self.parts]
        while sum(cells) > width:  # rounding up slivers can overflow the cell: trim the widest part
            cells[cells.index(max(cells))] -= 1
        for index, ((_, style), n) in enumerate(zip(self.parts, cells, strict=True)):
            if n:
                yield Segment(_FILLS[index][1 if ascii_only else 0] * n, Style.parse(style))


class _Legend:
    """Which fill is which part of a stacked bar, in the characters the console will draw."""

    def __init__(self, names: Sequence[tuple[str, str]]) -> None:
        self.names = names  # (name, style) per part, in part order

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        legend = Text("bars: ")
        for index, (name, style) in enumerate(self.names):
            legend.append(_FILLS[index][1 if options.ascii_only else 0] * 2, style)
            legend.append(f" {name}  ")
        legend.rstrip()
        yield legend


def reports_chart(found: Sequence[reports.Report]) -> RenderableType:
    """Per window: users and workspaces (one scale), allowed and denied requests (another scale), each with its
    number; the header says whether the report is complete and what came late into it. A window without
    traffic (before a fleet started, say) is one line."""
    ids_top = max((max(r.unique_users, r.unique_workspaces) for r in found), default=0)
    requests_top = max((max(r.allowed_requests, r.denied_requests) for r in found), default=0)
    measures = [("users", "unique_users", ids_top, "cyan"), ("workspaces", "unique_workspaces", ids_top, "blue"),
                ("allowed", "allowed_requests", requests_top, "green"),
                ("denied", "denied_requests", requests_top, "red")]
    digits = max((len(str(getattr(r, field))) for r in found for _, field, _, _ in measures), default=1)
    parts: list[RenderableType] = [Text(
        f"{len(found)} report(s), UTC; bars: users and workspaces on one scale (top {ids_top}), requests on "
        f"another (top {requests_top})", style="dim")]
    for report in found:
        parts.extend(_report_header(report))
        if not any(getattr(report, field) for _, field, _, _ in measures):
            parts.append(Text("  no traffic: 0 users, 0 workspaces, 0 allowed, 0 denied", style="dim"))
            continue
        grid = _grid(label=len("  workspaces"), numbers=[digits])
        for label, field, top, style in measures:
            value = getattr(report, field)
            grid.add_row(Text(f"  {label}"), Bar([(value, style)], top), Text(str(value)))
        parts.append(grid)
    return Group(*parts)


def _report_header(report: reports.Report) -> list[Text]:
    header = Text(f"{report.window_start:%Y-%m-%d %H:%M:%S} - {report.window_end:%H:%M:%S}", style="bold")
    header.append(f"  {report.replicas} replica(s), ")
    if report.complete:
        header.append("complete", style="green")
    else:
        header.append(f"INCOMPLETE: {report.replicas_missing} replica(s) missing", style="bold yellow")
    late = [(report.late_allowed_requests, "allowed"), (report.late_denied_requests, "denied"),
            (report.late_unique_users, "users"), (report.late_unique_workspaces, "workspaces")]
    if not any(n for n, _ in late):
        return [header]
    return [header, Text("  late, of earlier windows: " + ", ".join(f"{n} {name}" for n, name in late if n),
                         style="magenta")]


def meters_chart(rows: Sequence[Mapping[str, Any]]) -> RenderableType:
    """Per meter and group (its dimensions), the quantity of each window, one scale per meter; a late row
    (records of an earlier window that came while this one was open) is marked. ``rows`` as ``meter_rows()``."""
    parts: list[RenderableType] = [Text("meter results per group, windows in UTC; one scale per meter", style="dim")]
    by_meter: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for row in rows:
        by_meter.setdefault(row["meter"], {}).setdefault(_group_label(row), []).append(row)
    for meter, groups in sorted(by_meter.items()):
        members = [row for group in groups.values() for row in group]
        top = max(abs(row["quantity"]) for row in members)
        digits = max(len(str(row["quantity"])) for row in members)
        records = max(len(_records(row)) for row in members)
        parts.append(Text(f"{meter}  ({len(groups)} group(s), top {top})", style="bold"))
        for label, group in sorted(groups.items()):
            parts.append(Text(f"  {label}"))
            grid = _grid(label=len("2000-01-01 00:00:00") + 4, numbers=[digits], texts=[records])
            for row in group:
                grid.add_row(Text("    " + _when(row["window_start"])), Bar([(row["quantity"], "green")], top),
                             Text(str(row["quantity"])), Text(_records(row), style="magenta" if row["late"] else ""))
            parts.append(grid)
    return Group(*parts)


def _group_label(row: Mapping[str, Any]) -> str:
    if row["overflow"]:
        return "(overflow: groups past the meter's limit)"
    return ", ".join(f"{k}={v}" for k, v in sorted(row["dimensions"].items())) or "(no dimensions)"


def _records(row: Mapping[str, Any]) -> str:
    return f"{row['records']} record(s)" + (", late" if row["late"] else "")


_OUTCOMES = (("ok", "succeeded", "green"), ("failed", "failed", "red"), ("timed out", "timed_out", "yellow"))


def experiences_chart(rows: Sequence[Mapping[str, Any]]) -> RenderableType:
    """Per experience and urgency, each window's completed journeys as one bar of succeeded (ok), failed and timed
    out (one scale per experience and urgency), with the counts and the duration percentiles p50, p90, p99."""
    groups: dict[tuple[str, str], list[tuple[Mapping[str, Any], list[str]]]] = {}
    for row in rows:
        cells = [f"{row['started']} started", *(f"{row[field]} {name}" for name, field, _ in _OUTCOMES),
                 *(f"{p} {_seconds(row[f'duration_{p}_s'])}" for p in ("p50", "p90", "p99"))]
        groups.setdefault((row["experience_id"], row["urgency"]), []).append((row, cells))
    every = [cells for group in groups.values() for _, cells in group]
    widths = [max(len(cells[i]) for cells in every) for i in range(len(every[0]))] if every else []
    parts: list[RenderableType] = [
        Text("experience SLIs per window, windows in UTC; one scale per experience and urgency", style="dim"),
        _Legend([(name, style) for name, _, style in _OUTCOMES])]
    for (experience, urgency), group in sorted(groups.items()):
        top = max(sum(row[field] for _, field, _ in _OUTCOMES) for row, _ in group)
        parts.append(Text(f"{experience} ({urgency})", style="bold"))
        grid = _grid(label=len("2000-01-01 00:00:00") + 2, numbers=widths[:4], texts=widths[4:])
        for row, cells in group:
            bar = Bar([(row[field], style) for _, field, style in _OUTCOMES], top)
            grid.add_row(Text("  " + _when(row["window_start"])), bar, *(Text(cell) for cell in cells))
        parts.append(grid)
    return Group(*parts)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:g}s"


def _grid(*, label: int, numbers: Sequence[int], texts: Sequence[int] = ()) -> Table:
    """A label, a bar taking the rest of the width, then right-aligned numbers and left-aligned notes: fixed
    widths, so that the grids of one chart line up."""
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(width=label, no_wrap=True)
    grid.add_column(ratio=1, min_width=10, no_wrap=True)
    for width in numbers:
        grid.add_column(width=width, justify="right", no_wrap=True)
    for width in texts:
        grid.add_column(width=width, no_wrap=True)
    return grid


def _when(iso: str) -> str:
    """An ISO 8601 UTC time as a chart label: ``2027-01-15 08:00:00``."""
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%S")


def meter_rows(found: Iterable[Mapping[str, Any]], *, flat: bool = False) -> list[dict[str, Any]]:
    """Stored meter results as shown: the quantity as a number (an int when whole), the dimensions as a map
    (``flat``: as ``k=v,k=v`` text, ``-`` for none, for a table)."""
    shown = []
    for row in found:
        quantity = decimal.Decimal(row["quantity"]).scaleb(-row["decimals"])
        shown.append({
            "window_start": reports.iso_utc(row["window_start"]),
            "meter": row["meter"],
            "dimensions": {} if row["group_key"] == meters.OVERFLOW else json.loads(row["group_key"]),
            "overflow": row["group_key"] == meters.OVERFLOW, "late": bool(row["late"]),
            "quantity": int(quantity) if quantity == quantity.to_integral_value() else float(quantity),
            "records": row["records"]})
    if flat:
        for row in shown:
            row["dimensions"] = ",".join(f"{k}={v}" for k, v in row["dimensions"].items()) or "-"
    return shown


def sli_rows(found: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored experience SLIs as shown."""
    return [{"window_start": reports.iso_utc(r["window_start"]), **{k: r[k] for k in (
        "experience_id", "urgency", "started", "succeeded", "failed", "timed_out", "completed",
        "duration_p50_s", "duration_p90_s", "duration_p99_s")}} for r in found]


def outbox_rows(found: Iterable[Mapping[str, Any]], *, now: float) -> list[dict[str, Any]]:
    """The outbox summary as shown: items per writer and status, and the oldest one's age."""
    return [{"writer": r["writer"], "status": r["status"], "items": r["items"],
             "oldest_age_s": round(now - r["oldest"], 1)} for r in found]


def outbox_items(found: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": r["id"], "writer": r["writer"], "status": r["status"], "attempts": r["attempts"],
             "report_id": r["report_id"], "event_id": str(r["event_id"]), "last_error": r["last_error"] or ""}
            for r in found]


def quarantine_rows(found: Iterable[Mapping[str, Any]], *, payload: bool) -> list[dict[str, Any]]:
    """Quarantined items as shown; the payload only where it fits (JSON lines, not a table)."""
    return [{"id": r["id"], "kind": r["kind"], "ref": r["ref"], "status": r["status"], "attempts": r["attempts"],
             "first": reports.iso_utc(r["first_at"], "seconds"), "last": reports.iso_utc(r["last_at"], "seconds"),
             "reason": r["reason"], **({"payload": r["payload"]} if payload else {})} for r in found]


def listing(rows: Sequence[Mapping[str, Any]], fmt: str, *, empty: str) -> str:
    """Rows as JSON lines, or as a plain table (``empty`` when there are none)."""
    if fmt == "json":
        return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    if not rows:
        return empty + "\n"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in columns) for row in rows]
    return "".join(line.rstrip() + "\n" for line in lines)


__all__ = ["Bar", "experiences_chart", "listing", "meter_rows", "meters_chart", "outbox_items", "outbox_rows",
           "quarantine_rows", "reports_chart", "sli_rows"]
