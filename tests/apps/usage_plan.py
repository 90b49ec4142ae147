"""The requests tests/test_middleware.py sends to each framework app, their ground truth, and the apps' identify.

Every app (FastAPI, Flask, Django) serves the same routes: ``/ok`` (200), ``/redirect`` (302),
``/status/<code>``, ``/stream`` (a streamed 200), ``/stream-boom`` (a streamed 200 that fails after its
first chunk), ``/boom`` (the view raises: 500), ``/health`` (never tracked), ``/state`` (the view finds
the user in ``?as=`` and leaves it for identify); anything else is the framework's 404. Requests name
their workspace and user in the ``x-workspace`` and ``x-user`` headers; ``x-identify: raise`` makes
identify raise, and a workspace that is not a number reaches track() as is (InvalidInput).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ERRORS_DIR_ENV = "MIDDLEWARE_APP_ERRORS_DIR"  # each process writes its middleware's errors there at exit
APP_USER_KEY = "aggregator_user"  # where a view leaves the user it found (scope["state"], environ)
CHUNKS = [b"one,", b"two,", b"three"]


@dataclass(frozen=True)
class Call:
    path: str
    status: int  # what the client must get; 0: the connection breaks mid-body
    workspace: int | str | None = None
    user: int | None = None
    identify_raises: bool = False
    tracked: str | None = None  # "allowed", "denied", or None: not tracked

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.workspace is not None:
            headers["x-workspace"] = str(self.workspace)
        if self.user is not None and not self.path.startswith("/state"):
            headers["x-user"] = str(self.user)
        if self.identify_raises:
            headers["x-identify"] = "raise"
        return headers


def plan() -> list[Call]:
    """98 requests: 67 allowed, 22 denied, 9 not tracked (4 health checks, 3 identify failures, 2 bad ids)."""
    calls: list[Call] = []

    def add(n: int, path: str, status: int, tracked: str | None) -> None:
        for _ in range(n):
            i = len(calls)
            calls.append(Call(path, status, workspace=i % 6 + 1, user=i % 17 + 1, tracked=tracked))

    add(30, "/ok", 200, "allowed")
    add(6, "/redirect", 302, "allowed")
    for code in (401, 402, 403, 429):
        add(4 + (code == 429) * 6, f"/status/{code}", code, "denied")
    for code in (400, 422, 503):
        add(3, f"/status/{code}", code, "allowed")
    add(5, "/missing", 404, "allowed")
    add(6, "/stream", 200, "allowed")
    add(3, "/stream-boom", 0, "allowed")  # the status (200) was sent before the view failed
    add(4, "/boom", 500, "allowed")
    for n in range(4):
        calls.append(Call(f"/state?as={n + 100}", 200, workspace=7, user=n + 100, tracked="allowed"))
    for _ in range(4):
        calls.append(Call("/health", 200, workspace=1, user=1))
    for n in range(3):
        calls.append(Call("/ok", 200, workspace=8, user=200 + n, identify_raises=True))
    for n in range(2):
        calls.append(Call("/ok", 200, workspace="not-a-workspace", user=300 + n))
    return calls


def truth(calls: list[Call]) -> tuple[int, int, int, int]:
    """(unique workspaces, unique users, allowed, denied) of what must be tracked."""
    tracked = [c for c in calls if c.tracked]
    return (len({c.workspace for c in tracked}), len({c.user for c in tracked}),
            sum(c.tracked == "allowed" for c in tracked), sum(c.tracked == "denied" for c in tracked))


EXPECTED_ERRORS = {"identify:RuntimeError": 3, "track:InvalidInput": 2}


def identity(path: str, header: Callable[[str], str | None], from_app: object) -> tuple[object, object] | None:
    """The apps' identify: ``header(name)`` reads a request header, ``from_app`` is what the view left."""
    if path == "/health":
        return None
    if header("x-identify") == "raise":
        raise RuntimeError("identify failed on purpose")
    workspace, user = header("x-workspace"), header("x-user")
    if workspace is None:
        return None
    user_id: object = from_app if user is None else uuid.UUID(int=int(user))
    return (uuid.UUID(int=int(workspace)) if workspace.isdigit() else workspace), user_id


def wsgi_identify(environ: dict[str, Any]) -> tuple[object, object] | None:
    """identify for the WSGI apps (Flask, Django): headers are ``HTTP_*`` keys of the environ."""

    def header(name: str) -> str | None:
        value = environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)

    return identity(str(environ.get("PATH_INFO", "")), header, environ.get(APP_USER_KEY))
