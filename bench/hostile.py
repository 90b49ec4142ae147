"""Issue 12's row: the worst-case request. A body of the maximum size made of the most expensive valid values.

Two bodies, each filled up to ``max_body_bytes``: ``POST /v1/record`` records of a sum meter with 16
dimensions of 256 characters, a 128-character event id, an ISO time and the value "4294.123456789"
(decimal text, converted exactly); and ``POST /v1/checkpoints`` checkpoints each with 4 KiB of ``meta``
(about 700 values). Each is served in-process (the FastAPI app over httpx's ASGI transport, the
Aggregator on SQLite, no flush) and timed against physical references of the same run: ``json.loads``
of the same bytes, and a trivial request of the same size (a body holding one long string, refused
with a 422 after parsing).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx

from aggregator import Aggregator, api, metrics, options
from bench import figures
from bench.figures import Check, Figure, Result
from bench.workload import Env

FULL_BYTES = 4 * 1024 * 1024  # the default max_body_bytes
QUICK_BYTES = 512 * 1024
DIMENSIONS = [f"d{i:02d}" for i in range(16)]  # a meter declares at most 16
METERS = {"worst": {"aggregation": "sum", "unit": "s", "decimals": 9, "dimensions": DIMENSIONS}}
RATIO_TARGET = 25.0  # ours / json.loads of the same bytes


def worst_request(env: Env) -> Result:
    size = QUICK_BYTES if env.quick else FULL_BYTES
    result = Result("worst_request", f"worst-case request: {size // 1024:,} KiB bodies of the costliest valid values")
    bodies = {"/v1/record": _records(size), "/v1/checkpoints": _checkpoints(size)}
    timings = asyncio.run(_measure(env.sqlite.fresh(), env.sizes.reps, bodies, size))
    (record_s, record_loads, trivial), (checkpoint_s, checkpoint_loads, _) = timings.values()
    worst = max(statistics.median(record_s), statistics.median(checkpoint_s))
    result.ours = Figure([max(a, b) for a, b in zip(record_s, checkpoint_s, strict=True)], "s/request")
    ratio_records = statistics.median(record_s) / statistics.median(record_loads)
    ratio_checkpoints = statistics.median(checkpoint_s) / statistics.median(checkpoint_loads)
    result.checks = [
        Check(peer="POST /v1/record, 202", figure=Figure(record_s, "s"), ratio_label="ours/json.loads",
              ratio=ratio_records, target=f"<= {RATIO_TARGET:g}x",
              passed=figures.at_most(ratio_records, RATIO_TARGET, not env.quick)),
        Check(peer="json.loads of the same record body", figure=Figure(record_loads, "s")),
        Check(peer="POST /v1/checkpoints, 202", figure=Figure(checkpoint_s, "s"), ratio_label="ours/json.loads",
              ratio=ratio_checkpoints, target=f"<= {RATIO_TARGET:g}x",
              passed=figures.at_most(ratio_checkpoints, RATIO_TARGET, not env.quick)),
        Check(peer="json.loads of the same checkpoint body", figure=Figure(checkpoint_loads, "s")),
        Check(peer="trivial request of the same size (one string, 422)", figure=Figure(trivial, "s"),
              ratio_label="worst/trivial", ratio=worst / statistics.median(trivial)),
    ]
    records = len(json.loads(bodies["/v1/record"])["records"])
    checkpoints = len(json.loads(bodies["/v1/checkpoints"])["checkpoints"])
    result.notes = [
        f"/v1/record: {records:,} records in {len(bodies['/v1/record']):,} bytes, each of a sum meter (9 decimals) "
        "with 16 dimensions of 256 characters, a 128-character event_id, an ISO time and value '4294.123456789'",
        f"/v1/checkpoints: {checkpoints:,} checkpoints in {len(bodies['/v1/checkpoints']):,} bytes, each with a "
        "meta of 4 KiB (about 700 short values, 4 levels deep)",
        "in-process: the app over httpx's ASGI transport, the Aggregator on SQLite, records kept in memory (no "
        "flush); time from sending the request to its 202; repetitions interleaved with the references",
        "the bound is linear: strict parsing (duplicate keys, depth, NaN) and every value's check cost a "
        "fixed amount per byte; this row states it as a ratio to parsing the same bytes",
    ]
    result.params = {"body_bytes": size, "records": records, "checkpoints": checkpoints, "repetitions": env.sizes.reps}
    return result


async def _measure(url: str, reps: int, bodies: dict[str, bytes], size: int) -> dict[str, tuple[list[float], ...]]:
    settings = options.load_daemon_settings({"database_url": url, "max_body_bytes": str(size), "window": "1h"},
                                           environ={})
    trivial = json.dumps({"records": "x" * (size - 20)}).encode()
    out: dict[str, tuple[list[float], ...]] = {path: ([], [], []) for path in bodies}
    async with Aggregator(database_url=settings.aggregator.database_url, window="1h", flush_interval="1h",
                          collect=False, handle_sigterm=False, meters=METERS) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            for _ in range(reps):
                for path, body in bodies.items():
                    served, loads, plain = out[path]
                    served.append(await _timed(http, path, body, 202))
                    began = time.perf_counter()
                    json.loads(body)
                    loads.append(time.perf_counter() - began)
                    plain.append(await _timed(http, path, trivial, 422))
    return out


async def _timed(http: httpx.AsyncClient, path: str, body: bytes, status: int) -> float:
    """Seconds from sending ``body`` to ``path`` to its response, which must have ``status``."""
    began = time.perf_counter()
    response = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    elapsed = time.perf_counter() - began
    if response.status_code != status:
        raise RuntimeError(f"expected {status}, got {response.status_code}: {response.text[:300]}")
    return elapsed


def _fill(size: int, item: Callable[[int], dict[str, Any]], name: str) -> bytes:
    """``{name: [item(0), item(1), ...]}`` with as many items as fit in ``size`` bytes."""
    one = len(json.dumps(item(0)).encode()) + 2
    count = max(1, (size - 64) // one)
    body = json.dumps({name: [item(i) for i in range(count)]}).encode()
    while len(body) > size:
        count -= 1
        body = json.dumps({name: [item(i) for i in range(count)]}).encode()
    return body


def _records(size: int) -> bytes:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return _fill(size, lambda i: {
        "meter": "worst", "value": "4294.123456789", "event_id": f"{i:08d}" + "e" * 120, "time": now,
        "dimensions": {d: f"{i:08d}{d}" + "v" * 245 for d in DIMENSIONS}}, "records")


def _checkpoints(size: int) -> bytes:
    stamp = dt.datetime.now(dt.timezone.utc).isoformat()
    meta = {f"k{j}": {"a": [j, f"v{j}", {"b": j * 0.5}]} for j in range(200)}
    while len(json.dumps(meta, separators=(",", ":"))) > 4096:
        meta.popitem()
    return _fill(size, lambda i: {
        "correlation_id": f"01J{i:023d}", "experience_id": "http_request", "checkpoint": "start", "type": "web",
        "feature_category": "ci", "urgency": "sync_fast", "client_timestamp": stamp, "meta": meta}, "checkpoints")
