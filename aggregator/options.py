"""The daemon's option table: every setting of `aggregator run` with its default, variable, flag and parser.

Read as defaults < TOML file < systemd credentials < ``AGGREGATOR_*`` environment < flags into
``DaemonSettings``, which builds the embedded ``config.Settings``. Nothing below the daemon imports this.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aggregator import config, dsn, exceptions, outbox, privacy, units, writers

DEFAULT_CONFIG_PATH = Path("/etc/aggregator/aggregator.toml")


def _listen(value: object, key: str) -> tuple[str, int]:
    text = config.parse_text(value, key)
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise exceptions.ConfigError(
            f"{key}={value!r} must be HOST:PORT with a port from 0 to 65535, e.g. 127.0.0.1:8714 or [::1]:8714")
    return host, int(port)


def _database_url(value: object, key: str) -> str:
    url = config.parse_text(value, key)
    password = dsn.password(url)
    if password is not None:
        config.not_placeholder(password, key, "the password", "give the database user's real one")
    return url


def _tokens(value: object, key: str) -> tuple[str, ...]:
    """Bearer tokens, each ``TOKEN`` (any use) or ``TOKEN:type1|type2`` (checkpoints of those types only)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
        raise exceptions.ConfigError(f"{key} must be a list of strings (TOML) or comma-separated (environment)")
    entries = tuple(t.strip() for t in items if t.strip())
    for index, (token, types) in enumerate(token_scopes(entries)):
        config.not_placeholder(token, key, f"token #{index + 1}")
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
    return units.parse_duration(value, key=key)  # type: ignore[arg-type]


def _choice(*allowed: str) -> Any:
    def parse(value: object, key: str) -> str:
        if value not in allowed:
            raise exceptions.ConfigError(f"{key}={value!r} must be one of: {', '.join(allowed)}")
        return str(value)

    return parse


def _urgency_table(value: object, key: str) -> dict[str, Any]:
    value = config.parse_json(value, key, '{"sync_fast": "10s"}')
    if not isinstance(value, Mapping):
        raise exceptions.ConfigError(f"{key} must be a table of NAME = \"lifetime\"")
    return dict(value)


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
    Option("database_pooler", "none", lambda v, k: dsn.resolve_database_pooler(v),
           "connection pooler in front of PostgreSQL: none, or transaction for PgBouncer with pool_mode = transaction "
           "(no prepared statements kept across transactions)"),
    Option("listen", "127.0.0.1:8714", _listen, "HTTP address HOST:PORT (port 0 picks a free one)"),
    Option("api_tokens", "", _tokens,
           "bearer tokens for ingest and pull; without any, the API is open only on a loopback address",
           secret=True),
    Option("window", "30m", lambda v, k: units.parse_window(v, key=k),
           "report window, dividing a day (e.g. 10s, 5m, 30m, 1h)"),
    Option("flush_interval", "60s", _duration, "how often tracked data is written to the database"),
    Option("grace", None, lambda v, k: units.parse_duration(v, key=k, zero=True),
           "extra wait after a window ends before collecting it, on top of the watermarks; unset: 0"),
    Option("replica_lease", None, _duration,
           "a replica silent this long (database clock) no longer holds windows back; unset: 3 x flush_interval, "
           "at least 10s"),
    Option("max_collect_delay", None, _duration,
           "a window is reported this long after its end whatever holds it; unset: max(window, 4 x replica_lease)"),
    Option("health_overdue_after", None, _duration,
           "health is degraded while a finished window is unreported this long after its end; unset: "
           "max_collect_delay + grace + 2 x collect_interval"),
    Option("health_failures_in_row", 3, config.parse_integer(1, 1000),
           "health is degraded once this many flushes, or collections, failed in a row"),
    Option("memory_budget", "64MiB", lambda v, k: units.parse_size(v, key=k),
           "memory for data queued while the database is unreachable; past it, batches go to the spool"),
    Option("spool_dir", None, config.parse_text,
           "where batches past the memory budget are kept until the database is back; unset: the state directory"),
    Option("collect_interval", None, _duration, "how often the collector looks for finished windows"),
    Option("replica_id", None, config.parse_text, "this replica's name in reports; unset: host-pid-random"),
    Option("max_body_bytes", 4 * 1024 * 1024, config.parse_integer(1024, 256 * 1024 * 1024),
           "largest accepted request body; larger gets 413"),
    Option("max_events_per_request", 10_000, config.parse_integer(1, 1_000_000), "most events in one POST /v1/track"),
    Option("max_event_age", "1d", lambda v, k: config.bounded_duration(v, k, config.MAX_EVENT_AGE),
           "oldest event time accepted (older gets 422, or InvalidInput in process); at most 3650d"),
    Option("max_event_future", "5m", lambda v, k: config.bounded_duration(v, k, config.MAX_EVENT_FUTURE),
           "furthest event time in the future accepted; at most 1d"),
    Option("shutdown_timeout", "30s", _duration, "bound on a clean stop: drain requests, final flush"),
    Option("writers", None, config.parse_named_tables,
           "report writers: TOML tables [writers.NAME] (type jsonl or snowplow); in the environment, the same as JSON"),
    Option("pseudonym_key", None, lambda v, k: config.not_placeholder(config.parse_text(v, k), k, "the key"),
           "secret key (>= 16 bytes) for HMAC-SHA256 pseudonyms of identifiers that leave the system", secret=True),
    Option("pseudonym_allowlist", "", config.parse_names,
           "identifier fields that may leave in clear (e.g. generated_by)"),
    Option("outbox_max_attempts", 12, config.parse_integer(1, 1000),
           "delivery attempts before an item is dead-lettered"),
    Option("outbox_backoff_initial", "1s", _duration, "delay before the first retry; doubles each attempt"),
    Option("outbox_backoff_max", "10m", _duration, "longest delay between retries"),
    Option("outbox_poll_interval", "5s", _duration, "how often delivery looks for due items without a wake-up"),
    Option("outbox_drain_timeout", "10s", _duration, "bound on delivering due items at shutdown"),
    Option("outbox_retention", "7d", _duration, "how long delivered items are kept (dead ones stay)"),
    Option("distinct_retention", "400d", _duration,
           "how long the per-day id rollup is kept: range distinct is exact over whole days this recent"),
    Option("meters", None, config.parse_named_tables,
           "declared meters: TOML tables [meters.NAME] (aggregation, unit, dimensions, ...); in the environment, JSON"),
    Option("billing_realm", "SaaS", config.parse_text, "realm of billable usage events (e.g. SaaS, SM)"),
    Option("billing_instance_id", None, config.parse_text, "instance_id of billable usage events; unset: none"),
    Option("meter_dedup_horizon", "2d", _duration, "how long a record's event_id is remembered (at least 1d)"),
    Option("experience_urgencies", None, _urgency_table,
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
    aggregator: config.Settings

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
        out["database_url"] = dsn.mask_url(effective.database_url)
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
    aggregator = config.Settings.build(
        database_url=values["database_url"], replica_id=values["replica_id"], window=values["window"],
        flush_interval=values["flush_interval"], grace=values["grace"], collect=True,
        collect_interval=values["collect_interval"], stop_timeout=values["shutdown_timeout"],
        distinct_retention=values["distinct_retention"],
        delivery=config.DeliverySettings.build(
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


def _check_writers(settings: config.Settings, source: str) -> None:
    """Build each writer once (its options are validated) and check it may send what it would send."""
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
