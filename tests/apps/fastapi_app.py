"""A FastAPI service wrapped in AggregatorASGI, for tests/test_middleware.py (served by uvicorn).

Its routes are those of ``tests.apps.usage_plan``. The Aggregator runs on uvicorn's loop, entered and
left in the lifespan, which reaches the app through the middleware; at shutdown the middleware's error
counts are written to ``$MIDDLEWARE_APP_ERRORS_DIR/<pid>.json``. Configured by environment variables:
``MIDDLEWARE_APP_DATABASE_URL`` (required).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse, StreamingResponse

from aggregator import Aggregator
from aggregator.middleware import AggregatorASGI, Scope
from tests.apps import usage_plan
from tests.helpers import GRACE, WINDOW

agg = Aggregator(database_url=os.environ["MIDDLEWARE_APP_DATABASE_URL"], window=f"{WINDOW}s", grace=f"{GRACE}s",
                 flush_interval="1h", collect=False)


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    async with agg:
        yield
    Path(os.environ[usage_plan.ERRORS_DIR_ENV], f"{os.getpid()}.json").write_text(json.dumps(application.errors))


api = FastAPI(lifespan=lifespan)


@api.get("/ok")
async def ok() -> PlainTextResponse:
    return PlainTextResponse("ok")


@api.get("/health")
async def health() -> PlainTextResponse:
    return PlainTextResponse("ok")


@api.get("/redirect")
async def redirect() -> RedirectResponse:
    return RedirectResponse("/ok", status_code=302)


@api.get("/status/{code}")
async def status(code: int) -> Response:
    return PlainTextResponse(f"status {code}", status_code=code)


@api.get("/stream")
async def stream() -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for chunk in usage_plan.CHUNKS:
            yield chunk

    return StreamingResponse(chunks(), media_type="text/plain")


@api.get("/stream-boom")
async def stream_boom() -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        yield usage_plan.CHUNKS[0]
        raise RuntimeError("the stream failed on purpose")

    return StreamingResponse(chunks(), media_type="text/plain")


@api.get("/boom")
async def boom() -> Response:
    raise RuntimeError("the view failed on purpose")


@api.get("/state")
async def state(request: Request) -> PlainTextResponse:
    # What an auth dependency does: it finds the user and leaves it for identify (scope["state"]).
    setattr(request.state, usage_plan.APP_USER_KEY, uuid.UUID(int=int(request.query_params["as"])))
    return PlainTextResponse("ok")


def identify(scope: Scope) -> tuple[object, object] | None:
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    return usage_plan.identity(scope["path"], headers.get, scope.get("state", {}).get(usage_plan.APP_USER_KEY))


application = AggregatorASGI(api, agg, identify)
