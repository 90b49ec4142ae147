"""Settings: what an embedded Aggregator needs (``Settings``, ``DeliverySettings``), built and validated once.

Frozen objects passed down, never global or mutable. The daemon's option table reading them from TOML, the
environment and flags is ``options.py``; this module never imports it, the store or the outbox.
Durations are strings such as ``"10s"``, ``"30m"``, ``"1h"`` or a number of seconds (``units.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from aggregator import dsn, exceptions, experiences, reports, units, values
from aggregator import meters as meters_module


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
        tables = parse_named_tables(writers or {}, "writers")
        key = pseudonym_key if pseudonym_key is not None else os.environ.get("AGGREGATOR_PSEUDONYM_KEY") or None
        if key is not None and (not isinstance(key, str) or len(key.encode()) < 16):
            # The key is a secret: the message names the setting, never the value.
            raise exceptions.ConfigError("pseudonym_key must be a string of at least 16 bytes, e.g. from "
                                         "`python3 -c 'import secrets; print(secrets.token_hex(32))'`")
        if key is not None:  # embedded too: the placeholder of aggregator.env.example is no key
            not_placeholder(key, "pseudonym_key", "the key")
        initial = units.parse_duration(backoff_initial, key="outbox_backoff_initial")
        maximum = units.parse_duration(backoff_max, key="outbox_backoff_max")
        if maximum < initial:
            raise exceptions.ConfigError(
                f"outbox_backoff_max={backoff_max!r} is shorter than outbox_backoff_initial={backoff_initial!r}")
        return cls(
            writers=tables, pseudonym_key=key,
            pseudonym_allowlist=parse_names(pseudonym_allowlist, "pseudonym_allowlist"),
            max_attempts=parse_integer(1, 1000)(max_attempts, "outbox_max_attempts"), backoff_initial=initial,
            backoff_max=maximum, poll_interval=units.parse_duration(poll_interval, key="outbox_poll_interval"),
            drain_timeout=units.parse_duration(drain_timeout, key="outbox_drain_timeout"),
            retention=units.parse_duration(retention, key="outbox_retention"),
        )


def parse_json(value: object, key: str, example: str) -> object:
    """A table given in the environment: the same as JSON (an empty string is an empty table)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else {}
    except json.JSONDecodeError as exc:
        raise exceptions.ConfigError(
            f"{key} is not valid JSON ({exc.msg} at character {exc.pos}); in the environment give e.g. {example}"
        ) from None


