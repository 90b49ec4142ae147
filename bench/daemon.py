"""Row 7: `aggregator run` ingesting batched events over HTTP from two client processes.

The daemon is the installed console script, run as a real process on a temporary SQLite file; the
clients are spawned processes posting pre-serialized bodies of 1,000 events with httpx keep-alive.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path

import httpx

from bench import figures
from bench.figures import Check, Figure, Result
from bench.workload import SEED, Env, draw_pairs

EVENTS_PER_BODY = 1_000
BODIES_PER_CLIENT = 8
FLUSH_INTERVAL = "1s"
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 120.0


def ingest(env: Env) -> Result:
    sizes = env.sizes
    result = Result("daemon_ingest", "daemon ingest over HTTP, batched")
    with tempfile.TemporaryDirectory(prefix="aggregator-bench-daemon-") as tmp:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        log = Path(tmp) / "daemon.log"
        daemon = _start_daemon(Path(tmp), port, log)
        try:
            _wait_healthy(base, daemon, log)
            events, elapsed = _drive(base, sizes.daemon_clients, sizes.daemon_seconds)
        finally:
            code = _stop(daemon)
        if code != 0:
            raise RuntimeError(f"aggregator run exited {code} after SIGTERM, expected 0; log: {_tail(log)}")
    rate = events / elapsed
    result.ours = Figure([rate], "events/s")
    result.checks = [Check(target=">= 50,000 events/s", passed=figures.at_least(rate, 50_000.0))]
    cores = len(os.sched_getaffinity(0))
    result.notes = [
        f"{sizes.daemon_clients} client processes share this machine's {cores} cores with the server, so the "
        "clients' own CPU (JSON bodies are pre-serialized) is taken from the daemon",
        f"each POST /v1/track carries {EVENTS_PER_BODY:,} events; 202 asserted for every request; events/s = "
        f"events accepted / wall time of the slowest client ({sizes.daemon_seconds:g} s of sending, 1 run)",
        f"daemon: `aggregator run` on a temporary SQLite file with --flush-interval {FLUSH_INTERVAL} (the default "
        "60s would flush nothing during the run, leaving the database work out); SIGTERM, exit 0 checked",
    ]
    result.params = {"clients": sizes.daemon_clients, "seconds": sizes.daemon_seconds,
                     "events_per_request": EVENTS_PER_BODY, "events": events, "elapsed_s": elapsed,
                     "flush_interval": FLUSH_INTERVAL}
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_daemon(tmp: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    # No inherited AGGREGATOR_* setting (tokens especially: loopback needs none); an empty config file
    # so that /etc/aggregator/aggregator.toml, if this machine has one, is not read either.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGGREGATOR_")}
    env["STATE_DIRECTORY"] = str(tmp)
    config = tmp / "aggregator.toml"
    config.write_text("")
    command = [str(Path(sys.executable).parent / "aggregator"), "run", "--config", str(config),
               "--database-url", f"sqlite:///{tmp / 'aggregator.db'}", "--listen", f"127.0.0.1:{port}",
               "--log-level", "warning", "--flush-interval", FLUSH_INTERVAL]
    with log.open("wb") as out:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wait_healthy(base: str, daemon: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"aggregator run exited {daemon.returncode} at start; log: {_tail(log)}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"aggregator run did not answer /healthz within {STARTUP_TIMEOUT:g}s; log: {_tail(log)}")


def _stop(daemon: subprocess.Popen[bytes]) -> int:
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        return daemon.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        daemon.kill()
        daemon.wait()
        raise RuntimeError(f"aggregator run did not stop within {STOP_TIMEOUT:g}s of SIGTERM") from None


def _drive(base: str, clients: int, seconds: float) -> tuple[int, float]:
    """Run the clients together; returns events accepted and the slowest client's wall time."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients + 1)
    pipes = []
    workers = []
    for index in range(clients):
        receive, send = context.Pipe(duplex=False)
        worker = context.Process(target=_client, args=(send, barrier, base, _bodies(index), seconds),
                                 name=f"bench-client-{index}")
        worker.start()
        send.close()
        pipes.append(receive)
        workers.append(worker)
    try:
        try:
            barrier.wait(timeout=STARTUP_TIMEOUT)  # every client connected and warmed up
        except threading.BrokenBarrierError:
            pass  # a client failed before the start: its answer says why
        answers = [pipe.recv() for pipe in pipes]
    finally:
        for worker in workers:
            worker.join(timeout=30)
    failures = [a for a in answers if isinstance(a, str)]
    if failures:
        raise RuntimeError(f"HTTP client failed: {failures[0]}")
    return sum(a[0] for a in answers), max(a[1] for a in answers)


def _bodies(client: int) -> list[bytes]:
    pairs = draw_pairs(EVENTS_PER_BODY * BODIES_PER_CLIENT, seed=SEED + 100 + client)
    random.Random(client).shuffle(pairs)
    return [
        json.dumps({"events": [{"workspace_id": str(w), "user_id": str(u)}
                               for w, u in pairs[i:i + EVENTS_PER_BODY]]}).encode()
        for i in range(0, len(pairs), EVENTS_PER_BODY)
    ]


def _client(send: Connection, barrier: Barrier, base: str, bodies: list[bytes], seconds: float) -> None:
    """In a client process: one warm-up POST, wait for the others, then POST until ``seconds`` pass."""
    try:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
            _post(client, bodies[0])
            barrier.wait()
            sent = 0
            began = time.perf_counter()
            while time.perf_counter() - began < seconds:
                _post(client, bodies[sent % len(bodies)])
                sent += 1
            events = sent * EVENTS_PER_BODY
            send.send((events, time.perf_counter() - began))
    except BaseException as exc:
        barrier.abort()
        send.send(f"{type(exc).__name__}: {exc}")
    finally:
        send.close()


def _post(client: httpx.Client, body: bytes) -> None:
    response = client.post("/v1/track", content=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/track answered {response.status_code}: {response.text[:200]}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
