"""A Flask service wrapped in AggregatorWSGI, for tests/test_middleware.py (served by gunicorn).

Its routes are those of ``tests.apps.usage_plan``. The Aggregator starts at import (in each worker)
and stops at interpreter exit, as in tests/apps/wsgi_app.py; at exit the middleware's error counts are
written to ``$MIDDLEWARE_APP_ERRORS_DIR/<pid>.json``. Configured by environment variables:
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

from flask import Flask, Response, redirect, request
from flask.typing import ResponseReturnValue

from aggregator import Aggregator
from aggregator.middleware import AggregatorWSGI
from tests.apps import usage_plan
from tests.helpers import GRACE, WINDOW

# The host configures logging: the middleware's once-per-kind warnings show, with the worker's pid.
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s [%(process)d] %(message)s")

agg = Aggregator(database_url=os.environ["MIDDLEWARE_APP_DATABASE_URL"], window=f"{WINDOW}s", grace=f"{GRACE}s",
                 flush_interval="1h", collect=False)
agg.start()

app = Flask(__name__)


@app.get("/ok")
def ok() -> str:
    return "ok"


@app.get("/health")
def health() -> str:
    return "ok"


@app.get("/redirect")
def to_ok() -> ResponseReturnValue:
    return redirect("/ok", code=302)


@app.get("/status/<int:code>")
def status(code: int) -> tuple[str, int]:
    return f"status {code}", code


@app.get("/stream")
def stream() -> Response:
    return Response(iter(usage_plan.CHUNKS), mimetype="text/plain")


@app.get("/stream-boom")
def stream_boom() -> Response:
    def chunks() -> Iterator[bytes]:
        yield usage_plan.CHUNKS[0]
        raise RuntimeError("the stream failed on purpose")

    return Response(chunks(), mimetype="text/plain")


@app.get("/boom")
def boom() -> str:
    raise RuntimeError("the view failed on purpose")


@app.get("/state")
def state() -> str:
    # What an auth decorator does: it finds the user and leaves it for identify (the WSGI environ).
    request.environ[usage_plan.APP_USER_KEY] = uuid.UUID(int=int(request.args["as"]))
    return "ok"


middleware = AggregatorWSGI(app.wsgi_app, agg, usage_plan.wsgi_identify)
app.wsgi_app = middleware  # type: ignore[method-assign]


@atexit.register
def _write_errors() -> None:
    Path(os.environ[usage_plan.ERRORS_DIR_ENV], f"{os.getpid()}.json").write_text(json.dumps(middleware.errors))
