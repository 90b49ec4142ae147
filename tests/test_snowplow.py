"""The Snowplow writer against a fake collector over real HTTP: delivery, batching, failures, config."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jsonschema
import pytest
import structlog
from structlog.testing import capture_logs

from aggregator import exceptions, iglu, reports, writers
from aggregator.writers import snowplow
from aggregator.writers.snowplow import SnowplowWriter
from tests.fakes.snowplow import FakeCollector

UTC = dt.timezone.utc
GENERATED_AT = dt.datetime(2027, 1, 15, 12, 1, 5, tzinfo=UTC)
SECRET = "Bearer s3cret-token-value"


def report_data(number: int = 1, **changes: Any) -> dict[str, Any]:
    """A real report as the outbox hands it over: generated_by already a pseudonym."""
    start = dt.datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
    report = reports.Report(
        id=number, window_start=start, window_end=start + dt.timedelta(minutes=1), unique_workspaces=3,
        unique_users=7, allowed_requests=100 + number, denied_requests=2, replicas=2, replicas_missing=0,
        late_allowed_requests=0, late_denied_requests=0, late_unique_workspaces=0, late_unique_users=0,
        generated_at=GENERATED_AT, generated_by="ab" * 32)
    return {**report.to_dict(), **changes}


def envelope(number: int = 1, *, schema: str = iglu.USAGE_REPORT, **changes: Any) -> writers.Envelope:
    return writers.Envelope(event_id=uuid.uuid4(), kind="usage_report", schema=schema,
                            occurred_at=GENERATED_AT.timestamp(), data=report_data(number, **changes))


USAGE_REPORT_1_0_0 = "iglu:dev.aggregator/usage_report/jsonschema/1-0-0"


def old_report_data(number: int = 1) -> dict[str, Any]:
    """A report as queued before replicas_missing existed (schema 1-0-0)."""
    data = report_data(number)
    del data["replicas_missing"]
    return data


def envelopes(n: int) -> list[writers.Envelope]:
    return [envelope(i + 1) for i in range(n)]


def statuses(outcomes: list[writers.Outcome]) -> list[str]:
    return [outcome.status for outcome in outcomes]


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


@pytest.fixture
def default_logging() -> Iterator[None]:
    """structlog's defaults (every level) for the test, whatever another test configured; restored after."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


@asynccontextmanager
async def opened(collector: FakeCollector, **options: Any) -> AsyncIterator[SnowplowWriter]:
    writer = SnowplowWriter.from_config("sp", {"collector": collector.url, **options})
    await writer.open()
    try:
        yield writer
    finally:
        await writer.close()


async def test_delivers_a_batch_of_valid_events(collector: FakeCollector) -> None:
    """A batch goes in one POST; every event passes the collector's checks and carries the report."""
    batch = envelopes(3)
    async with opened(collector, app_id="billing", namespace="eu") as writer:
        outcomes = await writer.send(batch)
    assert statuses(outcomes) == ["delivered"] * 3
    assert collector.invalid == []
    assert collector.requests == 1
    assert [str(e.event_id) for e in batch] == collector.good_ids()
    first = collector.good[0]
    assert (iglu.USAGE_REPORT, report_data(1)) == (first["schema"], first["data"])
    assert (first["e"], first["p"], first["aid"], first["tna"]) == ("ue", "srv", "billing", "eu")
    assert str(round(GENERATED_AT.timestamp() * 1000)) == first["dtm"]
    assert first["tv"].startswith("py-aggregator-") and first["stm"].isdigit() and "ue_px" not in first
    headers = {k.lower(): v for k, v in collector.request_headers[0].items()}
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["user-agent"].startswith("aggregator/")


