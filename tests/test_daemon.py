"""`aggregator run` as operators run it: the installed CLI in a subprocess, on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from aggregator import Aggregator
from tests.helpers import total_requests

TOKEN = "daemon-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """A running `aggregator run` with a fake systemd notify socket."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.notify_path = tmp_path / f"notify-{uuid.uuid4().hex[:8]}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.settimeout(0.2)
        self.messages: list[str] = []
        script = Path(sys.executable).parent / "aggregator"
        self.log = (tmp_path / f"daemon-{self.port}.log").open("w+")
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("AGGREGATOR_", "NOTIFY_", "WATCHDOG_"))}
        self.process = subprocess.Popen(
            [str(script), "run", "--listen", f"127.0.0.1:{self.port}", *args],
            env=clean | {"NOTIFY_SOCKET": str(self.notify_path), "AGGREGATOR_LOG_FORMAT": "json"} | (env or {}),
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    def wait_for(self, message: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(message in m for m in self.messages):
                return
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except TimeoutError:
                assert self.process.poll() is None, f"daemon exited early:\n{self.output()}"
        raise AssertionError(f"no {message} from the daemon within {timeout}s; got {self.messages}\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        self.drain()
        return code

    def drain(self) -> None:
        try:
            while True:
                self.messages.append(self.notify.recv(4096).decode())
        except (TimeoutError, OSError):
            pass

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.notify.close()
        self.log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


def test_run_serves_pulls_and_stops_on_sigterm_without_loss(database_url: str, tmp_path: Path,
                                                            daemons: list[Daemon]) -> None:
    """READY, ingest across live windows, pull with a cursor, SIGTERM: every accepted request is reported."""
    daemon = Daemon(tmp_path, "--database-url", database_url, "--window", "2s", "--flush-interval", "0.3s",
                    "--grace", "1s", env={"AGGREGATOR_API_TOKENS": TOKEN})
    daemons.append(daemon)
    daemon.wait_for("READY=1")
    assert any("STATUS=serving on 127.0.0.1:" in m for m in daemon.messages)
    accepted = 0
    pulled: list[dict] = []
    cursor = "0"
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as http:
        deadline = time.monotonic() + 7
        batch = 0
        while time.monotonic() < deadline:
            events = [{"workspace_id": str(uuid.UUID(int=1 + i % 4)), "user_id": str(uuid.UUID(int=50 + i % 37)),
                       "allowed": 1 + i % 2, "denied": i % 3} for i in range(batch, batch + 200)]
            response = http.post("/v1/track", json={"events": events})
            assert response.status_code == 202, response.text
            accepted += sum(e["allowed"] + e["denied"] for e in events)
            batch += 200
            page = http.get("/v1/reports", params={"after": cursor}).json()
            pulled += page["reports"]
            cursor = page["next_cursor"]
            time.sleep(0.05)
        assert http.get("/healthz").status_code == 200
        assert "aggregator_events_accepted_total" in http.get("/metrics").text
    assert len(pulled) >= 2, "windows should have closed live while the daemon served"
    assert [r["id"] for r in pulled] == sorted({r["id"] for r in pulled})
    assert daemon.stop() == 0, daemon.output()
    assert any("STOPPING=1" in m for m in daemon.messages)
    logged = [json.loads(line) for line in daemon.output().splitlines() if line.startswith("{")]
    events = {entry["event"] for entry in logged}
    assert {"configuration", "serving", "flush", "collect", "stopping", "stopped"} <= events
    assert TOKEN not in daemon.output()
    reader = Aggregator(database_url=database_url, window="2s", grace="1s", flush_interval="1h",
                        collect_interval="1h", clock=lambda: time.time() + 60, handle_sigterm=False)
    with reader:
        reader.collect()
        assert total_requests(reader.reports()) == accepted


def test_run_starts_on_the_embedded_default_with_no_config(tmp_path: Path, daemons: list[Daemon]) -> None:
    """No database URL, no file: the SQLite file goes to the state directory."""
    state = tmp_path / "state"
    daemon = Daemon(tmp_path, env={"STATE_DIRECTORY": str(state)})
    daemons.append(daemon)
    daemon.wait_for("READY=1")
    response = httpx.post(f"{daemon.url}/v1/track", json={"events": [
        {"workspace_id": str(uuid.UUID(int=1)), "user_id": str(uuid.UUID(int=2))}]})
    assert response.status_code == 202
    assert daemon.stop(signal.SIGINT) == 0, daemon.output()
    assert (state / "aggregator.db").is_file()


def test_bad_configuration_exits_2_naming_the_key(tmp_path: Path) -> None:
    config_file = tmp_path / "aggregator.toml"
    config_file.write_text('window = "7m"\nflush_interval = "1s"\n')
    script = Path(sys.executable).parent / "aggregator"
    result = subprocess.run([str(script), "run", "--config", str(config_file)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "window='7m' must be a whole number of seconds that divides a day" in result.stderr
    assert f"(set by file {config_file})" in result.stderr
    config_file.write_text("windw = '1m'\n")
    result = subprocess.run([str(script), "config", "check", "--config", str(config_file)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "unknown key(s) windw" in result.stderr


def test_config_check_masks_secrets_and_names_sources(tmp_path: Path) -> None:
    config_file = tmp_path / "aggregator.toml"
    config_file.write_text('[aggregator]\nwindow = "1h"\napi_tokens = ["file-token-0123456789abcdef"]\n')
    script = Path(sys.executable).parent / "aggregator"
    result = subprocess.run(
        [str(script), "config", "check", "--config", str(config_file), "--flush-interval", "30s"],
        capture_output=True, text=True, timeout=30,
        env={**os.environ, "AGGREGATOR_DATABASE_URL": "postgresql://svc:s3cret-pw@db.internal/usage"})
    assert result.returncode == 0, result.stderr
    lines = {line.split("=")[0].strip(): line for line in result.stdout.splitlines()}
    assert "svc:***@db.internal" in lines["database_url"] and "env AGGREGATOR_DATABASE_URL" in lines["database_url"]
    assert "<1 tokens>" in lines["api_tokens"] and f"file {config_file}" in lines["api_tokens"]
    assert "3600s" in lines["window"] and "30s" in lines["flush_interval"] and "flag --flush-interval" in (
        lines["flush_interval"])
    assert "s3cret" not in result.stdout and "file-token" not in result.stdout


def test_readme_documents_every_configuration_key() -> None:
    """Each option's key, environment variable and flag appear in the README's table."""
    from aggregator import options

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [o.key for o in options.OPTIONS if f"| `{o.key}` | `{o.env}` | `{o.flag}` |" not in readme]
    assert missing == []


def test_run_delivers_reports_to_jsonl_and_snowplow_with_pseudonyms(tmp_path: Path, daemons: list[Daemon]) -> None:
    """The daemon configured from a TOML file with two writers: every report reaches both, once each,
    with generated_by hashed under the key from the environment; the key never appears in the logs."""
    from tests.fakes.snowplow import FakeCollector

    key = "pseudonym-key-0123456789abcdef"
    config_file = tmp_path / "aggregator.toml"
    with FakeCollector() as collector:
        config_file.write_text(
            '[aggregator]\nwindow = "1s"\nflush_interval = "0.2s"\ngrace = "0.5s"\noutbox_poll_interval = "0.2s"\n'
            f'[writers.jsonl]\ndirectory = "{tmp_path / "out"}"\n'
            f'[writers.snowplow]\ncollector = "{collector.url}"\nbatch_size = 5\n')
        daemon = Daemon(tmp_path, "--config", str(config_file), "--database-url", f"sqlite:///{tmp_path / 'a.db'}",
                        env={"AGGREGATOR_PSEUDONYM_KEY": key})
        daemons.append(daemon)
        daemon.wait_for("READY=1")
        with httpx.Client(base_url=daemon.url, timeout=10) as http:
            for i in range(15):
                response = http.post("/v1/track", json={"events": [
                    {"workspace_id": str(uuid.UUID(int=1)), "user_id": str(uuid.UUID(int=2 + i))}]})
                assert response.status_code == 202
                time.sleep(0.2)
            # On a loaded machine the collector may lag the traffic: wait for two reports (not a timing bet).
            deadline = time.monotonic() + 60
            while len(http.get("/v1/reports").json()["reports"]) < 2:
                assert time.monotonic() < deadline, "fewer than two reports after 60 s"
                time.sleep(0.2)
        assert daemon.stop() == 0, daemon.output()
        files = sorted((tmp_path / "out").glob("*.jsonl"))
        lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        reader = Aggregator(database_url=f"sqlite:///{tmp_path / 'a.db'}", window="1s", handle_sigterm=False)
        reports = reader.reports()
        assert len(reports) >= 2
        assert sorted(line["data"]["id"] for line in lines) == [r.id for r in reports]
        assert sorted(e["data"]["id"] for e in collector.good) == [r.id for r in reports]
        assert collector.invalid == []
        assert {line["data"]["generated_by"] for line in lines} <= {e["data"]["generated_by"] for e in collector.good}
        assert all(len(line["data"]["generated_by"]) == 64 for line in lines)
        assert key not in daemon.output()


def test_the_client_delivers_each_checkpoint_once_across_a_server_outage(tmp_path: Path, daemons: list[Daemon]) -> None:
    """aggregator.client sends while the daemon is down (connection refused, retried with backoff), then up;
    checkpoints sent twice count once: every journey is stored once, and the caller never waited."""
    import asyncio

    from aggregator import store
    from aggregator.client import Client, new_correlation_id

    port = free_port()
    url = f"sqlite:///{tmp_path / 'c.db'}"
    journeys = [new_correlation_id() for _ in range(25)]
    fields = {"experience_id": "http_request", "type": "web", "feature_category": "ci", "urgency": "sync_slow"}
    with Client(f"http://127.0.0.1:{port}", TOKEN, flush_interval=0.1, backoff_initial=0.1,
                backoff_max=0.5) as client:
        began = time.monotonic()
        for journey in journeys:
            stamp = dt.datetime.now(dt.timezone.utc)
            for _ in range(2):  # a service that retries on its own: the same checkpoints twice
                client.checkpoint(journey, checkpoint="start", client_timestamp=stamp, **fields)
                client.checkpoint(journey, checkpoint="end", client_timestamp=stamp + dt.timedelta(seconds=1),
                                  **fields)
        assert time.monotonic() - began < 1.0
        time.sleep(1.0)  # nothing listens yet: the client retries
        assert client.stats.retries >= 1 and client.stats.sent == 0
        daemon = Daemon(tmp_path, "--database-url", url, "--flush-interval", "0.2s", port=port,
                        env={"AGGREGATOR_API_TOKENS": TOKEN})
        daemons.append(daemon)
        daemon.wait_for("READY=1")
        assert client.flush(timeout=30)
        assert (client.stats.sent, client.stats.lost, client.stats.rejected) == (100, 0, 0)
    assert daemon.stop() == 0, daemon.output()

    async def stored() -> list[dict]:
        db = store.Store(url)
        try:
            return [await db.experience(j) for j in journeys]
        finally:
            await db.close()

    rows = asyncio.run(stored())
    assert [r["status"] if r else None for r in rows] == ["succeeded"] * 25
    assert all(r["ended_at"] - r["started_at"] == 1.0 for r in rows if r)
