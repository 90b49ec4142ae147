"""A tiny WSGI service embedding aggregator, for tests/test_prefork.py (served by gunicorn).

The Aggregator is created and started at import, at module level, as services do: under
``gunicorn --preload`` it starts in the master before the workers are forked; without it, in each
worker. ``GET /track?ws=1&user=2&allowed=1&denied=0`` tracks one call with those ids and answers the
worker's pid; ``GET /ping`` answers ``pong`` and tracks nothing. Configured by environment variables:
``WSGI_APP_DATABASE_URL`` (required), ``WSGI_APP_STOP_TIMEOUT`` and ``WSGI_APP_FLUSH_INTERVAL``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from aggregator import Aggregator
from tests.helpers import GRACE, WINDOW

# A host that configures logging sees aggregator's warnings and errors (stop_timed_out, final_flush_failed).
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s [%(process)d] %(message)s")

agg = Aggregator(database_url=os.environ["WSGI_APP_DATABASE_URL"], window=f"{WINDOW}s", grace=f"{GRACE}s",
                 flush_interval=os.environ.get("WSGI_APP_FLUSH_INTERVAL", "1h"), collect=False,
                 stop_timeout=os.environ.get("WSGI_APP_STOP_TIMEOUT", "5s"))
agg.start()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/track":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        agg.track(uuid.UUID(int=int(query["ws"][0])), uuid.UUID(int=int(query["user"][0])),
                  allowed=int(query.get("allowed", ["1"])[0]), denied=int(query.get("denied", ["0"])[0]))
        body = str(os.getpid()).encode()
    elif path == "/ping":
        body = b"pong"
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
