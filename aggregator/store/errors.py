"""Driver and network errors turned into aggregator's exceptions, told apart by what they are (SQLSTATE first).

Every statement of the store runs under ``translate_errors``; nothing here may let a driver error, or any
secret of the database URL, out of the store.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa

from aggregator import dsn, exceptions
from aggregator.store.base import sqlstate as _sqlstate

# SQLSTATEs (PostgreSQL's error codes) that mean the schema is not the one this version uses: a table,
# column, schema, type or unique index it needs is missing.
_SCHEMA_MISMATCH = frozenset({"42P01", "42703", "3F000", "42704", "42P10"})
# A named prepared statement already on the server connection (42P05) or gone from it (26000): a
# transaction pooler gave this transaction a server connection another client, or nobody, prepared on.
_POOLED_STATEMENT = frozenset({"42P05", "26000"})
# protocol_violation: how PgBouncer reports its own refusals (PostgreSQL only for a confused client, such
# as a Bind that reached another client's unnamed statement through a pooler).
_PROTOCOL_VIOLATION = "08P01"
_POOLER_FIX = ("a connection pooler in transaction mode (PgBouncer with pool_mode = transaction) is in front of "
               "PostgreSQL: set database_pooler = \"transaction\" (AGGREGATOR_DATABASE_POOLER=transaction, or "
               "Aggregator(database_pooler=\"transaction\")); this is not a schema problem")


@contextlib.contextmanager
def translate_errors(url: str) -> Any:
    """Turn driver and network errors into our exceptions, by what they are, without leaking the password.

    PostgreSQL's errors are told apart by SQLSTATE: a missing table or column is an outdated schema; a
    prepared statement clash is a transaction pooler the settings do not know of; a pooler's refusal
    names the pooler; any other rejected statement is reported as the server words it. Lost
    connections and timeouts are transient. Every secret of the URL (its password wherever it sits, see
    ``dsn.url_secrets``) is scrubbed from what the driver or server said.
    """
    masked = dsn.mask_url(url)
    secrets = dsn.url_secrets(url)
    try:
        yield
    except exceptions.AggregatorError:
        raise
    except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
        raise exceptions.StoreError(_scrub(f"database {masked} rejected the operation: {_first_line(exc)}",
                                           secrets)) from exc
    except sa.exc.DBAPIError as exc:
        translated = _translated(exc, masked, None)
        raise type(translated)(_scrub(str(translated), secrets)) from exc
    except (sa.exc.TimeoutError, OSError, TimeoutError) as exc:
        raise exceptions.StoreUnavailable(_scrub(
            f"database {masked} unavailable: {type(exc).__name__}: {_first_line(exc)}", secrets)) from exc


def _translated(exc: sa.exc.DBAPIError, masked: str, password: str | None) -> exceptions.StoreError:
    state, line = _sqlstate(exc), _first_line(exc)
    kind: type[exceptions.StoreError] = exceptions.StoreUnavailable
    if state in _SCHEMA_MISMATCH or line.startswith(("no such table", "no such column")) or (
            " has no column named " in line):  # the last two: SQLite's words, it has no SQLSTATE
        kind, message = exceptions.SchemaOutdated, (f"database {masked}: {line}; the schema is older than this "
                                                    "version of aggregator: run `aggregator db upgrade`")
    elif _value_refused(exc):
        kind, message = exceptions.StoreError, f"database {masked} driver refused a value: {line}"
    elif state in _POOLED_STATEMENT or state == _PROTOCOL_VIOLATION and line.startswith("bind message"):
        kind, message = exceptions.StoreError, f"database {masked}: {line}; {_POOLER_FIX}"
    elif state == _PROTOCOL_VIOLATION and line.startswith("unsupported startup parameter"):
        kind, message = exceptions.StoreError, (
            f"database {masked} refused the connection: {line}; a connection pooler (PgBouncer) in front of "
            "PostgreSQL refuses startup parameters it does not track: add it to its ignore_startup_parameters")
    elif state == _PROTOCOL_VIOLATION:
        message = (f"database {masked} unavailable: {line} (SQLSTATE 08P01: most likely refused by a connection "
                   "pooler in front of PostgreSQL, such as PgBouncer: see its log)")
    elif isinstance(exc, sa.exc.ProgrammingError):
        kind, message = exceptions.StoreError, f"database {masked} rejected a statement: {line}"
    else:
        message = f"database {masked} unavailable: {type(exc).__name__}: {line}"
    return kind(_scrub(message, password))


def _value_refused(exc: BaseException) -> bool:
    """Whether a value of the statement was refused: a data exception (SQLSTATE class 22), or the driver's
    own refusal before sending it (asyncpg: a number out of int64 range, raised from an OverflowError).
    A fault of the data, never transient."""
    if (_sqlstate(exc) or "").startswith("22"):
        return True
    seen: BaseException | None = getattr(exc, "orig", None) or exc.__cause__
    for _ in range(5):  # the driver's error, and what it was raised from
        if seen is None:
            break
        if isinstance(seen, ValueError | OverflowError):
            return True
        seen = seen.__cause__
    return False


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    if type(orig).__module__.startswith("sqlalchemy") and orig.__cause__ is not None:
        orig = orig.__cause__  # the driver's own error under SQLAlchemy's adapter (2.0 prefixes the class name)
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _scrub(message: str, password: str | Sequence[str] | None) -> str:
    """``message`` with each of the secrets in ``password`` (one, or several: longest first) replaced by ``***``."""
    for secret in [password] if isinstance(password, str) else password or ():
        if secret:
            message = message.replace(secret, "***")
    return message



@contextlib.asynccontextmanager
async def translated(url: str) -> AsyncIterator[None]:
    with translate_errors(url):
        yield
