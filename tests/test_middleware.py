"""Middleware: FastAPI under uvicorn, Flask and Django under gunicorn, each wrapped in one line, are exact.

Each server gets the requests of ``tests.apps.usage_plan`` (several workspaces and users; allowed,
denied and failed statuses; streamed bodies, one failing midway; a view that raises; health checks
identify skips; an identify that raises; an id track() refuses), and the reports must equal the plan's
ground truth. The protocol's corners (scopes passed through, apps that fail before a response,
``exc_info``, ``close()``, a stopped Aggregator) are checked in-process against a real Aggregator.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import gunicorn  # type: ignore[import-untyped]  # no stubs; only its version is read
import httpx
import pytest
from structlog.testing import capture_logs

from aggregator import Aggregator, Report
from aggregator.middleware import AggregatorASGI, AggregatorWSGI, Message, Outcome, Scope, default_outcome
from tests.apps import usage_plan
from tests.faults import free_port
from tests.helpers import WINDOW, FakeClock, collect_all, far_future_reader, manual
from tests.test_prefork import _kill_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NO_CONTROL_SOCKET = ["--no-control-socket"] if gunicorn.version_info >= (25, 1) else []
SEND_MARGIN = 20.0  # seconds the plan's requests may take; they must land in one report window




def _wait_until_serving(process: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=base_url, timeout=5) as http:
        while True:
            assert process.poll() is None, f"the server exited at start:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not serve within 60 s:\n{log.read_text()}"
            try:
                if http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)


def _in_one_window() -> None:
    """Wait for the next window when this one ends within SEND_MARGIN, so one report holds every request."""
    left = WINDOW - time.time() % WINDOW
    if left < SEND_MARGIN:
        time.sleep(left + 0.2)


def _send(base_url: str, calls: list[usage_plan.Call]) -> list[tuple[usage_plan.Call, int]]:
    """Each call from 8 threads; returns it with the status the client got (0: the connection broke)."""

    def one(http: httpx.Client, call: usage_plan.Call) -> tuple[usage_plan.Call, int]:
        try:
            response = http.get(call.path, headers=call.headers())
        except httpx.TransportError:
            if call.status:
                raise
            return call, 0  # the server broke the connection of a body that failed midway, as it must
        if call.path == "/stream":
            assert response.content == b"".join(usage_plan.CHUNKS)
        return call, response.status_code

    # A connection per request: a server may close a kept-alive one after a failed view while the client
    # already reuses it, which would fail a request the test expects to succeed.
    no_keepalive = httpx.Limits(max_keepalive_connections=0)
    with (httpx.Client(base_url=base_url, timeout=30, limits=no_keepalive) as http,
          concurrent.futures.ThreadPoolExecutor(8) as pool):
        return list(pool.map(lambda call: one(http, call), calls))


def _serve_and_send(command: list[str], url: str, tmp_path: Path) -> tuple[str, list[dict[str, int]]]:
    """Start the server, send the plan, check every status, stop it with SIGTERM; returns its output and the
    middleware's error counts of each process that served."""
    port = free_port()
    errors_dir = tmp_path / "errors"
    errors_dir.mkdir()
    env = {**os.environ, "MIDDLEWARE_APP_DATABASE_URL": url, usage_plan.ERRORS_DIR_ENV: str(errors_dir)}
    log = tmp_path / "server.log"
    calls = usage_plan.plan()
    with log.open("w+b") as out:
        process = subprocess.Popen([c.replace("{port}", str(port)) for c in command], cwd=ROOT, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            base_url = f"http://127.0.0.1:{port}"
            _wait_until_serving(process, base_url, log)
            _in_one_window()
            got = _send(base_url, calls)
            process.send_signal(signal.SIGTERM)
            code = process.wait(30)
        finally:
            _kill_group(process)
    output = log.read_text()
    assert [(call.path, status) for call, status in got] == [(call.path, call.status) for call in calls], output
    # uvicorn re-raises the SIGTERM it handled once its graceful shutdown (lifespan included) is done.
    assert code in (0, -signal.SIGTERM), output
    return output, [json.loads(f.read_text()) for f in sorted(errors_dir.glob("*.json"))]


def _reports(url: str) -> list[Report]:
    with far_future_reader(url) as reader:
        collect_all(reader)
        return [r for r in reader.reports() if r.allowed_requests + r.denied_requests + r.late_allowed_requests]


def _figures(report: Report) -> tuple[int, int, int, int]:
    return report.unique_workspaces, report.unique_users, report.allowed_requests, report.denied_requests


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for kind, n in one.items():
            total[kind] = total.get(kind, 0) + n
    return total


def _warnings_per_process(output: str) -> dict[tuple[str, str], int]:
    """How often each process logged each kind of the middleware's warning."""
    seen: dict[tuple[str, str], int] = {}
    for pid, kind in re.findall(r"aggregator\.middleware \[(\d+)\] middleware_request_not_tracked kind='([^']+)'",
                                output):
        seen[pid, kind] = seen.get((pid, kind), 0) + 1
    return seen


@pytest.mark.slow
def test_fastapi_under_uvicorn_is_exact(sqlite_url: str, tmp_path: Path) -> None:
    """FastAPI wrapped in AggregatorASGI under uvicorn, its Aggregator entered in the lifespan (which passes
    through the middleware): 98 requests give one report of 7 workspaces, 21 users, 67 allowed (2xx, 3xx,
    400, 404, 422, 503, the view's 500, streams, one failing after its first chunk), 22 denied (401, 402,
    403, 429); the 9 others are untracked (4 health checks, 3 identify failures, 2 ids track() refuses),
    every client got its status untouched, the failures are counted by kind, and nothing is logged: the
    host configured no logging."""
    command = [str(BIN / "uvicorn"), "--host", "127.0.0.1", "--port", "{port}", "--lifespan", "on",
               "tests.apps.fastapi_app:application"]
    output, errors = _serve_and_send(command, sqlite_url, tmp_path)
    reports = _reports(sqlite_url)
    assert [_figures(r) for r in reports] == [usage_plan.truth(usage_plan.plan())]
    assert (len(errors), _summed(errors)) == (1, usage_plan.EXPECTED_ERRORS)
    assert "middleware_request_not_tracked" not in output


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_flask_under_gunicorn_with_three_workers_is_exact(backend: str, request: pytest.FixtureRequest,
                                                          tmp_path: Path) -> None:
    """Flask's wsgi_app wrapped in AggregatorWSGI under gunicorn -w 3: the 98 requests spread over three
    worker processes, each with its own Aggregator, give one report equal to the ground truth (7 workspaces,
    21 users, 67 allowed, 22 denied); the failures summed over the workers are exactly the 3 identify
    failures and 2 refused ids, and each worker logged each kind at most once (the app configured logging)."""
    url = request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[backend])
    command = [str(BIN / "gunicorn"), "--bind", "127.0.0.1:{port}", "--workers", "3", *NO_CONTROL_SOCKET,
               "tests.apps.flask_app:app"]
    output, errors = _serve_and_send(command, url, tmp_path)
    reports = _reports(url)
    assert [_figures(r) for r in reports] == [usage_plan.truth(usage_plan.plan())]
    assert (len(errors), _summed(errors)) == (3, usage_plan.EXPECTED_ERRORS)
    warned = _warnings_per_process(output)
    assert {kind for _, kind in warned} == set(usage_plan.EXPECTED_ERRORS), output
    assert set(warned.values()) == {1}, output


