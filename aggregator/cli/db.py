"""`db upgrade`, and the migrated store that the commands reading or changing the database open.

Handlers only: they must never define flags nor exit the process themselves, and a store opened here is
always closed before the command returns.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aggregator import dsn, migrate


def upgrade(args: argparse.Namespace) -> int:
    before, after = asyncio.run(migrate.upgrade_url(dsn.resolve_database_url(args.database_url),
                                                    pooler=dsn.resolve_database_pooler(args.database_pooler)))
    url = dsn.mask_url(dsn.resolve_database_url(args.database_url))
    if before == after:
        print(f"{url}: schema already at {after}")
    else:
        print(f"{url}: schema upgraded from {before or 'empty'} to {after}")
    return 0


async def open_store(args: argparse.Namespace) -> Any:
    from aggregator import store

    db = store.Store(dsn.resolve_database_url(args.database_url), pool_size=1,
                     pooler=dsn.resolve_database_pooler(args.database_pooler))
    try:
        await migrate.ensure_current(db, auto_upgrade=db.dialect == "sqlite")
    except BaseException:
        await db.close()
        raise
    return db


async def with_store(args: argparse.Namespace, action: Any) -> Any:
    db = await open_store(args)
    try:
        return await action(db)
    finally:
        await db.close()
