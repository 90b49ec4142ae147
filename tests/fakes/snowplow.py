"""A fake Snowplow collector: a real HTTP server on 127.0.0.1 that checks every event it receives.

Stricter than a real collector (which accepts anything it can read and validates later, in enrichment):
each POST to tp2 is checked against Snowplow's payload_data and unstruct_event schemas (copied into
``tests/iglu``) and against the inner event's own schema shipped with aggregator; a request with any invalid
event is answered 400 and recorded in ``invalid``. Tests script failures with ``fail``, ``stall``
and ``drop``, which apply to the next tp2 POSTs in the order they were scripted.
"""

from __future__ import annotations

import base64
import binascii
import collections
import json
import os
import re
import socket
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import jsonschema

from aggregator import iglu

TP2_PATH = "/com.snowplowanalytics.snowplow/tp2"
PAYLOAD_DATA = "iglu:com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4"
UNSTRUCT_EVENT = "iglu:com.snowplowanalytics.snowplow/unstruct_event/jsonschema/1-0-0"
IGLU_ENV = "AGGREGATOR_IGLU_DIR"
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
# Inside the repository, so that a fresh clone with nothing beside it runs the whole suite.
IGLU_DIR = Path(__file__).resolve().parents[1] / "iglu"


def iglu_dir() -> Path:
    """The reference Iglu schemas: ``$AGGREGATOR_IGLU_DIR`` if set, else ``tests/iglu``."""
    path = Path(os.environ.get(IGLU_ENV) or IGLU_DIR)
    if not path.is_dir():
        raise FileNotFoundError(
            f"the reference Iglu schemas are not at {path}; set {IGLU_ENV} to the directory holding "
            "com.snowplowanalytics.snowplow/payload_data/jsonschema/1-0-4")
    return path


def _load(directory: Path, uri: str) -> jsonschema.Draft4Validator:
    schema = json.loads(directory.joinpath(*uri.removeprefix("iglu:").split("/")).read_text(encoding="utf-8"))
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


def _errors(validator: jsonschema.Draft4Validator, instance: object, where: str) -> list[str]:
    return [f"{where} at {error.json_path}: {error.message}" for error in validator.iter_errors(instance)]


