"""HTTP hygiene (issue 12): content type, strict JSON, bounded values, one 422 shape, Host and Origin, a whole
OpenAPI document, pseudonymized pulls. In-process (httpx's ASGI transport) on a real database."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from aggregator import api, billing, http_guard, meters, metrics, options, privacy
from aggregator.runtime import Aggregator
from tests.helpers import T0, WINDOW, FakeClock, manual

TOKEN = "hygiene-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEY = "pseudonym-key-for-tests-0123456789"
LOCAL = "http://127.0.0.1:8714"
METERS = {"build_seconds": {"aggregation": "sum", "unit": "seconds", "decimals": 9,
                            "dimensions": ["project_id", "region"]},
          "builds": {"aggregation": "count", "unit": "builds", "dimensions": ["project_id"]}}
JOURNEY = {"correlation_id": "01J00000000000000000000000", "experience_id": "http_request", "checkpoint": "start",
           "type": "web", "feature_category": "ci", "urgency": "sync_fast",
           "client_timestamp": dt.datetime.fromtimestamp(T0 + 1, dt.timezone.utc).isoformat()}


def event(i: int = 0, **fields: object) -> dict[str, object]:
    return {"workspace_id": str(uuid.UUID(int=1 + i)), "user_id": str(uuid.UUID(int=100 + i)), **fields}


def record(value: object = "1.5", **fields: object) -> dict[str, object]:
    return {"meter": "build_seconds", "value": value, "dimensions": {"project_id": "p1", "region": "eu"}, **fields}


class Served:
    """The API of one Aggregator (fake clock, jobs only when told), and what it counted."""

    def __init__(self, http: httpx.AsyncClient, agg: Aggregator, counters: metrics.Counters, clock: FakeClock) -> None:
        self.http, self.agg, self.counters, self.clock = http, agg, counters, clock

    def counted(self) -> int:
        """Events, records and checkpoints held for the next flush."""
        status = self.agg.status()
        return int(status["pending_events"]) + self.agg._recorder.pending() + self.agg._checkpoints.pending()

    async def post(self, path: str, body: bytes | str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(path, content=body, headers={"Content-Type": "application/json", **AUTH,
                                                                 **(headers or {})})


async def serve(url: str, base_url: str = "http://aggregator.internal", **flags: str) -> AsyncIterator[Served]:
    settings = options.load_daemon_settings(
        {"database_url": url, "window": f"{WINDOW}s", "max_body_bytes": "1048576", "listen": "127.0.0.1:8714",
         "experience_urgencies": json.dumps({"sync_fast": "10s"}), **flags}, environ={})
    counters = metrics.Counters()
    clock = FakeClock()
    async with manual(url, clock, meters=METERS, urgencies={"sync_fast": "10s"},
                      pseudonym_key=settings.aggregator.delivery.pseudonym_key) as agg:
        app = api.build_app(agg, settings, counters)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as http:
            yield Served(http, agg, counters, clock)


@pytest.fixture
async def served(sqlite_url: str) -> AsyncIterator[Served]:
    """With a token: any Host is served."""
    async for one in serve(sqlite_url, api_tokens=TOKEN):
        yield one


@pytest.fixture
async def local(sqlite_url: str) -> AsyncIterator[Served]:
    """Without tokens, on loopback: only local Host names are served."""
    async for one in serve(sqlite_url, LOCAL):
        yield one


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1", "application/jsonx"])
async def test_a_body_that_is_not_application_json_is_415(served: Served, content_type: str | None) -> None:
    """POST bodies need Content-Type application/json (UTF-8): else 415 naming the type received and the fix."""
    body = json.dumps({"events": [event()]}).encode()
    for path in ("/v1/track", "/v1/record", "/v1/checkpoints"):
        given = {} if content_type is None else {"Content-Type": content_type}
        response = await served.http.post(path, content=body, headers=AUTH | given)  # bytes: no type of its own
        assert response.status_code == 415
        assert response.json()["detail"].endswith("send Content-Type: application/json")
        assert (content_type or "no Content-Type") in response.json()["detail"]
    assert (served.counted(), served.counters.rejected["unsupported_media_type"]) == (0, 3)


async def test_json_with_a_utf8_charset_is_accepted(served: Served) -> None:
    """`application/json; charset=utf-8` (any case, quoted or not) is JSON."""
    for content_type in ("application/json; charset=utf-8", 'Application/JSON; charset="UTF-8"'):
        response = await served.post("/v1/track", json.dumps({"events": [event()]}), {"Content-Type": content_type})
        assert response.status_code == 202, response.text


async def test_text_plain_cross_origin_post_is_refused(local: Served) -> None:
    """A page's cross-origin `text/plain` POST (no preflight needed) is refused for its Origin, also on loopback
    without tokens; the same body from a non-browser client without Origin is refused for its type."""
    body = json.dumps({"events": [event()]})
    refused = await local.http.post("/v1/track", content=body, headers={"Content-Type": "text/plain",
                                                                        "Origin": "https://evil.example"})
    assert refused.status_code == 403
    assert "browsers are not served" in refused.json()["detail"] and "server-side client" in refused.json()["detail"]
    assert "access-control-allow-origin" not in refused.headers
    assert (await local.http.post("/v1/track", content=body, headers={"Content-Type": "text/plain"})).status_code == 415
    assert (local.counted(), local.counters.rejected["cross_origin"]) == (0, 1)
    exposed = (await local.http.get("/metrics")).text
    assert 'aggregator_requests_rejected_total{reason="cross_origin"} 1' in exposed
    assert 'aggregator_requests_rejected_total{reason="unsupported_media_type"} 1' in exposed


@pytest.mark.parametrize("origin", ["https://evil.example", "null", LOCAL])
async def test_cors_preflight_and_any_request_with_an_origin_are_refused(served: Served, origin: str) -> None:
    """Preflights and requests with any Origin (even this server's) get 403 and no CORS headers."""
    preflight = await served.http.options("/v1/track", headers={"Origin": origin,
                                                                "Access-Control-Request-Method": "POST"})
    pull = await served.http.get("/v1/reports", headers={**AUTH, "Origin": origin})
    post = await served.post("/v1/track", json.dumps({"events": [event()]}), {"Origin": origin})
    assert [r.status_code for r in (preflight, pull, post)] == [403, 403, 403]
    assert not any(name.startswith("access-control-") for r in (preflight, pull, post) for name in r.headers)
    assert served.counted() == 0


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8714", "127.0.0.1.nip.io:8714", "localhost.evil",
                                  "127.0.0.2:8714", "[::2]:8714", "localhost:http"])
