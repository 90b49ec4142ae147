"""Fixtures: a fresh, migrated database per test, on SQLite and on real PostgreSQL.

PostgreSQL is the server named by ``AGGREGATOR_TEST_DATABASE_URL`` (any database on it; we create and
drop our own), or else a throwaway server from testing.postgresql. initdb refuses to run as root, so
as root the server runs as an unprivileged user through ``setpriv`` (exec'd, so signals reach it).
Each test gets a database cloned from a template migrated once per session.
"""

from __future__ import annotations

import asyncio
import glob
import multiprocessing
import os
import pwd
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa

from aggregator import migrate

PG_ENV = "AGGREGATOR_TEST_DATABASE_URL"
TEMPLATE = "aggregator_test_template"


def _run(coro):  # noqa: ANN001, ANN202 - tiny helper for sync fixtures
    return asyncio.run(coro)


def _pg_binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        pytest.fail("PostgreSQL server binaries not found (apt-get install postgresql), "
                    f"or set {PG_ENV} to an existing server")
    return str(Path(found[-1]).parent)


def _wrapper(path: Path, real: str, base: str, uid: int, gid: int) -> str:
    path.write_text(
        "#!/bin/sh\n"
        f"chown -R {uid}:{gid} {base}\n"
        f"exec setpriv --reuid={uid} --regid={gid} --clear-groups {real} \"$@\"\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser URL of a PostgreSQL server for the whole session."""
    if url := os.environ.get(PG_ENV):
        yield str(sa.make_url(url).set(drivername="postgresql"))
        return
    import testing.postgresql

    bindir = _pg_binaries()
    base = tempfile.mkdtemp(prefix="aggregator-pg-")
    kwargs: dict[str, str] = {"base_dir": base}
    tools = None
    if os.geteuid() == 0:
        name = "postgres" if _user_exists("postgres") else "nobody"
        account = pwd.getpwnam(name)
        tools = Path(tempfile.mkdtemp(prefix="aggregator-pg-bin-"))
        kwargs["initdb"] = _wrapper(tools / "initdb", f"{bindir}/initdb", base, account.pw_uid, account.pw_gid)
        kwargs["postgres"] = _wrapper(tools / "postgres", f"{bindir}/postgres", base, account.pw_uid,
                                      account.pw_gid)
    else:
        kwargs["initdb"], kwargs["postgres"] = f"{bindir}/initdb", f"{bindir}/postgres"
    server = testing.postgresql.Postgresql(
        postgres_args="-h 127.0.0.1 -F -c logging_collector=off -c max_connections=300 -c fsync=off", **kwargs)
    try:
        yield server.url(database="postgres")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
        if tools is not None:
            shutil.rmtree(tools, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _with_database(url: str, name: str) -> str:
    return str(sa.make_url(url).set(database=name).render_as_string(hide_password=False))


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str) -> Iterator[str]:
    name = f"{TEMPLATE}_{os.getpid()}"
    _run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"'))
    _run(migrate.upgrade_url(_with_database(pg_admin_url, name)))
    yield name
    _run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    _run(migrate.upgrade_url(f"sqlite:///{path}"))
    return path


@pytest.fixture
def pg_url(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """A fresh migrated PostgreSQL database for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    _run(_admin(pg_admin_url, f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield _with_database(pg_admin_url, name)
    _run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def sqlite_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh migrated SQLite database file for one test."""
    path = tmp_path / "aggregator.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """The contract suite runs every test on both backends."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[request.param])


@pytest.fixture
def empty_database_url(request: pytest.FixtureRequest, pg_admin_url: str, tmp_path: Path) -> Iterator[str]:
    """Unmigrated databases, for migration tests; parametrized indirectly by backend."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = f"e_{uuid.uuid4().hex[:16]}"
    _run(_admin(pg_admin_url, f'CREATE DATABASE "{name}"'))
    yield _with_database(pg_admin_url, name)
    _run(_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def pgbouncer_server(pg_admin_url: str) -> Iterator[object]:
    """A PgBouncer (``tests.pgbouncer``) in transaction pooling mode in front of the session's PostgreSQL.

    Skipped, naming the Debian package, when the binary is missing; under ``CI=true`` that fails instead.
    """
    from tests import pgbouncer

    with pgbouncer.PgBouncer(pg_admin_url, pool_mode="transaction") as server:
        yield server


@pytest.fixture
def pgbouncer_url(pgbouncer_server: object, pg_url: str) -> str:
    """The test's fresh migrated PostgreSQL database (``pg_url``), reached through PgBouncer in transaction mode."""
    from tests import pgbouncer

    assert isinstance(pgbouncer_server, pgbouncer.PgBouncer)
    return pgbouncer_server.url(pg_url)


@pytest.fixture(autouse=True)
def _no_child_outlives_its_test() -> Iterator[None]:
    """A child process a test started and left running (its assertion failed before the join) is killed here:
    multiprocessing joins live children at interpreter exit, so one left behind would hang pytest for good."""
    yield
    for child in multiprocessing.active_children():
        child.kill()
        child.join(5)
