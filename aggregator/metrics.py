"""Prometheus text exposition of the daemon's figures (format 0.0.4), without a client library.

Counters of the API live here; the flusher's and collector's figures come from ``Aggregator.status()``,
the outbox's and the report stream's from the database (those of every replica): its completeness, and
the figures of the last complete report, for a dashboard (``aggregator/grafana/dashboard.json``).
"""

from __future__ import annotations

import collections
import dataclasses
import decimal
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from aggregator import meters, reports

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


# Why the API refused a request (http_guard and api count them); each is exposed, at 0 too.
REJECTED = ("unauthorized", "forbidden", "invalid", "too_large", "unsupported_media_type", "foreign_host",
            "cross_origin")


@dataclasses.dataclass
class Counters:
    events_accepted: int = 0
    records_accepted: int = 0
    checkpoints_accepted: int = 0
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)


@dataclasses.dataclass(frozen=True, slots=True)
class GroupFigure:
    """One meter group's quantity in the last complete report: a series of ``last_complete_report_meter_quantity``."""

    meter: str
    group: str  # rank by quantity within the meter ("1": the largest), or meters.OVERFLOW
    dimensions: tuple[tuple[str, str], ...]  # as the pull API shows them; a withheld (null) one is left out
    quantity: float


@dataclasses.dataclass
class ReportTally:
    """Completeness of the report stream in the database, whichever replica wrote each report, and the
    figures of the last complete report.

    Reports never change and their ids follow commit order, so the stream is read once, onwards from
    the last report counted; a report seen twice (two scrapes at once) counts once. The meter groups of
    the last complete report are read once per such report, not on every scrape.
    """

    PAGE: ClassVar[int] = 1000  # reports per read
    PAGES_PER_SCRAPE: ClassVar[int] = 20  # a long stream is caught up over several scrapes, each one quick
    GROUPS_PER_METER: ClassVar[int] = 10  # groups shown one by one; the rest are summed into __overflow__

    after: int = 0  # id of the newest report counted
    incomplete: int = 0
    last_replicas_missing: int | None = None  # of the newest report; None before the first report
    caught_up: bool = False  # the figures hold every report; until then they are not shown
    last_complete: reports.Report | None = None  # the complete report of the latest window
    groups: list[GroupFigure] = dataclasses.field(default_factory=list)  # of the report ``groups_of``
    groups_of: int | None = None

    def add(self, page: Iterable[reports.Report]) -> None:
        for report in page:
            if report.id > self.after:
                self.after = report.id
                self.last_replicas_missing = report.replicas_missing
                if not report.complete:
                    self.incomplete += 1
                elif self.last_complete is None or report.window_start > self.last_complete.window_start:
                    self.last_complete = report

    async def catch_up(self, read: Callable[[int, int], Awaitable[Sequence[reports.Report]]],
                       results: Callable[[list[int]], Awaitable[Sequence[meters.Result]]] | None = None,
                       shown: Callable[[dict[str, str]], Mapping[str, str | None]] | None = None) -> None:
        """Count the reports after ``after``; ``read(after, limit)`` gives them in id order.

        ``results(report_ids)`` gives the meter results of reports, ``shown(dimensions)`` a group's
        dimensions as they may be shown (None where withheld; the daemon shows allowlisted ones only);
        without it every value is withheld, so no caller puts identifiers in the exposition by omission.
        """
        for _ in range(self.PAGES_PER_SCRAPE):
            page = await read(self.after, self.PAGE)
            self.add(page)
            if len(page) < self.PAGE:
                self.caught_up = True
                break
        last = self.last_complete
        if results is None or not self.caught_up or last is None or self.groups_of == last.id:
            return
        groups = meter_groups(await results([last.id]), shown or _withheld, self.GROUPS_PER_METER)
        if self.last_complete is last:  # a concurrent scrape may have moved on to a newer report meanwhile
            self.groups, self.groups_of = groups, last.id


def _withheld(dimensions: dict[str, str]) -> dict[str, str | None]:
    return dict.fromkeys(dimensions)