@pytest.mark.slow
def test_django_under_gunicorn_with_threads_is_exact(sqlite_url: str, tmp_path: Path) -> None:
    """A one-file Django project whose WSGI application is wrapped in AggregatorWSGI, under gunicorn with 2
    workers of 4 threads: the 98 requests give one report equal to the ground truth (7 workspaces, 21 users,
    67 allowed including Django's own 404 and 500 pages, 22 denied), and the failures summed over the workers
    are exactly the 3 identify failures and 2 refused ids, each logged at most once per worker."""
    command = [str(BIN / "gunicorn"), "--bind", "127.0.0.1:{port}", "--workers", "2", "--threads", "4",
               *NO_CONTROL_SOCKET, "tests.apps.django_app:application"]
    output, errors = _serve_and_send(command, sqlite_url, tmp_path)
    reports = _reports(sqlite_url)
    assert [_figures(r) for r in reports] == [usage_plan.truth(usage_plan.plan())]
    assert (len(errors), _summed(errors)) == (2, usage_plan.EXPECTED_ERRORS)
    warned = _warnings_per_process(output)
    assert {kind for _, kind in warned} == set(usage_plan.EXPECTED_ERRORS), output
    assert set(warned.values()) == {1}, output


# ---- the protocols' corners, in-process ------------------------------------------------------