async def test_foreign_host_is_refused_without_tokens(local: Served, host: str) -> None:
    """Tokenless (loopback) mode serves only Host names of this host: a DNS name rebound to 127.0.0.1 gets 421."""
    body = json.dumps({"events": [event()]})
    responses = [await local.http.post("/v1/track", content=body, headers={"Host": host,
                                                                           "Content-Type": "application/json"}),
                 await local.http.get("/v1/reports", headers={"Host": host}),
                 await local.http.get("/openapi.json", headers={"Host": host})]
    assert [r.status_code for r in responses] == [421, 421, 421]
    assert "is not this server" in responses[0].json()["detail"] and "set api_tokens" in responses[0].json()["detail"]
    assert (local.counted(), local.counters.rejected["foreign_host"]) == (0, 3)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8714", "localhost", "LOCALHOST:8714", "[::1]", "[::1]:80"])
async def test_local_host_names_are_served_without_tokens(local: Served, host: str) -> None:
    """The listen address and localhost, 127.0.0.1 and [::1], with or without a port, are served."""
    response = await local.http.post("/v1/track", content=json.dumps({"events": [event()]}),
                                     headers={"Host": host, "Content-Type": "application/json"})
    assert (response.status_code, local.counted()) == (202, 1)


def test_the_listen_address_is_a_local_host_name() -> None:
    """A loopback listen address other than 127.0.0.1 (or an IPv6 one) is served under its own name too."""
    assert {"127.0.0.5", "localhost", "127.0.0.1", "[::1]"} == http_guard.local_hosts("127.0.0.5")
    assert {"[::1]", "localhost", "127.0.0.1"} == http_guard.local_hosts("::1")