def meter_groups(results: Iterable[meters.Result], shown: Callable[[dict[str, str]], Mapping[str, str | None]],
                 per_meter: int) -> list[GroupFigure]:
    """Each meter's groups of the window's own traffic (late data is left out, as in the report's own
    figures): the ``per_meter`` largest one by one, ranked; the rest summed with the meter's __overflow__
    group, so that a meter adds at most ``per_meter + 1`` series whatever its max_groups.
    """
    by_meter: dict[str, list[tuple[meters.Result, tuple[tuple[str, str], ...]]]] = {}
    for result in results:
        if not result.late:
            dimensions = () if result.overflow else tuple(
                (name, value) for name, value in shown(result.dimensions).items() if value is not None)
            by_meter.setdefault(result.meter, []).append((result, dimensions))
    out: list[GroupFigure] = []
    for meter, found in sorted(by_meter.items()):
        # Ties in the order of the shown values: the raw ones would tell which of two hashed ids sorts first.
        ranked = sorted((f for f in found if not f[0].overflow), key=lambda f: (-f[0].quantity, f[1]))
        out.extend(GroupFigure(meter, str(rank), dimensions, float(result.quantity))
                   for rank, (result, dimensions) in enumerate(ranked[:per_meter], start=1))
        rest = [result for result, _ in ranked[per_meter:]] + [result for result, _ in found if result.overflow]
        if rest:
            out.append(GroupFigure(meter, meters.OVERFLOW, (),
                                   float(sum((r.quantity for r in rest), decimal.Decimal(0)))))
    return out


