"""The daemon's API fuzzed from its own OpenAPI document (schemathesis): no 5xx, every answer as documented.

The installed CLI serves a fresh database on each backend, once with a token and once without (on
loopback); schemathesis reads ``/openapi.json`` and generates schema-valid (positive) and
schema-violating (negative) requests for every operation: with the token, so the handlers run deep,
then with missing or wrong credentials. Every response must be documented: no server error, a
documented status code, content type, headers and schema, and no ignored authentication. Two checks
are left out because the document cannot state every business rule: `positive_data_acceptance` (an
event time outside ``max_event_age``, or an undeclared meter, is schema-valid yet rightly refused)
and `negative_data_rejection` (pydantic's lax parsing accepts some values the schema's formats do not
promise, such as a date-time given as digits).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from tests.test_daemon import AUTH, TOKEN, Daemon

POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE

# Anything but the configured token: none, other schemes, near misses, and arbitrary latin-1 header
# values (what the client library will send: no line breaks, no leading whitespace).
WRONG_CREDENTIALS = st.one_of(
    st.just({}),
    st.sampled_from([f"Basic {TOKEN}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", "Bearer "])
    .map(lambda value: {"Authorization": value}),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)
    .map(lambda value: {"Authorization": value.lstrip()}),
)

# (generation mode, credentials, examples per operation): most requests authenticated, so that they
# pass the bearer check and reach validation, tracking and the report query.
PASSES = [
    (POSITIVE, st.just(AUTH), 150),
    (NEGATIVE, st.just(AUTH), 150),
    (POSITIVE, WRONG_CREDENTIALS, 25),
    (NEGATIVE, WRONG_CREDENTIALS, 25),
]
# Without tokens, credentials change nothing: fewer examples with them.
TOKENLESS_PASSES = [
    (POSITIVE, st.just({}), 120),
    (NEGATIVE, st.just({}), 120),
    (POSITIVE, WRONG_CREDENTIALS, 15),
]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, ignored_auth, unsupported_method]
OPERATIONS = {"POST /v1/track", "POST /v1/record", "POST /v1/checkpoints", "GET /v1/reports", "GET /v1/meters",
              "GET /v1/experiences", "GET /v1/distinct", "GET /healthz", "GET /metrics"}

# Requests sent, by (operation, generation mode, valid token?, status code).
Statuses = collections.Counter[tuple[str, str, bool, int]]


def fuzz_settings(max_examples: int) -> hypothesis.settings:
    """Bounded and repeatable: a seed fixed by the test's code, no example database, no deadline (real HTTP)."""
    return hypothesis.settings(
        max_examples=max_examples, derandomize=True, database=None, deadline=None, print_blob=False,
        suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.filter_too_much,
                               hypothesis.HealthCheck.data_too_large])


@pytest.fixture
def hypothesis_home(tmp_path: Path) -> Iterator[None]:
    """Hypothesis caches what it scans in a `.hypothesis` directory even with no example database: keep it in tmp."""
    set_hypothesis_home_dir(tmp_path / "hypothesis")
    yield
    set_hypothesis_home_dir(None)


@pytest.fixture(params=[True, False], ids=["token", "tokenless"])
def tokens(request: pytest.FixtureRequest) -> bool:
    """Whether the daemon has api_tokens; without, it serves loopback only, to local Host names."""
    return bool(request.param)


@pytest.fixture
def daemon(tokens: bool, database_url: str, tmp_path: Path) -> Iterator[Daemon]:
    """`aggregator run` on a fresh database (SQLite, PostgreSQL), with a token or without, serving; killed
    afterwards unless stopped."""
    # A short window and flush so that reports close during the run and the report pages are not empty.
    started = Daemon(tmp_path, "--database-url", database_url, "--window", "2s", "--flush-interval", "0.3s",
                     "--grace", "1s", env={"AGGREGATOR_API_TOKENS": TOKEN} if tokens else {})
    try:
        started.wait_for("READY=1")
        yield started
    finally:
        started.close()


def fuzz(operation: schemathesis.APIOperation, mode: schemathesis.GenerationMode,
         credentials: st.SearchStrategy[dict[str, str]], max_examples: int, base_url: str,
         session: requests.Session, statuses: Statuses) -> None:
    """Send `max_examples` generated requests to one operation; fail on the first 5xx, with a curl to replay it."""

    @fuzz_settings(max_examples)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), headers=credentials)
    def one_request(case: schemathesis.Case, headers: dict[str, str]) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=10)
        statuses[operation.label, mode.value, headers == AUTH, response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    one_request()


@pytest.mark.usefixtures("hypothesis_home")
def test_fuzzing_the_openapi_document_gets_no_server_error(daemon: Daemon, tokens: bool) -> None:
    """Generated requests to every operation, valid and invalid, with and without the token (and on a daemon
    without tokens), never get a 5xx or an undocumented answer; SIGTERM then exits 0."""
    # An explicit default config: a schemathesis.toml lying around must not change what is generated.
    schema = schemathesis.openapi.from_url(f"{daemon.url}/openapi.json", config=schemathesis.Config(), timeout=10)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {o.label for o in operations} == OPERATIONS
    statuses: Statuses = collections.Counter()
    began = time.monotonic()
    with requests.Session() as session:
        for mode, credentials, max_examples in PASSES if tokens else TOKENLESS_PASSES:
            for operation in operations:
                if mode is NEGATIVE and not (operation.body or any(operation.iter_parameters())):
                    continue  # nothing to make invalid: /healthz and /metrics take no input
                fuzz(operation, mode, credentials, max_examples, daemon.url, session, statuses)
    summary = f"{sum(statuses.values())} requests in {time.monotonic() - began:.1f}s: {sorted(statuses.items())}"
    # Every operation was called, and answered something other than a refusal of the whole request.
    assert {label for label, *_ in statuses} == OPERATIONS, summary
    assert not any(status >= 500 for *_, status in statuses), summary
    if not tokens:  # no token asked for, none needed: requests reach the handlers
        assert statuses["POST /v1/track", "positive", False, 202] > 0, summary
        assert statuses["POST /v1/record", "negative", False, 422] > 0, summary
        assert statuses["GET /v1/reports", "positive", False, 200] > 0, summary
        assert not any(status == 401 for *_, status in statuses), summary
    else:
        _assert_deep(statuses, summary)
    assert daemon.stop() == 0, daemon.output()
    assert "Traceback" not in daemon.output()


def _assert_deep(statuses: Statuses, summary: str) -> None:
    """The requests got past the token check into every handler, and the wrong credentials were refused."""
    assert statuses["POST /v1/track", "positive", True, 202] > 0, summary
    assert statuses["POST /v1/track", "negative", True, 422] > 0, summary
    assert statuses["GET /v1/reports", "positive", True, 200] > 0, summary
    assert statuses["POST /v1/record", "negative", True, 422] > 0, summary
    assert statuses["POST /v1/checkpoints", "negative", True, 422] > 0, summary
    assert statuses["GET /v1/reports", "negative", True, 422] > 0, summary
    assert statuses["POST /v1/track", "positive", False, 401] > 0, summary