async def test_any_host_is_served_with_tokens(served: Served) -> None:
    """With tokens the token protects: a proxy's or load balancer's Host name is served."""
    response = await served.post("/v1/track", json.dumps({"events": [event()]}), {"Host": "usage.example.com"})
    assert response.status_code == 202


@pytest.mark.parametrize(("body", "loc", "key"), [
    ('{"events": [], "events": [%s]}' % json.dumps(event()), "body", "events"),
    ('{"events": [{"workspace_id": "%s", "workspace_id": "%s", "user_id": "%s"}]}'
     % (uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)), "events[0]", "workspace_id"),
])
async def test_duplicate_json_keys_are_refused(served: Served, body: str, loc: str, key: str) -> None:
    """A key repeated in an object (json and pydantic would keep the last; a proxy may check the first) is a 422
    naming the key and the object; nothing is counted."""
    response = await served.post("/v1/track", body)
    assert response.status_code == 422
    assert response.json()["errors"] == [{"loc": loc, "type": "json_duplicate_key", "message": f"the key '{key}' "
                                          "appears more than once in this object; send each key once"}]
    assert served.counted() == 0


async def test_duplicate_dimension_keys_are_refused(served: Served) -> None:
    """A repeated dimension is found where it sits: records[1].dimensions."""
    body = json.dumps({"records": [record(), record()]}).replace(
        '"region": "eu"}}]', '"region": "eu", "project_id": "p2"}}]')
    response = await served.post("/v1/record", body)
    assert (response.status_code, response.json()["errors"][0]["loc"]) == (422, "records[1].dimensions")
    assert "'project_id'" in response.json()["detail"]


@pytest.mark.parametrize("depth", [5_000, 100_000])
async def test_deeply_nested_json_is_422_not_500(served: Served, depth: int) -> None:
    """A body nested 5,000 or 100,000 deep (closed or not) is a 422 found before parsing, never a RecursionError."""
    meta = "[" * depth + "]" * depth
    closed = json.dumps({"checkpoints": [JOURNEY]})[:-2] + f', "meta": {{"a": {meta}}}}}]}}'
    for body in (closed, '{"checkpoints": ' + "[" * depth):
        response = await served.post("/v1/checkpoints", body)
        assert response.status_code == 422, response.text
        assert [(e["loc"], e["type"]) for e in response.json()["errors"]] == [("body", "json_too_deep")]
        assert f"deeper than {http_guard.MAX_DEPTH} levels" in response.json()["detail"]
    assert served.counted() == 0


def test_depth_is_bounded_exactly_and_brackets_in_strings_do_not_count() -> None:
    """MAX_DEPTH levels parse, one more does not; brackets inside strings (even escaped quotes) are text."""
    def nested(n: int) -> bytes:
        return b"[" * n + b"]" * n

    assert http_guard.parse(nested(http_guard.MAX_DEPTH)) is not None
    with pytest.raises(http_guard.BodyError, match="deeper than"):
        http_guard.parse(nested(http_guard.MAX_DEPTH + 1))
    text = '"\\"' + "[" * 100 + '"'
    assert {"a": text[1:-1].replace('\\"', '"')} == http_guard.parse(b'{"a": ' + text.encode() + b"}")
    with pytest.raises(http_guard.BodyError, match="deeper than"):  # a chain hidden between empty siblings
        http_guard.parse(b"[[]" * 40 + b"]" * 40)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
