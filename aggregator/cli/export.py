"""`export`: reports or billable usage after a cursor to an idempotent CSV file (and S3), pseudonymized.

Handlers only: they must never define flags nor exit the process themselves, nor let an identifier out
in clear unless the allowlist names its field.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aggregator import config, exceptions
from aggregator.cli import db


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aggregator import export

    if not args.out:
        raise exceptions.ConfigError("--out is required: the directory to write the CSV file to")
    pseudonymizer = pseudonyms(args)
    since, until = whole(args.since, "--since"), None if args.until is None else whole(args.until, "--until")

    async def write() -> export.ExportResult:
        opened = await db.open_store(args)
        try:
            return await export.export_csv(opened, pseudonymizer, since=since, until=until, out_dir=Path(args.out),
                                           kind=args.kind,
                                           s3_url=args.s3 or None, s3_endpoint_url=args.s3_endpoint_url or None)
        finally:
            await opened.close()

    print(export.summary(asyncio.run(write())))
    return 0


def pseudonyms(args: argparse.Namespace, require: str | None = None) -> Any:
    """The key and allowlist of --pseudonym-key and --pseudonym-allowlist; with ``require``, that command refuses
    as export does when it would print identifiers of reports with no key to hash them."""
    from aggregator import export, privacy

    delivery = config.DeliverySettings.build(pseudonym_key=args.pseudonym_key,
                                             pseudonym_allowlist=args.pseudonym_allowlist)
    pseudonymizer = privacy.Pseudonymizer(delivery.pseudonym_key, delivery.pseudonym_allowlist)
    if require is not None:
        pseudonymizer.require([export.KIND], require)
    return pseudonymizer


def whole(value: str, flag: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise exceptions.ConfigError(f"{flag}={value!r} must be a report id (a whole number >= 0)") from None
