"""Settings: frozen objects, validated once, passed down.

``Settings`` is what an embedded Aggregator needs. ``DaemonSettings`` is the effective configuration of
`aggregator run`: defaults, then a TOML file, then ``AGGREGATOR_*`` environment variables, then flags.
Durations are strings such as ``"10s"``, ``"30m"``, ``"1h"`` or a number of seconds.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from aggregator import exceptions, experiences, reports, values
from aggregator import meters as meters_module

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int, *, key: str, zero: bool = False) -> float:
    """Seconds in ``value`` ("10s", "30m", "1h", "250ms", "2d", or a number of seconds); ``zero``: 0 allowed."""
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
    if not (seconds > 0 or zero and seconds == 0) or seconds == float("inf"):
        raise exceptions.ConfigError(f"{key}={value!r} must be {'zero or more' if zero else 'longer than zero'}")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, None: 1}


def parse_size(value: str | int, *, key: str) -> int:
    """Bytes in ``value`` ("64MiB", "500MB", "1GiB", or a number of bytes); at least 1 MiB."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise exceptions.ConfigError(f"{key}={value!r} is not a size; use e.g. '64MiB' or '1GiB'")
    match = _SIZE.match(str(value))
    if match is None:
        raise exceptions.ConfigError(f"{key}={value!r} is not a size; use a number with a unit: B, KiB, MiB, GiB, "
                                     "KB, MB or GB (e.g. '64MiB')")
    size = int(float(match.group(1)) * _UNIT_BYTES[(match.group(2) or "").lower() or None])
    if size < 2**20:
        raise exceptions.ConfigError(f"{key}={value!r} is below the least budget of 1MiB")
    return size


def parse_window(value: str | float | int, *, key: str) -> float:
    """A report window: a whole number of seconds that divides a day, or whole days."""
    seconds = parse_duration(value, key=key)
    if seconds < 1 or seconds != int(seconds) or 86400 % seconds and seconds % 86400:
        raise exceptions.ConfigError(
            f"{key}={value!r} must be a whole number of seconds that divides a day "
            "(or is a whole number of days), e.g. '10s', '5m', '30m', '1h'"
        )
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


@dataclasses.dataclass(frozen=True, slots=True)
class DeliverySettings:
    """Report delivery: the writers (``[writers.NAME]`` tables), pseudonymization, the outbox's retry policy."""

    writers: tuple[tuple[str, dict[str, Any]], ...] = ()
    pseudonym_key: str | None = dataclasses.field(default=None, repr=False)  # a secret
    pseudonym_allowlist: tuple[str, ...] = ()
    max_attempts: int = 12
    backoff_initial: float = 1.0
    backoff_max: float = 600.0
    poll_interval: float = 5.0
    drain_timeout: float = 10.0
    retention: float = 7 * 86400.0  # delivered items are kept this long, then pruned

    @classmethod
    def build(cls, *, writers: Mapping[str, Any] | None = None, pseudonym_key: str | None = None,
              pseudonym_allowlist: Any = (), max_attempts: Any = 12, backoff_initial: Any = "1s",
              backoff_max: Any = "10m", poll_interval: Any = "5s", drain_timeout: Any = "10s",
              retention: Any = "7d") -> DeliverySettings:
        """Validated delivery settings; ``pseudonym_key`` falls back to ``$AGGREGATOR_PSEUDONYM_KEY``."""
        tables = _named_tables(writers or {}, "writers")
        key = pseudonym_key if pseudonym_key is not None else os.environ.get("AGGREGATOR_PSEUDONYM_KEY") or None
        if key is not None and (not isinstance(key, str) or len(key.encode()) < 16):
            # The key is a secret: the message names the setting, never the value.
            raise exceptions.ConfigError("pseudonym_key must be a string of at least 16 bytes, e.g. from "
                                         "`python3 -c 'import secrets; print(secrets.token_hex(32))'`")
        if key is not None:  # embedded too: the placeholder of aggregator.env.example is no key
            _not_placeholder(key, "pseudonym_key", "the key")
        initial = parse_duration(backoff_initial, key="outbox_backoff_initial")
        maximum = parse_duration(backoff_max, key="outbox_backoff_max")
        if maximum < initial:
            raise exceptions.ConfigError(
                f"outbox_backoff_max={backoff_max!r} is shorter than outbox_backoff_initial={backoff_initial!r}")
        return cls(
            writers=tables, pseudonym_key=key, pseudonym_allowlist=_names(pseudonym_allowlist, "pseudonym_allowlist"),
            max_attempts=_integer(1, 1000)(max_attempts, "outbox_max_attempts"), backoff_initial=initial,
            backoff_max=maximum, poll_interval=parse_duration(poll_interval, key="outbox_poll_interval"),
            drain_timeout=parse_duration(drain_timeout, key="outbox_drain_timeout"),
            retention=parse_duration(retention, key="outbox_retention"),
        )


