"""Alembic environment: runs on a connection handed over by aggregator.migrate, or on its own."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from aggregator import dsn, schema, store


def _declared(name: str | None, type_: str, _parents: object) -> bool:
    """Autogenerate compares what the migrations declare: not the id partitions the engine manages."""
    return not (type_ == "table" and schema.is_partition(name))


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=schema.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=_declared,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone() -> None:
    """`alembic upgrade head` from a checkout: the URL comes from AGGREGATOR_DATABASE_URL."""
    from aggregator import migrate

    db = store.Store(dsn.resolve_database_url(None), pooler=dsn.resolve_database_pooler(None))
    try:
        await migrate.run_locked(db, run_on)
    finally:
        await db.close()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `aggregator db upgrade`")
connection = context.config.attributes.get("connection")
if connection is None:
    asyncio.run(run_standalone())
else:
    run_on(connection)
