"""A one-file Django service whose WSGI application is wrapped in AggregatorWSGI, for tests/test_middleware.py
(served by gunicorn with threads).

Its routes are those of ``tests.apps.usage_plan``. Settings are configured here (no settings module);
``application`` is what a project's ``wsgi.py`` exposes, wrapped in one line. The Aggregator starts at
import (in each worker) and stops at interpreter exit; at exit the middleware's error counts are written
to ``$MIDDLEWARE_APP_ERRORS_DIR/<pid>.json``. Configured by environment variables:
``MIDDLEWARE_APP_DATABASE_URL`` (required).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings  # type: ignore[import-untyped]

settings.configure(
    DEBUG=False,
    ALLOWED_HOSTS=["*"],
    ROOT_URLCONF=__name__,
    SECRET_KEY="tests-only-not-a-secret-" + "x" * 40,
    MIDDLEWARE=[],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
)

from django.core.wsgi import get_wsgi_application  # type: ignore[import-untyped]  # noqa: E402 - needs the settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, StreamingHttpResponse  # type: ignore[import-untyped]  # noqa: E402
from django.urls import path  # type: ignore[import-untyped]  # noqa: E402

from aggregator import Aggregator  # noqa: E402
from aggregator.middleware import AggregatorWSGI  # noqa: E402
from tests.apps import usage_plan  # noqa: E402
from tests.helpers import GRACE, WINDOW  # noqa: E402

# The host configures logging: the middleware's once-per-kind warnings show, with the worker's pid.
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s [%(process)d] %(message)s")

agg = Aggregator(database_url=os.environ["MIDDLEWARE_APP_DATABASE_URL"], window=f"{WINDOW}s", grace=f"{GRACE}s",
                 flush_interval="1h", collect=False)
agg.start()


def ok(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok")


def to_ok(request: HttpRequest) -> HttpResponse:
    return HttpResponseRedirect("/ok")


def status(request: HttpRequest, code: int) -> HttpResponse:
    return HttpResponse(f"status {code}", status=code)


def stream(request: HttpRequest) -> StreamingHttpResponse:
    return StreamingHttpResponse(iter(usage_plan.CHUNKS), content_type="text/plain")


def stream_boom(request: HttpRequest) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        yield usage_plan.CHUNKS[0]
        raise RuntimeError("the stream failed on purpose")

    return StreamingHttpResponse(chunks(), content_type="text/plain")


def boom(request: HttpRequest) -> HttpResponse:
    raise RuntimeError("the view failed on purpose")


def state(request: HttpRequest) -> HttpResponse:
    # What an authentication middleware does: it finds the user and leaves it for identify
    # (request.META is the WSGI environ).
    request.META[usage_plan.APP_USER_KEY] = uuid.UUID(int=int(request.GET["as"]))
    return HttpResponse("ok")


urlpatterns = [
    path("ok", ok), path("health", ok), path("redirect", to_ok), path("status/<int:code>", status),
    path("stream", stream), path("stream-boom", stream_boom), path("boom", boom), path("state", state),
]

application = AggregatorWSGI(get_wsgi_application(), agg, usage_plan.wsgi_identify)


@atexit.register
def _write_errors() -> None:
    Path(os.environ[usage_plan.ERRORS_DIR_ENV], f"{os.getpid()}.json").write_text(json.dumps(application.errors))
