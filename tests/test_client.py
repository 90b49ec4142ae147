"""The HTTP client for remote services, against a fake daemon: a real HTTP server on 127.0.0.1.

The fake stores checkpoints deduplicated by (correlation_id, checkpoint, checkpoint_category,
client_timestamp) like the real server, so "delivered once" holds even when an ambiguous timeout made
the client send a batch twice. Tests script failures with ``fail``, ``stall`` and ``drop``.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from aggregator import client as client_module
from aggregator import exceptions
from aggregator.client import Client, new_correlation_id

TOKEN = "s3cret-token-value"
REPO = Path(__file__).resolve().parents[1]
Key = tuple[str, str, str | None, str]


class FakeDaemon:
    """The daemon's /v1/checkpoints and /v1/record in a background thread; use as a context manager.

    ``requests`` has (path, parsed body, monotonic arrival time) for every POST whatever became of it;
    ``stored`` maps each checkpoint's dedup key to the checkpoint, in first-arrival order; ``records``
    holds accepted meter records in arrival order; ``completed`` counts POSTs fully handled.
    """

    def __init__(self, *, max_items: int | None = None) -> None:
        self.max_items = max_items  # a batch with more items gets 413, like a body over max_body_bytes
        self.requests: list[tuple[str, dict[str, Any], float]] = []
        self.stored: dict[Key, dict[str, Any]] = {}
        self.records: list[dict[str, Any]] = []
        self.completed = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._script: collections.deque[tuple[str, Any]] = collections.deque()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-daemon", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def fail(self, status: int, *, times: int = 1, retry_after: int | None = None, detail: str = "injected") -> None:
        """Answer the next ``times`` POSTs with ``status`` (and ``Retry-After`` if given), then recover."""
        self._add(("fail", (status, retry_after, detail)), times)

    def stall(self, seconds: float, *, times: int = 1) -> None:
        """Wait ``seconds`` before handling each of the next ``times`` POSTs, which then succeed as usual."""
        self._add(("stall", seconds), times)

    def drop(self, *, times: int = 1) -> None:
        """Close the connection of each of the next ``times`` POSTs without answering."""
        self._add(("drop", None), times)

    def posts(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for where, body, _ in self.requests if where == path]

    def stored_ids(self) -> list[str]:
        with self.lock:
            return [checkpoint["correlation_id"] for checkpoint in self.stored.values()]

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop at once: stalls end, open connections are cut, every handler thread is joined."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._server.shutdown()
        with self.lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # its handler closed it meanwhile
        self._server.server_close()  # joins the handler threads (daemon_threads is off)
        self._thread.join()

    def _add(self, action: tuple[str, Any], times: int) -> None:
        with self.lock:
            self._script.extend([action] * times)

    def _next(self) -> tuple[str, Any] | None:
        with self.lock:
            return self._script.popleft() if self._script else None


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # so server_close() waits for every handler: no thread outlives the test
    block_on_close = True

    def __init__(self, address: tuple[str, int], handler: type[_Handler], daemon: FakeDaemon) -> None:
        self.daemon = daemon
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client that gave up is expected
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx's pool expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.daemon.lock:
            self.server.daemon._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.daemon.lock:
            self.server.daemon._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests assert on what was recorded, not on an access log

    def do_POST(self) -> None:
        daemon = self.server.daemon
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        with daemon.lock:
            daemon.requests.append((self.path, body, time.monotonic()))
        try:
            self._handle(daemon, body)
        finally:
            with daemon.lock:
                daemon.completed += 1

    def _handle(self, daemon: FakeDaemon, body: dict[str, Any]) -> None:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._answer(401, {"detail": "missing or wrong bearer token"})
            return
        action = daemon._next()
        if action is not None and action[0] == "stall":
            daemon.stopping.wait(action[1])
        if daemon.stopping.is_set() or (action is not None and action[0] == "drop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action is not None and action[0] == "fail":
            status, retry_after, detail = action[1]
            self._answer(status, {"detail": detail, "errors": []},
                         {"Retry-After": str(retry_after)} if retry_after is not None else {})
            return
        items = body.get("checkpoints") or body.get("records") or []
        if daemon.max_items is not None and len(items) > daemon.max_items:
            self._answer(413, {"detail": f"{len(items)} items, at most {daemon.max_items}"})
            return
        with daemon.lock:
            if self.path == "/v1/checkpoints":
                for item in items:
                    key = (item["correlation_id"], item["checkpoint"], item.get("checkpoint_category"),
                           item["client_timestamp"])
                    daemon.stored.setdefault(key, item)
            else:
                daemon.records.extend(items)
        self._answer(202, {"accepted": len(items), "server_timestamp": "2026-01-31T12:00:00Z"})

    def _answer(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[FakeDaemon]:
    with FakeDaemon() as daemon:
        yield daemon


@pytest.fixture
def make_client() -> Iterator[Callable[..., Client]]:
    """Clients with test-sized timings, each closed at teardown."""
    made: list[Client] = []

    def make(url: str, **kwargs: Any) -> Client:
        token = kwargs.pop("token", TOKEN)
        options: dict[str, Any] = {"flush_interval": 0.05, "backoff_initial": 0.02, "backoff_max": 0.2,
                                   "timeout": 5.0, "drain_timeout": 5.0} | kwargs
        made.append(Client(url, token, **options))
        return made[-1]

    yield make
    for client in made:
        client.close(timeout=5.0)


def send(client: Client, n: int, **kwargs: Any) -> list[str]:
    """Queue ``n`` start checkpoints with fresh correlation ids; returns the ids in order."""
    ids = [new_correlation_id() for _ in range(n)]
    for correlation_id in ids:
        client.checkpoint(correlation_id, "http_request", "start", type="api", feature_category="search",
                          urgency="high", **kwargs)
    return ids


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def closed_port() -> str:
    """A URL nothing listens on: connections are refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_batches_arrive_whole_and_in_order(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """Checkpoints travel in batches of at most batch_size with the bearer token; each is stored once."""
    client = make_client(server.url, batch_size=200)
    ids = send(client, 450)

    assert client.flush(timeout=10)
    assert ids == server.stored_ids()
    assert all(len(body["checkpoints"]) <= 200 for body in server.posts("/v1/checkpoints"))
    assert len(server.posts("/v1/checkpoints")) >= 3
    first = server.posts("/v1/checkpoints")[0]["checkpoints"][0]
    assert {"correlation_id", "experience_id", "checkpoint", "type", "feature_category", "urgency",
            "client_timestamp"} == set(first)
    assert (client.stats.sent, client.stats.queued, client.stats.retries) == (450, 0, 0)


def test_server_errors_are_retried_in_order(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """Three 500s then recovery: every checkpoint stored once, in the order queued, with retries counted."""
    server.fail(500, times=3)
    client = make_client(server.url, batch_size=50)
    ids = send(client, 120)

    assert client.flush(timeout=10)
    assert ids == server.stored_ids()
    assert client.stats.retries >= 3
    assert (client.stats.sent, client.stats.rejected) == (120, 0)


def test_stall_past_timeout_is_retried_and_stored_once(server: FakeDaemon,
                                                       make_client: Callable[..., Client]) -> None:
    """A request the server finishes after the client gave up is resent; the server's dedup keeps one copy."""
    server.stall(1.5)
    client = make_client(server.url, timeout=0.5)
    ids = send(client, 10)

    assert client.flush(timeout=10)
    assert wait_for(lambda: server.completed >= 2)  # the stalled request has stored its copy too
    assert len(server.posts("/v1/checkpoints")) >= 2
    assert ids == server.stored_ids()
    assert client.stats.retries >= 1


def test_dropped_connection_is_retried(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """A connection closed without an answer is a transport error: the batch is resent."""
    server.drop(times=2)
    client = make_client(server.url)
    ids = send(client, 5)

    assert client.flush(timeout=10)
    assert ids == server.stored_ids()
    assert client.stats.retries >= 2


def test_retry_after_is_honoured(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """A 429 with Retry-After: 1 delays the retry about a second, though our own backoff is far shorter."""
    server.fail(429, retry_after=1)
    client = make_client(server.url, backoff_initial=0.01)
    ids = send(client, 3)

    assert client.flush(timeout=10)
    assert ids == server.stored_ids()
    times = [at for path, _, at in server.requests]
    assert len(times) == 2
    assert times[1] - times[0] >= 0.9


def test_invalid_batch_is_dropped_and_later_batches_go_on(server: FakeDaemon,
                                                          make_client: Callable[..., Client]) -> None:
    """A 422 cannot succeed by retrying: the batch is dropped, counted, logged without the token."""
    server.fail(422, detail="checkpoints[0].urgency: 'meh' is not a configured urgency")
    client = make_client(server.url)
    with capture_logs() as logs:
        send(client, 3)
        assert client.flush(timeout=10)
        later = send(client, 2)
        assert client.flush(timeout=10)

    assert later == server.stored_ids()
    assert (client.stats.rejected, client.stats.sent, client.stats.retries) == (3, 2, 0)
    errors = [entry for entry in logs if entry["log_level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["status"] == 422
    assert "not a configured urgency" in errors[0]["detail"]
    assert TOKEN not in repr(logs)


def test_wrong_token_is_rejected(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """A 401 is not retried: retrying with the same token cannot help."""
    client = make_client(server.url, token="not-the-right-one")
    with capture_logs() as logs:
        send(client, 4)
        assert client.flush(timeout=10)

    assert (client.stats.rejected, client.stats.retries) == (4, 0)
    assert [entry["status"] for entry in logs if entry["log_level"] == "error"] == [401]
    assert "not-the-right-one" not in repr(logs)


def test_too_large_batches_are_split(make_client: Callable[..., Client]) -> None:
    """413 on a batch of several items splits it in halves until each fits; a single item too large is dropped."""
    with FakeDaemon(max_items=3) as server:
        client = make_client(server.url, batch_size=10)
        ids = send(client, 10)
        assert client.flush(timeout=10)
        assert ids == server.stored_ids()
        assert (client.stats.sent, client.stats.rejected) == (10, 0)

        server.fail(413)
        send(client, 1)
        assert client.flush(timeout=10)
        assert (client.stats.sent, client.stats.rejected) == (10, 1)


def test_caller_never_blocks_on_a_stalled_server(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """With the server stalled, 10,000 checkpoint() calls return well under a second in total."""
    server.stall(30, times=100)
    client = make_client(server.url, timeout=30)
    ids = [new_correlation_id() for _ in range(10_000)]

    started = time.perf_counter()
    for correlation_id in ids:
        client.checkpoint(correlation_id, "http_request", "start", type="api", feature_category="search",
                          urgency="high")
    elapsed = time.perf_counter() - started

    assert elapsed < 1.0
    assert client.stats.queued == 10_000
    started = time.monotonic()
    client.close(timeout=0.5)
    assert time.monotonic() - started < 2.0
    assert client.stats.lost == 10_000


def test_full_queue_drops_new_items(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """Past max_queue, new items are dropped and counted with one warning; the queued ones still go."""
    client = make_client(server.url, max_queue=10, batch_size=100, flush_interval=60)
    with capture_logs() as logs:
        ids = send(client, 15)
    assert (client.stats.queued, client.stats.dropped) == (10, 5)
    assert sum("queue full" in entry["event"] for entry in logs) == 1

    client.close(timeout=10)
    assert ids[:10] == server.stored_ids()


def test_close_drains_within_timeout(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """close() sends what is queued before returning, without waiting for flush_interval."""
    client = make_client(server.url, flush_interval=60)
    ids = send(client, 50)
    client.record("api_calls")

    started = time.monotonic()
    client.close(timeout=10)
    assert time.monotonic() - started < 5
    assert ids == server.stored_ids()
    assert len(server.records) == 1
    assert (client.stats.sent, client.stats.lost, client.stats.queued) == (51, 0, 0)


def test_close_with_server_down_returns_in_time(make_client: Callable[..., Client]) -> None:
    """With nothing listening, close() gives up at its timeout and counts what it could not send as lost."""
    client = make_client(closed_port())
    send(client, 7)
    with capture_logs() as logs:
        started = time.monotonic()
        client.close(timeout=0.5)
        elapsed = time.monotonic() - started

    assert 0.4 <= elapsed < 1.5
    assert (client.stats.lost, client.stats.sent, client.stats.queued) == (7, 0, 0)
    assert client.stats.retries >= 1
    assert [entry["lost"] for entry in logs if entry["log_level"] == "error"] == [7]


def test_calls_after_close_raise(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """A closed client refuses new items; closing again is harmless."""
    client = make_client(server.url)
    client.close()
    client.close()
    with pytest.raises(exceptions.NotRunning, match="closed"):
        send(client, 1)
    with pytest.raises(exceptions.NotRunning):
        client.record("api_calls")


def test_context_manager_closes(server: FakeDaemon) -> None:
    """Leaving the `with` block drains the client."""
    with Client(server.url, TOKEN, flush_interval=60) as client:
        ids = send(client, 3)
    assert ids == server.stored_ids()


GOOD: dict[str, Any] = {"correlation_id": "01J0000000000000000000000Z", "experience_id": "http_request",
                        "checkpoint": "end", "type": "api", "feature_category": "search", "urgency": "high"}


@pytest.mark.parametrize(("changes", "error", "field"), [
    ({"correlation_id": "01J000000000000000000000U"}, exceptions.InvalidInput, "correlation_id"),
    ({"correlation_id": "01J0000000000000000000000U"}, exceptions.InvalidInput, "correlation_id"),
    ({"correlation_id": "81J0000000000000000000000Z"}, exceptions.InvalidInput, "correlation_id"),
    ({"correlation_id": 5}, exceptions.InvalidType, "correlation_id"),
    ({"experience_id": "HTTP request"}, exceptions.InvalidInput, "experience_id"),
    ({"experience_id": ""}, exceptions.InvalidInput, "experience_id"),
    ({"checkpoint": "middle"}, exceptions.InvalidInput, "checkpoint"),
    ({"type": "x" * 65}, exceptions.InvalidInput, "type"),
    ({"type": None}, exceptions.InvalidType, "type"),
    ({"feature_category": ""}, exceptions.InvalidInput, "feature_category"),
    ({"urgency": "u" * 33}, exceptions.InvalidInput, "urgency"),
    ({"checkpoint_category": "c" * 65}, exceptions.InvalidInput, "checkpoint_category"),
    ({"client_timestamp": "yesterday"}, exceptions.InvalidInput, "client_timestamp"),
    ({"client_timestamp": "2026-01-31T12:00:00"}, exceptions.InvalidInput, "client_timestamp"),
    ({"client_timestamp": 1_800_000_000}, exceptions.InvalidType, "client_timestamp"),
    ({"outcome": "maybe"}, exceptions.InvalidInput, "outcome"),
    ({"checkpoint": "start", "outcome": "success"}, exceptions.InvalidInput, "outcome"),
    ({"meta": ["a"]}, exceptions.InvalidType, "meta"),
    ({"meta": {"blob": "x" * 4096}}, exceptions.InvalidInput, "meta"),
    ({"meta": {"when": object()}}, exceptions.InvalidType, "meta"),
    ({"meta": {"ratio": float("nan")}}, exceptions.InvalidInput, "meta"),
])
def test_bad_checkpoint_arguments(server: FakeDaemon, make_client: Callable[..., Client], changes: dict[str, Any],
                                  error: type[Exception], field: str) -> None:
    """A bad argument raises in the caller, naming the field, and nothing is queued."""
    client = make_client(server.url)
    arguments = GOOD | changes
    positional = [arguments.pop(name) for name in ("correlation_id", "experience_id", "checkpoint")]
    with pytest.raises(error, match=field):
        client.checkpoint(*positional, **arguments)
    assert client.stats.queued == 0


@pytest.mark.parametrize(("arguments", "error", "field"), [
    ({"meter": ""}, exceptions.InvalidInput, "meter"),
    ({"meter": "m", "value": True}, exceptions.InvalidType, "value"),
    ({"meter": "m", "value": float("inf")}, exceptions.InvalidInput, "value"),
    ({"meter": "m", "dimensions": {"region": 1.5}}, exceptions.InvalidType, "dimensions"),
    ({"meter": "m", "event_id": ""}, exceptions.InvalidInput, "event_id"),
    ({"meter": "m", "time": "now"}, exceptions.InvalidType, "time"),
])
def test_bad_record_arguments(server: FakeDaemon, make_client: Callable[..., Client], arguments: dict[str, Any],
                              error: type[Exception], field: str) -> None:
    """A bad meter record raises in the caller, naming the field, and nothing is queued."""
    client = make_client(server.url)
    with pytest.raises(error, match=field):
        client.record(**arguments)
    assert client.stats.queued == 0


def test_good_checkpoint_fields_are_sent(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """Optional fields travel as given; a lowercase ULID is sent in its canonical uppercase."""
    client = make_client(server.url)
    arguments = GOOD | {"correlation_id": GOOD["correlation_id"].lower(), "checkpoint_category": "db",
                        "outcome": "failure", "meta": {"route": "/search", "é": 1},
                        "client_timestamp": "2026-01-31T12:00:00Z"}
    positional = [arguments.pop(name) for name in ("correlation_id", "experience_id", "checkpoint")]
    client.checkpoint(*positional, **arguments)
    assert client.flush(timeout=10)

    expected = GOOD | {"checkpoint_category": "db", "outcome": "failure", "meta": {"route": "/search", "é": 1},
                       "client_timestamp": "2026-01-31T12:00:00+00:00"}
    assert [expected] == list(server.stored.values())


def test_correlation_ids_are_ulids() -> None:
    """26 Crockford base32 characters, unique, and ordered across milliseconds by their time prefix."""
    before = time.time_ns() // 1_000_000
    first = new_correlation_id()
    time.sleep(0.002)
    second = new_correlation_id()
    many = {new_correlation_id() for _ in range(1000)}

    assert len(first) == 26
    assert set(first + second) <= set(client_module.CROCKFORD)
    assert first < second
    assert len(many) == 1000
    decoded = 0
    for char in first[:10]:
        decoded = decoded * 32 + client_module.CROCKFORD.index(char)
    assert before <= decoded <= before + 1000


def test_records_carry_stable_event_ids(server: FakeDaemon, make_client: Callable[..., Client]) -> None:
    """record() gives each record a UUID4 event id, and a retried batch resends the same ids."""
    server.fail(503)
    client = make_client(server.url)
    client.record("api_calls", dimensions={"region": "eu"})
    client.record("bytes", 12.5, event_id="job-1", time=1_800_000_000)
    assert client.flush(timeout=10)

    first, retried = server.posts("/v1/record")
    assert first == retried
    assert uuid.UUID(first["records"][0]["event_id"]).version == 4
    assert [{"meter": "api_calls", "event_id": first["records"][0]["event_id"], "dimensions": {"region": "eu"}},
            {"meter": "bytes", "value": 12.5, "event_id": "job-1", "time": 1_800_000_000.0}] == server.records


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="os.fork() semantics tested on Linux")
@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_forked_child_sends_its_own_items(server: FakeDaemon, make_client: Callable[..., Client],
                                          tmp_path: Path) -> None:
    """After fork the child starts empty with its own thread; parent and child each deliver their items."""
    client = make_client(server.url, flush_interval=60)
    parent_before = send(client, 2)
    assert client.flush(timeout=10)
    pending = send(client, 3)  # queued in the parent at fork time: the parent's to send, not the child's
    child_file = tmp_path / "child_ids.json"

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if client.stats.queued == 0:
                child_file.write_text(json.dumps(send(client, 4)))
                client.close(timeout=10)
                code = 0 if (client.stats.sent, client.stats.lost) == (4, 0) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    parent_after = send(client, 1)
    assert client.flush(timeout=10)
    child_ids = json.loads(child_file.read_text())
    assert len(server.stored) == 10
    assert set(parent_before + pending + parent_after + child_ids) == set(server.stored_ids())
    assert (client.stats.sent, client.stats.lost) == (6, 0)


def test_exit_drains_an_open_client(server: FakeDaemon) -> None:
    """A process that exits without close() still sends its queue, through the atexit hook."""
    script = (
        "import sys\n"
        "from aggregator.client import Client, new_correlation_id\n"
        f"client = Client(sys.argv[1], {TOKEN!r}, flush_interval=60)\n"
        "for _ in range(5):\n"
        "    client.checkpoint(new_correlation_id(), 'job', 'start', type='worker', feature_category='batch',\n"
        "                      urgency='low')\n"
    )
    subprocess.run([sys.executable, "-c", script, server.url], cwd=REPO, check=True, timeout=60)
    assert len(server.stored) == 5


def test_the_client_checks_names_and_ulids_as_the_server_does() -> None:
    """What the client accepts the server accepts: a name starting with '_' and a ULID starting with 8 are
    refused in the caller (the server would refuse the whole batch)."""
    from aggregator import InvalidInput, experiences

    client = Client("http://127.0.0.1:9")
    fields = {"experience_id": "http_request", "type": "web", "feature_category": "ci", "urgency": "sync_fast"}
    with pytest.raises(InvalidInput, match="starting with a letter or digit"):
        client.checkpoint(new_correlation_id(), **{**fields, "experience_id": "_private"}, checkpoint="start")
    with pytest.raises(InvalidInput, match="is not a ULID"):
        client.checkpoint("8" + new_correlation_id()[1:], **fields, checkpoint="start")
    with pytest.raises(InvalidInput, match="must be a ULID"):
        experiences.validate({**fields, "correlation_id": "8" + new_correlation_id()[1:], "checkpoint": "start",
                              "client_timestamp": "2026-01-01T00:00:00Z"}, experiences.DEFAULT_URGENCIES, 0.0)
    assert client.stats.queued == 0
    client.close(timeout=1)
