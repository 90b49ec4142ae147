"""What the dashboard draws: the reports of a range of windows, their meter results and experience SLIs, as panels.

Every panel has a column per report (its window), in window order, so the charts line up. The numbers
are the pull API's (``/v1/reports``, ``/v1/meters``, ``/v1/experiences``): the same rows, and meter
dimensions shown as ``api_models.shown_dimensions`` shows them (pseudonymized under the key, in clear
on the allowlist, withheld without a key). Late data is drawn as lighter segments stacked on the
window's own, and a window whose report misses replicas is marked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from aggregator import api_models, meters, privacy
from aggregator.dashboard import svg
from aggregator.dashboard.svg import Number, Panel, Series
from aggregator.reports import Report, to_datetime

# Okabe-Ito colours by meaning: good news green, refusals vermillion, timeouts orange.
GREEN, RED, ORANGE, BLUE, PINK, SKY, BLACK = "#009E73", "#D55E00", "#E69F00", "#0072B2", "#CC79A7", "#56B4E9", "#000000"
OVERFLOW = meters.OVERFLOW  # the group of records beyond a meter's max_groups
SHORT = 12  # characters of a dimension value in a legend
WITHHELD = "(withheld)"  # a dimension value with no pseudonym_key to hash it under (api_models: null)


def windows(found: Sequence[Report]) -> list[svg.Window]:
    return [svg.Window(r.window_start, r.window_end, r.replicas_missing) for r in found]


def _field(found: Sequence[Report], name: str) -> list[Number | None]:
    return [getattr(r, name) for r in found]


def requests(reports: Sequence[Report]) -> list[Panel]:
    """Allowed and denied requests per window; late ones (of earlier windows, counted here) stacked on top."""
    def total(name: str) -> int:
        return sum(getattr(r, name) for r in reports)

    incomplete = sum(1 for r in reports if r.replicas_missing)
    subtitle = (f"{len(reports)} windows, {incomplete} incomplete; allowed {total('allowed_requests')}, denied "
                f"{total('denied_requests')}; late allowed {total('late_allowed_requests')}, late denied "
                f"{total('late_denied_requests')}")
    return [Panel("requests", "Requests per window", "requests", windows(reports), subtitle=subtitle, bars=[
        Series("allowed_requests", "allowed", _field(reports, "allowed_requests"), GREEN),
        Series("denied_requests", "denied", _field(reports, "denied_requests"), RED),
        Series("late_allowed_requests", "late allowed (of earlier windows)",
               _field(reports, "late_allowed_requests"), GREEN, late=True),
        Series("late_denied_requests", "late denied (of earlier windows)",
               _field(reports, "late_denied_requests"), RED, late=True)])]


def uniques(reports: Sequence[Report]) -> list[Panel]:
    """Unique workspaces and users per window, side by side; late ones (new to an earlier window) on top."""
    subtitle = "late: ids new to an earlier, already reported window, counted in this one"
    return [Panel("uniques", "Unique workspaces and users per window", "ids", windows(reports), subtitle=subtitle,
                  bars=[Series("unique_workspaces", "workspaces", _field(reports, "unique_workspaces"), BLUE),
                        Series("late_unique_workspaces", "late workspaces",
                               _field(reports, "late_unique_workspaces"), BLUE, late=True),
                        Series("unique_users", "users", _field(reports, "unique_users"), PINK, stack=1),
                        Series("late_unique_users", "late users", _field(reports, "late_unique_users"), PINK,
                               late=True, stack=1)])]


def meter_panels(reports: Sequence[Report], results: Sequence[meters.Result],
                 pseudonyms: privacy.Pseudonymizer) -> list[Panel]:
    """A panel per meter: each window's quantity per dimension group, stacked; late quantities lighter."""
    column = {r.id: index for index, r in enumerate(reports)}
    by_meter: dict[str, dict[tuple[str, bool], list[Number | None]]] = {}
    shown: dict[str, dict[str, str | None]] = {}
    units: dict[str, str] = {}
    for result in results:
        if result.report_id not in column:
            continue
        dimensions = {} if result.overflow else api_models.shown_dimensions(result.dimensions, pseudonyms)
        group = OVERFLOW if result.overflow else json.dumps(dimensions)
        shown[group] = dimensions
        units[result.meter] = result.unit or units.get(result.meter, "")
        values = by_meter.setdefault(result.meter, {}).setdefault((group, result.late), [None] * len(reports))
        values[column[result.report_id]] = result.quantity
    panels = []
    for meter, groups in sorted(by_meter.items()):
        order = sorted({group for group, _ in groups}, key=lambda g: (g == OVERFLOW, g))
        bars = [series for index, group in enumerate(order)
                for series in _group_series(meter, group, shown[group], groups, svg.PALETTE[index % len(svg.PALETTE)])]
        panels.append(Panel(f"meter:{meter}", meter, units[meter], windows(reports), bars=bars,
                            subtitle=f"{len(order)} dimension group{'s' if len(order) != 1 else ''}"))
    return panels


