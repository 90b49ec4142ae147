"""Schema migrations: alembic, driven programmatically on our own connection.

The migration scripts ship inside the wheel (``aggregator/_migrations``); in a checkout they are the
top-level ``migrations/`` folder. Migrations run under a lock (``BEGIN IMMEDIATE`` on SQLite, a
transaction-scoped advisory lock on PostgreSQL), so replicas starting together do not race.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from aggregator import exceptions, store

_MIGRATION_LOCK_KEY = 0x61676772  # "aggr"


def script_location() -> Path:
    packaged = Path(__file__).parent / "_migrations"
    if (packaged / "env.py").is_file():
        return packaged
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(connection: Any = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migrations found"
    return head


async def run_locked(db: store.Store, fn: Callable[[sa.Connection], Any]) -> Any:
    """Run ``fn`` on a sync connection inside one locked transaction."""
    async with db.transaction() as conn:
        if db.dialect == "postgresql":
            await conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        return await conn.run_sync(fn)


async def upgrade(db: store.Store, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply migrations up to ``revision``; returns (revision before, revision after)."""

    def run(connection: sa.Connection) -> tuple[str | None, str | None]:
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(alembic_config(connection), revision)
        return before, MigrationContext.configure(connection).get_current_revision()

    before, after = await run_locked(db, run)
    return before, after


async def upgrade_url(url: str, revision: str = "head", *, pooler: str = "none") -> tuple[str | None, str | None]:
    """``upgrade`` on a database given by URL, with a store of its own (``pooler``: see ``store.Store``)."""
    db = store.Store(url, pool_size=1, pooler=pooler)
    try:
        return await upgrade(db, revision)
    finally:
        await db.close()


async def current_revision(db: store.Store) -> str | None:
    async with store.translated(db.url), db.reader.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def ensure_current(db: store.Store, *, auto_upgrade: bool) -> None:
    """Make sure the schema is at head: upgrade it when allowed, else fail naming the command."""
    current = await current_revision(db)
    head = head_revision()
    if current == head:
        return
    if auto_upgrade:
        await upgrade(db)
        return
    raise exceptions.SchemaOutdated(
        f"database {db.masked_url} is at schema revision {current or 'none (empty)'}, this version "
        f"needs {head}; run `aggregator db upgrade --database-url ...` (or alembic upgrade head)"
    )