WS, USER = uuid.UUID(int=1), uuid.UUID(int=2)


def _identify(_: object) -> tuple[object, object]:
    return WS, USER


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def agg(sqlite_url: str, clock: FakeClock) -> Iterator[Aggregator]:
    with manual(sqlite_url, clock) as agg:
        yield agg


def _allowed_denied(agg: Aggregator, clock: FakeClock) -> tuple[int, int]:
    agg.flush()
    clock.past_window(int(clock.t) // WINDOW * WINDOW)
    reports = agg.collect()
    return sum(r.allowed_requests for r in reports), sum(r.denied_requests for r in reports)


def _asgi(app: Any, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def _http_scope(path: str = "/") -> Scope:
    return {"type": "http", "path": path, "headers": [], "method": "GET"}


def _respond(status: int) -> Any:
    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    return app


def test_default_outcome_denies_refusals_and_allows_everything_served_or_failed() -> None:
    """401, 402, 403 and 429 are denied; 2xx, 3xx, every other 4xx and 5xx are allowed."""
    statuses = [200, 204, 301, 304, 400, 401, 402, 403, 404, 409, 422, 429, 451, 500, 502, 503]
    assert {s: default_outcome(s) for s in statuses} == {
        **{s: "allowed" for s in statuses}, 401: "denied", 402: "denied", 403: "denied", 429: "denied"}


def test_asgi_passes_websocket_and_lifespan_scopes_through_untouched(agg: Aggregator, clock: FakeClock) -> None:
    """A websocket or lifespan scope reaches the app with the very scope, receive and send objects, identify is
    never called, and nothing is tracked."""
    reached: list[tuple[object, object, object]] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        reached.append((scope, receive, send))

    def identify(scope: Scope) -> tuple[object, object]:
        raise AssertionError("identify called for a non-http scope")

    middleware = AggregatorASGI(app, agg, identify)
    for kind in ("websocket", "lifespan"):
        scope: Scope = {"type": kind}

        async def receive() -> Message:
            return {}

        async def send(message: Message) -> None:
            pass

        asyncio.run(middleware(scope, receive, send))
        assert reached[-1] == (scope, receive, send)
        assert reached[-1][0] is scope and reached[-1][1] is receive and reached[-1][2] is send
    assert (_allowed_denied(agg, clock), middleware.errors) == ((0, 0), {})


def test_asgi_app_failing_before_its_response_counts_as_a_500_and_its_error_goes_on(agg: Aggregator,
                                                                                    clock: FakeClock) -> None:
    """An app that raises before http.response.start is tracked once as a 500 (allowed by default, denied
    under an outcome that says so) and the exception reaches the server; one that returns without starting
    a response counts as a 500 too; one that raises after starting is tracked once, by its status."""

    async def raises(scope: Scope, receive: Any, send: Any) -> None:
        raise RuntimeError("before the response")

    async def returns(scope: Scope, receive: Any, send: Any) -> None:
        return None

    async def raises_late(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 403, "headers": []})
        raise RuntimeError("after the response started")

    def failures_denied(status: int) -> Outcome:
        return "denied" if status >= 500 else default_outcome(status)

    with pytest.raises(RuntimeError, match="before the response"):
        _asgi(AggregatorASGI(raises, agg, _identify), _http_scope())
    with pytest.raises(RuntimeError, match="before the response"):
        _asgi(AggregatorASGI(raises, agg, _identify, outcome=failures_denied), _http_scope())
    assert _asgi(AggregatorASGI(returns, agg, _identify), _http_scope()) == []
    with pytest.raises(RuntimeError, match="after the response started"):
        _asgi(AggregatorASGI(raises_late, agg, _identify), _http_scope())
    assert _allowed_denied(agg, clock) == (2, 2)


def test_an_outcome_override_decides_and_none_leaves_a_request_untracked(agg: Aggregator, clock: FakeClock) -> None:
    """outcome(status) overrides the mapping: here 404 is not tracked and 409 is denied."""

    def outcome(status: int) -> Outcome:
        return {404: None, 409: "denied"}.get(status, "allowed")

    for status in (200, 404, 409, 409):
        _asgi(AggregatorASGI(_respond(status), agg, _identify, outcome=outcome), _http_scope())
    assert _allowed_denied(agg, clock) == (1, 2)


def test_a_stopped_aggregator_or_a_failing_identify_never_breaks_a_request(sqlite_url: str) -> None:
    """track() raising NotRunning (the Aggregator was stopped) and identify raising leave every response
    untouched; each kind is logged once, with the exception's class, and counted every time."""
    agg = manual(sqlite_url, FakeClock()).start()
    agg.stop()
    calls = 0

    def flaky(scope: Scope) -> tuple[object, object]:
        nonlocal calls
        calls += 1
        if scope["path"] == "/bad":
            raise KeyError("no such header")
        return WS, USER

    middleware = AggregatorASGI(_respond(200), agg, flaky)
    with capture_logs() as logs:
        bodies = [_asgi(middleware, _http_scope(path)) for path in ["/", "/bad", "/", "/bad", "/"]]
    assert [[m.get("status", m.get("body")) for m in sent] for sent in bodies] == [[200, b"x"]] * 5
    assert middleware.errors == {"track:NotRunning": 3, "identify:KeyError": 2}
    assert sorted(e["kind"] for e in logs if e["event"] == "middleware_request_not_tracked") == [
        "identify:KeyError", "track:NotRunning"]


def _wsgi(app: Any, path: str = "/") -> tuple[list[tuple[str, Any]], bytes, Iterable[bytes]]:
    """Call a WSGI app as a server does: the start_response calls it made, the body, and its iterable."""
    calls: list[tuple[str, Any]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        calls.append((status, exc_info))
        return lambda data: None

    result = app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    return calls, body, result


class _Body:
    """A response body with close(), as frameworks return."""

    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"body"

    def close(self) -> None:
        self.closed = True


def test_wsgi_returns_the_apps_iterable_itself_and_close_reaches_it(agg: Aggregator, clock: FakeClock) -> None:
    """When the app called start_response before returning, the server gets the app's very iterable (its
    close() and a wsgi.file_wrapper keep working); a generator app's iterable is wrapped and close() still
    reaches it. Both are tracked once."""
    body = _Body()

    def plain(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return body

    closed: list[bool] = []

    def generator(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        start_response("429 Too Many Requests", [])
        try:
            yield b"slow down"
        finally:
            closed.append(True)

    calls, data, result = _wsgi(AggregatorWSGI(plain, agg, _identify))
    assert (calls, data, result is body, body.closed) == ([("200 OK", None)], b"body", True, True)
    middleware = AggregatorWSGI(generator, agg, _identify)

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        return None

    unstarted = middleware({"PATH_INFO": "/"}, start_response)
    assert next(iter(unstarted)) == b"slow down"
    unstarted.close()  # type: ignore[attr-defined]  # the server closes it mid-body (a client went away)
    assert closed == [True]
    assert _allowed_denied(agg, clock) == (1, 1)


def test_wsgi_tracks_once_at_the_first_start_response_with_or_without_exc_info(agg: Aggregator,
                                                                              clock: FakeClock) -> None:
    """An app that starts a 403, then replaces it by a 500 with exc_info before the body, is tracked once, as
    its first status (denied); an app whose first call carries exc_info (an error page) is tracked by it;
    the server sees every call as the app made it."""

    def replaces(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("403 Forbidden", [])
        try:
            raise ValueError("rendering failed")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error"]

    def error_page(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            raise ValueError("view failed")
        except ValueError:
            start_response("500 Internal Server Error", [], sys.exc_info())
        return [b"error"]

    calls, _, _ = _wsgi(AggregatorWSGI(replaces, agg, _identify))
    assert [(status, exc_info is not None) for status, exc_info in calls] == [
        ("403 Forbidden", False), ("500 Internal Server Error", True)]
    calls, _, _ = _wsgi(AggregatorWSGI(error_page, agg, _identify))
    assert [(status, exc_info is not None) for status, exc_info in calls] == [("500 Internal Server Error", True)]
    assert _allowed_denied(agg, clock) == (1, 1)


def test_wsgi_app_failing_before_start_response_counts_as_a_500_and_its_error_goes_on(agg: Aggregator,
                                                                                      clock: FakeClock) -> None:
    """An app raising in its call, and a generator app raising at its first step, both before start_response,
    are each tracked once as a 500 (allowed by default) and the exception reaches the server; close() of the
    failed generator still runs."""

    def raises(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise RuntimeError("in the call")

    def generator(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        raise RuntimeError("at the first step")
        yield b""

    with pytest.raises(RuntimeError, match="in the call"):
        _wsgi(AggregatorWSGI(raises, agg, _identify))
    with pytest.raises(RuntimeError, match="at the first step"):
        _wsgi(AggregatorWSGI(generator, agg, _identify))
    assert _allowed_denied(agg, clock) == (2, 0)


def test_identify_sees_what_the_app_left_in_the_environ(agg: Aggregator, clock: FakeClock) -> None:
    """identify runs when the response starts, after the app has authenticated: a user the app put in the
    environ is the one tracked; a request it left unnamed (None) is not tracked."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/signed-in":
            environ["app.user"] = USER
        start_response("200 OK", [])
        return [b"ok"]

    def identify(environ: dict[str, Any]) -> tuple[object, object] | None:
        user = environ.get("app.user")
        return None if user is None else (WS, user)

    middleware = AggregatorWSGI(app, agg, identify)
    for path in ("/signed-in", "/anonymous", "/signed-in"):
        _wsgi(middleware, path)
    assert (_allowed_denied(agg, clock), middleware.errors) == ((2, 0), {})


async def test_fastapi_add_middleware_form_tracks_as_the_wrapping_form(agg: Aggregator, clock: FakeClock) -> None:
    """``api.add_middleware(AggregatorASGI, agg, identify)`` (inside Starlette's error middleware, so a view's
    exception passes through it before any response) tracks the same: 200 and the failed view allowed, 403
    denied."""
    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse

    api = FastAPI()

    @api.get("/ok")
    async def ok() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @api.get("/forbidden")
    async def forbidden() -> PlainTextResponse:
        return PlainTextResponse("no", status_code=403)

    @api.get("/boom")
    async def boom() -> PlainTextResponse:
        raise RuntimeError("the view failed on purpose")

    api.add_middleware(AggregatorASGI, agg, _identify)
    transport = httpx.ASGITransport(api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        statuses = [(await http.get(path)).status_code for path in ("/ok", "/forbidden", "/boom")]
    assert statuses == [200, 403, 500]
    assert await asyncio.to_thread(_allowed_denied, agg, clock) == (2, 1)