async def test_nan_and_infinity_are_refused(served: Served, number: str) -> None:
    """JSON has no NaN or Infinity, and 1e999 (infinite as a float) is no amount: 422, nothing counted."""
    response = await served.post("/v1/record", '{"records": [{"meter": "build_seconds", "value": %s, '
                                               '"dimensions": {"project_id": "p", "region": "eu"}}]}' % number)
    assert response.status_code == 422, response.text
    assert "finite" in response.json()["detail"]
    assert served.counted() == 0


@pytest.mark.parametrize(("body", "loc"), [
    ({"records": [record(True)]}, "records[0].value"),
    ({"records": [record(False)]}, "records[0].value"),
    ({"records": [record("1", dimensions={"project_id": True, "region": "eu"})]}, "records[0].dimensions.project_id"),
    ({"records": [record("1", time=True)]}, "records[0].time"),
    ({"events": [event(allowed=True)]}, "events[0].allowed"),
    ({"events": [event(time=True)]}, "events[0].time"),
])
async def test_boolean_meter_value_is_refused(served: Served, body: dict[str, Any], loc: str) -> None:
    """A boolean where a number, a time or a dimension is meant is a 422 at its field (pydantic's lax float
    took `true` as 1.0); nothing is counted."""
    path = "/v1/record" if "records" in body else "/v1/track"
    response = await served.post(path, json.dumps(body))
    assert response.status_code == 422
    assert [loc] == [e["loc"] for e in response.json()["errors"]]
    assert served.counted() == 0


@pytest.mark.parametrize(("value", "loc", "says"), [
    ("1" + "0" * 5000, "body", "2**63-1"),  # over the parser's 4,300-digit limit
    ("1" + "0" * 4000, "records[0].value", "2**63-1"),
    (str(2**63), "records[0].value", "2**63-1"),
    ('"1e999999999"', "records[0]", "exponent"),
    ('"1e300000"', "records[0]", "exponent"),
    ('"' + "9" * 300 + '"', "records[0].value", "at most 256"),
])
async def test_huge_numbers_are_422_not_500(served: Served, value: str, loc: str, says: str) -> None:
    """Integers beyond 64 bits and long or huge decimal strings are a 422 naming the bound, in well under a second."""
    began = time.monotonic()
    response = await served.post("/v1/record", '{"records": [{"meter": "build_seconds", "value": %s, '
                                               '"dimensions": {"project_id": "p", "region": "eu"}}]}' % value)
    assert response.status_code == 422, response.text
    assert loc == response.json()["errors"][0]["loc"] and says in response.json()["detail"]
    assert time.monotonic() - began < 5  # a loose ceiling against a hang; the bound is a benchmark row
    assert served.counted() == 0


@pytest.mark.parametrize(("dimension", "says"), [(10**30, "2**63-1"), ("x" * 257, "1-256"), ("", "1-256")])
async def test_dimension_values_are_bounded(served: Served, dimension: object, says: str) -> None:
    """A dimension is text of 1-256 characters or a 64-bit integer."""
    response = await served.post("/v1/record", json.dumps({"records": [record(
        dimensions={"project_id": dimension, "region": "eu"})]}))
    assert (response.status_code, response.json()["errors"][0]["loc"]) == (422, "records[0].dimensions.project_id")
    assert says in response.json()["detail"]


def assert_problem(response: httpx.Response) -> None:
    body = response.json()
    assert {"detail", "errors"} == set(body), body
    assert body["errors"] and all({"loc", "message", "type"} <= set(e) for e in body["errors"]), body
    assert all(isinstance(e["loc"], str) and isinstance(e["message"], str) for e in body["errors"])