def _from_json(value: object, key: str, example: str) -> object:
    """A table given in the environment: the same as JSON (an empty string is an empty table)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as exc:
        raise exceptions.ConfigError(
            f"{key} is not valid JSON ({exc.msg} at character {exc.pos}); in the environment give e.g. {example}"
        ) from None


def _named_tables(value: object, key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Named tables (writers, meters) from TOML (a table of tables) or the environment (the same as JSON)."""
    value = _from_json(value, key, '{"NAME": {"option": "value"}}')
    if not isinstance(value, Mapping) or not all(isinstance(t, Mapping) for t in value.values()):
        raise exceptions.ConfigError(
            f"{key} must be a table of tables, one per name, e.g. [{key}.NAME] in TOML")
    for name in value:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
            raise exceptions.ConfigError(
                f"{key}: name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return tuple((str(name), dict(table)) for name, table in value.items())


def _names(value: object, key: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple | frozenset | set) or not all(isinstance(t, str) for t in items):
        raise exceptions.ConfigError(f"{key}={value!r} must be a list of field names (TOML) or comma-separated")
    return tuple(sorted({t.strip() for t in items if t.strip()}))


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
    # Range distinct (distinct.py): the per-day id rollup is kept this long (exact daily and monthly uniques).
    distinct_retention: float = 86400.0 * 400
    delivery: DeliverySettings = DeliverySettings()
    meters: tuple[meters_module.Meter, ...] = ()
    billing_realm: str = "SaaS"
    billing_instance_id: str | None = None
    meter_dedup_horizon: float = 86400.0 * 2
    urgencies: dict[str, float] = dataclasses.field(default_factory=lambda: dict(experiences.DEFAULT_URGENCIES))
    # Watermarks: an incarnation silent this long (database clock) no longer holds windows back ...
    replica_lease: float = 180.0
    # ... and a window is closed this long after its end whatever holds it.
    max_collect_delay: float = 1800.0
    # Health (health.py): degraded once a finished window is unreported this long after its end, or once
    # this many flushes, or collections, failed in a row.
    health_overdue_after: float = 1830.0
    health_failures_in_row: int = 3
    # Past this much memory queued for an unreachable store, batches go to the spool directory.
    memory_budget: int = 64 * 2**20
    spool_dir: str | None = None
    # "transaction": a transaction-pooling PgBouncer is in front of PostgreSQL (see resolve_database_pooler).
    database_pooler: str = "none"
    # Explicit event times (track(at=), record(at=), a checkpoint's client_timestamp, the API's `time`) must
    # lie this close to now; outside, the call is refused (values.TimeRange).
    max_event_age: float = 86400.0
    max_event_future: float = 300.0

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
        distinct_retention: str | float = "400d",
        delivery: DeliverySettings | None = None,
        meters: Mapping[str, Mapping[str, Any]] | Iterable[meters_module.Meter] | None = None,
        billing_realm: str = "SaaS",
        billing_instance_id: str | None = None,
        meter_dedup_horizon: str | float = "2d",
        urgencies: Mapping[str, Any] | None = None,
        replica_lease: str | float | None = None,
        max_collect_delay: str | float | None = None,
        health_overdue_after: str | float | None = None,
        health_failures_in_row: str | int = 3,
        memory_budget: str | int = "64MiB",
        spool_dir: str | None = None,
        database_pooler: str | None = None,
        max_event_age: str | float = "1d",
        max_event_future: str | float = "5m",
    ) -> Settings:
        window_s = parse_window(window, key="window")
        flush_s = parse_duration(flush_interval, key="flush_interval")
        # Watermarks tell the collector when a window is complete; grace only adds a wait on top.
        grace_s = parse_duration(grace, key="grace", zero=True) if grace is not None else 0.0
        # A live replica publishes every flush interval, retrying sooner after a failure: three missed
        # intervals (and never under 10 s, for a loaded host) is silence, not jitter.
        lease_s = (parse_duration(replica_lease, key="replica_lease") if replica_lease is not None
                   else max(3 * flush_s, 10.0))
        delay_s = (parse_duration(max_collect_delay, key="max_collect_delay") if max_collect_delay is not None
                   else max(window_s, 4 * lease_s))
        if delay_s < lease_s:
            raise exceptions.ConfigError(
                f"max_collect_delay={delay_s:g}s is shorter than replica_lease={lease_s:g}s; a window would be "
                "closed before a silent replica is given up on: make max_collect_delay at least the lease")
        if collect_interval is None:
            collect_s = min(max(min(window_s, flush_s) / 4, 0.25), 15.0)
        else:
            collect_s = parse_duration(collect_interval, key="collect_interval")
        # max_collect_delay is the promise; a run comes every collect_interval, give or take half of it.
        overdue_s = (parse_duration(health_overdue_after, key="health_overdue_after")
                     if health_overdue_after is not None else delay_s + grace_s + 2 * collect_s)
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
            distinct_retention=parse_duration(distinct_retention, key="distinct_retention"),
            delivery=delivery or DeliverySettings.build(),
            meters=meters_module.declare(meters or ()),
            billing_realm=_bounded_text(billing_realm, "billing_realm", 128),
            billing_instance_id=None if billing_instance_id is None else _bounded_text(
                billing_instance_id, "billing_instance_id", 256),
            meter_dedup_horizon=_dedup_horizon(meter_dedup_horizon),
            urgencies=experiences.urgencies(urgencies, lambda v, k: parse_duration(v, key=k)),
            replica_lease=lease_s,
            max_collect_delay=delay_s,
            health_overdue_after=overdue_s,
            health_failures_in_row=_integer(1, 1000)(health_failures_in_row, "health_failures_in_row"),
            memory_budget=parse_size(memory_budget, key="memory_budget"),
            spool_dir=None if spool_dir is None else _text(spool_dir, "spool_dir"),
            database_pooler=resolve_database_pooler(database_pooler),
            max_event_age=_bounded_duration(max_event_age, "max_event_age", MAX_EVENT_AGE),
            max_event_future=_bounded_duration(max_event_future, "max_event_future", MAX_EVENT_FUTURE),
        )

    @property
    def window_seconds(self) -> int:
        return int(self.window)

    def next_report(self, now: float) -> reports.NextReport:
        """The report due next under these timings, seen at ``now`` (for readers who find nothing yet)."""
        return reports.next_report(now, window=self.window, flush_interval=self.flush_interval, grace=self.grace,
                                   collect_interval=self.collect_interval, max_collect_delay=self.max_collect_delay)

    @property
    def time_range(self) -> values.TimeRange:
        """The event times accepted around now."""
        return values.TimeRange(self.max_event_age, self.max_event_future)


