"""PostgreSQL behind a real PgBouncer in transaction pooling mode, and driver errors told apart by SQLSTATE."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import time
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aggregator import Aggregator, ConfigError, SchemaOutdated, StoreError, StoreUnavailable, migrate, store
from tests import procs_pgbouncer
from tests.helpers import T0, WINDOW, FakeClock, assert_exact_per_window, ids, manual
from tests.test_cli import aggregator

SPAWN = multiprocessing.get_context("spawn")
POOLER_FIX = 'database_pooler = "transaction"'


def _in_child(url: str, pooler: str) -> tuple[str, str] | None:
    out = SPAWN.Queue()
    child = SPAWN.Process(target=procs_pgbouncer.start_and_flush, args=(url, pooler, out))
    child.start()
    try:
        return out.get(timeout=120)  # type: ignore[no-any-return]
    finally:
        child.join(30)


def test_without_the_setting_replicas_fail_naming_the_pooler_setting(pgbouncer_url: str) -> None:
    """Replica processes through PgBouncer without database_pooler: asyncpg names its prepared statements
    __asyncpg_stmt_1__ and up in every process, so the next replica finds one of the previous one's on its
    server connection. The error names the pooler setting, not `db upgrade`, and is no SchemaOutdated."""
    failures = [failure for failure in (_in_child(pgbouncer_url, "none") for _ in range(3)) if failure is not None]
    assert failures, "three replicas in turn through PgBouncer without the setting: expected a clash"
    for kind, message in failures:
        assert kind == "StoreError"
        assert "prepared statement" in message and POOLER_FIX in message
        assert "AGGREGATOR_DATABASE_POOLER=transaction" in message
        assert "db upgrade" not in message


def test_with_the_setting_replicas_in_turn_start_and_flush(pgbouncer_url: str) -> None:
    """The same replicas in turn with database_pooler="transaction" all start and flush."""
    assert [_in_child(pgbouncer_url, "transaction") for _ in range(3)] == [None, None, None]


async def _prepared_statements_per_server(url: str, servers: int) -> list[int]:
    """Prepared statements on each server connection of ``url``'s pool: ``servers`` transactions at once
    hold that many server connections, so each pooled one answers once."""
    conns = [await asyncpg.connect(url, statement_cache_size=0) for _ in range(servers)]
    try:
        counts = []
        for conn in conns:
            await conn.execute("BEGIN")
            counts.append(await conn.fetchval("SELECT count(*) FROM pg_prepared_statements"))
        return counts
    finally:
        for conn in conns:
            await conn.close()


def test_with_the_setting_an_aggregator_reports_exactly_and_leaves_no_statement(
        pgbouncer_url: str, pgbouncer_server: Any) -> None:
    """With database_pooler="transaction" an Aggregator through PgBouncer starts, tracks, flushes, collects
    and reports exactly; afterwards no server connection of the pool holds a prepared statement."""
    clock = FakeClock()
    with manual(pgbouncer_url, clock, database_pooler="transaction") as agg:
        for n in range(40):
            agg.track(ids(4)[n % 4], ids(40, offset=1000)[n], allowed=2, denied=n % 2)
        agg.track(ids(1)[0], ids(1, offset=1000)[0], allowed=1, at=T0 + WINDOW)  # the next window
        agg.flush()
        clock.past_window(T0)
        assert len(agg.collect()) == 1
        (report,) = agg.reports()
        assert agg.settings.database_pooler == "transaction"
    assert (report.unique_workspaces, report.unique_users, report.allowed_requests, report.denied_requests,
            report.replicas, report.late_allowed_requests) == (4, 40, 80, 20, 1, 0)
    assert asyncio.run(_prepared_statements_per_server(pgbouncer_url, pgbouncer_server.pool_size)) == [
        0] * pgbouncer_server.pool_size


@pytest.mark.slow
def test_replica_processes_through_pgbouncer_report_exactly(pgbouncer_url: str) -> None:
    """4 processes x 3 threads track for 6 s through PgBouncer (transaction pooling), 2 s windows, 0.25 s
    flushes, every process collecting: each window has one report, equal to the ground truth."""
    window, duration = 2, 6.0
    out = SPAWN.Queue()
    workers = [SPAWN.Process(target=procs_pgbouncer.pooled_replica, args=(pgbouncer_url, i, 3, window, duration, out))
               for i in range(4)]
    for p in workers:
        p.start()
    truths = [out.get(timeout=duration + 120) for _ in workers]
    for p in workers:
        p.join(30)
    assert [p.exitcode for p in workers] == [0] * 4
    reader = Aggregator(database_url=pgbouncer_url, database_pooler="transaction", window=f"{window}s",
                        flush_interval="1h", collect_interval="1h", clock=lambda: time.time() + 60,
                        handle_sigterm=False)
    with reader:
        reader.collect()
        reports = reader.reports()
    assert_exact_per_window(truths, reports)


@pytest.mark.parametrize("empty_database_url", ["postgresql"], indirect=True)
def test_db_upgrade_and_reports_through_pgbouncer(empty_database_url: str, pgbouncer_server: Any) -> None:
    """`aggregator db upgrade` with --database-pooler transaction migrates an empty database through PgBouncer,
    and `aggregator reports` reads it with the setting from the environment."""
    url = pgbouncer_server.url(empty_database_url)
    first = aggregator("db", "upgrade", "--database-url", url, "--database-pooler", "transaction")
    assert first.returncode == 0, first.stderr
    assert f"schema upgraded from empty to {migrate.head_revision()}" in first.stdout
    env = {"AGGREGATOR_DATABASE_URL": url, "AGGREGATOR_DATABASE_POOLER": "transaction"}
    again = aggregator("db", "upgrade", env=env)
    assert again.returncode == 0, again.stderr
    assert f"schema already at {migrate.head_revision()}" in again.stdout
    shown = aggregator("reports", "--format", "json", env=env)
    assert (shown.returncode, shown.stdout) == (0, "")
    refused = aggregator("reports", env={**env, "AGGREGATOR_DATABASE_POOLER": "statement"})
    assert refused.returncode == 2
    assert "database_pooler='statement' must be one of: none, transaction" in refused.stderr


def test_numeric_connection_arguments_in_the_url_are_numbers(pg_url: str, pgbouncer_url: str) -> None:
    """asyncpg's numeric arguments given in the URL query are converted (no TypeError), directly and through
    PgBouncer, and the URL's command_timeout wins over our default of 300 s."""

    async def check(url: str, pooler: str) -> tuple[type, float]:
        db = store.Store(url, pooler=pooler)
        try:
            await db.ping()
            began = time.monotonic()
            try:
                async with db.transaction() as conn:
                    await conn.exec_driver_sql("SELECT pg_sleep(5)")
            except StoreError as exc:
                return type(exc), time.monotonic() - began
            raise AssertionError("pg_sleep(5) outlived command_timeout=0.5")
        finally:
            await db.close()

    query = "?statement_cache_size=0&prepared_statement_cache_size=0&command_timeout=0.5&timeout=5"
    for url, pooler in ((pg_url, "none"), (pgbouncer_url, "transaction")):
        kind, took = asyncio.run(check(url + query, pooler))
        assert kind is StoreUnavailable and took < 4


