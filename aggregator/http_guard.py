"""What an HTTP request must be before a handler reads it: no browser, a local Host, a strict JSON body.

The daemon serves programs, not browsers: a request with an ``Origin`` header is refused, so a web page
cannot make a visitor's browser count usage (a cross-origin ``text/plain`` POST needs no preflight).
Without tokens (allowed only on a loopback address) the ``Host`` must name this host, so a DNS name
rebound to 127.0.0.1 cannot reach the API either. Bodies must be ``application/json`` and are parsed
strictly, in time linear in their size: no duplicate keys, bounded depth, no NaN or Infinity.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from aggregator import metrics, values

# How deep a body may nest: a checkpoint's `meta` sits 3 levels down ({"checkpoints": [{"meta": ...}]})
# and may nest values.MAX_JSON_DEPTH levels itself, as it may in-process.
MAX_DEPTH = values.MAX_JSON_DEPTH + 3
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")

# A JSON string, also an unterminated one (to the end): it always matches at a quote, so the scan is
# linear whatever the body (a pattern that could fail at a quote would retry from every later quote).
_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SQUARE = bytes.maketrans(b"{}", b"[]")
_RUN = b"[" * (MAX_DEPTH + 1)
_PORT = re.compile(r":[0-9]{1,5}")


class BodyError(ValueError):
    """A request body that is not the strict JSON we take; ``loc``, ``message`` and ``type`` say why."""

    def __init__(self, loc: str, message: str, kind: str) -> None:
        super().__init__(f"{loc}: {message}")
        self.loc, self.message, self.kind = loc, message, kind

    def as_error(self) -> dict[str, str]:
        return {"loc": self.loc, "message": self.message, "type": self.kind}


class Guard:
    """ASGI middleware: refuses browser requests (403) and, when ``hosts`` is given, other Host names (421)."""

    def __init__(self, app: ASGIApp, *, hosts: frozenset[str] | None, counters: metrics.Counters) -> None:
        self.app = app
        self.hosts = hosts
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(Headers(scope=scope))
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> JSONResponse | None:
        if "origin" in headers:
            self.counters.rejected["cross_origin"] += 1
            return JSONResponse({"detail": f"a request with an Origin header ({_shown(headers['origin'])}) comes "
                                           "from a browser, and browsers are not served (nor CORS preflights); "
                                           "call the API from a server-side client, without Origin"},
                                status_code=403)
        if self.hosts is not None:
            host = headers.get("host")
            if host is None or _hostname(host) not in self.hosts:
                self.counters.rejected["foreign_host"] += 1
                return JSONResponse({"detail": f"Host {_shown(host)} is not this server: without api_tokens only "
                                               f"{', '.join(sorted(self.hosts))} (with any port) are served; use "
                                               "one of them, or set api_tokens"}, status_code=421)
        return None


def local_hosts(listen_host: str) -> frozenset[str]:
    """The Host names (without port) served when no token is configured: the listen address and localhost."""
    name = listen_host.lower()
    return frozenset({f"[{name}]" if ":" in name else name, *LOCAL_NAMES})


def _hostname(host: str) -> str:
    """``host`` (a Host header) without its port, lower case: ``[::1]:8714`` -> ``[::1]``."""
    host = host.strip().lower()
    end = host.rfind("]") + 1 if host.startswith("[") else host.rfind(":")
    if end > 0 and _PORT.fullmatch(host[end:]):
        return host[:end]
    return host


def content_type_problem(header: str | None) -> str | None:
    """Why ``header`` (a Content-Type) is not JSON in UTF-8; None when it is."""
    media, _, parameters = (header or "").partition(";")
    charset = next((value.strip().strip('"').lower() for name, _, value in
                    (p.partition("=") for p in parameters.split(";")) if name.strip().lower() == "charset"), "utf-8")
    if media.strip().lower() == "application/json" and charset in ("utf-8", "utf8"):
        return None
    given = "no Content-Type" if header is None else f"Content-Type {_shown(header)}"
    return f"{given}: the body must be JSON in UTF-8; send Content-Type: application/json"


def parse(body: bytes) -> Any:
    """``body`` as JSON, strictly: UTF-8, at most MAX_DEPTH levels, each key once per object, no NaN/Infinity.

    Raises BodyError. Linear time: the depth is measured on the raw bytes before parsing (so a body
    nested 100,000 deep never reaches the recursive parser), and the parser's own work is linear.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError("body", f"byte {exc.start} is not UTF-8; send the JSON encoded in UTF-8",
                        "json_invalid") from None
    if _too_deep(body):
        raise BodyError("body", f"arrays and objects nested deeper than {MAX_DEPTH} levels; flatten the body",
                        "json_too_deep")
    repeated: list[str] = []
    try:
        data = json.loads(text, object_pairs_hook=lambda pairs: _object(pairs, repeated),
                          parse_constant=_constant)
    except BodyError:
        raise
    except json.JSONDecodeError as exc:
        raise BodyError("body", f"invalid JSON: {exc}", "json_invalid") from None
    except ValueError as exc:  # an integer of more than 4,300 digits (sys.int_info.default_max_str_digits)
        raise BodyError("body", f"invalid JSON: {exc}; integers are at most 2**63-1", "json_invalid") from None
    if repeated:
        loc, key = _repeated(data)
        raise BodyError(loc, f"the key {_shown(key)} appears more than once in this object; send each key once",
                        "json_duplicate_key")
    return data


