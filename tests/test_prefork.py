"""Pre-fork servers: gunicorn with and without --preload, and a uWSGI-style os.fork() after start.

Each process ends through normal interpreter exit, where the exit hook stops its Aggregator. Every exit
must be bounded by stop_timeout (plus a margin), print no traceback, and lose nothing: the reports
count exactly the requests sent over all start/stop cycles.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gunicorn  # type: ignore[import-untyped]  # no stubs; only its version is read
import httpx
import pytest

from tests import procs_stop
from tests.faults import free_port
from tests.helpers import reported

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).parent / "gunicorn"
STOP_TIMEOUT = 5.0  # the app's Aggregator stop_timeout
EXIT_MARGIN = 10.0  # seconds past STOP_TIMEOUT after which a stopping master counts as hung
CYCLES = 10  # as the issue asks; ~80 s per mode on 2 CPUs (four workers import aggregator at each boot)
REQUESTS_PER_CYCLE = 200
WORKERS = 4
# gunicorn 25.1+ opens a control socket at one path in $HOME by default: masters running at once would share it.
NO_CONTROL_SOCKET = ["--no-control-socket"] if gunicorn.version_info >= (25, 1) else []


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process and everything in its session (workers, forked children)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def _send(http: httpx.Client, cycle: int, count: int) -> tuple[int, set[str]]:
    """``count`` /track requests with known ids from 8 threads, and a /ping every tenth; returns the
    requests (allowed + denied) tracked and the worker pids that served them."""

    def one(i: int) -> tuple[int, str]:
        ws, user, allowed, denied = procs_stop.requests_of(cycle * count + i)
        response = http.get("/track", params={"ws": ws.int, "user": user.int, "allowed": allowed, "denied": denied})
        assert response.status_code == 200, response.text
        if i % 10 == 0:
            assert http.get("/ping").text == "pong"
        return allowed + denied, response.text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(count)))
    return sum(r for r, _ in results), {pid for _, pid in results}


def _cycle(url: str, preload: bool, cycle: int, log: Path) -> tuple[int, float, int | None, str, int]:
    """One gunicorn start, REQUESTS_PER_CYCLE requests, SIGTERM. Returns the requests sent, the seconds
    the master took to exit (and its exit code, None if it hung and was killed), its output, and how
    many workers served requests."""
    port = free_port()
    command = [str(GUNICORN), "--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS), "--graceful-timeout",
               str(int(STOP_TIMEOUT + 5)), "--timeout", "30", *(["--preload"] if preload else []),
               *NO_CONTROL_SOCKET, "tests.apps.wsgi_app:app"]
    env = {**os.environ, "WSGI_APP_DATABASE_URL": url, "WSGI_APP_STOP_TIMEOUT": f"{STOP_TIMEOUT:g}s"}
    with log.open("w+b") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                deadline = time.monotonic() + 30
                while True:
                    assert process.poll() is None, f"gunicorn exited at start:\n{log.read_text()}"
                    assert time.monotonic() < deadline, f"gunicorn did not serve within 30 s:\n{log.read_text()}"
                    try:
                        if http.get("/ping").text == "pong":
                            break
                    except httpx.TransportError:
                        time.sleep(0.05)
                sent, pids = _send(http, cycle, REQUESTS_PER_CYCLE)
            began = time.monotonic()
            process.send_signal(signal.SIGTERM)
            try:
                code: int | None = process.wait(STOP_TIMEOUT + EXIT_MARGIN)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - began
            deadline = time.monotonic() + 5
            while not _group_gone(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert code is None or _group_gone(process.pid), f"a worker outlived its master:\n{log.read_text()}"
        finally:
            _kill_group(process)
    return sent, took, code, log.read_text(), len(pids)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [True, False], ids=["preload", "no-preload"])
def test_gunicorn_start_stop_cycles_never_hang_print_no_traceback_and_lose_nothing(preload: bool,
                                                                                  sqlite_url: str,
                                                                                  tmp_path: Path) -> None:
    """gunicorn -w 4 (with and without --preload) serving an app that starts an Aggregator at import,
    started and stopped with SIGTERM CYCLES (10) times: each master exits 0 within stop_timeout plus a margin
    (none killed), no output has a traceback, and the reports count exactly every request sent."""
    sent_total, timings, served = 0, [], []
    for cycle in range(CYCLES):
        log = tmp_path / f"gunicorn-{cycle}.log"
        sent, took, code, output, served_by = _cycle(sqlite_url, preload, cycle, log)
        timings.append(took)
        assert code is not None, f"cycle {cycle}: the master hung {took:.1f}s after SIGTERM; killed\n{output}"
        assert code == 0, f"cycle {cycle}: exit code {code}\n{output}"
        assert "Traceback" not in output, f"cycle {cycle}:\n{output}"
        served.append(served_by)
        sent_total += sent
    print(f"\n{'--preload' if preload else 'no preload'}: {CYCLES} cycles, master exit after SIGTERM "
          f"min {min(timings):.2f}s max {max(timings):.2f}s; {sent_total} requests sent; workers serving {served}")
    # Most cycles spread requests over several workers; the kernel may give one worker a whole cycle.
    assert sum(n >= 2 for n in served) >= CYCLES // 2, served
    assert reported(sqlite_url) == sent_total


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_fork_after_start_children_exit_normally_without_hang_traceback_or_loss(backend: str,
                                                                                request: pytest.FixtureRequest,
                                                                                tmp_path: Path) -> None:
    """uWSGI-style: a process starts an Aggregator, tracks, forks 3 children that track and end with
    sys.exit(0), tracks on, waits for them and ends: all exit 0 within stop_timeout plus a margin,
    print no traceback, and every request of the four processes is reported."""
    url = request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[backend])
    calls, children = 1000, 3
    script = (f"from tests.procs_stop import fork_and_exit; fork_and_exit({url!r}, {calls}, {children})")
    log = tmp_path / "fork.log"
    with log.open("w+b") as out:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        began = time.monotonic()
        try:
            try:
                code: int | None = process.wait(30 + STOP_TIMEOUT + EXIT_MARGIN)
            except subprocess.TimeoutExpired:
                code = None
            took = time.monotonic() - began
        finally:
            _kill_group(process)
    output = log.read_text()
    print(f"\nfork ({backend}): exit code {code} after {took:.2f}s")
    assert code is not None, f"hung; killed\n{output}"
    assert code == 0, output
    assert f"children exited {[0] * children}" in output, output
    assert "Traceback" not in output, output
    assert reported(url) == (1 + children) * procs_stop.requests_in(calls)