async def test_base64_mode_sends_ue_px_with_the_same_content(collector: FakeCollector) -> None:
    """encode_base64 sends ue_px: URL-safe base64 without padding of exactly the ue_pr JSON."""
    batch = envelopes(2)
    async with opened(collector) as plain, opened(collector, encode_base64=True) as encoded:
        assert statuses(await plain.send(batch)) == ["delivered"] * 2
        assert statuses(await encoded.send(batch)) == ["delivered"] * 2
    sent_plain, sent_encoded = collector.good[:2], collector.good[2:]
    assert [e["data"] for e in sent_plain] == [e["data"] for e in sent_encoded]
    for pr, px in zip(sent_plain, sent_encoded, strict=True):
        assert "ue_pr" not in px and "=" not in px["ue_px"]
        padded = px["ue_px"] + "=" * (-len(px["ue_px"]) % 4)
        assert json.loads(pr["ue_pr"]) == json.loads(base64.urlsafe_b64decode(padded))


async def test_batches_by_count(collector: FakeCollector) -> None:
    """batch_size caps the events per POST and is the writer's max_batch."""
    batch = envelopes(5)
    async with opened(collector, batch_size=2) as writer:
        assert writer.max_batch == 2
        assert statuses(await writer.send(batch)) == ["delivered"] * 5
    assert collector.requests == 3
    assert [str(e.event_id) for e in batch] == collector.good_ids()


async def test_batches_by_bytes(collector: FakeCollector) -> None:
    """batch_bytes caps the body size; an event larger than the cap still goes, alone."""
    async with opened(collector) as writer:
        await writer.send(envelopes(1))
    one = collector.body_sizes[0]
    async with opened(collector, batch_bytes=int(one * 2.5)) as writer:
        assert statuses(await writer.send(envelopes(5))) == ["delivered"] * 5
    assert collector.requests == 1 + 3
    assert all(size <= one * 2.5 for size in collector.body_sizes[1:])
    async with opened(collector, batch_bytes=100) as writer:
        assert statuses(await writer.send(envelopes(2))) == ["delivered"] * 2
    assert collector.requests == 4 + 2


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_transient_statuses_are_retried_until_recovery(collector: FakeCollector, status: int) -> None:
    """408, 429 and 5xx answer retry for every event of the POST; the next send succeeds."""
    batch = envelopes(2)
    collector.fail(status, retry_after=7 if status in (429, 503) else None)
    async with opened(collector) as writer:
        failed = await writer.send(batch)
        assert statuses(failed) == ["retry", "retry"]
        assert f"answered {status}" in (failed[0].error or "") and "'sp'" in (failed[0].error or "")
        if status in (429, 503):
            assert "retry after 7s" in (failed[0].error or "")
        assert statuses(await writer.send(batch)) == ["delivered", "delivered"]
    assert [str(e.event_id) for e in batch] == collector.good_ids()


async def test_retry_stops_the_rest_of_the_batch(collector: FakeCollector) -> None:
    """After a retryable failure the later POSTs of the batch are not attempted; they wait too."""
    collector.fail(500)
    async with opened(collector, batch_size=1) as writer:
        outcomes = await writer.send(envelopes(3))
    assert statuses(outcomes) == ["retry"] * 3
    assert collector.requests == 1
    assert "not sent" in (outcomes[2].error or "")


async def test_client_error_is_rejected_with_status_and_body(collector: FakeCollector) -> None:
    """A 4xx other than 408/413/429 rejects the POST's events, naming the status and the answer."""
    collector.fail(400, body="bad things happened")
    async with opened(collector) as writer:
        outcomes = await writer.send(envelopes(2))
    assert statuses(outcomes) == ["rejected", "rejected"]
    assert "answered 400" in (outcomes[0].error or "") and "bad things happened" in (outcomes[0].error or "")


async def test_payload_too_large_splits_the_post(collector: FakeCollector) -> None:
    """413 on a multi-event POST: the halves are sent in the same send() and delivered."""
    async with opened(collector) as writer:
        await writer.send(envelopes(1))
        collector.max_body_bytes = int(collector.body_sizes[0] * 2.5)
        batch = envelopes(4)
        assert statuses(await writer.send(batch)) == ["delivered"] * 4
    assert collector.requests == 1 + 3  # 4 events refused, then 2 + 2
    assert {str(e.event_id) for e in batch} <= set(collector.good_ids())


