"""Middleware: one line wraps an ASGI or WSGI app so every HTTP request calls ``Aggregator.track()``.

Pure ASGI 3 and WSGI (PEP 3333) protocol code, so it serves Starlette/FastAPI and Flask/Django alike
without importing them. The host comes first: nothing here may break a request. A failure of
``identify``, ``outcome`` or ``track()`` is logged once per kind, counted in ``errors``, and the
response goes on untouched.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any, Literal
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from aggregator import logs
from aggregator.runtime import Aggregator

__all__ = ["DENIED_STATUSES", "AggregatorASGI", "AggregatorWSGI", "Identity", "Outcome", "default_outcome"]

log = logs.get_logger("aggregator.middleware")

Outcome = Literal["allowed", "denied"] | None
Identity = tuple[object, object] | None  # (workspace_id, user_id), anything track() accepts; None: not tracked

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Refusals: the service would not serve this caller (authentication, authorization, payment, quota).
DENIED_STATUSES = frozenset({401, 402, 403, 429})
# What the server answers for an app that raised (or returned) before it started a response.
FAILED_STATUS = 500


def default_outcome(status: int) -> Outcome:
    """401, 402, 403 and 429 are denied; every other status is allowed.

    Allowed and denied count what crossed the service's boundary: a request is denied when the service
    refused the caller (not authenticated, not authorized, not paid for, over quota), and allowed when
    it was let in, whatever came of it. A 404, a 422 or a 500 was admitted and used the service; how
    well it went is for experience SLIs (``checkpoint()``), not for usage counts.
    """
    return "denied" if status in DENIED_STATUSES else "allowed"


class _Recorder:
    """identify → outcome → track() for each request whose status is known, every failure contained."""

    def __init__(self, aggregator: Aggregator, identify: Callable[[Any], Identity],
                 outcome: Callable[[int], Outcome]) -> None:
        self._aggregator = aggregator
        self._identify = identify
        self._outcome = outcome
        self._errors: dict[str, int] = {}
        self._lock = threading.Lock()  # WSGI servers call from many threads; errors are rare

    @property
    def errors(self) -> dict[str, int]:
        """Failures so far by kind, ``"<stage>:<ExceptionClass>"`` (stage: identify, outcome, track)."""
        with self._lock:
            return dict(self._errors)

    def record(self, request: Any, status: int) -> None:
        try:
            identity = self._identify(request)
        except Exception as exc:
            self._failed("identify", exc)
            return
        if identity is None:
            return
        try:
            result = self._outcome(status)
        except Exception as exc:
            self._failed("outcome", exc)
            return
        if result is None:
            return
        try:
            workspace_id, user_id = identity
            denied = result == "denied"
            self._aggregator.track(workspace_id, user_id, allowed=int(not denied), denied=int(denied))
        except Exception as exc:  # InvalidInput (a bad id), NotRunning (after stop), a bad identity tuple
            self._failed("track", exc)

    def _failed(self, stage: str, exc: Exception) -> None:
        kind = f"{stage}:{type(exc).__name__}"
        with self._lock:
            seen = self._errors.get(kind, 0)
            self._errors[kind] = seen + 1
        if not seen:  # a bug in identify fails every request: one line says it, the count says how often
            log.warning("middleware_request_not_tracked", kind=kind, error=str(exc),
                        note="logged once per kind; later ones are only counted")


class AggregatorASGI:
    """Wrap an ASGI 3 app: ``app = AggregatorASGI(app, agg, identify)``.

    ``identify(scope)`` names the ``(workspace_id, user_id)`` of an HTTP request, or None to leave it
    untracked (health checks). It runs when the response starts, so the app may leave what it found
    in the scope (``request.state`` in Starlette is ``scope["state"]``). Each request is tracked once,
    when ``http.response.start`` passes (a streaming response counts when it starts); an app that
    raises or returns before starting a response counts as a 500, the server's answer, and its
    exception goes on to the server. ``websocket`` and ``lifespan`` scopes pass through untouched.
    """

    def __init__(self, app: ASGIApp, aggregator: Aggregator, identify: Callable[[Scope], Identity], *,
                 outcome: Callable[[int], Outcome] = default_outcome) -> None:
        self.app = app
        self._recorder = _Recorder(aggregator, identify, outcome)

    @property
    def errors(self) -> dict[str, int]:
        """Requests left untracked by a failure, by kind (see the module docstring)."""
        return self._recorder.errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            if not started and message["type"] == "http.response.start":
                started = True
                self._recorder.record(scope, _asgi_status(message))
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            if not started:
                started = True
                self._recorder.record(scope, FAILED_STATUS)
            raise
        if not started:
            self._recorder.record(scope, FAILED_STATUS)


def _asgi_status(message: Message) -> int:
    status = message.get("status")
    return status if isinstance(status, int) else FAILED_STATUS


class AggregatorWSGI:
    """Wrap a WSGI app: ``application = AggregatorWSGI(application, agg, identify)``.

    ``identify(environ)`` names the ``(workspace_id, user_id)`` of a request, or None to leave it
    untracked. It runs when the app calls ``start_response`` (the status is known then, also for a
    streaming body), so the app may leave what it found in the environ (Flask's ``request.environ``,
    Django's ``request.META``). Each request is tracked once, at the first ``start_response`` call,
    with or without ``exc_info``; an app that raises before calling it counts as a 500. The app's
    iterable is returned as it is (its ``close()`` and a ``wsgi.file_wrapper`` keep working), except
    for an app that returns before calling ``start_response`` (a generator), whose iterable is wrapped
    so that a failure before the response starts still counts; that wrapper forwards ``close()``.
    """

    def __init__(self, app: WSGIApplication, aggregator: Aggregator, identify: Callable[[WSGIEnvironment], Identity],
                 *, outcome: Callable[[int], Outcome] = default_outcome) -> None:
        self.app = app
        self._recorder = _Recorder(aggregator, identify, outcome)

    @property
    def errors(self) -> dict[str, int]:
        """Requests left untracked by a failure, by kind (see the module docstring)."""
        return self._recorder.errors

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        request = _WSGIRequest(self._recorder, environ, start_response)
        try:
            body = self.app(environ, request.start_response)
        except Exception:
            request.failed()
            raise
        if request.started:
            return body
        return _Pending(body, request)


class _WSGIRequest:
    """One request's start_response, tracking at its first call."""

    def __init__(self, recorder: _Recorder, environ: WSGIEnvironment, start_response: StartResponse) -> None:
        self._recorder = recorder
        self._environ = environ
        self._start_response = start_response
        self.started = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if not self.started:
            self.started = True
            self._recorder.record(self._environ, _wsgi_status(status))
        if exc_info is None:
            return self._start_response(status, headers)
        return self._start_response(status, headers, exc_info)

    def failed(self) -> None:
        """The app raised, or its iterable ended, with no response started: the server answers 500."""
        if not self.started:
            self.started = True
            self._recorder.record(self._environ, FAILED_STATUS)


def _wsgi_status(status: object) -> int:
    try:
        return int(str(status)[:3])
    except ValueError:
        return FAILED_STATUS


class _Pending:
    """The iterable of an app that returned before calling start_response, as the server sees it."""

    def __init__(self, body: Iterable[bytes], request: _WSGIRequest) -> None:
        self._body = body
        self._request = request
        self._iterator: Iterator[bytes] | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._body)
        try:
            return next(self._iterator)
        except StopIteration:
            self._request.failed()  # no-op when the response started
            raise
        except Exception:
            self._request.failed()
            raise

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            close()
