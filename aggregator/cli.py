"""The aggregator command line: the daemon, one-shot collection, the schema, reports, meters and SLIs (as
tables, JSON, CSV or charts), CSV export, the outbox, the quarantine, and a demo.

Every option falls back to an AGGREGATOR_* environment variable; COMMAND --help names it.
Exit codes: 0 success, 1 failure at run time (database, a demo mismatch), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from aggregator import charts, config, demo, distinct, exceptions, flush, logs, migrate, quarantine, reports, runtime


def _env_option(parser: argparse.ArgumentParser, flag: str, env: str, help: str, **kwargs: Any) -> None:
    default = os.environ.get(env, kwargs.pop("default", None))
    parser.add_argument(flag, default=default, help=f"{help} [env: {env}; default: %(default)s]", **kwargs)


def _database_options(parser: argparse.ArgumentParser, url_help: str = "database URL") -> None:
    _env_option(parser, "--database-url", "AGGREGATOR_DATABASE_URL", url_help)
    _env_option(parser, "--database-pooler", "AGGREGATOR_DATABASE_POOLER",
                "connection pooler in front of PostgreSQL: none, or transaction (PgBouncer pool_mode = transaction)",
                default="none")


def _version() -> str:
    """The installed distribution's version (the one pip shows)."""
    from importlib import metadata

    try:
        return metadata.version("aggregator")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    description, epilog = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(prog="aggregator", description=description, epilog=epilog)
    parser.add_argument("--version", action="version", version=f"aggregator {_version()}")
    _env_option(parser, "--cli-log-level", "AGGREGATOR_CLI_LOG_LEVEL",
                "log level of the short commands (run has its own --log-level)", default="warning",
                choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the daemon: collect windows, serve the HTTP API, stop cleanly on SIGTERM")
    _daemon_options(run)
    run.set_defaults(run=_run)
    check = commands.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="CONFIG_COMMAND").add_parser(
        "check", help="validate and print the effective configuration of run, secrets masked")
    _daemon_options(check)
    check.set_defaults(run=_config_check)

    collect = commands.add_parser(
        "collect", help="report every finished window now and exit (after a fleet stops; cron, systemd timers)")
    _daemon_options(collect)
    collect.add_argument("--wait", default="0s", metavar="DURATION",
                         help="wait up to this long for windows held by live replicas' watermarks (e.g. 5m)")
    collect.set_defaults(run=_collect)

    db = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True,
                                                                            metavar="DB_COMMAND")
    upgrade = db.add_parser("upgrade", help="apply schema migrations up to the newest")
    _database_options(upgrade,
                      "database URL (postgresql://... or sqlite:///path); unset means the embedded SQLite file")
    upgrade.set_defaults(run=_db_upgrade)

    report = commands.add_parser("reports", help="print finished reports, oldest first, or chart them")
    _database_options(report)
    _env_option(report, "--since", "AGGREGATOR_SINCE", "only windows starting at or after this ISO 8601 time")
    _env_option(report, "--format", "AGGREGATOR_FORMAT", "output format; csv pseudonymizes generated_by as export "
                "does", default="table", choices=["table", "json", "csv"])
    _chart_option(report, "users, workspaces, allowed and denied per window; completeness and late data marked")
    report.add_argument("--config", default=None, metavar="PATH", help="the daemon's TOML file, for when the next "
                        f"report is due [env: AGGREGATOR_CONFIG; default: {config.DEFAULT_CONFIG_PATH} if present]")
    _pseudonym_options(report)
    report.set_defaults(run=_reports)

    export = commands.add_parser("export", help="write reports after a cursor to an idempotent CSV file")
    _database_options(export)
    export.add_argument("--format", default="csv", choices=["csv"], help="file format [default: csv]")
    export.add_argument("--kind", default="usage_report", choices=["usage_report", "billable_usage"],
                        help="what to export: reports, or billable usage events [default: usage_report]")
    _env_option(export, "--since", "AGGREGATOR_EXPORT_SINCE", "cursor: the last report id already exported",
                default="0")
    export.add_argument("--until", default=None, help="last report id to include [default: the newest]")
    _env_option(export, "--out", "AGGREGATOR_EXPORT_DIR", "directory for the file", required=False)
    _env_option(export, "--s3", "AGGREGATOR_EXPORT_S3", "also upload to s3://bucket/prefix (needs aggregator[s3])")
    _env_option(export, "--s3-endpoint-url", "AGGREGATOR_EXPORT_S3_ENDPOINT_URL",
                "S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO")
    _pseudonym_options(export)
    export.set_defaults(run=_export)

    meter = commands.add_parser("meters", help="per-window results of declared meters, oldest first")
    _database_options(meter)
    meter.add_argument("--meter", default=None, help="only this meter")
    meter.add_argument("--format", default="table", choices=["table", "json"])
    _chart_option(meter, "each group's quantity per window, one scale per meter; late records marked")
    meter.set_defaults(run=_meters)

    journeys = commands.add_parser("experiences", help="SLIs per window, experience and urgency, oldest first")
    _database_options(journeys)
    journeys.add_argument("--format", default="table", choices=["table", "json"])
    _chart_option(journeys, "succeeded, failed and timed out per window, with p50, p90 and p99 durations")
    journeys.set_defaults(run=_experiences)

    uniques = commands.add_parser("distinct", help="distinct workspaces or users over a range of reported windows")
    _database_options(uniques)
    uniques.add_argument("--from", dest="start", required=True,
                         help="range start: ISO 8601 with offset (2026-01-01T00:00:00Z) or epoch seconds")
    uniques.add_argument("--to", dest="end", required=True, help="range end (exclusive), likewise")
    uniques.add_argument("--dim", default="users", choices=["workspaces", "users"], help="[default: users]")
    uniques.add_argument("--format", default="table", choices=["table", "json"])
    uniques.set_defaults(run=_distinct)

    box = commands.add_parser("outbox", help="report delivery: status, items, dead-letter retry").add_subparsers(
        dest="outbox_command", required=True, metavar="OUTBOX_COMMAND")
    status = box.add_parser("status", help="items per writer and status, and the oldest one's age")
    items = box.add_parser("list", help="items, newest errors included (default: dead ones)")
    items.add_argument("--status", default="dead", choices=["pending", "delivered", "dead", "all"])
    items.add_argument("--writer", default=None)
    items.add_argument("--limit", type=int, default=100)
    retry = box.add_parser("retry", help="send dead items again: all, one writer's (--writer) or some (--id)")
    retry.add_argument("--writer", default=None)
    retry.add_argument("--id", dest="ids", type=int, action="append", default=None, metavar="ID")
    enqueue = box.add_parser("enqueue", help="queue existing reports for a writer added later")
    enqueue.add_argument("--writer", required=True)
    enqueue.add_argument("--since", type=int, default=0, help="queue reports with id above this [default: 0]")
    for sub, handler in ((status, _outbox_status), (items, _outbox_list), (retry, _outbox_retry),
                         (enqueue, _outbox_enqueue)):
        _database_options(sub)
        if sub is not retry and sub is not enqueue:
            sub.add_argument("--format", default="table", choices=["table", "json"])
        sub.set_defaults(run=handler)

    held = commands.add_parser(
        "quarantine", help="items set aside because they failed for a reason of their own: list, retry"
    ).add_subparsers(dest="quarantine_command", required=True, metavar="QUARANTINE_COMMAND")
    listed = held.add_parser("list", help="items set aside, oldest first, with their reason")
    listed.add_argument("--kind", default=None, choices=list(quarantine.KINDS))
    listed.add_argument("--limit", type=int, default=100)
    listed.add_argument("--format", default="table", choices=["table", "json"])
    again = held.add_parser("retry", help="hand items back to their loop, after fixing the cause: --id N ... or --all")
    chosen = again.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--id", dest="ids", type=int, action="append", default=None, metavar="ID")
    chosen.add_argument("--all", action="store_true", help="every item in the quarantine")
    for sub, handler in ((listed, _quarantine_list), (again, _quarantine_retry)):
        _database_options(sub)
        sub.set_defaults(run=handler)

    show_off = commands.add_parser("demo", help="replica processes, live windows, reports checked against the truth")
    _env_option(show_off, "--replicas", "AGGREGATOR_DEMO_REPLICAS", "replica processes, 1 to 32", default="3",
                type=int)
    _env_option(show_off, "--window", "AGGREGATOR_WINDOW", "report window", default="10s")
    _env_option(show_off, "--duration", "AGGREGATOR_DEMO_DURATION", "how long the replicas send traffic", default="35s")
    _env_option(show_off, "--flush-interval", "AGGREGATOR_FLUSH_INTERVAL", "flush interval", default="1s")
    _env_option(show_off, "--database-url", "AGGREGATOR_DEMO_DATABASE_URL",
                f"database URL; unset: SQLite file {demo.default_file()}, replaced by each demo, kept after it")
    show_off.set_defaults(run=_demo)
    return parser