async def test_422_has_errors_on_every_endpoint(served: Served) -> None:
    """Every 422 (pydantic, strict JSON, the time range, the in-process checks of record_many and checkpoint_many,
    a query) is `{"detail", "errors": [{"loc", "message", "type"}]}`; in-process refusals at the item they name."""
    bad = {
        "/v1/track": [{"events": [event(user_id="nope")]}, "{", {"events": [event(time=1.0)]}],
        "/v1/record": [{"records": [record(event_id="")]}, {"records": [record("1", meter="nope")]},
                       {"records": [record(), record("-1")]}],
        "/v1/checkpoints": [{"checkpoints": [JOURNEY | {"urgency": "soon"}]}, {"checkpoints": [JOURNEY | {"x": 1}]}],
    }
    for path, bodies in bad.items():
        for body in bodies:
            response = await served.post(path, body if isinstance(body, str) else json.dumps(body))
            assert response.status_code == 422, (path, body, response.text)
            assert_problem(response)
    for path in ("/v1/reports", "/v1/meters", "/v1/experiences"):
        response = await served.http.get(path, params={"after": "-1", "limit": "0"}, headers=AUTH)
        assert response.status_code == 422
        assert_problem(response)
        assert {"after", "limit"} == {e["loc"] for e in response.json()["errors"]}
    unknown = (await served.post("/v1/record", json.dumps({"records": [record(), record("1", meter="nope")]}))).json()
    assert [(e["loc"], e["index"], e["type"]) for e in unknown["errors"]] == [("records[1]", 1, "invalid_input")]
    urgency = (await served.post("/v1/checkpoints", json.dumps({"checkpoints": [JOURNEY | {"urgency": "soon"}]})))
    located = [(e["loc"], e["index"], e["field"]) for e in urgency.json()["errors"]]
    assert located == [("checkpoints[0].urgency", 0, "urgency")]
    assert served.counted() == 0


async def test_a_batch_of_bad_items_gets_a_bounded_answer(served: Served) -> None:
    """300 bad values: `errors` lists the first 100 and says how many more; `detail` names the first 10."""
    response = await served.post("/v1/track", json.dumps({"events": [
        {"workspace_id": "x", "user_id": "y", "allowed": -1} for _ in range(100)]}))
    errors = response.json()["errors"]
    assert (len(errors), errors[-1]["type"]) == (101, "too_many_errors")
    assert "200 more errors not listed" in errors[-1]["message"]
    assert response.json()["detail"].endswith("; and 290 more (see errors)")


