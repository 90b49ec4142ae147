"""Settings: one frozen object, validated once, passed down.

Values come from the Python API or the CLI; every CLI option falls back to an ``AGGREGATOR_*``
environment variable. Durations are strings such as ``"10s"``, ``"30m"``, ``"1h"`` or a number of
seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from pathlib import Path

import sqlalchemy as sa

from aggregator import exceptions

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int, *, key: str) -> float:
    """Seconds in ``value`` ("10s", "30m", "1h", "250ms", "2d", or a number of seconds)."""
    if isinstance(value, bool):
        raise exceptions.ConfigError(f"{key}={value!r} is not a duration; use e.g. '10s', '30m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise exceptions.ConfigError(
            f"{key}={value!r} is not a duration; use a number with a unit: ms, s, m, h or d (e.g. '30m')"
        )
    if not seconds > 0:
        raise exceptions.ConfigError(f"{key}={value!r} must be longer than zero")
    return seconds


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


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, safe for logs and error messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Everything an Aggregator needs, validated."""

    database_url: str
    replica_id: str
    window: float
    flush_interval: float
    grace: float
    collect: bool
    collect_interval: float
    stop_timeout: float = 30.0
    id_retention: float = 86400.0 * 2

    @classmethod
    def build(
        cls,
        *,
        database_url: str | None = None,
        replica_id: str | None = None,
        window: str | float = "30m",
        flush_interval: str | float = "60s",
        grace: str | float | None = None,
        collect: bool = True,
        collect_interval: str | float | None = None,
        stop_timeout: str | float = "30s",
        id_retention: str | float = "2d",
    ) -> Settings:
        window_s = parse_duration(window, key="window")
        if window_s < 1 or window_s != int(window_s) or 86400 % window_s and window_s % 86400:
            raise exceptions.ConfigError(
                f"window={window!r} must be a whole number of seconds that divides a day "
                "(or is a whole number of days), e.g. '10s', '5m', '30m', '1h'"
            )
        flush_s = parse_duration(flush_interval, key="flush_interval")
        # Data tracked at the very end of a window reaches the database one flush interval later
        # (plus a retry); collecting before then would turn it into late data.
        grace_s = parse_duration(grace, key="grace") if grace is not None else max(2 * flush_s, 1.0)
        if collect_interval is None:
            collect_s = min(max(min(window_s, flush_s) / 4, 0.25), 15.0)
        else:
            collect_s = parse_duration(collect_interval, key="collect_interval")
        if replica_id is not None and (not isinstance(replica_id, str) or not 0 < len(replica_id) <= 200):
            raise exceptions.ConfigError(f"replica_id={replica_id!r} must be a string of 1 to 200 characters")
        return cls(
            database_url=resolve_database_url(database_url),
            replica_id=replica_id or new_replica_id(),
            window=window_s,
            flush_interval=flush_s,
            grace=grace_s,
            collect=bool(collect),
            collect_interval=collect_s,
            stop_timeout=parse_duration(stop_timeout, key="stop_timeout"),
            id_retention=parse_duration(id_retention, key="id_retention"),
        )

    @property
    def window_seconds(self) -> int:
        return int(self.window)


def new_replica_id() -> str:
    """A fresh replica id: host name, pid and a random suffix, readable in logs."""
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
