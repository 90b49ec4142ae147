"""The schema comes from alembic migrations only, and equals the declared metadata."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from aggregator import Aggregator, SchemaOutdated, migrate, schema, store
from tests.helpers import T0, FakeClock, manual

# The id partitions are the engine's (store/partitions.py): the migrations declare the partitioned table only.
_OPTS = {"compare_type": True,
         "include_name": lambda name, type_, _: not (type_ == "table" and schema.is_partition(name))}


async def _diff(url: str) -> list:
    db = store.Store(url)
    try:
        async with db.engine.connect() as conn:
            return await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts=_OPTS),
                                           schema.metadata))
    finally:
        await db.close()


@pytest.mark.parametrize("empty_database_url", ["sqlite", "postgresql"], indirect=True)
def test_migrated_schema_equals_declared_metadata(empty_database_url: str) -> None:
    assert asyncio.run(migrate.upgrade_url(empty_database_url)) == (None, migrate.head_revision())
    assert asyncio.run(_diff(empty_database_url)) == []
    assert asyncio.run(migrate.upgrade_url(empty_database_url)) == (migrate.head_revision(),) * 2  # idempotent


@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_outdated_postgresql_schema_fails_start_naming_the_command(empty_database_url: str) -> None:
    agg = Aggregator(database_url=empty_database_url, handle_sigterm=False)
    with pytest.raises(SchemaOutdated, match="run `aggregator db upgrade"):
        agg.start()


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_embedded_sqlite_is_upgraded_by_start(empty_database_url: str) -> None:
    with manual(empty_database_url, FakeClock(T0 + 1)):
        pass
    assert asyncio.run(_diff(empty_database_url)) == []


def test_migrations_ship_in_the_package_layout() -> None:
    """The wheel carries migrations at aggregator/_migrations; a checkout uses migrations/."""
    location = migrate.script_location()
    assert (location / "env.py").is_file()
    assert list((location / "versions").glob("*.py"))
