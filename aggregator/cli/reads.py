"""`reports`, `meters`, `experiences` and `distinct`: finished results as tables, JSON, CSV or charts.

Handlers only: they must never define flags, exit the process, or write to the database (beyond the
migrations an embedded SQLite store applies on opening).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from typing import Any

from aggregator import charts, config, distinct, dsn, exceptions, options, reports, runtime
from aggregator.cli import db, export


def print_reports(args: argparse.Namespace) -> int:
    since = None
    if args.since:
        import datetime as dt

        try:
            parsed = dt.datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError:
            raise exceptions.ConfigError(
                f"--since={args.since!r} is not an ISO 8601 time; use e.g. 2026-01-31T12:00:00Z") from None
        since = int((parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp())

    csv = args.format == "csv" and not args.chart
    pseudonymizer = export.pseudonyms(args, require="aggregator reports --format csv") if csv else None
    found = asyncio.run(runtime.read_reports(dsn.resolve_database_url(args.database_url), since,
                                             pooler=dsn.resolve_database_pooler(args.database_pooler)))
    if not found:
        print(next_report(args.config, first=since is None), file=sys.stderr)
    if args.chart:
        show(charts.reports_chart(found) if found else None)
    elif pseudonymizer is not None:
        sys.stdout.write(reports.format_csv(pseudonymized(report, pseudonymizer) for report in found))
    else:
        sys.stdout.write({"table": reports.format_table, "json": reports.format_json}[args.format](found))
    return 0


def pseudonymized(report: reports.Report, pseudonymizer: Any) -> reports.Report:
    """``report`` with its identifiers (``generated_by``) hashed as the export hashes them."""
    from aggregator import export

    fields = report.to_dict()
    hashed = pseudonymizer.apply(export.KIND, fields)
    return dataclasses.replace(report, **{k: v for k, v in hashed.items() if v != fields[k]})


def next_report(config_path: str | None, *, first: bool) -> str:
    """Why there is nothing to show, and when there will be: timings as the daemon would run with them (its file,
    AGGREGATOR_* variables), or the defaults where that configuration cannot be read (unless --config named it)."""
    try:
        settings = options.load_daemon_settings({}, config_path=config_path).aggregator
    except exceptions.ConfigError:
        if config_path is not None:
            raise
        settings = config.Settings.build(database_url="sqlite:///unused.db", delivery=config.DeliverySettings())
    return settings.next_report(time.time()).sentence(first=first)


def show(chart: Any, empty: str = "") -> int:
    """Print a chart (or the line ``empty`` for none): styled on a terminal, else plain text without trailing blanks."""
    from rich.console import Console

    console = Console(highlight=False)
    if chart is None:
        sys.stdout.write(empty and empty + "\n")
    elif console.is_terminal:
        console.print(chart)
    else:
        with console.capture() as captured:
            console.print(chart)
        sys.stdout.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    return 0


def print_meters(args: argparse.Namespace) -> int:
    found = asyncio.run(db.with_store(args, lambda db: db.meter_results(meter=args.meter)))
    shown = charts.meter_rows(found, flat=args.format == "table" and not args.chart)
    if args.chart:
        return show(charts.meters_chart(shown) if shown else None, "no meter results yet")
    sys.stdout.write(charts.listing(shown, args.format, empty="no meter results yet"))
    return 0


def print_distinct(args: argparse.Namespace) -> int:
    """Exact (path ids or daily) while the ids are kept, else estimated from sketches (path sketch, with bounds)."""
    def moment(text: str) -> str | float:
        try:
            return float(text)
        except ValueError:
            return text

    start, end, dim = distinct.check_range(moment(args.start), moment(args.end), args.dim, names=("--from", "--to"))
    found = asyncio.run(db.with_store(args, lambda db: db.distinct(start, end, dim))).as_dict()
    sys.stdout.write(charts.listing([found], args.format, empty=""))
    return 0


def print_experiences(args: argparse.Namespace) -> int:
    shown = charts.sli_rows(asyncio.run(db.with_store(args, lambda db: db.experience_slis())))
    if args.chart:
        return show(charts.experiences_chart(shown) if shown else None, "no experience SLIs yet")
    sys.stdout.write(charts.listing(shown, args.format, empty="no experience SLIs yet"))
    return 0