def _group_series(meter: str, group: str, dimensions: Mapping[str, str | None],
                  groups: Mapping[tuple[str, bool], Sequence[Number | None]], color: str) -> list[Series]:
    """A dimension group's quantities per window, and its late ones if any, in one colour."""
    overflow = group == OVERFLOW
    data = (("meter", meter), ("dimensions", "{}" if overflow else group), ("overflow", str(overflow).lower()))
    label, legend = _group_label(dimensions, overflow), _group_label(dimensions, overflow, short=True)
    return [Series(f"{group}/late" if late else group, label + suffix, groups[group, late], color, late=late,
                   data=data, legend=legend + suffix)
            for late, suffix in ((False, ""), (True, " (late)")) if (group, late) in groups]


def _group_label(dimensions: Mapping[str, str | None], overflow: bool, *, short: bool = False) -> str:
    """``name=value, ...``; ``short`` cuts long values (a pseudonym is 64 hex digits) so each dimension shows."""
    if overflow:
        return "__overflow__ (groups beyond max_groups)"
    if not dimensions:
        return "(no dimensions)"

    def shown(value: str | None) -> str:
        if value is None:
            return WITHHELD
        return value[:SHORT] + "\u2026" if short and len(value) > SHORT + 1 else value

    return ", ".join(f"{name}={shown(value)}" for name, value in dimensions.items())


OUTCOMES = (("succeeded", "success", GREEN), ("failed", "failure", RED), ("timed_out", "timeout", ORANGE))
DURATIONS = (("duration_p50_s", "p50", SKY), ("duration_p90_s", "p90", BLUE), ("duration_p99_s", "p99", BLACK))


def experience_panels(reports: Sequence[Report], slis: Sequence[api_models.SliOut]) -> list[Panel]:
    """Two panels per experience and urgency: outcomes per window (stacked), and duration percentiles."""
    column = {r.id: index for index, r in enumerate(reports)}
    by_journey: dict[tuple[str, str], list[api_models.SliOut | None]] = {}
    for sli in slis:
        if sli.report_id in column:
            by_journey.setdefault((sli.experience_id, sli.urgency), [None] * len(reports))[column[sli.report_id]] = sli
    panels = []
    for (experience, urgency), rows in sorted(by_journey.items()):
        data = (("experience", experience), ("urgency", urgency))
        key = f"experience:{experience}:{urgency}"
        completed = sum(row.completed for row in rows if row is not None)
        panels.append(Panel(f"{key}:outcomes", f"{experience} ({urgency}): outcomes", "experiences",
                            windows(reports), bars=[_sli_series(rows, *o, data) for o in OUTCOMES],
                            subtitle=_rates(rows, completed)))
        panels.append(Panel(f"{key}:durations", f"{experience} ({urgency}): duration", "s", windows(reports),
                            lines=[_sli_series(rows, *d, data) for d in DURATIONS],
                            subtitle="percentiles of the experiences completed in each window"))
    return panels


def _sli_series(rows: Sequence[api_models.SliOut | None], name: str, label: str, color: str,
                data: Sequence[tuple[str, str]]) -> Series:
    values: list[Number | None] = [None if row is None else getattr(row, name) for row in rows]
    return Series(name, label, values, color, data=data)


def _rates(rows: Sequence[api_models.SliOut | None], completed: int) -> str:
    """Success, failure and timeout as shares of what completed over the range."""
    if not completed:
        return "no experience completed in this range"

    def share(name: str) -> str:
        part = sum(getattr(row, name) for row in rows if row is not None)
        return f"{100 * part / completed:.1f}% ({part})"

    return (f"{completed} completed: success {share('succeeded')}, failure {share('failed')}, timeout "
            f"{share('timed_out')}")


TITLES = {"requests": "Allowed and denied requests per window", "uniques": "Unique workspaces and users per window",
          "meters": "Meters per dimension group", "experiences": "Experience SLIs"}
EMPTY = {"requests": "no reports in this range", "uniques": "no reports in this range",
         "meters": "no meter results in this range", "experiences": "no experience SLIs in this range"}


def sli_out(row: Mapping[str, Any]) -> api_models.SliOut:
    """A stored SLI row as the pull API shows it (``GET /v1/experiences``)."""
    return api_models.SliOut(**{**row, "window_start": to_datetime(row["window_start"])})


__all__ = ["EMPTY", "TITLES", "experience_panels", "meter_panels", "requests", "sli_out", "uniques", "windows"]