def _too_deep(body: bytes) -> bool:
    """Whether ``body``'s arrays and objects nest deeper than MAX_DEPTH (brackets in strings not counted).

    Each pass deletes the innermost pairs (``[]`` after ``{}`` became ``[]``), so after ``removed``
    passes the depth is at most ``removed`` plus the ``[`` left: at most MAX_DEPTH + 1 passes of C code.
    Unbalanced brackets say "too deep" only when json would otherwise have to recurse deeper to see it.
    """
    brackets = _STRING.sub(b"", body).translate(_SQUARE, _NOT_BRACKETS)
    for removed in range(MAX_DEPTH + 1):
        if brackets.count(b"[") + removed <= MAX_DEPTH:
            return False
        if _RUN in brackets:  # MAX_DEPTH + 1 opening brackets in a row: the common attack, found at once
            return True
        if removed == MAX_DEPTH or b"[]" not in brackets:
            break
        brackets = brackets.replace(b"[]", b"")
    # Left: a pair nested deeper than MAX_DEPTH, or unclosed "[" (deep ones), or an unopened "]" first,
    # where json stops before going deeper than the pairs already removed.
    return not brackets.startswith(b"]")


class _Repeated(dict[str, Any]):
    """An object in which ``key`` appeared more than once (the last value kept, as json does)."""

    key: str


def _object(pairs: list[tuple[str, Any]], repeated: list[str]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    marked = _Repeated(out)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            marked.key = key
            break
        seen.add(key)
    repeated.append(marked.key)
    return marked


def _repeated(data: Any) -> tuple[str, str]:
    """Where the first object with a repeated key is (``records[2].dimensions``), and the key; breadth first."""
    queue: list[tuple[Any, str]] = [(data, "")]
    for item, loc in queue:  # grows while iterated: a walk without recursion
        if isinstance(item, _Repeated):
            return loc or "body", item.key
        children: Iterable[tuple[Any, str]] = ()
        if isinstance(item, dict):
            children = ((v, f"{loc}.{k}" if loc else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            children = ((v, f"{loc}[{i}]") for i, v in enumerate(item))
        queue.extend(children)
    return "body", ""  # not reached: the hook marked the object it saw


def _constant(name: str) -> Any:
    raise BodyError("body", f"{name} is not JSON (nor a number we accept); send a finite number", "json_invalid")


def _shown(value: str | None) -> str:
    return "none" if value is None else values.shown(value, 60)


__all__ = ["LOCAL_NAMES", "MAX_DEPTH", "BodyError", "Guard", "content_type_problem", "local_hosts", "parse"]