def _chart_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--chart", action="store_true", help=f"draw a chart instead: {what}")


def _daemon_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"TOML file [env: AGGREGATOR_CONFIG; default: {config.DEFAULT_CONFIG_PATH} if present]")
    for option in config.OPTIONS:
        shown = "unset" if option.default in (None, "") else option.default
        parser.add_argument(option.flag, dest=option.key, default=None, metavar=option.key.upper(),
                            help=f"{option.help} [env: {option.env}; default: {shown}]")


def _pseudonym_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pseudonym-key", default=None, metavar="KEY",
                        help="HMAC key for identifiers [env: AGGREGATOR_PSEUDONYM_KEY; prefer the variable]")
    _env_option(parser, "--pseudonym-allowlist", "AGGREGATOR_PSEUDONYM_ALLOWLIST",
                "comma-separated identifier fields that may leave in clear", default="")


def _daemon_settings(args: argparse.Namespace) -> config.DaemonSettings:
    flags = {option.key: getattr(args, option.key) for option in config.OPTIONS}
    return config.load_daemon_settings(flags, config_path=args.config)


def _run(args: argparse.Namespace) -> int:
    from aggregator import daemon  # the HTTP stack is imported only by the daemon

    return daemon.main(_daemon_settings(args))


def _config_check(args: argparse.Namespace) -> int:
    settings = _daemon_settings(args)
    shown = settings.masked()
    width = max(len(key) for key in shown)
    for key, value in shown.items():
        print(f"{key.ljust(width)} = {'unset' if value is None else value!s:<40} # {settings.sources[key]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(level=args.cli_log_level)
    try:
        return int(args.run(args) or 0)
    except exceptions.ConfigError as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return 2
    except exceptions.AggregatorError as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _collect(args: argparse.Namespace) -> int:
    """Collect every due window with the configured writers, meters and billing; exit 1 if some stay held."""
    wait = config.parse_duration(args.wait, key="--wait", zero=True)
    settings = _daemon_settings(args)
    # Only this command's own collections run, so every report written here is the one it prints.
    once = dataclasses.replace(settings.aggregator, collect_interval=86400.0)
    agg = runtime.Aggregator.from_settings(once, handle_sigterm=False)
    deadline = time.monotonic() + wait
    agg.start(wait=max(wait, 10.0))
    written: list[reports.Report] = []
    # A window that ended less than a watermark's slack ago is held by this very process (its watermark
    # trails its clock by the slack): let it pass before the first collection.
    since_end = time.time() % settings.aggregator.window_seconds
    if since_end < flush.WATERMARK_SLACK:
        time.sleep(flush.WATERMARK_SLACK - since_end + 0.05)
    try:
        while True:
            written += agg.collect()
            held = agg._call(agg.aheld_windows)
            if not held or time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    finally:
        agg.stop()
    for report in written:
        missing = f", {report.replicas_missing} replica(s) missing" if report.replicas_missing else ""
        print(f"reported {reports.iso_utc(report.window_start)} (id {report.id}){missing}")
    print(f"collected {len(written)} report(s)")
    if held:
        print(f"aggregator: {len(held)} finished window(s) still held by live replicas' watermarks, from "
              f"{reports.iso_utc(held[0])}; wait longer (--wait), or for their replica_lease", file=sys.stderr)
        return 1
    return 0


def _db_upgrade(args: argparse.Namespace) -> int:
    before, after = asyncio.run(migrate.upgrade_url(config.resolve_database_url(args.database_url),
                                                    pooler=config.resolve_database_pooler(args.database_pooler)))
    url = config.mask_url(config.resolve_database_url(args.database_url))
    if before == after:
        print(f"{url}: schema already at {after}")
    else:
        print(f"{url}: schema upgraded from {before or 'empty'} to {after}")
    return 0


def _reports(args: argparse.Namespace) -> int:
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
    pseudonymizer = _pseudonyms(args, require="aggregator reports --format csv") if csv else None
    found = asyncio.run(runtime.read_reports(config.resolve_database_url(args.database_url), since,
                                             pooler=config.resolve_database_pooler(args.database_pooler)))
    if not found:
        print(_next_report(args.config, first=since is None), file=sys.stderr)
    if args.chart:
        _show(charts.reports_chart(found) if found else None)
    elif pseudonymizer is not None:
        sys.stdout.write(reports.format_csv(_pseudonymized(report, pseudonymizer) for report in found))
    else:
        sys.stdout.write({"table": reports.format_table, "json": reports.format_json}[args.format](found))
    return 0


def _pseudonyms(args: argparse.Namespace, require: str | None = None) -> Any:
    """The key and allowlist of --pseudonym-key and --pseudonym-allowlist; with ``require``, that command refuses
    as export does when it would print identifiers of reports with no key to hash them."""
    from aggregator import export, privacy

    delivery = config.DeliverySettings.build(pseudonym_key=args.pseudonym_key,
                                             pseudonym_allowlist=args.pseudonym_allowlist)
    pseudonymizer = privacy.Pseudonymizer(delivery.pseudonym_key, delivery.pseudonym_allowlist)
    if require is not None:
        pseudonymizer.require([export.KIND], require)
    return pseudonymizer


def _pseudonymized(report: reports.Report, pseudonymizer: Any) -> reports.Report:
    """``report`` with its identifiers (``generated_by``) hashed as the export hashes them."""
    from aggregator import export

    fields = report.to_dict()
    hashed = pseudonymizer.apply(export.KIND, fields)
    return dataclasses.replace(report, **{k: v for k, v in hashed.items() if v != fields[k]})


def _next_report(config_path: str | None, *, first: bool) -> str:
    """Why there is nothing to show, and when there will be: timings as the daemon would run with them (its file,
    AGGREGATOR_* variables), or the defaults where that configuration cannot be read (unless --config named it)."""
    try:
        settings = config.load_daemon_settings({}, config_path=config_path).aggregator
    except exceptions.ConfigError:
        if config_path is not None:
            raise
        settings = config.Settings.build(database_url="sqlite:///unused.db", delivery=config.DeliverySettings())
    return settings.next_report(time.time()).sentence(first=first)


def _show(chart: Any, empty: str = "") -> int:
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


def _demo(args: argparse.Namespace) -> int:
    return demo.run(replicas=args.replicas, window=config.parse_duration(args.window, key="--window"),
                    duration=config.parse_duration(args.duration, key="--duration"),
                    flush_interval=config.parse_duration(args.flush_interval, key="--flush-interval"),
                    database_url=args.database_url or None)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aggregator import export

    if not args.out:
        raise exceptions.ConfigError("--out is required: the directory to write the CSV file to")
    pseudonymizer = _pseudonyms(args)
    since, until = _whole(args.since, "--since"), None if args.until is None else _whole(args.until, "--until")

    async def run() -> export.ExportResult:
        db = await _open_store(args)
        try:
            return await export.export_csv(db, pseudonymizer, since=since, until=until, out_dir=Path(args.out),
                                           kind=args.kind,
                                           s3_url=args.s3 or None, s3_endpoint_url=args.s3_endpoint_url or None)
        finally:
            await db.close()

    print(export.summary(asyncio.run(run())))
    return 0


def _outbox_status(args: argparse.Namespace) -> int:
    shown = charts.outbox_rows(asyncio.run(_with_store(args, lambda db: db.outbox_summary())), now=time.time())
    sys.stdout.write(charts.listing(shown, args.format, empty="the outbox is empty"))
    return 0


def _outbox_list(args: argparse.Namespace) -> int:
    status = None if args.status == "all" else args.status
    rows = asyncio.run(_with_store(args, lambda db: db.outbox_items(
        status=status, writer=args.writer, limit=args.limit)))
    sys.stdout.write(charts.listing(charts.outbox_items(rows), args.format, empty=f"no {args.status} items"))
    return 0


def _outbox_retry(args: argparse.Namespace) -> int:
    n = asyncio.run(_with_store(args, lambda db: db.retry_outbox(
        now=time.time(), writer=args.writer, ids=args.ids)))
    print(f"{n} dead item(s) queued again")
    return 0


def _outbox_enqueue(args: argparse.Namespace) -> int:
    n = asyncio.run(_with_store(args, lambda db: db.enqueue_reports(
        args.writer, after_id=args.since, now=time.time())))
    print(f"{n} report(s) queued for writer {args.writer!r}")
    return 0


def _quarantine_list(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(args, lambda db: db.quarantined_items(kind=args.kind, limit=args.limit)))
    shown = charts.quarantine_rows(rows, payload=args.format == "json")
    sys.stdout.write(charts.listing(shown, args.format, empty="the quarantine is empty"))
    return 0


def _quarantine_retry(args: argparse.Namespace) -> int:
    ids = None if args.all else args.ids
    n = asyncio.run(_with_store(args, lambda db: db.retry_quarantined(now=time.time(), ids=ids)))
    print(f"{n} item(s) handed back to their loop (outbox items are queued again now; the others are taken at the "
          "next flush or collection of a running replica)")
    return 0


async def _open_store(args: argparse.Namespace) -> Any:
    from aggregator import store

    db = store.Store(config.resolve_database_url(args.database_url), pool_size=1,
                     pooler=config.resolve_database_pooler(args.database_pooler))
    try:
        await migrate.ensure_current(db, auto_upgrade=db.dialect == "sqlite")
    except BaseException:
        await db.close()
        raise
    return db


async def _with_store(args: argparse.Namespace, action: Any) -> Any:
    db = await _open_store(args)
    try:
        return await action(db)
    finally:
        await db.close()


def _whole(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise exceptions.ConfigError(f"{flag}={value!r} must be a report id (a whole number >= 0)") from None


def _meters(args: argparse.Namespace) -> int:
    found = asyncio.run(_with_store(args, lambda db: db.meter_results(meter=args.meter)))
    shown = charts.meter_rows(found, flat=args.format == "table" and not args.chart)
    if args.chart:
        return _show(charts.meters_chart(shown) if shown else None, "no meter results yet")
    sys.stdout.write(charts.listing(shown, args.format, empty="no meter results yet"))
    return 0


def _distinct(args: argparse.Namespace) -> int:
    """Exact (path ids or daily) while the ids are kept, else estimated from sketches (path sketch, with bounds)."""
    def moment(text: str) -> str | float:
        try:
            return float(text)
        except ValueError:
            return text

    start, end, dim = distinct.check_range(moment(args.start), moment(args.end), args.dim, names=("--from", "--to"))
    found = asyncio.run(_with_store(args, lambda db: db.distinct(start, end, dim))).as_dict()
    sys.stdout.write(charts.listing([found], args.format, empty=""))
    return 0


def _experiences(args: argparse.Namespace) -> int:
    shown = charts.sli_rows(asyncio.run(_with_store(args, lambda db: db.experience_slis())))
    if args.chart:
        return _show(charts.experiences_chart(shown) if shown else None, "no experience SLIs yet")
    sys.stdout.write(charts.listing(shown, args.format, empty="no experience SLIs yet"))
    return 0
