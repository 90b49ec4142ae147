"""A stop that never loses and never hangs: a second signal during the final flush, and loss at exit.

Real processes and signals, on SQLite and PostgreSQL. The final flush is made to wait by a ``Brake``:
on SQLite another connection holds the write lock (``BEGIN IMMEDIATE``), on PostgreSQL a TcpProxy holds
each round trip. A database gone at stop is one of three outages: SQLite locked by another process past
stop_timeout, PostgreSQL refusing connections (down), PostgreSQL not answering (a network black hole).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import httpx
import pytest
import sqlalchemy as sa

from aggregator import Aggregator
from tests import procs_stop
from tests.faults import TcpProxy, wait_for
from tests.helpers import GRACE, WINDOW, reported
from tests.test_daemon import AUTH, TOKEN, Daemon

SPAWN = multiprocessing.get_context("spawn")
IGNORED = "signal_ignored_during_stop"
BRAKE_SECONDS = 3.0  # how long the final flush is held after the first SIGTERM
STOP_MARGIN = 10.0  # seconds past shutdown_timeout after which a stopping daemon counts as hung


class Brake:
    """What makes the database slow or unreachable for a process under test, from outside that process.

    ``url`` is what the process under test is given. ``engage()`` makes its writes wait (SQLite: another
    connection holds the write lock; PostgreSQL: every round trip through the proxy waits BRAKE_SECONDS),
    ``cut()`` makes the database unreachable as ``outage`` says ("locked": SQLite's write lock held past
    any stop_timeout; "refused": PostgreSQL connections reset and refused; "hung": PostgreSQL round trips
    held for an hour), ``release()`` undoes any of them.
    """

    def __init__(self, database_url: str, outage: str = "") -> None:
        self.database_url = database_url
        self.outage = outage
        parsed = sa.make_url(database_url)
        self.sqlite_path = parsed.database if parsed.get_backend_name() == "sqlite" else None
        self.proxy = None if self.sqlite_path else TcpProxy.to(database_url)
        self.url = self.proxy.url_for(database_url) if self.proxy else database_url
        self._lock: sqlite3.Connection | None = None

    def engage(self) -> None:
        if self.proxy is not None:
            self.proxy.delay = BRAKE_SECONDS
        else:
            self._hold_write_lock()

    def cut(self) -> None:
        if self.outage == "refused":
            assert self.proxy is not None
            self.proxy.refuse = True
            self.proxy.cut_all()
        elif self.outage == "hung":
            assert self.proxy is not None
            self.proxy.delay = 3600.0
        else:
            assert self.outage == "locked" and self.sqlite_path is not None, self.outage
            self._hold_write_lock()

    def release(self) -> None:
        if self.proxy is not None:
            held = self.proxy.delay > BRAKE_SECONDS
            self.proxy.delay, self.proxy.refuse = 0.0, False
            if held:
                self.proxy.cut_all()  # round trips asleep for an hour would never end
        elif self._lock is not None:
            self._lock.rollback()
            self._lock.close()
            self._lock = None

    def _hold_write_lock(self) -> None:
        assert self.sqlite_path is not None
        self._lock = sqlite3.connect(self.sqlite_path, timeout=10, isolation_level=None)
        self._lock.execute("BEGIN IMMEDIATE")

    def __enter__(self) -> Brake:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
        if self.proxy is not None:
            self.proxy.close()


@pytest.fixture(params=["sqlite-locked", "postgresql-refused", "postgresql-hung"])
def outage(request: pytest.FixtureRequest) -> tuple[str, str]:
    """A fresh database and the way it will be gone at stop: (url, "locked" | "refused" | "hung")."""
    backend, kind = request.param.split("-")
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url"}[backend]), kind


def _wait_or_kill(process: subprocess.Popen[bytes], seconds: float) -> int | None:
    """The exit code of ``process`` within ``seconds``, or None after killing it (it hung)."""
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        return None


def _lines_with(output: str, event: str) -> list[str]:
    return [line for line in output.splitlines() if event in line]


def _is_error(line: str) -> bool:
    """Whether a log line is at error level: JSON (`"level": "error"`), console (`[error`), or stdlib (`ERROR`)."""
    return bool(re.search(r'"level": "error"|\[error\b|^ERROR\b', line))


def _events_lost(line: str) -> int:
    """The ``events_lost`` figure of a log line, in any rendering (JSON, key=value, console)."""
    found = re.search(r"events_lost\W{0,4}(\d+)", line)
    assert found, f"no events_lost in {line!r}"
    return int(found.group(1))


def _post_events(daemon: Daemon, posts: int, per_post: int) -> int:
    """POST ``posts`` batches of known events to the daemon; returns the requests they carry."""
    accepted = 0
    with httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10) as http:
        for p in range(posts):
            counts = [(1 + i % 2, i % 3 % 2) for i in range(p * per_post, (p + 1) * per_post)]
            events = [{"workspace_id": str(uuid.UUID(int=1 + i % 5)), "user_id": str(uuid.UUID(int=100 + i % 89)),
                       "allowed": allowed, "denied": denied} for i, (allowed, denied) in enumerate(counts)]
            response = http.post("/v1/track", json={"events": events})
            assert response.status_code == 202, response.text
            accepted += sum(allowed + denied for allowed, denied in counts)
    return accepted


def _daemon(tmp_path: Path, url: str, *args: str) -> Daemon:
    """`aggregator run` that flushes and collects only when stopped (intervals of an hour)."""
    daemon = Daemon(tmp_path, "--database-url", url, "--window", f"{WINDOW}s", "--grace", f"{GRACE}s",
                    "--flush-interval", "1h", "--collect-interval", "1h", *args, env={"AGGREGATOR_API_TOKENS": TOKEN})
    daemon.wait_for("READY=1")
    return daemon


def _signal_twice_while_braked(pid: int, alive: Callable[[], bool], brake: Brake) -> bool:
    """SIGTERM, then 0.5 s later SIGTERM and SIGINT while the final flush waits; release the brake after
    BRAKE_SECONDS. Returns whether the process was still alive (the flush still waiting) just before."""
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.5)
    assert alive(), "the process ended before the second signal: the final flush did not wait"
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.1)
    os.kill(pid, signal.SIGINT)
    time.sleep(BRAKE_SECONDS - 0.6 - 0.1)
    still_flushing = bool(alive())
    brake.release()
    return still_flushing


# ---- a: a second SIGTERM during the final flush of an embedding process ------------------------------


def test_second_sigterm_during_the_final_flush_is_logged_and_loses_nothing(database_url: str,
                                                                           tmp_path: Path) -> None:
    """A process tracking from two threads (nothing flushed before the stop) gets SIGTERM; while its final
    flush waits on the database it gets SIGTERM and SIGINT again: both are logged as ignored, the flush
    completes, and every counted request is reported."""
    counter = SPAWN.Value("q", 0)
    log = tmp_path / "child.log"
    with Brake(database_url) as brake:
        child = SPAWN.Process(target=procs_stop.track_until_signalled_logged, args=(brake.url, counter, str(log)))
        child.start()
        try:
            wait_for(lambda: counter.value >= 50_000 or not child.is_alive(), timeout=60)
            assert child.is_alive(), log.read_text()
            brake.engage()
            began = time.monotonic()
            assert child.pid is not None
            still_flushing = _signal_twice_while_braked(child.pid, child.is_alive, brake)
            child.join(40)
            took = time.monotonic() - began
            assert not child.is_alive(), f"the child did not exit within 40 s of SIGTERM\n{log.read_text()}"
        finally:
            if child.is_alive():
                child.kill()
                child.join(10)
    output = log.read_text()
    print(f"\nexit code {child.exitcode} {took:.2f}s after the first SIGTERM; {counter.value} requests counted")
    assert still_flushing, output
    assert child.exitcode == 128 + signal.SIGTERM, output  # the first SIGTERM's SystemExit(143)
    assert len(_lines_with(output, IGNORED)) == 2, output  # the second SIGTERM and the SIGINT
    assert "Traceback" not in output
    assert reported(database_url) == counter.value


# ---- b: the same for the daemon -----------------------------------------------------------------------


def test_daemon_second_sigterm_during_the_final_flush_is_logged_and_loses_nothing(database_url: str,
                                                                                  tmp_path: Path) -> None:
    """`aggregator run` gets SIGTERM; while its final flush waits on the database it gets SIGTERM and
    SIGINT again: it logs the ignored signals, exits 0, and every accepted request is reported."""
    with Brake(database_url) as brake:
        daemon = _daemon(tmp_path, brake.url)
        try:
            accepted = _post_events(daemon, posts=20, per_post=500)
            brake.engage()
            began = time.monotonic()
            still_flushing = _signal_twice_while_braked(daemon.process.pid, lambda: daemon.process.poll() is None,
                                                        brake)
            code = daemon.process.wait(40)
            took = time.monotonic() - began
            output = daemon.output()
        finally:
            daemon.close()
    print(f"\nexit code {code} {took:.2f}s after the first SIGTERM; {accepted} requests accepted")
    assert still_flushing, output
    assert code == 0, output
    assert "Traceback" not in output
    assert reported(database_url) == accepted
    assert len(_lines_with(output, IGNORED)) == 2, output


# ---- c: loss at exit is logged with its count, and the exit code says so ------------------------------


def _unwritable_spool_dir(tmp_path: Path) -> Path:
    """A spool directory that cannot be created, even by root: its parent is a regular file."""
    blocker = tmp_path / "a-regular-file"
    blocker.write_text("")
    return blocker / "spool"


def _cut_then_sigterm(brake: Brake, tmp_path: Path, spool_dir: Path, shutdown_timeout: float, posts: int,
                      per_post: int) -> tuple[int, int | None, float, str]:
    """A daemon through ``brake`` accepts events, the brake cuts the database, SIGTERM: returns (requests
    accepted, exit code or None if it had to be killed, seconds from SIGTERM to exit, its output)."""
    daemon = _daemon(tmp_path, brake.url, "--spool-dir", str(spool_dir), "--shutdown-timeout",
                     f"{shutdown_timeout:g}s")
    try:
        accepted = _post_events(daemon, posts=posts, per_post=per_post)
        brake.cut()
        began = time.monotonic()
        daemon.process.send_signal(signal.SIGTERM)
        code = _wait_or_kill(daemon.process, shutdown_timeout + STOP_MARGIN)
        return accepted, code, time.monotonic() - began, daemon.output()
    finally:
        daemon.close()


def test_daemon_loss_at_exit_is_logged_with_its_count_and_exits_non_zero(outage: tuple[str, str],
                                                                          tmp_path: Path) -> None:
    """The database is gone at stop and the spool directory cannot be written: `aggregator run` exits
    non-zero within shutdown_timeout (plus a margin), and logs `final_flush_failed` as an error with
    `events_lost` equal to the events it accepted."""
    database_url, kind = outage
    posts, per_post, shutdown_timeout = 3, 411, 3.0
    with Brake(database_url, kind) as brake:
        _, code, took, output = _cut_then_sigterm(brake, tmp_path, _unwritable_spool_dir(tmp_path), shutdown_timeout,
                                                  posts, per_post)
    print(f"\nexit code {code} {took:.2f}s after SIGTERM")
    assert code is not None, f"hung: no exit within {shutdown_timeout + STOP_MARGIN:g}s of SIGTERM; killed\n{output}"
    failed = _lines_with(output, "final_flush_failed")
    assert code != 0, output
    assert len(failed) == 1, output
    assert _is_error(failed[0]), failed[0]
    assert _events_lost(failed[0]) == posts * per_post
    assert "Traceback" not in output


def _track_then_stop(brake: Brake, spool_dir: Path, calls: int, log: Path) -> tuple[str, str, float]:
    """A child tracks ``calls`` known calls, the brake cuts the database, the child stops (stop_timeout 2 s)."""
    ready, go, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    child = SPAWN.Process(target=procs_stop.track_then_stop,
                          args=(brake.url, str(spool_dir), calls, "2s", ready, go, out, str(log)))
    child.start()
    try:
        assert ready.wait(60), log.read_text()
        brake.cut()
        go.set()
        outcome: tuple[str, str, float] = out.get(timeout=40)
        child.join(20)
        assert child.exitcode == 0, log.read_text()
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
    return outcome


def test_embedded_loss_at_stop_raises_naming_the_count(outage: tuple[str, str], tmp_path: Path) -> None:
    """Embedded, the database gone at stop and the spool unwritable: stop() raises StoreUnavailable naming
    how many events were lost, within stop_timeout (2 s, plus a second), and `final_flush_failed` logs
    that count."""
    database_url, kind = outage
    calls, log = 1237, tmp_path / "child.log"
    with Brake(database_url, kind) as brake:
        outcome, message, took = _track_then_stop(brake, _unwritable_spool_dir(tmp_path), calls, log)
    output = log.read_text()
    print(f"\nstop(): {outcome} after {took:.2f}s: {message}")
    assert outcome == "StoreUnavailable", output
    assert str(calls) in message
    failed = _lines_with(output, "final_flush_failed")
    assert len(failed) == 1, output
    assert _is_error(failed[0]), failed[0]
    assert _events_lost(failed[0]) == calls
    assert took < 2 + 1, output


# ---- d: unreachable at stop, spool writable: spooled, then replayed by the next start ----------------


def _replay(url: str, spool_dir: Path) -> None:
    """Start an Aggregator on ``spool_dir`` with the database back; return once it has replayed every spool."""
    replayer = Aggregator(database_url=url, window=f"{WINDOW}s", grace=f"{GRACE}s", flush_interval="1h",
                          collect=False, spool_dir=str(spool_dir), handle_sigterm=False)
    with replayer:
        wait_for(lambda: not list(spool_dir.rglob("*.spool")), timeout=30)


def test_unreachable_database_at_stop_is_spooled_and_replayed_by_the_next_start(outage: tuple[str, str],
                                                                               tmp_path: Path) -> None:
    """The database is unreachable at stop and the spool directory writable: stop() returns within
    stop_timeout (2 s, plus a second) without error, and an Aggregator started later with the same spool
    directory, the database back, replays it: the reports count every request tracked."""
    database_url, kind = outage
    calls, log, spool_dir = 1237, tmp_path / "child.log", tmp_path / "spool"
    with Brake(database_url, kind) as brake:
        outcome, message, took = _track_then_stop(brake, spool_dir, calls, log)
        output = log.read_text()
        print(f"\nstop(): {outcome} after {took:.2f}s {message}")
        assert (outcome, message) == ("stopped", ""), output
        assert _lines_with(output, "final_flush_spooled") and not _lines_with(output, "final_flush_failed"), output
        assert list(spool_dir.rglob("*.spool")), "nothing was spooled"
        brake.release()
        _replay(brake.url, spool_dir)
    assert took < 2 + 1, output
    assert reported(database_url) == procs_stop.requests_in(calls)


def test_daemon_unreachable_database_at_stop_is_spooled_and_replayed(outage: tuple[str, str],
                                                                     tmp_path: Path) -> None:
    """`aggregator run` with the database unreachable at stop and a writable spool directory: it exits 0
    within shutdown_timeout (plus a margin), logging `final_flush_spooled`; the next start with the same
    spool directory replays it and the reports count every accepted request."""
    database_url, kind = outage
    spool_dir, shutdown_timeout = tmp_path / "spool", 3.0
    with Brake(database_url, kind) as brake:
        accepted, code, took, output = _cut_then_sigterm(brake, tmp_path, spool_dir, shutdown_timeout, 3, 411)
        print(f"\nexit code {code} {took:.2f}s after SIGTERM")
        assert code is not None, f"hung: no exit within {shutdown_timeout + STOP_MARGIN:g}s of SIGTERM\n{output}"
        assert code == 0, output
        assert _lines_with(output, "final_flush_spooled") and not _lines_with(output, "final_flush_failed"), output
        assert "Traceback" not in output
        brake.release()
        _replay(brake.url, spool_dir)
    assert reported(database_url) == accepted


# ---- e: a host's flush() still waiting when the stop calls it off -----------------------------------


def test_a_flush_called_off_by_stop_raises_store_unavailable_and_its_events_are_spooled(sqlite_url: str,
                                                                                       tmp_path: Path) -> None:
    """Another process holds SQLite's write lock; a host thread's flush() waits on it when stop() (stop_timeout
    2 s) comes: the flush is called off with StoreUnavailable (our exception, not a CancelledError), stop()
    returns within its bound, and the events are spooled, then replayed by the next start."""
    import threading

    from aggregator import StoreUnavailable

    spool_dir = tmp_path / "spool"
    agg = Aggregator(database_url=sqlite_url, window=f"{WINDOW}s", grace=f"{GRACE}s", flush_interval="1h",
                     collect=False, stop_timeout="2s", spool_dir=str(spool_dir), handle_sigterm=False).start()
    for n in range(100):
        agg.track(uuid.UUID(int=1), uuid.UUID(int=1000 + n))
    holder = sqlite3.connect(sa.make_url(sqlite_url).database or "", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    outcome: list[BaseException | None] = []

    def flush() -> None:
        try:
            agg.flush()
            outcome.append(None)
        except BaseException as exc:  # the assertion below names what it was
            outcome.append(exc)

    flusher = threading.Thread(target=flush)
    flusher.start()
    time.sleep(0.5)  # the flush is waiting on the lock
    began = time.monotonic()
    agg.stop()
    took = time.monotonic() - began
    flusher.join(5)
    holder.rollback()
    holder.close()
    assert len(outcome) == 1 and isinstance(outcome[0], StoreUnavailable), outcome
    assert took < 2 + 1
    assert list(spool_dir.rglob("*.spool"))
    _replay(sqlite_url, spool_dir)
    assert reported(sqlite_url) == 100