MAX_EVENT_AGE = 3650 * 86400.0
MAX_EVENT_FUTURE = 86400.0


def _bounded_duration(value: str | float, key: str, limit: float) -> float:
    seconds = parse_duration(value, key=key)
    if seconds > limit:
        raise exceptions.ConfigError(f"{key}={value!r} is longer than {limit / 86400:g} days; choose a shorter one")
    return seconds


def _urgency_table(value: object, key: str) -> dict[str, Any]:
    value = _from_json(value, key, '{"sync_fast": "10s"}')
    if not isinstance(value, Mapping):
        raise exceptions.ConfigError(f"{key} must be a table of NAME = \"lifetime\"")
    return dict(value)


def _bounded_text(value: object, key: str, limit: int) -> str:
    text = _text(value, key)
    if len(text) > limit:
        raise exceptions.ConfigError(f"{key}={text[:40]!r}... is {len(text)} characters; at most {limit}")
    return text


def _dedup_horizon(value: str | float) -> float:
    seconds = parse_duration(value, key="meter_dedup_horizon")
    if seconds < 86400:
        raise exceptions.ConfigError(
            f"meter_dedup_horizon={value!r} must be at least a day (1d): clients retry for that long")
    return seconds


def new_replica_id() -> str:
    """A fresh replica id: host name, pid and a random suffix, readable in logs."""
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# ---- the daemon: one table of options, read from TOML, then AGGREGATOR_* variables, then flags ----

