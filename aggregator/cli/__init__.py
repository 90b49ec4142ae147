"""The aggregator command line: the daemon, one-shot collection, the schema, reports, meters and SLIs (as
tables, JSON, CSV or charts), CSV export, the outbox, the quarantine, and a demo.

Every option falls back to an AGGREGATOR_* environment variable; COMMAND --help names it.
Exit codes: 0 success, 1 failure at run time (database, a demo mismatch), 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

# aggregator.demo and aggregator.quarantine under other names: ``demo`` and ``quarantine`` here are the
# command modules of this package (importing a submodule binds its name in the package).
from aggregator import demo as demos
from aggregator import exceptions, logs, options
from aggregator import quarantine as quarantines
from aggregator.cli import daemon, db, demo, export, outbox, quarantine, reads


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
    run.set_defaults(run=daemon.run)
    check = commands.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="CONFIG_COMMAND").add_parser(
        "check", help="validate and print the effective configuration of run, secrets masked")
    _daemon_options(check)
    check.set_defaults(run=daemon.config_check)

    collect = commands.add_parser(
        "collect", help="report every finished window now and exit (after a fleet stops; cron, systemd timers)")
    _daemon_options(collect)
    collect.add_argument("--wait", default="0s", metavar="DURATION",
                         help="wait up to this long for windows held by live replicas' watermarks (e.g. 5m)")
    collect.set_defaults(run=daemon.collect)

    database = commands.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True,
                                                                            metavar="DB_COMMAND")
    upgrade = database.add_parser("upgrade", help="apply schema migrations up to the newest")
    _database_options(upgrade,
                      "database URL (postgresql://... or sqlite:///path); unset means the embedded SQLite file")
    upgrade.set_defaults(run=db.upgrade)

    report = commands.add_parser("reports", help="print finished reports, oldest first, or chart them")
    _database_options(report)
    _env_option(report, "--since", "AGGREGATOR_SINCE", "only windows starting at or after this ISO 8601 time")
    _env_option(report, "--format", "AGGREGATOR_FORMAT", "output format; csv pseudonymizes generated_by as export "
                "does", default="table", choices=["table", "json", "csv"])
    _chart_option(report, "users, workspaces, allowed and denied per window; completeness and late data marked")
    report.add_argument("--config", default=None, metavar="PATH", help="the daemon's TOML file, for when the next "
                        f"report is due [env: AGGREGATOR_CONFIG; default: {options.DEFAULT_CONFIG_PATH} if present]")
    _pseudonym_options(report)
    report.set_defaults(run=reads.print_reports)

    exporting = commands.add_parser("export", help="write reports after a cursor to an idempotent CSV file")
    _database_options(exporting)
    exporting.add_argument("--format", default="csv", choices=["csv"], help="file format [default: csv]")
    exporting.add_argument("--kind", default="usage_report", choices=["usage_report", "billable_usage"],
                        help="what to export: reports, or billable usage events [default: usage_report]")
    _env_option(exporting, "--since", "AGGREGATOR_EXPORT_SINCE", "cursor: the last report id already exported",
                default="0")
    exporting.add_argument("--until", default=None, help="last report id to include [default: the newest]")
    _env_option(exporting, "--out", "AGGREGATOR_EXPORT_DIR", "directory for the file", required=False)
    _env_option(exporting, "--s3", "AGGREGATOR_EXPORT_S3", "also upload to s3://bucket/prefix (needs aggregator[s3])")
    _env_option(exporting, "--s3-endpoint-url", "AGGREGATOR_EXPORT_S3_ENDPOINT_URL",
                "S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO")
    _pseudonym_options(exporting)
    exporting.set_defaults(run=export.run)

    meter = commands.add_parser("meters", help="per-window results of declared meters, oldest first")
    _database_options(meter)
    meter.add_argument("--meter", default=None, help="only this meter")
    meter.add_argument("--format", default="table", choices=["table", "json"])
    _chart_option(meter, "each group's quantity per window, one scale per meter; late records marked")
    meter.set_defaults(run=reads.print_meters)

    journeys = commands.add_parser("experiences", help="SLIs per window, experience and urgency, oldest first")
    _database_options(journeys)
    journeys.add_argument("--format", default="table", choices=["table", "json"])
    _chart_option(journeys, "succeeded, failed and timed out per window, with p50, p90 and p99 durations")
    journeys.set_defaults(run=reads.print_experiences)

    uniques = commands.add_parser("distinct", help="distinct workspaces or users over a range of reported windows")
    _database_options(uniques)
    uniques.add_argument("--from", dest="start", required=True,
                         help="range start: ISO 8601 with offset (2026-01-01T00:00:00Z) or epoch seconds")
    uniques.add_argument("--to", dest="end", required=True, help="range end (exclusive), likewise")
    uniques.add_argument("--dim", default="users", choices=["workspaces", "users"], help="[default: users]")
    uniques.add_argument("--format", default="table", choices=["table", "json"])
    uniques.set_defaults(run=reads.print_distinct)

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
    for sub, handler in ((status, outbox.status), (items, outbox.listing), (retry, outbox.retry),
                         (enqueue, outbox.enqueue)):
        _database_options(sub)
        if sub is not retry and sub is not enqueue:
            sub.add_argument("--format", default="table", choices=["table", "json"])
        sub.set_defaults(run=handler)

    held = commands.add_parser(
        "quarantine", help="items set aside because they failed for a reason of their own: list, retry"
    ).add_subparsers(dest="quarantine_command", required=True, metavar="QUARANTINE_COMMAND")
    listed = held.add_parser("list", help="items set aside, oldest first, with their reason")
    listed.add_argument("--kind", default=None, choices=list(quarantines.KINDS))
    listed.add_argument("--limit", type=int, default=100)
    listed.add_argument("--format", default="table", choices=["table", "json"])
    again = held.add_parser("retry", help="hand items back to their loop, after fixing the cause: --id N ... or --all")
    chosen = again.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--id", dest="ids", type=int, action="append", default=None, metavar="ID")
    chosen.add_argument("--all", action="store_true", help="every item in the quarantine")
    for sub, handler in ((listed, quarantine.listing), (again, quarantine.retry)):
        _database_options(sub)
        sub.set_defaults(run=handler)

    show_off = commands.add_parser("demo", help="replica processes, live windows, reports checked against the truth")
    _env_option(show_off, "--replicas", "AGGREGATOR_DEMO_REPLICAS", "replica processes, 1 to 32", default="3",
                type=int)
    _env_option(show_off, "--window", "AGGREGATOR_WINDOW", "report window", default="10s")
    _env_option(show_off, "--duration", "AGGREGATOR_DEMO_DURATION", "how long the replicas send traffic", default="35s")
    _env_option(show_off, "--flush-interval", "AGGREGATOR_FLUSH_INTERVAL", "flush interval", default="1s")
    _env_option(show_off, "--database-url", "AGGREGATOR_DEMO_DATABASE_URL",
                f"database URL; unset: SQLite file {demos.default_file()}, replaced by each demo, kept after it")
    show_off.set_defaults(run=demo.run)
    return parser


def _chart_option(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--chart", action="store_true", help=f"draw a chart instead: {what}")


def _daemon_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="PATH",
                        help=f"TOML file [env: AGGREGATOR_CONFIG; default: {options.DEFAULT_CONFIG_PATH} if present]")
    for option in options.OPTIONS:
        shown = "unset" if option.default in (None, "") else option.default
        parser.add_argument(option.flag, dest=option.key, default=None, metavar=option.key.upper(),
                            help=f"{option.help} [env: {option.env}; default: {shown}]")


def _pseudonym_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pseudonym-key", default=None, metavar="KEY",
                        help="HMAC key for identifiers [env: AGGREGATOR_PSEUDONYM_KEY; prefer the variable]")
    _env_option(parser, "--pseudonym-allowlist", "AGGREGATOR_PSEUDONYM_ALLOWLIST",
                "comma-separated identifier fields that may leave in clear", default="")


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
