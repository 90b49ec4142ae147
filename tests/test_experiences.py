"""Experiences: journeys from checkpoints across services, timeouts exactly once, SLIs per window."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from aggregator import Aggregator, InvalidInput, api, metrics, options, schema, store
from aggregator.client import new_correlation_id
from tests.helpers import T0, WINDOW, FakeClock, manual
from tests.test_outbox import KEY, Scripted, wait_for

URGENCIES = {"sync_fast": "10s", "async_low": "50s"}


def at(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).isoformat().replace("+00:00", "Z")


def journey(correlation_id: str, checkpoint: str, ts: float, *, type: str = "web", urgency: str = "sync_fast",
            **extra: Any) -> dict[str, Any]:
    return {"correlation_id": correlation_id, "experience_id": "http_request", "checkpoint": checkpoint,
            "type": type, "feature_category": "source_code", "urgency": urgency, "client_timestamp": at(ts), **extra}


def service(url: str, clock: FakeClock, **kwargs: Any) -> Aggregator:
    return manual(url, clock, urgencies=URGENCIES, **kwargs)


def slis(agg: Aggregator) -> dict[tuple[int, str], dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        return await agg._store.experience_slis()  # type: ignore[union-attr]

    return {(row["window_start"], row["urgency"]): row for row in agg._call(read)}


def test_sync_and_async_journeys_across_two_services(database_url: str) -> None:
    """A sync journey (start and end by one service) and an async one (start by the web service, end by the
    worker, through two replicas) each count once, with their durations in the window's SLIs."""
    clock = FakeClock()
    web, worker = service(database_url, clock).start(), service(database_url, clock).start()
    sync, background = new_correlation_id(), new_correlation_id()
    try:
        web.checkpoint_many([journey(sync, "start", T0 + 1.0), journey(sync, "end", T0 + 1.25)])
        web.checkpoint_many([journey(background, "start", T0 + 2.0, urgency="async_low")])
        web.flush()
        worker.checkpoint_many([journey(background, "intermediate", T0 + 3.0, urgency="async_low", type="worker"),
                                journey(background, "end", T0 + 6.0, urgency="async_low", type="worker",
                                        outcome="failure")])
        worker.flush()
        clock.past_window(T0)
        worker.flush()  # its scheduled flush: the worker's watermark passes the window's end
        web.collect()
        got = slis(web)
        assert {k: (r["started"], r["succeeded"], r["failed"], r["timed_out"], r["duration_p50_s"])
                for k, r in got.items()} == {(T0, "sync_fast"): (1, 1, 0, 0, 0.25),
                                             (T0, "async_low"): (1, 0, 1, 0, 4.0)}
    finally:
        web.stop()
        worker.stop()