class FakeCollector:
    """A Snowplow collector in a background thread; use as a context manager.

    ``good`` holds each accepted event's fields plus ``schema`` and ``data`` (the inner self-describing
    event); ``invalid`` holds one error string per problem found in a refused request; ``requests``
    counts tp2 POSTs, whatever became of them; ``request_headers`` and ``body_sizes`` have one entry each.
    """

    def __init__(self, *, max_body_bytes: int = 2_000_000) -> None:
        directory = iglu_dir()
        self._payload = _load(directory, PAYLOAD_DATA)
        self._unstruct = _load(directory, UNSTRUCT_EVENT)
        self.max_body_bytes = max_body_bytes  # like a real collector: larger bodies get 413
        self.good: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        self.requests = 0
        self.request_headers: list[dict[str, str]] = []
        self.body_sizes: list[int] = []
        self._script: collections.deque[tuple[str, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:PORT``: what a writer's ``collector`` option takes."""
        if self._server is None:
            raise RuntimeError("the fake collector is not started; use it in a `with` block")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail(self, status: int, *, times: int = 1, body: str = "injected failure",
             retry_after: int | None = None) -> None:
        """Answer the next ``times`` tp2 POSTs with ``status`` (and ``Retry-After`` if given), then recover."""
        self._add(("fail", (status, body, retry_after)), times)

    def stall(self, seconds: float, *, times: int = 1) -> None:
        """Wait ``seconds`` before handling each of the next ``times`` POSTs (which are then handled as usual)."""
        self._add(("stall", seconds), times)

    def drop(self, *, times: int = 1) -> None:
        """Close the connection of each of the next ``times`` POSTs without answering."""
        self._add(("drop", None), times)

    def good_ids(self) -> list[str]:
        """The ``eid`` of every accepted event, in arrival order (a retried event may appear twice)."""
        with self._lock:
            return [event["eid"] for event in self.good]

    def __enter__(self) -> FakeCollector:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-snowplow-collector", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop at once: stalls end, idle keep-alive connections are cut, every handler thread is joined."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the handler closed it meanwhile
        server.server_close()  # joins the handler threads (daemon_threads is off)
        if self._thread is not None:
            self._thread.join()

    def _add(self, action: tuple[str, Any], times: int) -> None:
        with self._lock:
            self._script.extend([action] * times)

    def _next(self) -> tuple[str, Any] | None:
        with self._lock:
            return self._script.popleft() if self._script else None

    def _check(self, body: bytes) -> tuple[list[dict[str, Any]], list[str]]:
        """The events in a tp2 body, and the problems found (no events are accepted if there is any)."""
        try:
            payload = json.loads(body)
        except ValueError as exc:
            return [], [f"body is not JSON: {exc}"]
        if not isinstance(payload, dict) or payload.get("schema") != PAYLOAD_DATA or set(payload) != {"schema", "data"}:
            return [], [f"body is not a self-describing {PAYLOAD_DATA} payload"]
        problems = _errors(self._payload, payload["data"], "payload")
        if problems:
            return [], problems
        events: list[dict[str, Any]] = []
        for number, event in enumerate(payload["data"]):
            found = self._check_event(event, f"event {number}")
            if isinstance(found, list):
                problems.extend(found)
            else:
                events.append(found)
        return events, problems

    def _check_event(self, event: dict[str, Any], where: str) -> dict[str, Any] | list[str]:
        if any(not isinstance(value, str) for value in event.values()):
            return [f"{where}: every value must be a string"]
        if event.get("e") != "ue":
            return [f"{where}: e={event.get('e')!r}, expected 'ue'"]
        if ("ue_pr" in event) == ("ue_px" in event):
            return [f"{where}: needs exactly one of ue_pr and ue_px"]
        try:
            uuid.UUID(event.get("eid", ""))
        except ValueError:
            return [f"{where}: eid={event.get('eid')!r} is not a UUID"]
        for key in ("dtm", "stm"):
            if key in event and not (event[key].isascii() and event[key].isdigit()):
                return [f"{where}: {key}={event[key]!r} is not milliseconds since the epoch"]
        try:
            if "ue_px" in event:
                text = event["ue_px"]
                if not _BASE64URL.fullmatch(text):
                    # b64decode would silently skip such characters and hide a wrong alphabet.
                    return [f"{where}: ue_px has characters outside URL-safe base64"]
                wrapper = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            else:
                wrapper = json.loads(event["ue_pr"])
        except (ValueError, binascii.Error) as exc:
            return [f"{where}: ue_pr/ue_px does not decode to JSON: {exc}"]
        if not isinstance(wrapper, dict) or wrapper.get("schema") != UNSTRUCT_EVENT:
            return [f"{where}: ue is not a self-describing {UNSTRUCT_EVENT}"]
        problems = _errors(self._unstruct, wrapper.get("data"), f"{where} unstruct_event")
        if problems:
            return problems
        inner = wrapper["data"]
        try:
            schema = iglu.load(inner["schema"])
        except (OSError, ValueError) as exc:
            return [f"{where}: schema {inner['schema']} is not shipped with aggregator: {exc}"]
        validator = jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())
        problems = _errors(validator, inner["data"], f"{where} {inner['schema']}")
        return problems or {**event, "schema": inner["schema"], "data": inner["data"]}


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() waits for every handler: no thread outlives the test
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], collector: FakeCollector) -> None:
        self.collector = collector
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout) or a connection cut at stop() is expected, not a test failure.
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real collector and httpx's pool expect
    server: _Server

    def setup(self) -> None:
        super().setup()
        collector = self.server.collector
        with collector._lock:
            collector._connections.add(self.connection)
            if collector._stopping.is_set():
                # Accepted just as stop() began: cut it now, or it would wait for a request that never comes.
                self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self.server.collector._lock:
            self.server.collector._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests assert on the recorded requests, not on an access log

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, "ok")
        else:
            self._answer(404, "not found")

    def do_POST(self) -> None:
        collector = self.server.collector
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != TP2_PATH:
            self._answer(404, "not found")
            return
        with collector._lock:
            collector.requests += 1
            collector.request_headers.append(dict(self.headers.items()))
            collector.body_sizes.append(len(body))
        action = collector._next()
        if action is not None and action[0] == "stall":
            collector._stopping.wait(action[1])
        if collector._stopping.is_set() or (action is not None and action[0] == "drop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action is not None and action[0] == "fail":
            status, text, retry_after = action[1]
            self._answer(status, text, {"Retry-After": str(retry_after)} if retry_after is not None else {})
            return
        if len(body) > collector.max_body_bytes:
            self._answer(413, "payload too large")
            return
        events, problems = collector._check(body)
        with collector._lock:
            if problems:
                collector.invalid.extend(problems)
            else:
                collector.good.extend(events)
        if problems:
            self._answer(400, "; ".join(problems))
        else:
            self._answer(200, "ok")

    def _answer(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)