@pytest.mark.parametrize(
    ("query", "pooler", "message"),
    [
        ("?statement_cache_size=ten", "none",
         "database_url: statement_cache_size='ten' in the query must be a whole number from 0 up, "
         "e.g. ?statement_cache_size=0"),
        ("?command_timeout=-1", "none", "command_timeout='-1' in the query must be a number from 0 up"),
        ("?statement_cache_size=100", "transaction",
         "statement_cache_size=100 in the query contradicts database_pooler='transaction'"),
        ("?prepared_statement_cache_size=5", "transaction",
         "prepared_statement_cache_size=5 in the query contradicts database_pooler='transaction'"),
        ("?sslmode=disable", "none", "sslmode in the query is not a connection argument of asyncpg"),
    ],
)
def test_unusable_connection_arguments_in_the_url_are_config_errors(query: str, pooler: str, message: str) -> None:
    """A connection argument asyncpg cannot take from the URL fails start with a ConfigError naming it."""
    agg = Aggregator(database_url=f"postgresql://svc:hunter2@127.0.0.1:1/usage{query}", database_pooler=pooler,
                     handle_sigterm=False)
    with pytest.raises(ConfigError, match=re.escape(message)) as raised:
        agg.start()
    assert "hunter2" not in str(raised.value)


def test_database_pooler_setting_from_arguments_environment_and_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """database_pooler: "none" by default, else $AGGREGATOR_DATABASE_POOLER, else the argument; the daemon
    reads it as key, variable or flag; a value outside none/transaction names itself and the choices."""
    from aggregator import config, options

    monkeypatch.delenv("AGGREGATOR_DATABASE_POOLER", raising=False)
    assert config.Settings.build(database_url="sqlite:///x.db").database_pooler == "none"
    monkeypatch.setenv("AGGREGATOR_DATABASE_POOLER", "transaction")
    assert config.Settings.build(database_url="sqlite:///x.db").database_pooler == "transaction"
    assert Aggregator(database_url="sqlite:///x.db", handle_sigterm=False).settings.database_pooler == "transaction"
    assert config.Settings.build(database_url="sqlite:///x.db", database_pooler="none").database_pooler == "none"
    with pytest.raises(ConfigError, match="database_pooler='session' must be one of: none, transaction"):
        config.Settings.build(database_url="sqlite:///x.db", database_pooler="session")
    monkeypatch.setenv("AGGREGATOR_DATABASE_POOLER", "statement")
    with pytest.raises(ConfigError, match="AGGREGATOR_DATABASE_POOLER='statement' must be one of"):
        Aggregator(database_url="sqlite:///x.db", handle_sigterm=False)
    daemon = options.load_daemon_settings({"database_url": "sqlite:///x.db"},
                                         environ={"AGGREGATOR_DATABASE_POOLER": "transaction"})
    assert (daemon.aggregator.database_pooler, daemon.sources["database_pooler"]) == (
        "transaction", "env AGGREGATOR_DATABASE_POOLER")
    flagged = options.load_daemon_settings({"database_url": "sqlite:///x.db", "database_pooler": "none"},
                                          environ={"AGGREGATOR_DATABASE_POOLER": "transaction"})
    assert flagged.aggregator.database_pooler == "none"
    with pytest.raises(ConfigError, match=r"database_pooler='yes' must be one of: none, transaction .*flag"):
        options.load_daemon_settings({"database_url": "sqlite:///x.db", "database_pooler": "yes"}, environ={})