def test_a_missing_end_times_out_once_with_several_sweepers_and_a_late_end_does_not_flip_it(
        database_url: str) -> None:
    """Three replicas sweep at once: the stale journey times out exactly once (one failure event per writer);
    its end arriving afterwards is recorded as late and the outcome stays a timeout."""
    clock = FakeClock()
    sinks = [Scripted("events") for _ in range(3)]
    replicas = [service(database_url, clock, writers=[sink], pseudonym_key=KEY).start() for sink in sinks]
    stale = new_correlation_id()
    try:
        replicas[0].checkpoint_many([journey(stale, "start", T0 + 1)])
        replicas[0].flush()
        clock.t = T0 + 1 + 11  # past sync_fast's 10 s lifetime, still inside the window
        barrier = threading.Barrier(3)

        def sweep(agg: Aggregator) -> None:
            barrier.wait()
            agg.collect()

        threads = [threading.Thread(target=sweep, args=(agg,)) for agg in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sum(agg.status()["collector"].timed_out for agg in replicas) == 1
        wait_for(lambda: sum(len([e for e in s.delivered if e.kind == "experience_failure"]) for s in sinks) == 1)
        (event,) = [e for s in sinks for e in s.delivered if e.kind == "experience_failure"]
        assert (event.data["reason"], event.data["outcome"], len(event.data["correlation_id"])) == (
            "timed_out", "failure", 64)  # the correlation id leaves pseudonymized
        replicas[1].checkpoint_many([journey(stale, "end", T0 + 30)])
        replicas[1].flush()
        row = replicas[1].experience(stale)
        assert row is not None and (row["status"], row["late_end"]) == ("timed_out", True)
        clock.past_window(T0)
        for agg in replicas[:2]:  # their scheduled flushes: the watermarks pass the window's end
            agg.flush()
        replicas[2].collect()
        (sli,) = slis(replicas[2]).values()
        assert (sli["started"], sli["succeeded"], sli["failed"], sli["timed_out"], sli["completed"]) == (1, 0, 0, 1, 0)
    finally:
        for agg in replicas:
            agg.stop()


def test_duplicates_out_of_order_and_unknown_ids(database_url: str) -> None:
    """A checkpoint sent twice (to two replicas) counts once; an end before its start is a success whose start
    counts when it arrives; an end for an id never started is accepted and flagged."""
    clock = FakeClock()
    a, b = service(database_url, clock).start(), service(database_url, clock).start()
    dup, reordered, orphan = new_correlation_id(), new_correlation_id(), new_correlation_id()
    try:
        for agg in (a, b):
            agg.checkpoint_many([journey(dup, "start", T0 + 1), journey(dup, "end", T0 + 2)])
            agg.flush()
        a.checkpoint_many([journey(reordered, "end", T0 + 5)])
        a.flush()
        b.checkpoint_many([journey(reordered, "start", T0 + 4), journey(orphan, "end", T0 + 7)])
        b.flush()
        assert (a.experience(orphan) or {}).get("unknown_start") is True
        assert (a.experience(reordered) or {})["status"] == "succeeded"
        clock.past_window(T0)
        b.flush()
        a.collect()
        (sli,) = slis(a).values()
        assert (sli["started"], sli["succeeded"], sli["completed"], sli["duration_p50_s"]) == (2, 3, 2, 1.0)
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize(("fields", "message"), [
    ({"correlation_id": "not-a-ulid"}, "correlation_id='not-a-ulid' must be a ULID"),
    ({"checkpoint": "middle"}, "checkpoint='middle' must be one of"),
    ({"urgency": "whenever"}, "urgency='whenever' must be one of: async_low, sync_fast"),
    ({"outcome": "failure"}, "only an end has an outcome"),
    ({"client_timestamp": "2026-01-01T00:00:00"}, "needs a UTC offset"),
    ({"meta": {"x": "y" * 5000}}, "at most 4096"),
])
def test_bad_checkpoints_raise_naming_the_field_and_keep_nothing(sqlite_url: str, fields: dict[str, Any],
                                                                 message: str) -> None:
    """Each bad field is named; the batch keeps nothing, not even its valid checkpoints."""
    agg = service(sqlite_url, FakeClock())
    good = journey(new_correlation_id(), "start", T0)
    with pytest.raises(InvalidInput, match=message):
        agg.checkpoint_many([good, {**journey(new_correlation_id(), "start", T0), **fields}])
    assert agg._checkpoints.pending() == 0


@pytest.fixture
async def http(database_url: str) -> Any:
    settings = options.load_daemon_settings(
        {"database_url": database_url, "api_tokens": "service-token-0123456789,web-only-token-0123456:web",
         "window": f"{WINDOW}s", "experience_urgencies": URGENCIES}, environ={})
    async with service(database_url, FakeClock()) as agg:
        app = api.build_app(agg, settings, metrics.Counters())
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client, agg


async def test_checkpoints_over_http_with_tokens_limited_to_types(http: Any) -> None:
    """POST /v1/checkpoints: 202 with the server time; a wrong token is 401 and a token limited to `web`
    sending a `worker` checkpoint is 403, with nothing stored; an invalid field is 422 naming it."""
    client, agg = http
    web_only = {"Authorization": "Bearer web-only-token-0123456"}
    ok = await client.post("/v1/checkpoints", headers=web_only,
                           json={"checkpoints": [journey(new_correlation_id(), "start", T0)]})
    assert ok.status_code == 202 and ok.json()["accepted"] == 1 and ok.json()["server_timestamp"].endswith("Z")
    wrong = await client.post("/v1/checkpoints", headers={"Authorization": "Bearer nope-nope-nope-nope"},
                              json={"checkpoints": [journey(new_correlation_id(), "start", T0)]})
    forbidden = await client.post("/v1/checkpoints", headers=web_only, json={"checkpoints": [
        journey(new_correlation_id(), "start", T0), journey(new_correlation_id(), "end", T0, type="worker")]})
    invalid = await client.post("/v1/checkpoints", headers={"Authorization": "Bearer service-token-0123456789"},
                                json={"checkpoints": [journey(new_correlation_id(), "start", T0, urgency="soon")]})
    assert (wrong.status_code, forbidden.status_code, invalid.status_code) == (401, 403, 422)
    assert "worker" in forbidden.json()["detail"] and "urgency='soon'" in invalid.json()["detail"]
    assert agg._checkpoints.pending() == 1
    track = await client.post("/v1/track", headers=web_only, json={"events": [
        {"workspace_id": "00000000-0000-0000-0000-000000000001", "user_id": "00000000-0000-0000-0000-000000000002"}]})
    assert track.status_code == 403  # a token limited to checkpoint types is for checkpoints only


def test_store_of_an_unknown_experience_is_none(sqlite_url: str) -> None:
    """experience() of an id never seen is None."""
    with service(sqlite_url, FakeClock()) as agg:
        assert agg.experience(new_correlation_id()) is None


def test_urgency_lifetimes_are_validated() -> None:
    """A bad urgency table fails at construction, naming the key."""
    from aggregator import ConfigError

    with pytest.raises(ConfigError, match="experience_urgencies.fast"):
        Aggregator(database_url="sqlite:///x.db", urgencies={"fast": "soon"})
    assert asyncio is not None and store is not None


def test_failure_and_sli_events_reach_a_validating_snowplow_collector(database_url: str) -> None:
    """The failure event of a timeout and the window's SLIs go out as self-describing events that validate
    against the shipped schemas (and Snowplow's own)."""
    from tests.fakes.snowplow import FakeCollector

    clock = FakeClock()
    with FakeCollector() as collector:
        agg = service(database_url, clock, pseudonym_key=KEY,
                      writers={"snowplow": {"collector": collector.url, "timeout": "2s"}}).start()
        try:
            done, stale = new_correlation_id(), new_correlation_id()
            agg.checkpoint_many([journey(done, "start", T0 + 1), journey(done, "end", T0 + 1.5),
                                 journey(stale, "start", T0 + 2)])
            agg.flush()
            clock.t = T0 + 20
            agg.collect()  # times out `stale`
            clock.past_window(T0)
            agg.collect()
            wait_for(lambda: {e["schema"] for e in collector.good} >= {
                "iglu:dev.aggregator/experience_failure/jsonschema/1-0-0",
                "iglu:dev.aggregator/experience_sli/jsonschema/1-0-0"})
        finally:
            agg.stop()
        assert collector.invalid == []
        (sli,) = [e["data"] for e in collector.good if e["schema"].endswith("experience_sli/jsonschema/1-0-0")]
        assert (sli["started"], sli["succeeded"], sli["timed_out"], sli["duration_p99_s"]) == (2, 1, 1, 0.5)


def test_checkpoint_categories_are_bounded_per_experience(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_CATEGORIES distinct categories of one experience_id, checkpoints are kept under __other__
    (still deduplicated, never refused)."""
    from aggregator import experiences

    monkeypatch.setattr(experiences, "MAX_CATEGORIES", 2)
    clock = FakeClock()
    journey_id = new_correlation_id()
    with service(sqlite_url, clock) as agg:
        agg.checkpoint_many([journey(journey_id, "intermediate", T0 + n, checkpoint_category=f"step{n}")
                             for n in range(4)])
        agg.flush()

        async def categories() -> list[str]:
            async with agg._store.read() as conn:  # type: ignore[union-attr]
                rows = await conn.execute(sa.select(schema.experience_checkpoints.c.checkpoint_category)
                                          .order_by(schema.experience_checkpoints.c.client_timestamp))
                return [c for (c,) in rows]

        assert agg._call(categories) == ["step0", "step1", "__other__", "__other__"]


def test_checkpoints_retried_after_a_database_error_apply_once(database_url: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that fails after applying its checkpoints is rolled back and retried with the same batch: the
    journey starts and ends once."""
    from aggregator import StoreUnavailable
    from aggregator.store.experiences import ExperienceQueries

    original = ExperienceQueries._apply_checkpoints
    failures = iter([True])

    async def failing(self: Any, *args: Any, **kwargs: Any) -> int:
        applied = await original(self, *args, **kwargs)
        if next(failures, False):
            raise sa.exc.OperationalError("UPDATE ...", {}, ConnectionResetError("connection reset by peer"))
        return applied

    monkeypatch.setattr(ExperienceQueries, "_apply_checkpoints", failing)
    clock = FakeClock()
    journey_id = new_correlation_id()
    with service(database_url, clock) as agg:
        agg.checkpoint_many([journey(journey_id, "start", T0 + 1), journey(journey_id, "end", T0 + 2)])
        with pytest.raises(StoreUnavailable, match="connection reset"):
            agg.flush()
        agg.flush()
        clock.past_window(T0)
        agg.collect()
        (sli,) = slis(agg).values()
        assert (sli["started"], sli["succeeded"], sli["completed"]) == (1, 1, 1)