def refs(document: object, at: str = "#") -> Iterator[tuple[str, str]]:
    """Every `$ref` in ``document``, with where it is."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key == "$ref":
                yield at, value
            else:
                yield from refs(value, f"{at}/{key}")
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from refs(value, f"{at}/{index}")


def resolve(document: dict[str, Any], ref: str) -> object:
    assert ref.startswith("#/"), ref
    found: Any = document
    for part in ref[2:].split("/"):
        found = found[part.replace("~1", "/").replace("~0", "~")]
    return found


async def test_every_openapi_ref_resolves(served: Served, local: Served) -> None:
    """Every `$ref` of /openapi.json resolves (RecordBatch and CheckpointBatch did not), with and without tokens,
    and each request body is one of the three batches."""
    for one in (served, local):
        document = (await one.http.get("/openapi.json")).json()
        found = list(refs(document))
        assert len(found) > 20
        unresolved = [(at, ref) for at, ref in found if not _resolves(document, ref)]
        assert unresolved == []
        bodies = {path: op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                  for path, item in document["paths"].items() for op in item.values() if "requestBody" in op}
        assert bodies == {"/v1/track": "#/components/schemas/TrackBatch",
                          "/v1/record": "#/components/schemas/RecordBatch",
                          "/v1/checkpoints": "#/components/schemas/CheckpointBatch"}
        assert "maxProperties" in document["components"]["schemas"]["MeterRecord"]["properties"]["dimensions"]


def _resolves(document: dict[str, Any], ref: str) -> bool:
    try:
        resolve(document, ref)
    except (KeyError, AssertionError):
        return False
    return True


async def test_every_operation_documents_its_refusals(served: Served, local: Served) -> None:
    """Bodies: 413, 415, 422; every operation 403 (browsers); with tokens the bearer ones 401, without 421."""
    for one, tokens in ((served, True), (local, False)):
        document = (await one.http.get("/openapi.json")).json()
        for path, item in document["paths"].items():
            for method, operation in item.items():
                codes = set(operation["responses"])
                expected = {"403"} | ({"401"} if tokens and path.startswith("/v1/") else set()) | (
                    set() if tokens else {"421"})
                if method == "post":
                    expected |= {"413", "415", "422", "503"}
                elif path.startswith("/v1/"):
                    expected |= {"422", "503"}
                assert expected <= codes, (path, method, tokens, codes)
                assert tokens or "401" not in codes
                # Without tokens the document asks for none (schemathesis' ignored_auth check holds).
                assert ("security" in operation) == (tokens and path.startswith("/v1/")), (path, tokens)


async def test_pull_api_pseudonymizes_replica_and_dimensions(database_url: str) -> None:
    """GET /v1/reports and /v1/meters show identifiers as the writers send them: hashed under the key, in clear
    on the allowlist (region), the same pseudonym a billable event carries; without a key, withheld (null)."""
    allow = "metadata.dimensions.region"
    async for one in serve(database_url, api_tokens=TOKEN, pseudonym_key=KEY, pseudonym_allowlist=allow):
        replica = await _report_with_a_meter(one)
        writer = privacy.Pseudonymizer(KEY, [allow])
        billable = billing.billable_event(meters.Meter.build("build_seconds", METERS["build_seconds"]),
                                          window_start=T0, window_end=T0 + WINDOW, quantity_units=1, late=False,
                                          realm="SaaS", dimensions={"project_id": "p1", "region": "eu"})
        assert billable is not None
        sent = writer.apply(billing.KIND, billable)
        report = (await one.http.get("/v1/reports", headers=AUTH)).json()["reports"][0]
        assert writer.hash(replica) == report["generated_by"] != replica
        results = (await one.http.get("/v1/meters", headers=AUTH)).json()["results"]
        assert [{"project_id": sent["project_id"], "region": "eu"}] == [r["dimensions"] for r in results]
        assert sent["project_id"] != "p1"
    async for one in serve(database_url, api_tokens=TOKEN, pseudonym_allowlist=allow):
        report = (await one.http.get("/v1/reports", headers=AUTH)).json()["reports"][0]
        results = (await one.http.get("/v1/meters", headers=AUTH)).json()["results"]
        shown = (report["generated_by"], [r["dimensions"] for r in results])
        assert shown == (None, [{"project_id": None, "region": "eu"}])


async def test_the_allowlist_shows_pulled_identifiers_in_clear(sqlite_url: str) -> None:
    """Fields on pseudonym_allowlist (generated_by, project_id) leave in clear, key or not."""
    async for one in serve(sqlite_url, api_tokens=TOKEN, pseudonym_allowlist="generated_by,project_id"):
        replica = await _report_with_a_meter(one)
        report = (await one.http.get("/v1/reports", headers=AUTH)).json()["reports"][0]
        results = (await one.http.get("/v1/meters", headers=AUTH)).json()["results"]
        assert (replica, {"project_id": "p1", "region": None}) == (report["generated_by"],
                                                                        results[0]["dimensions"])


async def _report_with_a_meter(one: Served) -> str:
    """A report of window T0 with one build_seconds group (p1, eu); the collecting replica's raw id."""
    response = await one.post("/v1/record", json.dumps({"records": [record("0.000000001")]}))
    assert response.status_code == 202, response.text
    await one.agg.aflush()
    one.clock.past_window(T0)
    await one.agg.acollect()
    (report,) = await one.agg.areports()
    return report.generated_by