async def test_lone_oversize_event_is_rejected(collector: FakeCollector) -> None:
    """413 for a single event can never succeed: it is rejected, naming the status."""
    collector.max_body_bytes = 100
    async with opened(collector) as writer:
        outcomes = await writer.send(envelopes(2))
    assert statuses(outcomes) == ["rejected", "rejected"]
    assert "413" in (outcomes[0].error or "")
    assert collector.requests == 3


async def test_timeout_is_retried(collector: FakeCollector) -> None:
    """A collector slower than the timeout gives retry; once it answers in time, delivered."""
    batch = envelopes(1)
    collector.stall(2.0)
    async with opened(collector, timeout="0.2s") as writer:
        failed = await writer.send(batch)
        assert statuses(failed) == ["retry"]
        assert "within 0.2s" in (failed[0].error or "")
        assert statuses(await writer.send(batch)) == ["delivered"]
    # The stalled POST may still be accepted later: receivers drop the duplicate by eid.
    assert str(batch[0].event_id) in collector.good_ids()


async def test_dropped_connection_is_retried(collector: FakeCollector) -> None:
    """A connection closed without an answer gives retry; the next send delivers."""
    batch = envelopes(2)
    collector.drop()
    async with opened(collector) as writer:
        failed = await writer.send(batch)
        assert statuses(failed) == ["retry", "retry"]
        assert "RemoteProtocolError" in (failed[0].error or "")
        assert statuses(await writer.send(batch)) == ["delivered", "delivered"]
    assert [str(e.event_id) for e in batch] == collector.good_ids()


async def test_unreachable_collector_is_retried() -> None:
    """Nothing listening at the collector URL: retry, not an exception."""
    with FakeCollector() as gone:
        url = gone.url
    writer = SnowplowWriter.from_config("sp", {"collector": url})
    await writer.open()
    try:
        assert statuses(await writer.send(envelopes(1))) == ["retry"]
    finally:
        await writer.close()


async def test_an_incomplete_report_is_sent_as_1_0_1_with_replicas_missing(collector: FakeCollector) -> None:
    """Reports go out under usage_report 1-0-1, replicas_missing included; the collector validates them
    against the shipped 1-0-1 schema."""
    batch = [envelope(1, replicas_missing=2), envelope(2)]
    async with opened(collector) as writer:
        assert statuses(await writer.send(batch)) == ["delivered"] * 2
    assert collector.invalid == []
    expected = [("iglu:dev.aggregator/usage_report/jsonschema/1-0-1", 2),
                ("iglu:dev.aggregator/usage_report/jsonschema/1-0-1", 0)]
    assert expected == [(e["schema"], e["data"]["replicas_missing"]) for e in collector.good]


async def test_an_item_queued_as_1_0_0_is_validated_and_sent_as_1_0_0(collector: FakeCollector) -> None:
    """An envelope keeps the schema it was queued with: a 1-0-0 report (no replicas_missing) is valid and goes
    out as 1-0-0; replicas_missing is not a 1-0-0 field, so 1-0-0 data carrying it is rejected."""
    old = writers.Envelope(event_id=uuid.uuid4(), kind="usage_report", schema=USAGE_REPORT_1_0_0,
                           occurred_at=GENERATED_AT.timestamp(), data=old_report_data(1))
    mixed = envelope(2, schema=USAGE_REPORT_1_0_0, replicas_missing=1)
    async with opened(collector) as writer:
        outcomes = await writer.send([old, mixed])
    assert statuses(outcomes) == ["delivered", "rejected"]
    assert "does not match iglu:dev.aggregator/usage_report/jsonschema/1-0-0" in (outcomes[1].error or "")
    assert [(USAGE_REPORT_1_0_0, old_report_data(1))] == [(e["schema"], e["data"]) for e in collector.good]
    assert collector.invalid == []


