"""Snowplow writer: envelopes as self-describing events, POSTed to a collector's tp2 endpoint.

Each envelope's data is first validated against its shipped Iglu schema; an invalid one is rejected and
never sent. Valid events travel in POSTs of at most ``batch_size`` events and ``batch_bytes`` bytes.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import importlib.metadata
import json
import math
import re
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import jsonschema

from aggregator import exceptions, iglu, logs, units, writers

log = logs.get_logger("aggregator.writers.snowplow")

TP2_PATH = "/com.snowplowanalytics.snowplow/tp2"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
UNSTRUCT_EVENT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
CONTENT_TYPE = "application/json; charset=utf-8"
KEYS = ("collector", "app_id", "namespace", "encode_base64", "batch_size", "batch_bytes", "timeout", "headers")

# The pattern unstruct_event 1-0-0 puts on the inner schema URI: checking it here keeps a URI that the
# collector would refuse (or one that walks out of the schema directory) from ever being looked up.
_IGLU_URI = re.compile(r"iglu:[a-zA-Z0-9-_.]+/[a-zA-Z0-9-_]+/[a-zA-Z0-9-_]+/[0-9]+-[0-9]+-[0-9]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# The writer sets these per request; a configured value would corrupt the POST.
_RESERVED_HEADERS = frozenset({"content-type", "content-length", "host", "transfer-encoding"})
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_SNIPPET_CHARS = 200
# stm is a 13-digit millisecond time until the year 2286, so sizes measured with this stand-in are exact.
_STM_STAND_IN = "0" * 13


def _version() -> str:
    try:
        return importlib.metadata.version("aggregator")
    except importlib.metadata.PackageNotFoundError:
        # A source tree that was never installed still has to send a User-Agent.
        return "0+unknown"


VERSION = _version()
USER_AGENT = f"aggregator/{VERSION}"
TRACKER_VERSION = f"py-aggregator-{VERSION}"


def _is_rfc3339(value: object) -> bool:
    if not isinstance(value, str):
        return True  # JSON Schema formats only constrain strings
    if not _RFC3339.fullmatch(value):
        return False
    dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))  # ValueError for e.g. month 13
    return True


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker()
    if "date-time" not in checker.checkers:
        # jsonschema checks date-time only when rfc3339-validator is installed; without it a bad timestamp
        # would pass here and fail later in Snowplow enrichment, where nobody sees it.
        checker.checks("date-time", raises=ValueError)(_is_rfc3339)
    return checker


_FORMATS = _format_checker()


@functools.cache
def _validator(uri: str) -> jsonschema.Draft4Validator:
    """A validator for the shipped schema ``uri``. Iglu schemas are Draft 4; their ``$schema`` names Iglu's
    meta-schema, which jsonschema does not know, so the validator class is chosen here rather than by it."""
    schema = iglu.load(uri)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=_FORMATS)


def _dumps(value: object) -> str:
    # Compact and ASCII-only, so the length in characters is the length in bytes; NaN is not JSON.
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _body(events: Sequence[Mapping[str, str]]) -> bytes:
    return _dumps({"schema": PAYLOAD_DATA, "data": list(events)}).encode("ascii")


_EMPTY_BODY_BYTES = len(_body([]))


def _snippet(content: bytes) -> str:
    text = content[: _SNIPPET_CHARS * 4].decode("utf-8", errors="replace")
    return " ".join(text.split())[:_SNIPPET_CHARS]


Event = tuple[int, dict[str, str]]  # (position in the batch, the tp2 event)


class SnowplowWriter(writers.Writer):
    """Sends envelopes to a Snowplow collector as ``ue`` events wrapping ``{"schema", "data"}``.

    With ``encode_base64`` the wrapper travels as ``ue_px``: URL-safe base64 of the same JSON, ``=`` padding
    stripped as the Snowplow JavaScript tracker does (the collector and enrichment accept both).
    """

    type = "snowplow"

    def __init__(self, name: str, *, collector: str, app_id: str = "aggregator", namespace: str = "aggregator",
                 encode_base64: bool = False, batch_size: int = 50, batch_bytes: int = 50_000,
                 timeout: float = 10.0, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(name)
        self.collector = collector.rstrip("/")
        self.endpoint = self.collector + TP2_PATH
        self.app_id = app_id
        self.namespace = namespace
        self.encode_base64 = encode_base64
        self.batch_size = batch_size
        self.max_batch = batch_size
        self.batch_bytes = batch_bytes
        self.timeout = timeout
        self._headers = dict(headers or {})  # may hold secrets: never logged, never in a message
        self._client: httpx.AsyncClient | None = None
        self._who = f"snowplow writer {name!r}"

    def __repr__(self) -> str:
        return f"<SnowplowWriter {self.name!r} → {self.endpoint} headers={sorted(self._headers)}>"

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> SnowplowWriter:
        """Build from ``[writers.NAME]``; every error names ``writers.NAME.KEY`` (never a header value)."""
        writers.unknown_keys(name, options, KEYS)
        prefix = f"writers.{name}"
        return cls(
            name,
            collector=_collector(options.get("collector"), f"{prefix}.collector"),
            app_id=_text(options.get("app_id", "aggregator"), f"{prefix}.app_id"),
            namespace=_text(options.get("namespace", "aggregator"), f"{prefix}.namespace"),
            encode_base64=_flag(options.get("encode_base64", False), f"{prefix}.encode_base64"),
            batch_size=_integer(options.get("batch_size", 50), f"{prefix}.batch_size", 1, 1000),
            batch_bytes=_integer(options.get("batch_bytes", 50_000), f"{prefix}.batch_bytes", 1, None),
            timeout=units.parse_duration(options.get("timeout", "10s"), key=f"{prefix}.timeout"),
            headers=_header_table(options.get("headers", {}), f"{prefix}.headers"),
        )

    async def open(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout), headers={"User-Agent": USER_AGENT, **self._headers})

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def send(self, batch: Sequence[writers.Envelope]) -> list[writers.Outcome]:
        client = self._client
        if client is None:
            raise exceptions.NotRunning(f"{self._who}: send() was called before open()")
        outcomes: list[writers.Outcome | None] = [None] * len(batch)
        ready: list[Event] = []
        for index, envelope in enumerate(batch):
            event = self._event(envelope)
            if isinstance(event, str):
                # The reason stays in the outcome: a schema error's message may quote the data.
                log.warning("snowplow_event_rejected", writer=self.name, event_id=str(envelope.event_id),
                            schema=envelope.schema)
                outcomes[index] = writers.Outcome.rejected(event)
            else:
                ready.append((index, event))
        chunks = self._chunks(ready)
        for number, chunk in enumerate(chunks):
            stop = await self._deliver(client, chunk, outcomes)
            if stop is not None:
                # A retryable failure (collector down, overloaded, slow) will most likely hit the next POST
                # too: waiting out its timeout again, or pressing a collector that asked us to back off,
                # only delays the outbox's own backoff.
                skipped = writers.Outcome.retry(f"{stop} (not sent: an earlier POST of this batch failed)")
                for later in chunks[number + 1:]:
                    for index, _ in later:
                        outcomes[index] = skipped
                break
        return [outcome or writers.Outcome.retry(f"{self._who}: not sent") for outcome in outcomes]

    def _event(self, envelope: writers.Envelope) -> dict[str, str] | str:
        """The tp2 event for ``envelope``, or why it must be rejected."""
        eid = envelope.event_id
        uri = envelope.schema
        if not isinstance(uri, str) or not _IGLU_URI.fullmatch(uri):
            return f"{self._who}: event {eid} has schema {uri!r}, not an Iglu URI (iglu:VENDOR/NAME/jsonschema/X-Y-Z)"
        try:
            validator = _validator(uri)
        except (OSError, ValueError) as exc:  # not shipped (file missing) or not JSON
            return (f"{self._who}: event {eid} has schema {uri}, which is not shipped with aggregator "
                    f"({type(exc).__name__}); only events with a shipped schema can be validated and sent")
        except jsonschema.SchemaError as exc:
            return f"{self._who}: shipped schema {uri} is not valid Draft 4 JSON Schema: {exc.message}"
        data = dict(envelope.data)  # jsonschema's "object" is a dict, not any Mapping
        error = jsonschema.exceptions.best_match(validator.iter_errors(data))
        if error is not None:
            return (f"{self._who}: event {eid} does not match {uri} at {error.json_path}: "
                    f"{error.message[:_SNIPPET_CHARS]}")
        if not math.isfinite(envelope.occurred_at):
            return f"{self._who}: event {eid} has occurred_at={envelope.occurred_at!r}; it must be epoch seconds"
        try:
            wrapper = _dumps({"schema": UNSTRUCT_EVENT, "data": {"schema": uri, "data": data}})
        except (TypeError, ValueError) as exc:
            return f"{self._who}: event {eid} has data that is not JSON: {exc}"
        event = {"e": "ue", "eid": str(eid), "dtm": str(round(envelope.occurred_at * 1000)),
                 "tv": TRACKER_VERSION, "p": "srv", "aid": self.app_id, "tna": self.namespace}
        if self.encode_base64:
            event["ue_px"] = base64.urlsafe_b64encode(wrapper.encode("ascii")).decode("ascii").rstrip("=")
        else:
            event["ue_pr"] = wrapper
        return event

    def _chunks(self, events: list[Event]) -> list[list[Event]]:
        """``events`` in order, cut into POSTs of at most batch_size events and batch_bytes bytes."""
        chunks: list[list[Event]] = []
        current: list[Event] = []
        size = _EMPTY_BODY_BYTES
        for item in events:
            extra = len(_dumps({**item[1], "stm": _STM_STAND_IN})) + (1 if current else 0)  # 1: the comma
            if current and (len(current) >= self.batch_size or size + extra > self.batch_bytes):
                chunks.append(current)
                current, size = [], _EMPTY_BODY_BYTES
                extra -= 1
            current.append(item)
            size += extra
        if current:
            chunks.append(current)
        return chunks

    async def _deliver(self, client: httpx.AsyncClient, chunk: list[Event],
                       outcomes: list[writers.Outcome | None]) -> str | None:
        """POST ``chunk`` and set its outcomes; return the error if it was a retry (the rest should wait)."""
        stm = str(round(time.time() * 1000))
        body = _body([{**event, "stm": stm} for _, event in chunk])
        count = len(chunk)
        started = time.perf_counter()
        status: int | None = None
        try:
            response = await client.post(self.endpoint, content=body, headers={"Content-Type": CONTENT_TYPE})
        except httpx.TimeoutException as exc:
            reason = type(exc).__name__
            outcome = writers.Outcome.retry(
                f"{self._who}: no answer from {self.endpoint} within {self.timeout:g}s ({reason}) "
                f"to a POST of {count} event(s)")
        except httpx.RequestError as exc:  # connection refused or dropped, protocol errors
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            outcome = writers.Outcome.retry(
                f"{self._who}: POST of {count} event(s) to {self.endpoint} failed: {reason}")
        else:
            status = response.status_code
            reason = response.reason_phrase
            if status == 413 and count > 1:
                log.warning("snowplow_post", writer=self.name, events=count, bytes=len(body), status=status,
                            duration_ms=_since(started), outcome="split",
                            hint="the collector refused the body as too large; lower batch_bytes")
                half = count // 2
                stop = await self._deliver(client, chunk[:half], outcomes)
                if stop is not None:
                    for index, _ in chunk[half:]:
                        outcomes[index] = writers.Outcome.retry(f"{stop} (not sent: the other half failed)")
                    return stop
                return await self._deliver(client, chunk[half:], outcomes)
            outcome = self._judge(response, count, len(body))
        fields = {"writer": self.name, "events": count, "bytes": len(body), "status": status,
                  "duration_ms": _since(started)}
        if outcome.status == "delivered":
            log.debug("snowplow_post", **fields)
        else:
            log.warning("snowplow_post", **fields, outcome=outcome.status, reason=reason)
        for index, _ in chunk:
            outcomes[index] = outcome
        return outcome.error if outcome.status == "retry" else None

    def _judge(self, response: httpx.Response, count: int, size: int) -> writers.Outcome:
        status = response.status_code
        if 200 <= status < 300:
            return writers.Outcome.delivered()
        detail = (f"{self._who}: collector answered {status} {response.reason_phrase} "
                  f"to a POST of {count} event(s), {size} bytes")
        body = f"; body: {snippet!r}" if (snippet := _snippet(response.content)) else ""
        if status in (408, 429) or status >= 500:
            wait = response.headers.get("Retry-After", "")[:40]
            after = (f"; retry after {wait}s" if wait.isdigit() else f"; Retry-After: {wait}") if wait else ""
            return writers.Outcome.retry(detail + after + body)
        if status == 413:
            return writers.Outcome.rejected(
                f"{detail}: a single event larger than the collector accepts, so it can never be sent{body}")
        if 400 <= status < 500:
            return writers.Outcome.rejected(detail + body)
        # 1xx/3xx: a redirect is not followed (a POST would become a GET); the URL needs fixing, and until
        # then the events wait in the outbox instead of being dropped.
        return writers.Outcome.retry(f"{detail}; expected 2xx: if it redirects, set writers.{self.name}.collector "
                                     f"to the final URL{body}")


def _since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _collector(value: object, key: str) -> str:
    example = "e.g. 'https://collector.example.com'"
    if value is None:
        raise exceptions.ConfigError(f"{key} is required: the collector's base URL, {example}")
    if not isinstance(value, str):
        raise exceptions.ConfigError(f"{key}={value!r} must be a string: the collector's base URL, {example}")
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - parsing the port raises ValueError if it is not a number in range
    except ValueError as exc:
        raise exceptions.ConfigError(f"{key}={value!r} is not a valid URL ({exc}); use {example}") from exc
    if parts.username is not None or parts.password is not None:
        # The value is not shown: it holds credentials.
        raise exceptions.ConfigError(
            f"{key} must not carry credentials (user:password@); put an Authorization header in "
            f"{key.removesuffix('.collector')}.headers instead")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise exceptions.ConfigError(f"{key}={value!r} is not an http:// or https:// URL; use {example}")
    if parts.query or parts.fragment:
        raise exceptions.ConfigError(f"{key}={value!r} must have no query or fragment; use {example}")
    if parts.path.rstrip("/").endswith(TP2_PATH):
        raise exceptions.ConfigError(
            f"{key}={value!r} should be the collector's base URL; the writer appends {TP2_PATH} itself")
    return value


def _text(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise exceptions.ConfigError(f"{key}={value!r} must be a non-empty string")
    return value


def _flag(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise exceptions.ConfigError(f"{key}={value!r} must be true or false")
    return value


def _integer(value: object, key: str, low: int, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise exceptions.ConfigError(f"{key}={value!r} must be a whole number {span}")
    return value


def _header_table(value: object, key: str) -> dict[str, str]:
    """Extra HTTP headers. Values may be secrets: messages name the header, never its value."""
    if not isinstance(value, Mapping):
        raise exceptions.ConfigError(
            f"{key} must be a table of header names to values, e.g. {{ Authorization = \"Bearer …\" }}; "
            f"got a {type(value).__name__} (value not shown)")
    headers: dict[str, str] = {}
    for name, text in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise exceptions.ConfigError(f"{key}: {name!r} is not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS:
            raise exceptions.ConfigError(f"{key}.{name} is set by the writer itself; remove it")
        if not isinstance(text, str) or not text.isascii() or not text.isprintable():
            raise exceptions.ConfigError(
                f"{key}.{name} must be a string of printable ASCII on one line (value not shown)")
        headers[name] = text
    return headers


__all__ = ["SnowplowWriter"]
