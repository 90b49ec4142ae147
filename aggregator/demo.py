"""`aggregator demo`: several replica processes, live windows, each report checked against the truth.

Every replica process tracks synthetic traffic drawn from one shared pool of workspaces and users (so
the same user shows up on several replicas) and keeps its own ground truth per window. The parent
merges the truths, waits for each window's report, and prints the two side by side; while windows fill
it shows its progress (live on a terminal, a plain line every few seconds elsewhere). The database is
kept afterwards, so that its reports can be charted (`aggregator reports --chart`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import queue
import random
import shlex
import shutil
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from rich.console import Console
from rich.live import Live
from rich.text import Text

from aggregator import dsn, exceptions, logs, migrate, reports, runtime
from aggregator.runtime import Aggregator

POOL_WORKSPACES = 50
POOL_USERS = 400
PLAIN_EVERY = 5.0  # seconds between progress lines when stdout is not a terminal
PROGRESS_EVERY = 0.5  # seconds between a replica's counts of what it tracked


def default_file() -> Path:
    """Where the demo keeps its SQLite file: ``demo/demo.db`` in the state directory of the embedded default
    database (``$XDG_STATE_HOME/aggregator``, else ``~/.local/state/aggregator``). A directory of its own,
    so that the spool beside it is never that of a real database."""
    default = sa.make_url(dsn.default_database_url()).database or "aggregator.db"
    return Path(default).expanduser().absolute().parent / "demo" / "demo.db"


@dataclasses.dataclass
class Truth:
    workspaces: set[int] = dataclasses.field(default_factory=set)
    users: set[int] = dataclasses.field(default_factory=set)
    allowed: int = 0
    denied: int = 0
    replicas: set[int] = dataclasses.field(default_factory=set)


def _worker(index: int, url: str, window: float, flush_interval: float, duration: float,
            out: Any) -> None:
    """One replica: track random traffic for ``duration`` seconds, report truth per finished window."""
    logs.configure(level="warning")
    rng = random.Random(index)
    agg = Aggregator(database_url=url, window=window, flush_interval=flush_interval,
                     grace=max(3 * flush_interval, 2.0), handle_sigterm=False)
    agg.start()
    out.put(("ready", index))
    tracked, told = 0, time.monotonic()
    truth: dict[int, Truth] = {}
    w = int(window)
    # Replicas see overlapping but different slices of the user pool.
    users = list(range(POOL_USERS))[index * 40: index * 40 + POOL_USERS // 2]
    deadline = time.time() + duration
    while (now := time.time()) < deadline:
        for _ in range(rng.randint(20, 80)):
            ws, user = rng.randrange(POOL_WORKSPACES), rng.choice(users)
            allowed, denied = (1, 0) if rng.random() < 0.9 else (0, 1)
            at = time.time()
            agg.track(uuid.UUID(int=ws + 1), uuid.UUID(int=(1 << 64) + user), allowed=allowed, denied=denied, at=at)
            t = truth.setdefault(int(at // w) * w, Truth())
            t.workspaces.add(ws + 1)
            t.users.add((1 << 64) + user)
            t.allowed += allowed
            t.denied += denied
            tracked += 1
        if time.monotonic() - told >= PROGRESS_EVERY:
            out.put(("tracked", index, tracked))
            told = time.monotonic()
        for start in [s for s in truth if s + w <= now]:
            _send(out, index, start, truth.pop(start))
        time.sleep(rng.uniform(0.005, 0.03))
    agg.stop()
    out.put(("tracked", index, tracked))
    for start in list(truth):
        _send(out, index, start, truth.pop(start))
    out.put(("done", index))


def _send(out: Any, index: int, start: int, t: Truth) -> None:
    out.put(("truth", index, start, sorted(t.workspaces), sorted(t.users), t.allowed, t.denied))


def run(*, replicas: int, window: float, duration: float, flush_interval: float, database_url: str | None) -> int:
    if not 1 <= replicas <= 32:
        raise exceptions.ConfigError(f"--replicas={replicas} must be from 1 to 32")
    kept = database_url is None
    if database_url is None:
        path = default_file()
        _clear(path)
        database_url = f"sqlite:///{path}"
    url = dsn.resolve_database_url(database_url)
    console = Console(highlight=False)
    print(f"aggregator demo: {replicas} replica processes, {window:g}s windows, {duration:g}s of traffic, "
          f"flush every {flush_interval:g}s, database {dsn.mask_url(url)}"
          f"{' (the previous demo database is replaced)' if kept else ''}", flush=True)
    print("each report is shown as reported/truth; 'exact' means every figure matches\n", flush=True)
    with _Progress(console, replicas, window) as progress:
        progress.show("preparing the database")
        asyncio.run(migrate.upgrade_url(url))
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(i, url, window, flush_interval, duration, out), daemon=True)
                 for i in range(replicas)]
        progress.show(f"starting {replicas} replica processes")
        for p in procs:
            p.start()
        # A collector of our own keeps closing windows after the replicas have gone.
        collector = Aggregator(database_url=url, window=window, flush_interval=flush_interval,
                               grace=max(3 * flush_interval, 2.0), handle_sigterm=False)
        collector.start()
        try:
            ok = _watch(url, procs, out, progress, deadline=time.time() + duration + 6 * window + 30)
        finally:
            collector.stop()
            for p in procs:
                p.join(timeout=10)
    where = f"{database_url.removeprefix('sqlite:///')} (replaced by the next demo)" if kept else dsn.mask_url(url)
    print(f"\nthe database is kept: {where}\nchart it:  aggregator reports --chart --database-url "
          f"{shlex.quote(database_url if kept else dsn.mask_url(database_url))}", flush=True)
    return 0 if ok else 1


def _clear(path: Path) -> None:
    """Remove the previous demo's database file and its spool: each demo checks its reports against its own
    traffic only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(path.parent / "spool", ignore_errors=True)


