"""`outbox status`, `list`, `retry` and `enqueue`: report delivery as the outbox table holds it.

Handlers only: they must never define flags nor exit the process themselves, nor deliver anything (a
running replica does; these only show and queue items).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from aggregator import charts
from aggregator.cli import db


def status(args: argparse.Namespace) -> int:
    shown = charts.outbox_rows(asyncio.run(db.with_store(args, lambda db: db.outbox_summary())), now=time.time())
    sys.stdout.write(charts.listing(shown, args.format, empty="the outbox is empty"))
    return 0


def listing(args: argparse.Namespace) -> int:
    status = None if args.status == "all" else args.status
    rows = asyncio.run(db.with_store(args, lambda db: db.outbox_items(
        status=status, writer=args.writer, limit=args.limit)))
    sys.stdout.write(charts.listing(charts.outbox_items(rows), args.format, empty=f"no {args.status} items"))
    return 0


def retry(args: argparse.Namespace) -> int:
    n = asyncio.run(db.with_store(args, lambda db: db.retry_outbox(
        now=time.time(), writer=args.writer, ids=args.ids)))
    print(f"{n} dead item(s) queued again")
    return 0


def enqueue(args: argparse.Namespace) -> int:
    n = asyncio.run(db.with_store(args, lambda db: db.enqueue_reports(
        args.writer, after_id=args.since, now=time.time())))
    print(f"{n} report(s) queued for writer {args.writer!r}")
    return 0