def parse_named_tables(value: object, key: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Named tables (writers, meters) from TOML (a table of tables) or the environment (the same as JSON)."""
    value = parse_json(value, key, '{"NAME": {"option": "value"}}')
    if not isinstance(value, Mapping) or not all(isinstance(t, Mapping) for t in value.values()):
        raise exceptions.ConfigError(
            f"{key} must be a table of tables, one per name, e.g. [{key}.NAME] in TOML")
    for name in value:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}", name):
            raise exceptions.ConfigError(
                f"{key}: name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    return tuple((str(name), dict(table)) for name, table in value.items())


def parse_names(value: object, key: str) -> tuple[str, ...]:
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
    # "transaction": a transaction-pooling PgBouncer is in front of PostgreSQL (see dsn.resolve_database_pooler).
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
        window_s = units.parse_window(window, key="window")
        flush_s = units.parse_duration(flush_interval, key="flush_interval")
        # Watermarks tell the collector when a window is complete; grace only adds a wait on top.
        grace_s = units.parse_duration(grace, key="grace", zero=True) if grace is not None else 0.0
        # A live replica publishes every flush interval, retrying sooner after a failure: three missed
        # intervals (and never under 10 s, for a loaded host) is silence, not jitter.
        lease_s = (units.parse_duration(replica_lease, key="replica_lease") if replica_lease is not None
                   else max(3 * flush_s, 10.0))
        delay_s = (units.parse_duration(max_collect_delay, key="max_collect_delay") if max_collect_delay is not None
                   else max(window_s, 4 * lease_s))
        if delay_s < lease_s:
            raise exceptions.ConfigError(
                f"max_collect_delay={delay_s:g}s is shorter than replica_lease={lease_s:g}s; a window would be "
                "closed before a silent replica is given up on: make max_collect_delay at least the lease")
        if collect_interval is None:
            collect_s = min(max(min(window_s, flush_s) / 4, 0.25), 15.0)
        else:
            collect_s = units.parse_duration(collect_interval, key="collect_interval")
        # max_collect_delay is the promise; a run comes every collect_interval, give or take half of it.
        overdue_s = (units.parse_duration(health_overdue_after, key="health_overdue_after")
                     if health_overdue_after is not None else delay_s + grace_s + 2 * collect_s)
        if replica_id is not None and (not isinstance(replica_id, str) or not 0 < len(replica_id) <= 200):
            raise exceptions.ConfigError(f"replica_id={replica_id!r} must be a string of 1 to 200 characters")
        return cls(
            database_url=dsn.resolve_database_url(database_url),
            replica_id=replica_id or new_replica_id(),
            window=window_s,
            flush_interval=flush_s,
            grace=grace_s,
            collect=bool(collect),
            collect_interval=collect_s,
            stop_timeout=units.parse_duration(stop_timeout, key="stop_timeout"),
            id_retention=units.parse_duration(id_retention, key="id_retention"),
            distinct_retention=units.parse_duration(distinct_retention, key="distinct_retention"),
            delivery=delivery or DeliverySettings.build(),
            meters=meters_module.declare(meters or ()),
            billing_realm=_bounded_text(billing_realm, "billing_realm", 128),
            billing_instance_id=None if billing_instance_id is None else _bounded_text(
                billing_instance_id, "billing_instance_id", 256),
            meter_dedup_horizon=_dedup_horizon(meter_dedup_horizon),
            urgencies=experiences.urgencies(urgencies, lambda v, k: units.parse_duration(v, key=k)),
            replica_lease=lease_s,
            max_collect_delay=delay_s,
            health_overdue_after=overdue_s,
            health_failures_in_row=parse_integer(1, 1000)(health_failures_in_row, "health_failures_in_row"),
            memory_budget=units.parse_size(memory_budget, key="memory_budget"),
            spool_dir=None if spool_dir is None else parse_text(spool_dir, "spool_dir"),
            database_pooler=dsn.resolve_database_pooler(database_pooler),
            max_event_age=bounded_duration(max_event_age, "max_event_age", MAX_EVENT_AGE),
            max_event_future=bounded_duration(max_event_future, "max_event_future", MAX_EVENT_FUTURE),
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


def bounded_duration(value: str | float, key: str, limit: float) -> float:
    seconds = units.parse_duration(value, key=key)
    if seconds > limit:
        raise exceptions.ConfigError(f"{key}={value!r} is longer than {limit / 86400:g} days; choose a shorter one")
    return seconds


def _bounded_text(value: object, key: str, limit: int) -> str:
    text = parse_text(value, key)
    if len(text) > limit:
        raise exceptions.ConfigError(f"{key}={text[:40]!r}... is {len(text)} characters; at most {limit}")
    return text


def _dedup_horizon(value: str | float) -> float:
    seconds = units.parse_duration(value, key="meter_dedup_horizon")
    if seconds < 86400:
        raise exceptions.ConfigError(
            f"meter_dedup_horizon={value!r} must be at least a day (1d): clients retry for that long")
    return seconds


def new_replica_id() -> str:
    """A fresh replica id: host name, pid and a random suffix, readable in logs."""
    return f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


# ---- validators shared with the daemon's option table (options.py) ----

def parse_text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise exceptions.ConfigError(f"{key}={value!r} must be a non-empty string")
    return value.strip()


# Values nobody meant as secrets: those of systemd/aggregator.env.example, and their like.
_PLACEHOLDER = re.compile(r"(?i:change[-_ ]?me|placeholder|example|replace[-_ ]?with)|xxxx|XXXX")
_NEW_SECRET = "generate one with `python3 -c 'import secrets; print(secrets.token_hex(32))'`"


def not_placeholder(value: str, key: str, what: str, fix: str = _NEW_SECRET) -> str:
    """``value``, unless it is a placeholder: then ConfigError naming ``key``, the placeholder word and ``fix``."""
    if match := _PLACEHOLDER.search(value):
        raise exceptions.ConfigError(
            f"{key}: {what} contains {match.group(0)!r}, a placeholder (as in aggregator.env.example), not a "
            f"secret; {fix}")
    return value


def parse_integer(low: int, high: int) -> Any:
    def parse(value: object, key: str) -> int:
        try:
            number = int(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            raise exceptions.ConfigError(f"{key}={value!r} must be a whole number from {low} to {high}")
        return number

    return parse
