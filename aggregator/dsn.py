"""Where the database is: its URL (given, from the environment, or the embedded default), the pooler in
front of it, and the URL masked for logs. Imports no settings, store or anything above it, so the store
and migrations can use it without pulling in configuration.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path

import sqlalchemy as sa

from aggregator import exceptions


def default_database_url() -> str:
    """The embedded default: a SQLite file in the state directory.

    ``$STATE_DIRECTORY`` (set by systemd's StateDirectory=) wins, then ``$XDG_STATE_HOME/aggregator``,
    then ``~/.local/state/aggregator``.
    """
    if state := os.environ.get("STATE_DIRECTORY"):
        directory = Path(state.split(":")[0])
    elif xdg := os.environ.get("XDG_STATE_HOME"):
        directory = Path(xdg) / "aggregator"
    else:
        directory = Path.home() / ".local" / "state" / "aggregator"
    return f"sqlite+aiosqlite:///{directory / 'aggregator.db'}"


def resolve_database_url(url: str | None) -> str:
    """The URL to use: the one given, else ``$AGGREGATOR_DATABASE_URL``, else the embedded default.

    Plain ``postgresql://`` and ``sqlite://`` URLs are mapped to their asyncio drivers.
    """
    url = url or os.environ.get("AGGREGATOR_DATABASE_URL") or default_database_url()
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise exceptions.ConfigError(
            f"database_url={mask_url(url)!r} is not a database URL; "
            "use postgresql://user@host/db or sqlite:///path/to/file.db"
        ) from exc
    except ValueError:  # SQLAlchemy converts the port with int()
        raise exceptions.ConfigError(
            f"database_url={mask_url(url)!r}: the port is not a number; use e.g. postgresql://user@host:5432/db "
            "(a password holding ':' or '@' must be percent-encoded)") from None
    if parsed.host is not None and "@" in parsed.host:  # no host has one: the user part was cut at the first
        raise exceptions.ConfigError(
            f"database_url={mask_url(url)!r}: the user name or password holds an unencoded '@', which ends the "
            "user part early; percent-encode it as %40 (urllib.parse.quote(password, safe=''))")
    backend = parsed.get_backend_name()
    if backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise exceptions.ConfigError(
                f"database_url={url!r}: an in-memory SQLite database cannot be shared between "
                "replicas or survive a restart; give a file path, e.g. sqlite:///var/lib/aggregator/aggregator.db"
            )
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    else:
        raise exceptions.ConfigError(
            f"database_url={mask_url(url)!r}: backend {backend!r} is not supported; use postgresql:// or sqlite://"
        )
    return parsed.render_as_string(hide_password=False)


DATABASE_POOLERS = ("none", "transaction")


def resolve_database_pooler(pooler: str | None) -> str:
    """The connection pooler mode in front of PostgreSQL: the one given, else ``$AGGREGATOR_DATABASE_POOLER``,
    else ``"none"``.

    ``"transaction"`` is a pooler such as PgBouncer with ``pool_mode = transaction``: each transaction gets
    whichever server connection is free, so nothing of ours may outlive a transaction on one (the driver's
    prepared statements included). Session pooling keeps a server connection per client: ``"none"``.
    """
    key = "database_pooler"
    if pooler is None:
        key, pooler = "AGGREGATOR_DATABASE_POOLER", os.environ.get("AGGREGATOR_DATABASE_POOLER") or "none"
    value = pooler.strip().lower() if isinstance(pooler, str) else pooler
    if value not in DATABASE_POOLERS:
        raise exceptions.ConfigError(
            f"{key}={pooler!r} must be one of: {', '.join(DATABASE_POOLERS)} (transaction: PgBouncer or another "
            "pooler with pool_mode = transaction in front of PostgreSQL; session pooling needs none)")
    return str(value)


# Query parameters that carry a secret: asyncpg's password and sslpassword, and anything named like one.
_SECRET_PARAMETER = re.compile(r"(?i)([?&;][^=&#;]*(?:password|passwd|pwd|secret|token)[^=&#;]*=)([^&#;]*)")


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``url``'s user part sits, as (start, end), or None when there is none.

    The user part ends at the last ``@`` before the query, so a password with unencoded ``@`` (which
    SQLAlchemy and libpq cut at the first one, taking the rest for the host) is found whole.
    """
    start = url.find("://") + 3
    if start < 3:
        return None
    end = min([found for found in (url.find("?", start), url.find("#", start)) if found >= 0] or [len(url)])
    at = url.rfind("@", start, end)
    colon = url.find(":", start, at) if at >= 0 else -1
    return None if colon < 0 else (colon + 1, at)


def password(url: str) -> str | None:
    """The password of ``url``'s user part as written (every ``@`` in it kept), or None when there is none."""
    span = _password_span(url)
    return None if span is None else url[span[0]:span[1]]


def mask_url(url: str) -> str:
    """``url`` with every password replaced by ``***``, safe for logs and error messages.

    Masked wherever it sits: in the user part (with any number of ``@`` in it) and in query parameters
    named like a secret (``password``, ``sslpassword``, ``passwd``, ``pwd``, ``secret``, ``token``).
    """
    span = _password_span(url)
    if span is not None:
        url = f"{url[:span[0]]}***{url[span[1]:]}"
    return _SECRET_PARAMETER.sub(r"\1***", url)


def url_secrets(url: str) -> list[str]:
    """The secrets of ``url`` as a message may quote them, longest first: for scrubbing what we did not write.

    The password as written, decoded, and as SQLAlchemy reads it (up to the first ``@``, the rest read as
    the host), and the values of secret query parameters.
    """
    found: list[str] = []
    span = _password_span(url)
    if span is not None:
        password = url[span[0]:span[1]]
        found += [password, *password.split("@")[1:]]
    found += [match.group(2) for match in _SECRET_PARAMETER.finditer(url)]
    try:
        found.append(sa.make_url(url).password or "")
    except sa.exc.ArgumentError:
        pass
    found += [urllib.parse.unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)
