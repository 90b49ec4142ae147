"""Fresh, migrated databases for each repetition, so no repetition inherits another's rows.

SQLite: files copied from one template migrated once. PostgreSQL: the harness creates its own scratch
database ``aggregator_bench_<pid>`` on the admin URL, migrates it, clones it (``CREATE DATABASE ...
TEMPLATE``) for each use, and drops them all at the end (``WITH (FORCE)``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
from pathlib import Path

import asyncpg
import sqlalchemy as sa

from aggregator import migrate


class SqliteFiles:
    """SQLite database files in one directory, each a copy of a template at the newest schema."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._template: Path | None = None
        self._count = itertools.count()

    def fresh(self) -> str:
        if self._template is None:
            template = self.directory / "template.db"
            asyncio.run(migrate.upgrade_url(f"sqlite:///{template}"))
            self._template = template
        path = self.directory / f"bench-{next(self._count)}.db"
        shutil.copyfile(self._template, path)
        return f"sqlite:///{path}"


class PostgresScratch:
    """Scratch databases on a PostgreSQL server reached with a superuser (admin) URL."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = with_driver(admin_url, "postgresql")
        self.template = f"aggregator_bench_{os.getpid()}"
        self._live: list[str] = []
        self._count = itertools.count(1)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return str(sa.make_url(self.admin_url).set(drivername=driver, database=database)
                   .render_as_string(hide_password=False))

    def fresh(self) -> str:
        """A new database at the newest schema; returns its plain ``postgresql://`` URL."""
        if self.template not in self._live:
            asyncio.run(self.admin(f'CREATE DATABASE "{self.template}"'))
            self._live.append(self.template)
            asyncio.run(migrate.upgrade_url(self.url(self.template)))
        name = f"{self.template}_{next(self._count)}"
        asyncio.run(self.admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"'))
        self._live.append(name)
        return self.url(name)

    def drop(self, url: str) -> None:
        name = sa.make_url(url).database
        assert name in self._live, name
        asyncio.run(self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._live.remove(name)

    def close(self) -> None:
        """Drop every database this harness created, clones before the template."""
        for name in reversed(self._live):
            asyncio.run(self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self._live.clear()

    async def admin(self, *statements: str) -> None:
        conn = await asyncpg.connect(self.admin_url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()


def with_driver(url: str, driver: str) -> str:
    """``url`` with another SQLAlchemy driver name (``postgresql`` is what asyncpg itself accepts)."""
    return str(sa.make_url(url).set(drivername=driver).render_as_string(hide_password=False))