def test_usage_report_1_0_1_is_1_0_0_plus_one_optional_field() -> None:
    """A SchemaVer ADDITION: the same schema but for replicas_missing (an optional integer >= 0), so every
    1-0-0 event is valid under 1-0-1; both versions are shipped and valid Draft 4."""
    old, new = iglu.load(USAGE_REPORT_1_0_0), iglu.load(iglu.USAGE_REPORT)
    for schema in (old, new):
        jsonschema.Draft4Validator.check_schema(schema)
    added = new["properties"]["replicas_missing"]
    assert (added["type"], added["minimum"], "replicas_missing" in new["required"]) == ("integer", 0, False)
    assert {"version": "1-0-1"} | {k: v for k, v in old["self"].items() if k != "version"} == new["self"]
    same = ("$schema", "type", "required", "additionalProperties")
    assert [old[k] for k in same] == [new[k] for k in same]
    assert old["properties"] == {k: v for k, v in new["properties"].items() if k != "replicas_missing"}
    assert jsonschema.Draft4Validator(new).is_valid(old_report_data(1))
    assert not jsonschema.Draft4Validator(new).is_valid(report_data(1, replicas_missing=-1))


@pytest.mark.parametrize(("changes", "path"), [
    ({"unique_users": -1}, "$.unique_users"),
    ({"replicas_missing": -1}, "$.replicas_missing"),
    ({"replicas_missing": "2"}, "$.replicas_missing"),
    ({"window_start": "yesterday"}, "$.window_start"),
    ({"surprise": 1}, "$"),
])
async def test_invalid_event_is_rejected_and_never_sent(
        collector: FakeCollector, changes: dict[str, Any], path: str) -> None:
    """An envelope whose data breaks its schema is rejected (with the JSON path); the others go out."""
    batch = [envelope(1), envelope(2, **changes), envelope(3)]
    async with opened(collector) as writer:
        outcomes = await writer.send(batch)
    assert statuses(outcomes) == ["delivered", "rejected", "delivered"]
    assert f"at {path}:" in (outcomes[1].error or "")
    assert [str(batch[0].event_id), str(batch[2].event_id)] == collector.good_ids()
    assert collector.invalid == []


async def test_event_with_unshipped_schema_is_rejected(collector: FakeCollector) -> None:
    """Only shipped schemas can be validated, so an envelope of another schema is rejected, not sent."""
    other = writers.Envelope(event_id=uuid.uuid4(), kind="usage_report",
                             schema="iglu:dev.aggregator/nothing/jsonschema/1-0-0", occurred_at=1.0, data={})
    async with opened(collector) as writer:
        outcomes = await writer.send([other])
    assert statuses(outcomes) == ["rejected"]
    assert "not shipped" in (outcomes[0].error or "")
    assert collector.requests == 0


@pytest.mark.usefixtures("default_logging")
async def test_headers_are_sent_but_never_logged_or_reported(collector: FakeCollector) -> None:
    """Extra headers reach the collector; their values appear in no log event and no outcome."""
    collector.fail(400)
    with capture_logs() as logs:
        async with opened(collector, headers={"Authorization": SECRET}) as writer:
            rejected = await writer.send(envelopes(1))
            delivered = await writer.send(envelopes(1))
    assert statuses(rejected) == ["rejected"] and statuses(delivered) == ["delivered"]
    assert [h["Authorization"] for h in collector.request_headers] == [SECRET, SECRET]
    assert SECRET not in repr(logs) + repr(rejected) + repr(writer)
    posts = [event for event in logs if event["event"] == "snowplow_post"]
    assert [(e["log_level"], e["status"]) for e in posts] == [("warning", 400), ("debug", 200)]
    assert {"writer", "events", "bytes", "status", "duration_ms"} <= set(posts[1])


