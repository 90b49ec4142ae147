"""A client for services that do not embed aggregator: experience checkpoints and meter records over HTTP.

Calls validate and enqueue, never touching the network; one daemon thread sends batches to the daemon's
``/v1/checkpoints`` and ``/v1/record``, retrying transient failures with jittered exponential backoff.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import datetime as dt
import json
import math
import os
import random
import re
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import httpx

from aggregator import exceptions, experiences, logs, values

__all__ = ["Client", "ClientStats", "new_correlation_id"]

log = logs.get_logger("aggregator.client")

CHECKPOINTS = "/v1/checkpoints"
RECORDS = "/v1/record"
_BODY_KEYS = {CHECKPOINTS: "checkpoints", RECORDS: "records"}
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RETRIED = frozenset({408, 429})
_DROP_WARNING_EVERY = 10.0
_DETAIL_CHARS = 500


def new_correlation_id() -> str:
    """A new ULID: 48 bits of Unix milliseconds then 80 random bits, as 26 Crockford base32 characters."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    return "".join(CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclasses.dataclass(frozen=True)
class ClientStats:
    """Item counts (``retries`` counts requests): sent, refused by the server, dropped on a full queue,
    abandoned at close, and queued now (including a batch being retried)."""

    sent: int = 0
    retries: int = 0
    rejected: int = 0
    dropped: int = 0
    lost: int = 0
    queued: int = 0


class _Lane:
    """One endpoint's items: ``queue`` waits for a batch; ``batches`` are taken, sent head first."""

    def __init__(self) -> None:
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.batches: collections.deque[list[dict[str, Any]]] = collections.deque()
        self.since = 0.0  # when the queue last became non-empty: its oldest item's age bounds the wait
        self.retry_at = 0.0
        self.failures = 0
        self.enqueued = 0  # totals, in order: flush() waits for `finished` to pass a snapshot of `enqueued`
        self.finished = 0


_clients: weakref.WeakSet[Client] = weakref.WeakSet()


