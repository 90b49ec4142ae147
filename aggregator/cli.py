"""The ``aggregator`` command: ``run``, ``config check``, ``db upgrade``, ``reports``, ``export``, ``outbox``,
``quarantine``, ``demo``.

Every option falls back to an ``AGGREGATOR_*`` environment variable; ``--help`` names it.
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

from aggregator import config, exceptions, flush, logs, migrate, quarantine, reports, runtime


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
    parser = argparse.ArgumentParser(prog="aggregator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"aggregator {_version()}")
    _env_option(parser, "--cli-log-level", "AGGREGATOR_CLI_LOG_LEVEL",
                "log level of the short commands (`run` has its own --log-level)", default="warning",
                choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="the daemon: collect windows, serve the HTTP API, stop cleanly on SIGTERM")
    _daemon_options(run)
    run.set_defaults(run=_run)
    check = commands.add_parser("config", help="configuration").add_subparsers(
        dest="config_command", required=True, metavar="CONFIG_COMMAND").add_parser(
        "check", help="validate and print the effective configuration of `run`, secrets masked")
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

    report = commands.add_parser("reports", help="print finished reports, oldest first")
    _database_options(report)
    _env_option(report, "--since", "AGGREGATOR_SINCE", "only windows starting at or after this ISO 8601 time")
    _env_option(report, "--format", "AGGREGATOR_FORMAT", "output format", default="table",
                choices=["table", "json", "csv"])
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
    meter.set_defaults(run=_meters)

    journeys = commands.add_parser("experiences", help="SLIs per window, experience and urgency, oldest first")
    _database_options(journeys)
    journeys.add_argument("--format", default="table", choices=["table", "json"])
    journeys.set_defaults(run=_experiences)

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

    demo = commands.add_parser("demo", help="several replica processes, live windows, reports checked against truth")
    _env_option(demo, "--replicas", "AGGREGATOR_DEMO_REPLICAS", "replica processes", default="3")
    _env_option(demo, "--window", "AGGREGATOR_WINDOW", "report window", default="10s")
    _env_option(demo, "--duration", "AGGREGATOR_DEMO_DURATION", "how long the replicas send traffic", default="35s")
    _env_option(demo, "--flush-interval", "AGGREGATOR_FLUSH_INTERVAL", "flush interval", default="1s")
    _env_option(demo, "--database-url", "AGGREGATOR_DEMO_DATABASE_URL",
                "database URL; unset means a fresh SQLite file in a temporary directory")
    demo.set_defaults(run=_demo)
    return parser


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

    found = asyncio.run(runtime.read_reports(config.resolve_database_url(args.database_url), since,
                                             pooler=config.resolve_database_pooler(args.database_pooler)))
    formatter = {"table": reports.format_table, "json": reports.format_json, "csv": reports.format_csv}[args.format]
    sys.stdout.write(formatter(found))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from aggregator import demo

    try:
        replicas = int(args.replicas)
    except ValueError:
        raise exceptions.ConfigError(f"--replicas={args.replicas!r} must be a whole number from 1 to 32") from None
    if not 1 <= replicas <= 32:
        raise exceptions.ConfigError(f"--replicas={replicas} must be from 1 to 32")
    return demo.run(
        replicas=replicas,
        window=config.parse_duration(args.window, key="--window"),
        duration=config.parse_duration(args.duration, key="--duration"),
        flush_interval=config.parse_duration(args.flush_interval, key="--flush-interval"),
        database_url=args.database_url,
    )


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aggregator import export, privacy

    if not args.out:
        raise exceptions.ConfigError("--out is required: the directory to write the CSV file to")
    delivery = config.DeliverySettings.build(pseudonym_key=args.pseudonym_key,
                                             pseudonym_allowlist=args.pseudonym_allowlist)
    pseudonymizer = privacy.Pseudonymizer(delivery.pseudonym_key, delivery.pseudonym_allowlist)
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
    import time

    rows = asyncio.run(_with_store(args, lambda db: db.outbox_summary()))
    now = time.time()
    shown = [{"writer": r["writer"], "status": r["status"], "items": r["items"],
              "oldest_age_s": round(now - r["oldest"], 1)} for r in rows]
    _print_rows(shown, args.format, empty="the outbox is empty")
    return 0


def _outbox_list(args: argparse.Namespace) -> int:
    status = None if args.status == "all" else args.status
    rows = asyncio.run(_with_store(args, lambda db: db.outbox_items(
        status=status, writer=args.writer, limit=args.limit)))
    shown = [{"id": r["id"], "writer": r["writer"], "status": r["status"], "attempts": r["attempts"],
              "report_id": r["report_id"], "event_id": str(r["event_id"]), "last_error": r["last_error"] or ""}
             for r in rows]
    _print_rows(shown, args.format, empty=f"no {args.status} items")
    return 0


def _outbox_retry(args: argparse.Namespace) -> int:
    import time

    n = asyncio.run(_with_store(args, lambda db: db.retry_outbox(
        now=time.time(), writer=args.writer, ids=args.ids)))
    print(f"{n} dead item(s) queued again")
    return 0


def _outbox_enqueue(args: argparse.Namespace) -> int:
    import time

    n = asyncio.run(_with_store(args, lambda db: db.enqueue_reports(
        args.writer, after_id=args.since, now=time.time())))
    print(f"{n} report(s) queued for writer {args.writer!r}")
    return 0


def _quarantine_list(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(args, lambda db: db.quarantined_items(kind=args.kind, limit=args.limit)))
    shown = [{"id": r["id"], "kind": r["kind"], "ref": r["ref"], "status": r["status"], "attempts": r["attempts"],
              "first": reports.iso_utc(r["first_at"], "seconds"), "last": reports.iso_utc(r["last_at"], "seconds"),
              "reason": r["reason"]} for r in rows]
    if args.format == "json":
        for row, r in zip(shown, rows, strict=True):
            row["payload"] = r["payload"]
    _print_rows(shown, args.format, empty="the quarantine is empty")
    return 0


def _quarantine_retry(args: argparse.Namespace) -> int:
    import time

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


def _print_rows(rows: list[dict[str, Any]], fmt: str, *, empty: str) -> None:
    import json

    if fmt == "json":
        sys.stdout.write("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        return
    if not rows:
        print(empty)
        return
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns).rstrip())


def _meters(args: argparse.Namespace) -> int:
    rows = asyncio.run(_with_store(args, lambda db: db.meter_results(meter=args.meter)))
    import decimal
    import json

    from aggregator import meters

    shown = []
    for row in rows:
        quantity = decimal.Decimal(row["quantity"]).scaleb(-row["decimals"])
        shown.append({
            "window_start": reports.iso_utc(row["window_start"]),
            "meter": row["meter"],
            "dimensions": {} if row["group_key"] == meters.OVERFLOW else json.loads(row["group_key"]),
            "overflow": row["group_key"] == meters.OVERFLOW, "late": bool(row["late"]),
            "quantity": int(quantity) if quantity == quantity.to_integral_value() else float(quantity),
            "records": row["records"]})
    if args.format == "table":
        for row in shown:
            row["dimensions"] = ",".join(f"{k}={v}" for k, v in row["dimensions"].items()) or "-"
    _print_rows(shown, args.format, empty="no meter results yet")
    return 0


def _experiences(args: argparse.Namespace) -> int:

    rows = asyncio.run(_with_store(args, lambda db: db.experience_slis()))
    shown = [{"window_start": reports.iso_utc(r["window_start"]), **{k: r[k] for k in (
                  "experience_id", "urgency", "started", "succeeded", "failed", "timed_out", "completed",
                  "duration_p50_s", "duration_p90_s", "duration_p99_s")}} for r in rows]
    _print_rows(shown, args.format, empty="no experience SLIs yet")
    return 0