def render(status: dict[str, Any], counters: Counters, outbox: list[dict[str, Any]] | None = None,
           overflow: list[dict[str, Any]] | None = None, tally: ReportTally | None = None) -> str:
    """The exposition; ``outbox``, ``overflow`` and ``tally`` come from the database (None: not available)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP aggregator_{name} {help_}")
        lines.append(f"# TYPE aggregator_{name} {kind}")
        lines.extend(f"aggregator_{name}{labels} {_number(value)}" for labels, value in samples)

    metric("events_accepted_total", "counter", "Events accepted by POST /v1/track.",
           [("", counters.events_accepted)])
    metric("records_accepted_total", "counter", "Meter records accepted by POST /v1/record.",
           [("", counters.records_accepted)])
    metric("checkpoints_accepted_total", "counter", "Checkpoints accepted by POST /v1/checkpoints.",
           [("", counters.checkpoints_accepted)])
    metric("requests_rejected_total", "counter", "API requests rejected, by reason.",
           [(f'{{reason="{r}"}}', counters.rejected[r]) for r in REJECTED])
    metric("unflushed_events", "gauge", "Events tracked in this replica and not yet durable.",
           [("", status.get("unflushed_events", status["pending_events"]))])
    contact = status.get("store")
    if contact is not None:
        metric("store_up", "gauge", "1 while the database answers this replica and its schema is usable, else 0.",
               [("", 1.0 if contact["connected"] and contact["ready"] else 0.0)])
        metric("store_outage_seconds", "gauge", "Seconds since the current outage began (0 when none).",
               [("", contact["outage_for_s"] or 0.0)])
        metric("store_outages_total", "counter", "Outages of the database seen by this replica.",
               [("", contact["outages"])])
        metric("store_failures_in_row", "gauge", "Failed attempts to reach the database since the last answer.",
               [("", contact["failures_in_row"])])
    if "spooled_events" in status:
        metric("spooled_events", "gauge", "Events in this replica's local spool, waiting for the database.",
               [("", status["spooled_events"])])
    flush = status.get("flush")
    if flush is not None:
        metric("watermark_seconds", "gauge", "This replica's last watermark the database accepted (epoch seconds).",
               [("", flush.watermark if flush.watermark is not None else float("nan"))])
        metric("spilled_batches_total", "counter", "Times queued data went to the spool (memory budget, stop).",
               [("", flush.spilled_batches)])
        metric("replayed_batches_total", "counter", "Spooled batches applied to the database.",
               [("", flush.replayed_batches)])
        lag = time.time() - flush.last_success_at if flush.last_success_at else float("nan")
        metric("flushes_total", "counter", "Flush batches applied.", [("", flush.flushes)])
        metric("flush_failures_total", "counter", "Flush attempts that failed (and are retried).",
               [("", flush.failures)])
        metric("flush_duration_seconds", "gauge", "Duration of the last successful flush.",
               [("", flush.last_duration)])
        metric("flush_lag_seconds", "gauge", "Seconds since the last successful flush.", [("", lag)])
        metric("events_flushed_total", "counter", "Events made durable.", [("", flush.events_flushed)])
        metric("meter_overflow_flushed_total", "counter",
               "Meter records this replica's flushes sent to an __overflow__ group (max_groups reached).",
               [("", flush.meter_overflow)])
    collector = status.get("collector")
    if collector is not None:
        metric("collector_runs_total", "counter", "Collector runs in this replica.", [("", collector.runs)])
        metric("reports_written_total", "counter", "Reports written by this replica.",
               [("", collector.reports_written)])
        metric("collector_failures_total", "counter", "Collector runs that failed.", [("", collector.failures)])
        metric("experiences_timed_out_total", "counter", "Experiences this replica timed out as failures.",
               [("", collector.timed_out)])
    delivery = status.get("delivery")
    if delivery:
        for name, help_, field in (
                ("delivered_total", "Outbox items delivered by this replica, by writer.", "delivered"),
                ("delivery_retries_total", "Delivery attempts that failed and will be retried, by writer.",
                 "retried"),
                ("dead_lettered_total", "Outbox items this replica moved to dead-letter, by writer.", "dead")):
            metric(f"outbox_{name}", "counter", help_,
                   [(f'{{writer="{writer}"}}', getattr(stats, field)) for writer, stats in sorted(delivery.items())])
    if outbox is not None:
        now = time.time()
        metric("outbox_items", "gauge", "Outbox items in the database, by writer and status (all replicas).",
               [(f'{{writer="{r["writer"]}",status="{r["status"]}"}}', r["items"]) for r in outbox])
        metric("outbox_oldest_pending_seconds", "gauge", "Age of the oldest undelivered item, by writer.",
               [(f'{{writer="{r["writer"]}"}}', now - r["oldest"]) for r in outbox if r["status"] == "pending"])
    if overflow is not None:
        metric("meter_overflow_records", "gauge",
               "Meter records in __overflow__ groups, by meter, over the windows the database keeps (all replicas).",
               [(f'{{meter="{r["meter"]}"}}', r["records"]) for r in overflow])
    if tally is not None and tally.caught_up:
        metric("reports_incomplete_total", "counter",
               "Reports written with replicas missing (replicas_missing > 0), by any replica.",
               [("", tally.incomplete)])
        if tally.last_replicas_missing is not None:
            metric("last_report_replicas_missing", "gauge",
                   "Replica incarnations given up on in the newest report (0: complete).",
                   [("", tally.last_replicas_missing)])
        if tally.last_complete is not None:
            _last_complete(metric, tally)
    found = status.get("health")
    if found is not None:  # one-hot, so an alert reads `aggregator_health{state="degraded"} == 1`
        metric("health", "gauge", "1 for this replica's health state (ok, degraded or failing; see /healthz), else 0.",
               [(f'{{state="{state}"}}', 1.0 if found["state"] == state else 0.0)
                for state in ("ok", "degraded", "failing")])
    quarantined = status.get("quarantined")
    if quarantined is not None:
        metric("quarantined_items", "gauge",
               "Items set aside in the quarantine, by kind (all replicas): see `aggregator quarantine list`.",
               [(f'{{kind="{kind}"}}', n) for kind, n in sorted(quarantined.items())])
    errors = (flush.failures if flush else 0) + (collector.failures if collector else 0)
    metric("errors_total", "counter", "Errors of flushes and collections in this replica.", [("", errors)])
    return "\n".join(lines) + "\n"


def _last_complete(metric: Callable[[str, str, str, list[tuple[str, float]]], None], tally: ReportTally) -> None:
    """The last complete report's figures: the same in every replica (read from the database), so a
    dashboard takes their max over replicas."""
    last = tally.last_complete
    assert last is not None
    for name, help_, value in (
            ("unique_users", "Unique users in the window of the last complete report.", last.unique_users),
            ("unique_workspaces", "Unique workspaces in the window of the last complete report.",
             last.unique_workspaces),
            ("allowed_requests", "Allowed requests in the window of the last complete report.",
             last.allowed_requests),
            ("denied_requests", "Denied requests in the window of the last complete report.", last.denied_requests),
            ("window_start_seconds", "Start of the last complete report's window (epoch seconds).",
             last.window_start.timestamp()),
            ("window_end_seconds", "End of the last complete report's window (epoch seconds).",
             last.window_end.timestamp())):
        metric(f"last_complete_report_{name}", "gauge", help_, [("", value)])
    if tally.groups_of == last.id:
        metric("last_complete_report_meter_quantity", "gauge",
               "A meter's quantity per group in the window of the last complete report (late data left out): "
               f"group is the rank by quantity (1: the largest, at most {tally.GROUPS_PER_METER} per meter), "
               f"or {meters.OVERFLOW} for the meter's overflow group plus the smaller groups, summed; "
               "dimension_NAME labels show each dimension as GET /v1/meters does, left out where it shows null.",
               [(_labels({"meter": g.meter, "group": g.group} | {f"dimension_{name}": value
                                                                  for name, value in g.dimensions}), g.quantity)
                for g in tally.groups])


def _labels(labels: Mapping[str, str]) -> str:
    """A label set, its values escaped as the text format wants (backslash, double quote, line feed)."""
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{name}="{escape(value)}"' for name, value in labels.items()) + "}"


def _number(value: float) -> str:
    """A sample value: whole numbers in full (``:g`` would print an epoch time as 1.8e+09), others exactly."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))