# ---- error translation, with errors from a real PostgreSQL and a real PgBouncer ----------------------


async def _raised(url: str, *statements: str, pooler: str = "none") -> BaseException:
    db = store.Store(url, pooler=pooler)
    try:
        async with db.transaction() as conn:
            for statement in statements:
                await conn.exec_driver_sql(statement)
    except BaseException as exc:
        return exc
    finally:
        await db.close()
    raise AssertionError(f"no error from {statements}")


@pytest.mark.parametrize(
    ("statements", "kind", "words"),
    [
        (["SELECT * FROM no_such_table"], SchemaOutdated,
         'relation "no_such_table" does not exist; the schema is older than this version of aggregator: '
         "run `aggregator db upgrade`"),
        (["SELECT no_such_column FROM windows"], SchemaOutdated, 'column "no_such_column" does not exist'),
        (["SELEKT 1"], StoreError, 'rejected a statement: syntax error at or near "SELEKT"'),
        (["PREPARE twice AS SELECT 1", "PREPARE twice AS SELECT 1"], StoreError,
         f'prepared statement "twice" already exists; a connection pooler in transaction mode (PgBouncer with '
         f"pool_mode = transaction) is in front of PostgreSQL: set {POOLER_FIX}"),
        (["EXECUTE never_prepared"], StoreError, 'prepared statement "never_prepared" does not exist; a connection '
                                                 "pooler in transaction mode"),
    ],
)
def test_postgresql_errors_are_told_apart_by_sqlstate(pg_url: str, statements: list[str], kind: type,
                                                      words: str) -> None:
    """An undefined table or column is SchemaOutdated; a prepared statement clash (42P05, 26000) names the pooler
    setting; any other rejected statement is a StoreError in the server's words, with no `db upgrade` advice."""
    raised = asyncio.run(_raised(pg_url, *statements))
    assert type(raised) is kind
    assert words in str(raised)
    if kind is not SchemaOutdated:
        assert "db upgrade" not in str(raised)


def test_sqlite_missing_table_is_schema_outdated(sqlite_url: str) -> None:
    """SQLite has no SQLSTATE: its "no such table" is recognised by its words."""
    raised = asyncio.run(_raised(sqlite_url, "SELECT * FROM no_such_table"))
    assert type(raised) is SchemaOutdated
    assert "no such table: no_such_table" in str(raised) and "aggregator db upgrade" in str(raised)


def test_pgbouncer_refusals_name_the_pooler(pgbouncer_url: str) -> None:
    """PgBouncer's own refusals (SQLSTATE 08P01): an unknown user is transient-looking StoreUnavailable naming
    the pooler; a startup parameter it does not track is a StoreError naming ignore_startup_parameters."""
    unknown_user = sa.make_url(pgbouncer_url).set(username="nobody_here").render_as_string(hide_password=False)
    raised = asyncio.run(_raised(unknown_user, "SELECT 1", pooler="transaction"))
    assert type(raised) is StoreUnavailable
    assert "authentication failed" in str(raised) and "connection pooler in front of PostgreSQL" in str(raised)

    async def with_startup_parameter() -> BaseException:
        url = pgbouncer_url.replace("postgresql://", "postgresql+asyncpg://")
        engine = create_async_engine(url, connect_args={"server_settings": {"jit": "off"}})
        try:
            with store.translate_errors(url):
                async with engine.connect():
                    pass
        except BaseException as exc:
            return exc
        finally:
            await engine.dispose()
        raise AssertionError("PgBouncer accepted the startup parameter jit")

    raised = asyncio.run(with_startup_parameter())
    assert type(raised) is StoreError
    assert "unsupported startup parameter: jit" in str(raised) and "ignore_startup_parameters" in str(raised)


def test_ci_fails_instead_of_skipping_without_pgbouncer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the pgbouncer binary the tests skip naming the Debian package, except under CI=true: they fail."""
    from tests import pgbouncer

    monkeypatch.setattr(pgbouncer.shutil, "which", lambda *args, **kwargs: None)
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="install the Debian package `pgbouncer`"):
        pgbouncer.binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="install the Debian package `pgbouncer`"):
        pgbouncer.binary()
