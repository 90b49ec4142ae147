"""How the store's engine is opened: asyncpg's connection arguments (and what a transaction pooler needs),
SQLite's pragmas, file modes and ``BEGIN IMMEDIATE``.

Connection setup only: no statement of the application's runs here, and no error is translated here
(the Store opens the engine under ``translate_errors``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aggregator import exceptions

SQLITE_BUSY_TIMEOUT_S = 60.0
SQLITE_BUSY_SLICE_S = 0.1  # a writer waits for the lock in slices this long: see _begin_immediate


# asyncpg's numeric connection arguments: a URL query gives text, which asyncpg would compare with numbers.
_NUMERIC_ARGUMENTS: dict[str, type[int] | type[float]] = {
    "statement_cache_size": int, "max_cacheable_statement_size": int, "prepared_statement_cache_size": int,
    "max_cached_statement_lifetime": float, "command_timeout": float, "timeout": float,
}
_STATEMENT_CACHES = ("statement_cache_size", "prepared_statement_cache_size")  # asyncpg's, SQLAlchemy's


def _asyncpg_arguments(url: sa.URL, pooler: str) -> tuple[sa.URL, dict[str, Any]]:
    """The URL less the arguments taken from its query, and the connection arguments for asyncpg.

    Behind a transaction pooler a server connection serves one transaction, then whichever client comes
    next, so no prepared statement may be kept or named: both statement caches are off and every
    statement is the unnamed one, which asyncpg (its cache off) parses again in the same message
    sequence that executes it. Unique names instead would never clash, but a statement closed while
    another server connection served its client stays behind on the first one until that one closes.
    """
    import inspect

    import asyncpg  # type: ignore[import-untyped]  # only PostgreSQL needs it

    unknown = sorted(set(url.query) - set(inspect.signature(asyncpg.connect).parameters) - set(_STATEMENT_CACHES))
    if unknown:
        raise exceptions.ConfigError(
            f"database_url: {', '.join(unknown)} in the query {'is' if len(unknown) == 1 else 'are'} not a connection "
            "argument of asyncpg, the PostgreSQL driver; remove it (for TLS give ?ssl=require)")
    arguments: dict[str, Any] = {"timeout": 10, "command_timeout": 300,
                                 "server_settings": {"application_name": "aggregator"}}  # PgBouncer tracks it
    for key, kind in _NUMERIC_ARGUMENTS.items():
        if key not in url.query:
            continue
        given = url.query[key]
        text = given if isinstance(given, str) else given[-1]  # the last of a repeated key
        try:
            number = kind(text)
        except ValueError:
            number = -1
        if not 0 <= number < float("inf"):
            raise exceptions.ConfigError(
                f"database_url: {key}={text!r} in the query must be a {'whole ' if kind is int else ''}number "
                f"from 0 up, e.g. ?{key}={'0' if kind is int else '30'}")
        arguments[key] = number
    if pooler == "transaction":
        for key in _STATEMENT_CACHES:
            if arguments.get(key, 0) != 0:
                raise exceptions.ConfigError(
                    f"database_url: {key}={arguments[key]} in the query contradicts database_pooler='transaction', "
                    "which turns statement caches off (a pooled server connection is shared); remove it from the URL")
        arguments.update(dict.fromkeys(_STATEMENT_CACHES, 0), prepared_statement_name_func=_unnamed_statement)
    return url.difference_update_query(_NUMERIC_ARGUMENTS), arguments


def _unnamed_statement() -> str:
    return ""  # asyncpg: the unnamed statement (a name given, so asyncpg 0.29 and 0.30 do not make one up)



def create_engine(url: str, *, pool_size: int, pooler: str, idle: int | None) -> AsyncEngine:
    """The engine for ``url`` (its async driver resolved already); see ``Store`` for ``pool_size`` and ``idle``."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # The file holds raw ids: a directory made here is the owner's alone (the files: _sqlite_setup).
        Path(parsed.database or "").expanduser().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, pool_size=pool_size)
        _sqlite_setup(engine)
        return engine
    target, connect_args = _asyncpg_arguments(parsed, pooler)
    # The pre-ping runs in a transaction of its own (SQLAlchemy does so for PgBouncer's sake).
    kept = pool_size if idle is None else min(idle, pool_size)
    return create_async_engine(target, pool_size=kept, max_overflow=2 * pool_size - kept,
                               pool_pre_ping=True, connect_args=connect_args)


def _sqlite_setup(engine: AsyncEngine) -> None:
    """WAL, a generous busy timeout, full fsync, and ``BEGIN IMMEDIATE`` for every transaction.

    IMMEDIATE takes the write lock up front: two processes cannot both read under a shared lock and
    then deadlock upgrading it, and a flush and a collection of one window are strictly ordered.
    """

    database = engine.url.database or ""

    @sa.event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        # The files hold raw ids: owner only. Opening created the database file (umask 0644 at most);
        # SQLite gives its -wal and -shm the database file's mode, so narrowing it first covers them,
        # and ones left by an earlier process are narrowed too. A file of another user stays as it is.
        for path in (Path(database), Path(f"{database}-wal"), Path(f"{database}-shm")):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mode & 0o077:
                    path.chmod(0o600)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.close()

    @sa.event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Any) -> None:
        if conn.get_execution_options().get("aggregator_read_only"):
            conn.exec_driver_sql("BEGIN")
        else:
            _begin_immediate(conn.connection.dbapi_connection)


def _begin_immediate(dbapi_connection: Any) -> None:
    """``BEGIN IMMEDIATE``, waiting for another process's write lock up to SQLITE_BUSY_TIMEOUT_S.

    SQLite waits in its driver thread, where nothing can call it off (not even ``interrupt()``), so
    it waits in slices of SQLITE_BUSY_SLICE_S: between them the task is back on the event loop, where
    a stop that cannot wait any longer cancels it.
    """
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_SLICE_S * 1000)}")
        waited_until = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
        while True:
            try:
                cursor.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= waited_until:
                    raise
    finally:
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        cursor.close()