class Client:
    """Sends checkpoints and meter records to an aggregator daemon from a background thread.

    Use as a context manager or call close(); a client still open at interpreter exit is drained then.
    """

    def __init__(self, url: str, token: str | None = None, *, batch_size: int = 200, flush_interval: float = 1.0,
                 max_queue: int = 100_000, timeout: float = 10.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, drain_timeout: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not isinstance(url, str) or not re.match(r"https?://[^/]", url):
            raise exceptions.ConfigError(f"url={url!r} is not an HTTP URL; pass e.g. 'http://127.0.0.1:8000'")
        if token is not None and (not isinstance(token, str) or not token or not token.isprintable()):
            # The value is a secret: name the problem, never echo it.
            raise exceptions.ConfigError("token must be a non-empty printable string, or None for no auth")
        for name, value in (("batch_size", batch_size), ("max_queue", max_queue)):
            if type(value) is not int or value < 1:
                raise exceptions.ConfigError(f"{name}={value!r} must be an int >= 1")
        for name, number in (("flush_interval", flush_interval), ("timeout", timeout),
                             ("backoff_initial", backoff_initial), ("backoff_max", backoff_max),
                             ("drain_timeout", drain_timeout)):
            if not isinstance(number, int | float) or isinstance(number, bool) or not 0 < number < math.inf:
                raise exceptions.ConfigError(f"{name}={number!r} must be a positive number of seconds")
        self.url = url.rstrip("/")
        self._where = str(httpx.URL(self.url).copy_with(userinfo=b""))  # for logs: no credentials in them
        self._headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
        self._batch_size, self._max_queue, self._timeout = batch_size, max_queue, float(timeout)
        self._flush_interval, self._drain_timeout = float(flush_interval), float(drain_timeout)
        self._backoff_initial, self._backoff_max = float(backoff_initial), float(backoff_max)
        self._transport = transport
        self._closed = False
        self._atexit_registered = False
        self._reset()
        _clients.add(self)

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child, where the parent's lock may be held forever."""
        self._cond = threading.Condition(threading.Lock())
        self._lanes = {CHECKPOINTS: _Lane(), RECORDS: _Lane()}
        self._total = 0  # items in all lanes, queued or taken: what max_queue bounds
        self._counts: collections.Counter[str] = collections.Counter()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._urgent = 0  # flush() or close() callers waiting: send without waiting for flush_interval
        self._deadline = math.inf  # close()'s: requests must not outlive it
        self._last_drop_warning = -math.inf

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def stats(self) -> ClientStats:
        with self._cond:
            return ClientStats(**self._counts, queued=self._total)

    def checkpoint(self, correlation_id: str, experience_id: str, checkpoint: str, *, type: str,
                   feature_category: str, urgency: str, client_timestamp: dt.datetime | str | None = None,
                   checkpoint_category: str | None = None, outcome: str | None = None,
                   meta: Mapping[str, Any] | None = None) -> None:
        """Queue one checkpoint of an experience and return at once; raises InvalidInput for a bad argument."""
        item: dict[str, Any] = {
            "correlation_id": _ulid(correlation_id),
            "experience_id": _name("experience_id", experience_id),
            "checkpoint": _choice("checkpoint", checkpoint, experiences.CHECKPOINTS),
            "type": _name("type", type),
            "feature_category": _text("feature_category", feature_category, 64),
            "urgency": _text("urgency", urgency, 32),
            "client_timestamp": _timestamp(client_timestamp),
        }
        if checkpoint_category is not None:
            item["checkpoint_category"] = _text("checkpoint_category", checkpoint_category, 64, minimum=0)
        if outcome is not None:
            if checkpoint != "end":
                raise exceptions.InvalidInput(f"outcome={outcome!r} given on a {checkpoint!r} checkpoint; "
                                              "only an 'end' checkpoint has an outcome")
            item["outcome"] = _choice("outcome", outcome, experiences.OUTCOMES)
        if meta is not None:
            item["meta"] = _meta(meta)
        self._put(CHECKPOINTS, item)

    def record(self, meter: str, value: int | float | str | None = None,
               dimensions: Mapping[str, str | int] | None = None, *, event_id: str | None = None,
               time: dt.datetime | float | None = None) -> None:
        """Queue one meter record and return at once; without ``event_id`` a UUID4 makes retries count once."""
        item: dict[str, Any] = {"meter": _text("meter", meter, 64),
                                "event_id": str(uuid.uuid4()) if event_id is None else _text("event_id", event_id, 128)}
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                raise exceptions.InvalidType(f"value={values.shown(value)} is a {_kind(value)}; pass an int, float, "
                                             "decimal string or None")
            # A sum's amount or a distinct meter's item: only the server knows the meter; bound it here.
            if isinstance(value, float):
                if not math.isfinite(value):
                    raise exceptions.InvalidInput(f"value={value!r} is not finite; pass a finite number")
            else:
                values.text(value, "value")
            item["value"] = value
        if dimensions is not None:
            if not isinstance(dimensions, Mapping):
                raise exceptions.InvalidType(f"dimensions={dimensions!r} is a {_kind(dimensions)}; pass a dict")
            for key, dimension in dimensions.items():
                if not isinstance(key, str) or isinstance(dimension, bool) or not isinstance(dimension, str | int):
                    raise exceptions.InvalidType(f"dimensions[{values.shown(key)}]={values.shown(dimension)}: keys "
                                                 "are strings, values strings or ints")
                values.text(dimension, f"dimensions[{key!r}]")
            item["dimensions"] = dict(dimensions)
        if time is not None:
            if not isinstance(time, dt.datetime | int | float) or isinstance(time, bool):
                raise exceptions.InvalidType(f"time={values.shown(time)} is a {_kind(time)}; pass an aware datetime "
                                             "or epoch seconds")
            values.moment(time, "time")  # 1970-2100; the server checks its own range around now
            item["time"] = _timestamp(time, "time") if isinstance(time, dt.datetime) else float(time)
        self._put(RECORDS, item)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call is sent, rejected or lost; False on timeout."""
        with self._cond:
            targets = [(lane, lane.enqueued) for lane in self._lanes.values()]
            self._urgent += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: all(lane.finished >= n for lane, n in targets), timeout)
            finally:
                self._urgent -= 1

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, send what is queued within ``timeout`` (default drain_timeout), count the rest lost."""
        limit = self._drain_timeout if timeout is None else timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._deadline = time.monotonic() + limit
            thread = self._thread
        if self._atexit_registered:
            atexit.unregister(self.close)
            self._atexit_registered = False
        if thread is None:
            return
        self.flush(max(0.0, self._deadline - time.monotonic()))
        with self._cond:
            lost = self._total
            for lane in self._lanes.values():
                lane.finished += len(lane.queue) + sum(map(len, lane.batches))
                lane.queue.clear()
                lane.batches.clear()
            self._total = 0
            self._counts["lost"] += lost
            self._stopping = True
            self._cond.notify_all()
        if lost:
            log.error("client closed with items unsent", lost=lost, timeout=limit, url=self._where)
        thread.join(max(0.0, self._deadline - time.monotonic()))

    def _put(self, path: str, item: dict[str, Any]) -> None:
        warn = False
        with self._cond:
            if self._closed:
                raise exceptions.NotRunning(f"this client of {self._where} is closed; create a new Client")
            if self._total >= self._max_queue:
                self._counts["dropped"] += 1
                now = time.monotonic()
                if now - self._last_drop_warning >= _DROP_WARNING_EVERY:
                    self._last_drop_warning, warn, dropped = now, True, self._counts["dropped"]
            else:
                if self._thread is None:
                    self._start()
                lane = self._lanes[path]
                lane.queue.append(item)
                lane.enqueued += 1
                self._total += 1
                # Wake the sender only when its plan changes: a deadline to set, or a full batch.
                if len(lane.queue) == 1:
                    lane.since = time.monotonic()
                    self._cond.notify()
                elif len(lane.queue) == self._batch_size:
                    self._cond.notify()
        if warn:
            log.warning("client queue full, dropping new items", max_queue=self._max_queue, dropped=dropped,
                        url=self._where)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="aggregator-client", daemon=True)
        self._thread.start()
        if not self._atexit_registered:
            atexit.register(self.close)
            self._atexit_registered = True

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self._headers, transport=self._transport) as http:
            while (job := self._next_batch()) is not None:
                self._send(http, *job)

    def _next_batch(self) -> tuple[str, list[dict[str, Any]]] | None:
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                wake = math.inf
                for path, lane in self._lanes.items():
                    if lane.batches or not lane.queue:
                        due = lane.retry_at if lane.batches else math.inf
                    elif self._urgent or len(lane.queue) >= self._batch_size:
                        due = now
                    else:
                        due = lane.since + self._flush_interval
                    if due <= now:
                        if not lane.batches:
                            count = min(self._batch_size, len(lane.queue))
                            lane.batches.append([lane.queue.popleft() for _ in range(count)])
                        # Served lanes go last, so a busy endpoint cannot starve the other one.
                        self._lanes[path] = self._lanes.pop(path)
                        return path, lane.batches[0]
                    wake = min(wake, due)
                self._cond.wait(None if wake == math.inf else wake - now)
        return None

    def _send(self, http: httpx.Client, path: str, batch: list[dict[str, Any]]) -> None:
        body = json.dumps({_BODY_KEYS[path]: batch}, separators=(",", ":"), ensure_ascii=False)
        # Bounded by close()'s deadline so a stalled server cannot hold the drain past it.
        timeout = max(0.001, min(self._timeout, self._deadline - time.monotonic()))
        try:
            response = http.post(path, content=body.encode(), timeout=timeout)
        except httpx.TransportError as exc:  # timeouts included: the server may have the batch, so resend it
            self._retry(path, batch, f"{type(exc).__name__}: {exc}", None)
            return
        except Exception:  # the thread must survive; retrying a call that fails like this would only loop
            log.exception("client request failed unexpectedly, batch dropped", endpoint=path, items=len(batch))
            self._finish(path, batch, "rejected")
            return
        status = response.status_code
        if 200 <= status < 300:
            self._finish(path, batch, "sent")
        elif status >= 500 or status in _RETRIED:
            pause = _retry_after(response) if status in (429, 503) else None
            self._retry(path, batch, f"HTTP {status}", pause)
        elif status == 413 and len(batch) > 1:
            half = len(batch) // 2
            log.warning("client batch too large, splitting", endpoint=path, items=len(batch))
            with self._cond:
                lane = self._lanes[path]
                if lane.batches and lane.batches[0] is batch:
                    lane.batches.popleft()
                    lane.batches.extendleft([batch[half:], batch[:half]])
        else:
            log.error("server refused batch, dropped", endpoint=path, status=status, items=len(batch),
                      detail=_detail(response))
            self._finish(path, batch, "rejected")

    def _retry(self, path: str, batch: list[dict[str, Any]], reason: str, pause: float | None) -> None:
        with self._cond:
            lane = self._lanes[path]
            if not lane.batches or lane.batches[0] is not batch:
                return  # close() gave it up meanwhile
            delay = min(self._backoff_max, self._backoff_initial * 2 ** min(lane.failures, 64))
            delay *= random.uniform(0.5, 1.0)  # jitter: clients failing together must not retry together
            delay = max(delay, pause or 0.0)
            lane.failures += 1
            lane.retry_at = time.monotonic() + delay
            self._counts["retries"] += 1
            failures = lane.failures
        log.warning("client batch failed, will retry", endpoint=path, reason=reason, items=len(batch),
                    attempt=failures, delay=round(delay, 3))

    def _finish(self, path: str, batch: list[dict[str, Any]], outcome: str) -> None:
        with self._cond:
            lane = self._lanes[path]
            if not lane.batches or lane.batches[0] is not batch:
                return
            lane.batches.popleft()
            lane.finished += len(batch)
            lane.failures = 0
            lane.retry_at = 0.0
            self._total -= len(batch)
            self._counts[outcome] += len(batch)
            self._cond.notify_all()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        # The parent's thread and HTTP connections do not exist here; its queue is the parent's to send.
        client._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _kind(value: object) -> str:
    return type(value).__name__


