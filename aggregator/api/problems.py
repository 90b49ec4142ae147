"""Every refusal the API answers with: the Problem body, the one 422 shape, and the exception handlers.

Routers raise HTTPException (or let NotRunning and StoreError through) and this module renders them. It
must never answer a refusal in another shape, nor list more than MAX_ERRORS entries of `errors`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from aggregator import api_models as models
from aggregator import exceptions, metrics


class Problem(BaseModel):
    """Why a request was refused; on a 422, `errors` lists each bad value (`loc`, `message`, `type`)."""

    detail: str
    errors: list[dict[str, Any]] = []


BROWSERS = "a request with an Origin header: browsers are not served (use a server-side client)"
_FOREIGN_HOST = "the Host header names another server (no api_tokens: only the listen address and localhost)"
MAX_ERRORS = 100  # entries of `errors` in one 422; a batch of 10,000 bad items gets a bounded answer
_DETAILED = 10  # errors named in `detail`
# An in-process message that starts with the item it is about: "records[3]: ..." or "checkpoints[0].urgency=...".
_INDEXED = re.compile(r"(?P<list>records|checkpoints)\[(?P<index>[0-9]+)\](?:\.(?P<field>[a-z_]+))?")


def documented(description: str) -> dict[str, Any]:
    """A refusal as an operation's `responses` entry: a Problem body, and what it means there."""
    return {"model": Problem, "description": description}


@dataclasses.dataclass(frozen=True)
class Refusals:
    """The refusals the OpenAPI document lists, by kind of operation (they differ with and without tokens)."""

    guarded: dict[int | str, dict[str, Any]]  # every operation: the guard's (http_guard)
    pull: dict[int | str, dict[str, Any]]  # a GET of the pull API
    ingest: dict[int | str, dict[str, Any]]  # a POST of a batch

    @classmethod
    def of(cls, *, bearer: bool) -> Refusals:
        guarded: dict[int | str, dict[str, Any]] = {403: documented(BROWSERS)}
        if not bearer:
            guarded[421] = documented(_FOREIGN_HOST)
        pull = guarded | {422: documented("invalid query; `errors` names each bad parameter"),
                          503: documented("shutting down, or the database is unavailable; retry")}
        if bearer:
            pull |= {401: documented("missing or wrong bearer token"),
                     403: documented(f"the token is limited to sending checkpoints; {BROWSERS}")}
        ingest = pull | {
            413: documented("body larger than max_body_bytes"),
            415: documented("Content-Type is not application/json (UTF-8)"),
            422: documented("invalid body: not strict JSON (a repeated key, too deep, NaN), or an invalid "
                            "value; `errors` names each one")}
        return cls(guarded, pull, ingest)


def invalid(counters: metrics.Counters, errors: list[dict[str, Any]]) -> HTTPException:
    """A 422 to raise, listing ``errors``; counted as an invalid request."""
    counters.rejected["invalid"] += 1
    return HTTPException(422, unprocessable(errors))


def unprocessable(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """A 422 body: ``detail`` names the first few bad values, ``errors`` lists each (at most MAX_ERRORS)."""
    errors = [{"type": "value_error", **error} for error in errors]
    shown = [e["message"] if e["message"].startswith(e["loc"]) else f"{e['loc']}: {e['message']}" for e in errors]
    more = f"; and {len(shown) - _DETAILED} more (see errors)" if len(shown) > _DETAILED else ""
    listed = errors[:MAX_ERRORS]
    if len(errors) > MAX_ERRORS:
        listed.append({"loc": "body", "type": "too_many_errors",
                       "message": f"{len(errors) - MAX_ERRORS} more errors not listed; fix these first"})
    return {"detail": "; ".join(shown[:_DETAILED]) + more, "errors": listed}


def refused(exc: exceptions.InvalidInput, name: str) -> dict[str, Any]:
    """An in-process refusal (record_many, checkpoint_many) as an entry of `errors`, at the item it names."""
    text = str(exc)
    out: dict[str, Any] = {"loc": name, "message": text,
                           "type": "invalid_type" if isinstance(exc, exceptions.InvalidType) else "invalid_input"}
    found = _INDEXED.match(text)
    if found is not None and found["list"] == name:
        out |= {"loc": found[0], "index": int(found["index"])}
        if found["field"]:
            out["field"] = found["field"]
    return out


def describe(error: Any) -> dict[str, Any]:
    """A pydantic error as `events[3].user_id: message`, with the index and field separate too."""
    loc = list(error["loc"])
    if loc and loc[0] in ("query", "path", "header"):
        loc = loc[1:]
    text = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
    out: dict[str, Any] = {"loc": text or "body", "message": error["msg"], "type": error["type"]}
    if len(loc) >= 2 and loc[0] in models.BATCHES and isinstance(loc[1], int):
        out["index"] = loc[1]
        if len(loc) >= 3:
            out["field"] = loc[2]
    return out


def install(app: FastAPI, counters: metrics.Counters) -> None:
    """Render every refusal as a Problem: HTTPException, an invalid query, shutting down, no database."""

    @app.exception_handler(HTTPException)
    async def problem(_request: Request, exc: HTTPException) -> JSONResponse:
        content: dict[str, Any] = exc.detail if isinstance(exc.detail, dict) else {"detail": exc.detail}
        if exc.status_code == 422:  # one shape for every 422, whoever raised it
            errors = content.get("errors") or [{"loc": "body", "message": str(content["detail"])}]
            content = {"detail": content["detail"], "errors": [{"type": "value_error", **e} for e in errors]}
        return JSONResponse(content, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_query(_request: Request, exc: RequestValidationError) -> JSONResponse:
        counters.rejected["invalid"] += 1
        return JSONResponse(unprocessable([describe(e) for e in exc.errors()]), status_code=422)

    @app.exception_handler(exceptions.NotRunning)
    async def stopping(_request: Request, _exc: exceptions.NotRunning) -> JSONResponse:
        return JSONResponse({"detail": "shutting down; retry on another replica"}, status_code=503)

    @app.exception_handler(exceptions.StoreError)
    async def unavailable(_request: Request, exc: exceptions.StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable: {exc}; retry later"}, status_code=503)


__all__ = ["BROWSERS", "MAX_ERRORS", "Problem", "Refusals", "describe", "documented", "install", "invalid",
           "refused", "unprocessable"]