@pytest.mark.parametrize(("options", "needle"), [
    ({}, "writers.sp.collector is required"),
    ({"collector": "ftp://collector.example.com"}, "writers.sp.collector='ftp://collector.example.com'"),
    ({"collector": "collector.example.com"}, "writers.sp.collector='collector.example.com'"),
    ({"collector": "https://collector.example.com/com.snowplowanalytics.snowplow/tp2"}, "base URL"),
    ({"collector": "https://u:pw@c.example.com"}, "writers.sp.collector must not carry credentials"),
    ({"collector": "https://c.example.com", "colector": "x"}, "unknown key(s) colector"),
    ({"collector": "https://c.example.com", "batch_size": 0}, "writers.sp.batch_size=0"),
    ({"collector": "https://c.example.com", "batch_size": 1001}, "writers.sp.batch_size=1001"),
    ({"collector": "https://c.example.com", "batch_size": True}, "writers.sp.batch_size=True"),
    ({"collector": "https://c.example.com", "batch_bytes": "big"}, "writers.sp.batch_bytes='big'"),
    ({"collector": "https://c.example.com", "timeout": "soon"}, "writers.sp.timeout='soon'"),
    ({"collector": "https://c.example.com", "encode_base64": "yes"}, "writers.sp.encode_base64='yes'"),
    ({"collector": "https://c.example.com", "app_id": ""}, "writers.sp.app_id=''"),
    ({"collector": "https://c.example.com", "headers": {"Content-Type": "x"}}, "writers.sp.headers.Content-Type"),
])
def test_config_errors_name_the_key(options: dict[str, Any], needle: str) -> None:
    """Each bad setting raises ConfigError naming writers.NAME.KEY and the value."""
    with pytest.raises(exceptions.ConfigError) as caught:
        writers.build("sp", {"type": "snowplow", **options})
    assert needle in str(caught.value)


def test_config_errors_never_show_header_values() -> None:
    """A bad header value is reported by header name only: it may be a secret."""
    with pytest.raises(exceptions.ConfigError) as caught:
        SnowplowWriter.from_config("sp", {"collector": "https://c.example.com",
                                          "headers": {"Authorization": SECRET + "\n"}})
    assert "writers.sp.headers.Authorization" in str(caught.value) and SECRET not in str(caught.value)


def test_build_makes_a_snowplow_writer_with_defaults() -> None:
    """writers.build() finds the type; unset options take their documented defaults."""
    writer = writers.build("events", {"type": "snowplow", "collector": "https://c.example.com/"})
    assert isinstance(writer, SnowplowWriter)
    actual = (writer.endpoint, writer.app_id, writer.namespace, writer.encode_base64, writer.batch_size,
              writer.max_batch, writer.batch_bytes, writer.timeout)
    assert actual == ("https://c.example.com/com.snowplowanalytics.snowplow/tp2", "aggregator", "aggregator",
                      False, 50, 50, 50_000, 10.0)


@pytest.mark.parametrize(("value", "valid"), [
    ("2027-01-15T12:00:00Z", True), ("2027-01-15T12:00:00.123456+02:00", True), ("2027-13-15T12:00:00Z", False),
    ("2027-01-15 12:00:00Z", False), ("2027-01-15T12:00:00", False), ("yesterday", False),
])
def test_date_time_fallback_is_rfc3339(value: str, valid: bool) -> None:
    """Without rfc3339-validator installed, date-time is still checked, as RFC 3339 with an offset."""
    try:
        assert snowplow._is_rfc3339(value) is valid
    except ValueError:
        assert not valid


def test_fake_collector_health_and_validation(collector: FakeCollector) -> None:
    """The fake answers /health and refuses (400, recorded) an event that breaks the tp2 rules."""
    with httpx.Client(base_url=collector.url) as client:
        assert client.get("/health").text == "ok"
        bad = {"schema": "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4",
               "data": [{"e": "ue", "p": "srv", "tv": "t", "eid": str(uuid.uuid4()), "ue_pr": "{}", "dtm": 5}]}
        assert client.post("/com.snowplowanalytics.snowplow/tp2", json=bad).status_code == 400
    assert collector.good == [] and collector.invalid
