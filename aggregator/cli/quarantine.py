"""`quarantine list` and `retry`: items set aside because they failed for a reason of their own.

Handlers only: they must never define flags nor exit the process themselves, nor retry an item by
themselves (they hand it back to its loop).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from aggregator import charts
from aggregator.cli import db


def listing(args: argparse.Namespace) -> int:
    rows = asyncio.run(db.with_store(args, lambda db: db.quarantined_items(kind=args.kind, limit=args.limit)))
    shown = charts.quarantine_rows(rows, payload=args.format == "json")
    sys.stdout.write(charts.listing(shown, args.format, empty="the quarantine is empty"))
    return 0


def retry(args: argparse.Namespace) -> int:
    ids = None if args.all else args.ids
    n = asyncio.run(db.with_store(args, lambda db: db.retry_quarantined(now=time.time(), ids=ids)))
    print(f"{n} item(s) handed back to their loop (outbox items are queued again now; the others are taken at the "
          "next flush or collection of a running replica)")
    return 0
