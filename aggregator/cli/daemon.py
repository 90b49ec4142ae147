"""`run`, `config check` and `collect`: the commands that take the daemon's settings (TOML file, AGGREGATOR_*
variables, flags).

Handlers only: they must never define flags (the parser is built in ``aggregator.cli``) nor exit
the process themselves; each returns its exit code.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from aggregator import flush, options, reports, runtime, units


def load_settings(args: argparse.Namespace) -> options.DaemonSettings:
    flags = {option.key: getattr(args, option.key) for option in options.OPTIONS}
    return options.load_daemon_settings(flags, config_path=args.config)


def run(args: argparse.Namespace) -> int:
    from aggregator import daemon  # the HTTP stack is imported only by the daemon

    return daemon.main(load_settings(args))


def config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    shown = settings.masked()
    width = max(len(key) for key in shown)
    for key, value in shown.items():
        print(f"{key.ljust(width)} = {'unset' if value is None else value!s:<40} # {settings.sources[key]}")
    return 0


def collect(args: argparse.Namespace) -> int:
    """Collect every due window with the configured writers, meters and billing; exit 1 if some stay held."""
    wait = units.parse_duration(args.wait, key="--wait", zero=True)
    settings = load_settings(args)
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