class _Progress:
    """What the demo has seen so far, shown while windows fill: a status line kept live under the printed
    reports on a terminal (rich Live), else printed as a plain line at most every PLAIN_EVERY seconds."""

    def __init__(self, console: Console, replicas: int, window: float) -> None:
        self.replicas, self.window = replicas, window
        self.ready: set[int] = set()
        self.tracked: dict[int, int] = {}
        self.reported = 0
        self.traffic_over = False
        self._live = Live(console=console, refresh_per_second=4, transient=True) if console.is_terminal else None
        self._printed = -PLAIN_EVERY

    def __enter__(self) -> _Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()

    def show(self, status: str | None = None) -> None:
        text = status or self.status(time.time())
        if self._live is not None:
            self._live.update(Text(text, style="dim"))
        elif time.monotonic() - self._printed >= PLAIN_EVERY:
            self._printed = time.monotonic()
            print(f"... {text}", flush=True)

    def status(self, now: float) -> str:
        events = sum(self.tracked.values())
        if self.traffic_over:
            return f"traffic over: {events} events tracked; waiting for the last reports ({self.reported} so far)"
        end = (now // self.window + 1) * self.window
        return (f"{len(self.ready)} of {self.replicas} replicas tracking, {events} events so far; the window "
                f"{reports.to_datetime(end - self.window):%H:%M:%S}-{reports.to_datetime(end):%H:%M:%S} closes "
                f"in {end - now:.0f}s; {self.reported} report(s) in")


def _watch(url: str, procs: list[Any], out: Any, progress: _Progress, deadline: float) -> bool:
    replicas, window = progress.replicas, progress.window
    first = int(time.time() // window) * window  # windows before this one are another run's
    truths: dict[int, Truth] = {}
    done: set[int] = set()
    shown: set[int] = set()
    mismatches = 0
    total_tracked = total_reported = 0
    while time.time() < deadline:
        try:
            while True:
                message = out.get(timeout=0.2)
                if message[0] == "ready":
                    progress.ready.add(message[1])
                    continue
                if message[0] == "tracked":
                    progress.tracked[message[1]] = message[2]
                    continue
                if message[0] == "done":
                    done.add(message[1])
                    continue
                _, index, start, workspaces, users, allowed, denied = message
                t = truths.setdefault(start, Truth())
                t.workspaces.update(workspaces)
                t.users.update(users)
                t.allowed += allowed
                t.denied += denied
                t.replicas.add(index)
                total_tracked += allowed + denied
        except queue.Empty:
            pass
        if any(p.exitcode not in (None, 0) for p in procs):
            print("a replica process failed; see its error above", file=sys.stderr)
            return False
        finished = {r.window_start.timestamp(): r for r in asyncio.run(runtime.read_reports(url))
                    if r.window_start.timestamp() >= first}
        for start in sorted(truths):
            report = finished.get(start)
            # Show a window once its report exists and every live replica has sent its truth for it.
            if start in shown or report is None:
                continue
            if len(done) < replicas and start + window > time.time() - 0.5:
                continue
            shown.add(start)
            exact = _print_row(report, truths[start])
            mismatches += not exact
            total_reported += report.allowed_requests + report.denied_requests
        progress.reported, progress.traffic_over = len(shown), len(done) == replicas
        if len(done) == replicas and shown >= set(truths):
            late = sum(r.late_allowed_requests + r.late_denied_requests for r in finished.values())
            total_reported += late
            print(f"\n{len(shown)} windows, {total_reported} requests reported of {total_tracked} tracked "
                  f"({late} arrived late); {'all reports exact' if not mismatches else f'{mismatches} NOT exact'}",
                  flush=True)
            return mismatches == 0 and total_reported == total_tracked
        progress.show()
        time.sleep(0.3)
    print(f"timed out waiting for reports of {sorted(set(truths) - shown)}", file=sys.stderr)
    return False


def _print_row(report: reports.Report, truth: Truth) -> bool:
    pairs = [
        ("workspaces", report.unique_workspaces, len(truth.workspaces)),
        ("users", report.unique_users, len(truth.users)),
        ("allowed", report.allowed_requests, truth.allowed),
        ("denied", report.denied_requests, truth.denied),
        ("replicas", report.replicas, len(truth.replicas)),
    ]
    exact = all(got == want for _, got, want in pairs)
    cells = "  ".join(f"{name} {got:>5}/{want:<5}" for name, got, want in pairs)
    print(f"{report.window_start:%H:%M:%S}–{report.window_end:%H:%M:%S}  {cells}  "
          f"{'exact' if exact else 'NOT EXACT'}", flush=True)
    return exact