DEFAULT_CONFIG_PATH = Path("/etc/aggregator/aggregator.toml")


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise exceptions.ConfigError(f"{key}={value!r} must be a non-empty string")
    return value.strip()


def _listen(value: object, key: str) -> tuple[str, int]:
    text = _text(value, key)
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise exceptions.ConfigError(
            f"{key}={value!r} must be HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:8714 or [::1]:8714")
    return host, int(port)


# Values nobody meant as secrets: those of systemd/aggregator.env.example, and their like.
_PLACEHOLDER = re.compile(r"(?i:change[-_ ]?me|placeholder|example|replace[-_ ]?with)|xxxx|XXXX")
_NEW_SECRET = "generate one with `python3 -c 'import secrets; print(secrets.token_hex(32))'`"


def _not_placeholder(value: str, key: str, what: str, fix: str = _NEW_SECRET) -> str:
    """``value``, unless it is a placeholder: then ConfigError naming ``key``, the placeholder word and ``fix``."""
    if match := _PLACEHOLDER.search(value):
        raise exceptions.ConfigError(
            f"{key}: {what} contains {match.group(0)!r}, a placeholder (as in aggregator.env.example), not a "
            f"secret; {fix}")
    return value


def _database_url(value: object, key: str) -> str:
    url = _text(value, key)
    span = _password_span(url)
    if span is not None:
        _not_placeholder(url[span[0]:span[1]], key, "the password", "give the database user's real one")
    return url


