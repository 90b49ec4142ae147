"""Prometheus text exposition of the daemon's figures (format 0.0.4), without a client library.

Counters of the API live here; the flusher's and collector's figures come from ``Aggregator.status()``,
the outbox's and the report stream's from the database (those of every replica).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, ClassVar

from aggregator import reports

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


@dataclasses.dataclass
class ReportTally:
    """Completeness of the report stream in the database, whichever replica wrote each report.

    Reports never change and their ids follow commit order, so the stream is read once, onwards from
    the last report counted; a report seen twice (two scrapes at once) counts once.
    """

    PAGE: ClassVar[int] = 1000  # reports per read
    PAGES_PER_SCRAPE: ClassVar[int] = 20  # a long stream is caught up over several scrapes, each one quick

    after: int = 0  # id of the newest report counted
    incomplete: int = 0
    last_replicas_missing: int | None = None  # of the newest report; None before the first report
    caught_up: bool = False  # the figures hold every report; until then they are not shown

    def add(self, page: Iterable[reports.Report]) -> None:
        for report in page:
            if report.id > self.after:
                self.after = report.id
                self.last_replicas_missing = report.replicas_missing
                if not report.complete:
                    self.incomplete += 1

    async def catch_up(self, read: Callable[[int, int], Awaitable[Sequence[reports.Report]]]) -> None:
        """Count the reports after ``after``; ``read(after, limit)`` gives them in id order."""
        for _ in range(self.PAGES_PER_SCRAPE):
            page = await read(self.after, self.PAGE)
            self.add(page)
            if len(page) < self.PAGE:
                self.caught_up = True
                return


def render(status: dict[str, Any], counters: Counters, outbox: list[dict[str, Any]] | None = None,
           overflow: list[dict[str, Any]] | None = None, tally: ReportTally | None = None) -> str:
    """The exposition; ``outbox``, ``overflow`` and ``tally`` come from the database (None: not available)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP aggregator_{name} {help_}")
        lines.append(f"# TYPE aggregator_{name} {kind}")
        lines.extend(f"aggregator_{name}{labels} {value:g}" for labels, value in samples)

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