def _text(field: str, value: object, maximum: int, *, minimum: int = 1) -> str:
    if not isinstance(value, str):
        raise exceptions.InvalidType(f"{field}={value!r} is a {_kind(value)}; pass a string")
    if not minimum <= len(value) <= maximum:
        raise exceptions.InvalidInput(f"{field}={value!r} has {len(value)} characters; pass {minimum} to {maximum}")
    return value


def _ulid(value: object) -> str:
    if not isinstance(value, str):
        raise exceptions.InvalidType(f"correlation_id={value!r} is a {_kind(value)}; pass a ULID string")
    if not experiences.ULID.fullmatch(value.upper()):
        raise exceptions.InvalidInput(f"correlation_id={value!r} is not a ULID (26 Crockford base32 characters, "
                                      "the first 0-7); make one with new_correlation_id()")
    return value.upper()  # ULIDs are case-insensitive; one spelling keeps the server's dedup key stable


def _name(field: str, value: object) -> str:
    if not experiences.NAME.fullmatch(_text(field, value, 64)):
        raise exceptions.InvalidInput(f"{field}={value!r} must be 1-64 characters of a-z, 0-9, '_', '.', '-', "
                                      "starting with a letter or digit")
    return str(value)


def _choice(field: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise exceptions.InvalidInput(f"{field}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def _timestamp(value: object, field: str = "client_timestamp") -> str:
    if value is None:
        return dt.datetime.now(dt.UTC).isoformat()
    if not isinstance(value, str | dt.datetime):
        raise exceptions.InvalidType(f"{field}={values.shown(value)} is a {_kind(value)}; pass an aware datetime")
    values.moment(value, field)  # ISO 8601 with an offset, 1970-2100; the server checks its range around now
    return (dt.datetime.fromisoformat(value) if isinstance(value, str) else value).isoformat()


def _meta(value: object) -> dict[str, Any]:
    values.json_object(value, "meta")  # bounded depth and size: dumps cannot recurse or run long
    try:
        # json's defaults (ASCII escapes, spaced separators) give the longest usual serialization: if that
        # fits, the server's measure fits too, and one item over its cap cannot get a whole batch refused.
        text = json.dumps(value, allow_nan=False)
    except TypeError as exc:
        raise exceptions.InvalidType(f"meta is not JSON-serializable: {exc}; pass plain dicts, lists, strings, "
                                     "numbers, booleans and None") from None
    except ValueError as exc:  # a container holding itself
        raise exceptions.InvalidInput(f"meta cannot be sent as JSON: {exc}; pass finite numbers, no cycles") from None
    if len(text) > experiences.MAX_META_BYTES:
        raise exceptions.InvalidInput(f"meta is {len(text)} bytes as JSON; at most {experiences.MAX_META_BYTES}, "
                                      "trim it")
    result: dict[str, Any] = json.loads(text)  # a copy: later changes by the caller must not reach the wire
    return result


def _retry_after(response: httpx.Response) -> float | None:
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None  # an HTTP date, or nothing: our own backoff applies
    return seconds if 0 <= seconds < math.inf else None


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return response.text[:_DETAIL_CHARS]
    if isinstance(detail, dict):  # FastAPI nests our {"detail", "errors"} problem under its own "detail"
        detail = detail.get("detail", detail)
    return str(detail)[:_DETAIL_CHARS]