def _tokens(value: object, key: str) -> tuple[str, ...]:
    """Bearer tokens, each ``TOKEN`` (any use) or ``TOKEN:type1|type2`` (checkpoints of those types only)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
        raise exceptions.ConfigError(f"{key} must be a list of strings (TOML) or comma-separated (environment)")
    entries = tuple(t.strip() for t in items if t.strip())
    for index, (token, types) in enumerate(token_scopes(entries)):
        _not_placeholder(token, key, f"token #{index + 1}")
        if len(token) < 16 or any(c.isspace() for c in token):
            # The value itself is a secret: name its position, never the token.
            raise exceptions.ConfigError(
                f"{key}: token #{index + 1} is too weak; use at least 16 characters without spaces, "
                "e.g. from `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        if types is not None and (not types or not all(re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", t) for t in types)):
            raise exceptions.ConfigError(
                f"{key}: token #{index + 1} limits itself to types {sorted(types)!r}; after ':' give type names "
                "separated by '|', e.g. TOKEN:web|worker")
    return entries


def token_scopes(entries: tuple[str, ...]) -> list[tuple[str, frozenset[str] | None]]:
    """Each token with the checkpoint types it is limited to (None: not limited)."""
    out: list[tuple[str, frozenset[str] | None]] = []
    for entry in entries:
        token, colon, types = entry.rpartition(":")
        out.append((token, frozenset(t.strip() for t in types.split("|") if t.strip())) if colon
                   else (entry, None))
    return out


def _duration(value: object, key: str) -> float:
    return parse_duration(value, key=key)  # type: ignore[arg-type]


def _integer(low: int, high: int) -> Any:
    def parse(value: object, key: str) -> int:
        try:
            number = int(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise exceptions.ConfigError(f"{key}={value!r} must be a whole number from {low} to {high}")
        return number

    return parse


def _choice(*allowed: str) -> Any:
    def parse(value: object, key: str) -> str:
        if value not in allowed:
            raise exceptions.ConfigError(f"{key}={value!r} must be one of: {', '.join(allowed)}")
        return str(value)

    return parse


def _boolean(value: object, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise exceptions.ConfigError(f"{key}={value!r} must be true or false")


@dataclasses.dataclass(frozen=True, slots=True)
class Option:
    key: str
    default: Any
    parse: Any
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return f"AGGREGATOR_{self.key.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("database_url", None, _database_url,
           "database URL (postgresql://... or sqlite:///path); unset: the embedded SQLite file", secret=True),
    Option("database_pooler", "none", lambda v, k: resolve_database_pooler(v),
           "connection pooler in front of PostgreSQL: none, or transaction for PgBouncer with pool_mode = transaction "
           "(no prepared statements kept across transactions)"),
    Option("listen", "127.0.0.1:8714", _listen, "HTTP address HOST:PORT (port 0 picks a free one)"),
    Option("api_tokens", "", _tokens,
           "bearer tokens for ingest and pull; without any, the API is open only on a loopback address",
           secret=True),
    Option("window", "30m", lambda v, k: parse_window(v, key=k),
           "report window, dividing a day (e.g. 10s, 5m, 30m, 1h)"),
    Option("flush_interval", "60s", _duration, "how often tracked data is written to the database"),
    Option("grace", None, lambda v, k: parse_duration(v, key=k, zero=True),
           "extra wait after a window ends before collecting it, on top of the watermarks; unset: 0"),
    Option("replica_lease", None, _duration,
           "a replica silent this long (database clock) no longer holds windows back; unset: 3 x flush_interval, "
           "at least 10s"),
    Option("max_collect_delay", None, _duration,
           "a window is reported this long after its end whatever holds it; unset: max(window, 4 x replica_lease)"),
    Option("health_overdue_after", None, _duration,
           "health is degraded while a finished window is unreported this long after its end; unset: "
           "max_collect_delay + grace + 2 x collect_interval"),
    Option("health_failures_in_row", 3, _integer(1, 1000),
           "health is degraded once this many flushes, or collections, failed in a row"),
    Option("memory_budget", "64MiB", lambda v, k: parse_size(v, key=k),
           "memory for data queued while the database is unreachable; past it, batches go to the spool"),
    Option("spool_dir", None, lambda v, k: _text(v, k),
           "where batches past the memory budget are kept until the database is back; unset: the state directory"),
    Option("collect_interval", None, _duration, "how often the collector looks for finished windows"),
    Option("replica_id", None, lambda v, k: _text(v, k), "this replica's name in reports; unset: host-pid-random"),
    Option("max_body_bytes", 4 * 1024 * 1024, _integer(1024, 256 * 1024 * 1024),
           "largest accepted request body; larger gets 413"),
    Option("max_events_per_request", 10_000, _integer(1, 1_000_000), "most events in one POST /v1/track"),
    Option("max_event_age", "1d", lambda v, k: _bounded_duration(v, k, MAX_EVENT_AGE),
           "oldest event time accepted (older gets 422, or InvalidInput in process); at most 3650d"),
    Option("max_event_future", "5m", lambda v, k: _bounded_duration(v, k, MAX_EVENT_FUTURE),
           "furthest event time in the future accepted; at most 1d"),
    Option("shutdown_timeout", "30s", _duration, "bound on a clean stop: drain requests, final flush"),
    Option("writers", None, _named_tables,
           "report writers: TOML tables [writers.NAME] (type jsonl or snowplow); in the environment, the same as JSON"),
    Option("pseudonym_key", None, lambda v, k: _not_placeholder(_text(v, k), k, "the key"),
           "secret key (>= 16 bytes) for HMAC-SHA256 pseudonyms of identifiers that leave the system", secret=True),
    Option("pseudonym_allowlist", "", _names, "identifier fields that may leave in clear (e.g. generated_by)"),
    Option("outbox_max_attempts", 12, _integer(1, 1000), "delivery attempts before an item is dead-lettered"),
    Option("outbox_backoff_initial", "1s", _duration, "delay before the first retry; doubles each attempt"),
    Option("outbox_backoff_max", "10m", _duration, "longest delay between retries"),
    Option("outbox_poll_interval", "5s", _duration, "how often delivery looks for due items without a wake-up"),
    Option("outbox_drain_timeout", "10s", _duration, "bound on delivering due items at shutdown"),
    Option("outbox_retention", "7d", _duration, "how long delivered items are kept (dead ones stay)"),
    Option("distinct_retention", "400d", _duration,
           "how long the per-day id rollup is kept: range distinct is exact over whole days this recent"),
    Option("meters", None, _named_tables,
           "declared meters: TOML tables [meters.NAME] (aggregation, unit, dimensions, ...); in the environment, JSON"),
    Option("billing_realm", "SaaS", lambda v, k: _text(v, k), "realm of billable usage events (e.g. SaaS, SM)"),
    Option("billing_instance_id", None, lambda v, k: _text(v, k), "instance_id of billable usage events; unset: none"),
    Option("meter_dedup_horizon", "2d", _duration, "how long a record's event_id is remembered (at least 1d)"),
    Option("experience_urgencies", None, lambda v, k: _urgency_table(v, k),
           "urgencies of experiences and their lifetimes: TOML table NAME = \"10s\"; unset: sync_fast 10s, "
           "sync_slow 60s, async_fast 5m, async_low 1h"),
    Option("log_level", "info", _choice("debug", "info", "warning", "error"), "log level"),
    Option("log_format", "auto", _choice("auto", "json", "console"),
           "auto: JSON lines when not on a terminal (journald), readable on one"),
)
OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The effective configuration of `aggregator run`, and where each value came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    aggregator: Settings

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def masked(self) -> dict[str, Any]:
        """Values safe to print or log: tokens hidden, database password masked."""
        out = dict(self.values)
        effective = self.aggregator
        for key in ("window", "flush_interval", "grace", "collect_interval", "max_event_age", "max_event_future",
                    "shutdown_timeout", "replica_lease", "max_collect_delay", "health_overdue_after",
                    "distinct_retention"):
            value = getattr(effective, key, None)
            out[key] = f"{self.values[key] if value is None else value:g}s"
        out["replica_id"] = effective.replica_id
        out["database_url"] = mask_url(effective.database_url)
        out["api_tokens"] = f"<{len(self.values['api_tokens'])} tokens>"
        out["listen"] = "{}:{}".format(*self.values["listen"])
        out["pseudonym_key"] = "<set>" if effective.delivery.pseudonym_key else None
        out["writers"] = {name: _masked_table(table) for name, table in effective.delivery.writers}
        out["meters"] = {m.name: m.aggregation for m in effective.meters}
        out["experience_urgencies"] = {name: f"{seconds:g}s" for name, seconds in effective.urgencies.items()}
        out["meter_dedup_horizon"] = f"{self.values['meter_dedup_horizon']:g}s"
        for key in ("outbox_backoff_initial", "outbox_backoff_max", "outbox_poll_interval", "outbox_drain_timeout",
                    "outbox_retention"):
            out[key] = f"{self.values[key]:g}s"
        return out


def load_daemon_settings(flags: dict[str, Any], environ: Mapping[str, str] | None = None,
                         config_path: str | None = None) -> DaemonSettings:
    """Defaults < TOML file < systemd credentials < environment < flags; every value parsed and validated once.

    Credentials (``LoadCredential=``) are files named after a secret option (``database_url``,
    ``api_tokens``, ``pseudonym_key``) in ``$CREDENTIALS_DIRECTORY``, read stripped.
    """
    environ = os.environ if environ is None else environ
    credentials = environ.get("CREDENTIALS_DIRECTORY")
    raw: dict[str, Any] = {o.key: o.default for o in OPTIONS}
    sources = {o.key: "default" for o in OPTIONS}
    path = config_path or environ.get("AGGREGATOR_CONFIG")
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = str(DEFAULT_CONFIG_PATH)
    if path is not None:
        for key, value in _read_toml(Path(path)).items():
            raw[key], sources[key] = value, f"file {path}"
    for option in OPTIONS:
        if option.secret and credentials and (Path(credentials) / option.key).is_file():
            credential = Path(credentials) / option.key
            raw[option.key], sources[option.key] = _read_credential(credential), f"credential {credential}"
        if option.env in environ:
            raw[option.key], sources[option.key] = environ[option.env], f"env {option.env}"
        if flags.get(option.key) is not None:
            raw[option.key], sources[option.key] = flags[option.key], f"flag {option.flag}"
    values: dict[str, Any] = {}
    for o in OPTIONS:
        try:
            values[o.key] = None if raw[o.key] is None else o.parse(raw[o.key], o.key)
        except exceptions.ConfigError as exc:
            raise exceptions.ConfigError(f"{exc} (set by {sources[o.key]})") from None
    host = values["listen"][0]
    if not values["api_tokens"] and not _is_loopback(host):
        raise exceptions.ConfigError(
            f"listen={host!r} is not a loopback address and no api_tokens are set; set AGGREGATOR_API_TOKENS "
            "(or api_tokens in the config file), or listen on 127.0.0.1")
    aggregator = Settings.build(
        database_url=values["database_url"], replica_id=values["replica_id"], window=values["window"],
        flush_interval=values["flush_interval"], grace=values["grace"], collect=True,
        collect_interval=values["collect_interval"], stop_timeout=values["shutdown_timeout"],
        distinct_retention=values["distinct_retention"],
        delivery=DeliverySettings.build(
            writers=dict(values["writers"] or ()), pseudonym_key=values["pseudonym_key"],
            pseudonym_allowlist=values["pseudonym_allowlist"], max_attempts=values["outbox_max_attempts"],
            backoff_initial=values["outbox_backoff_initial"], backoff_max=values["outbox_backoff_max"],
            poll_interval=values["outbox_poll_interval"], drain_timeout=values["outbox_drain_timeout"],
            retention=values["outbox_retention"]),
        meters=dict(values["meters"] or ()), billing_realm=values["billing_realm"],
        billing_instance_id=values["billing_instance_id"], meter_dedup_horizon=values["meter_dedup_horizon"],
        urgencies=values["experience_urgencies"], replica_lease=values["replica_lease"],
        max_collect_delay=values["max_collect_delay"], memory_budget=values["memory_budget"],
        health_overdue_after=values["health_overdue_after"], health_failures_in_row=values["health_failures_in_row"],
        spool_dir=values["spool_dir"], database_pooler=values["database_pooler"],
        max_event_age=values["max_event_age"], max_event_future=values["max_event_future"],
    )
    _check_writers(aggregator, sources["writers"])
    return DaemonSettings(values=values, sources=sources, aggregator=aggregator)


def _check_writers(settings: Settings, source: str) -> None:
    """Build each writer once (its options are validated) and check it may send what it would send."""
    from aggregator import outbox, privacy, writers  # they import this module

    delivery = settings.delivery
    pseudonymizer = privacy.Pseudonymizer(delivery.pseudonym_key, delivery.pseudonym_allowlist)
    for name, table in delivery.writers:
        try:
            writers.build(name, table)
        except exceptions.ConfigError as exc:
            raise exceptions.ConfigError(f"{exc} (set by {source})") from None
        pseudonymizer.require(outbox.sent_kinds(settings), f"writer {name!r}")


def _read_credential(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        # The file holds a secret: say why it cannot be read, never what it holds.
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise exceptions.ConfigError(
            f"credential {path} cannot be read: {reason}; check LoadCredential= in the unit") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise exceptions.ConfigError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise exceptions.ConfigError(f"config file {path} cannot be read: {exc}") from exc
    section = dict(data.get("aggregator", data))  # keys at the top level or under [aggregator]
    for tables in ("writers", "meters", "experience_urgencies"):  # tables beside [aggregator]
        if "aggregator" in data and tables in data:
            section[tables] = data[tables]
    unknown = sorted(set(section) - set(OPTIONS_BY_KEY))
    if unknown:
        raise exceptions.ConfigError(
            f"config file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(OPTIONS_BY_KEY)}")
    return dict(section)


def _masked_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """A writer table for logs: header values and anything named like a secret hidden."""
    secret = re.compile(r"(?i)header|token|secret|password|key")
    return {k: "***" if secret.search(k) else v for k, v in table.items()}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
