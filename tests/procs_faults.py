"""Code that the outage tests (tests/test_outages.py) run in separate processes (multiprocessing 'spawn').

Each replica keeps the ground truth of what it tracked, per window by its own clock (it tracks with
``at=`` the moment it read), and hands it back through a queue when it stops, with figures from
``status()`` the parent prints. Messages on the queue are ``(kind, index, payload)`` tuples.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aggregator import Aggregator

# Id ranges that never meet: the SIGKILL victim's and the memory-budget replica's ids are their own.
VICTIM_WORKSPACE = 10**6
VICTIM_USERS = 10**7
FRESH_WORKSPACES = 2 * 10**6
FRESH_USERS = 10**9

Truth = dict[int, list[Any]]  # window start -> [workspace ids, user ids, allowed, denied]


def _count(truth: Truth, window: int, at: float, workspace: int, user: int, allowed: int, denied: int) -> None:
    t = truth.setdefault(int(at // window) * window, [set(), set(), 0, 0])
    t[0].add(workspace)
    t[1].add(user)
    t[2] += allowed
    t[3] += denied


def _merge(truths: list[Truth]) -> dict[int, tuple[list[int], list[int], int, int]]:
    merged: Truth = {}
    for truth in truths:
        for start, (workspaces, users, allowed, denied) in truth.items():
            m = merged.setdefault(start, [set(), set(), 0, 0])
            m[0] |= workspaces
            m[1] |= users
            m[2] += allowed
            m[3] += denied
    return {start: (sorted(w), sorted(u), a, d) for start, (w, u, a, d) in merged.items()}


class _Sampler:
    """Figures of one replica read from status() while it runs: flush durations, failures, spool, contact."""

    def __init__(self, agg: Aggregator) -> None:
        self.agg = agg
        self.flushes_seen = 0
        self.durations: list[float] = []
        self.spooled_max = 0
        self.unflushed_max = 0

    def sample(self) -> None:
        status = self.agg.status()
        self.spooled_max = max(self.spooled_max, status.get("spooled_events", 0))
        self.unflushed_max = max(self.unflushed_max, status.get("unflushed_events", 0))
        stats = status.get("flush")
        if stats is not None and stats.flushes != self.flushes_seen:
            self.flushes_seen = stats.flushes
            self.durations.append(stats.last_duration)

    def figures(self) -> dict[str, Any]:
        status = self.agg.status()
        out: dict[str, Any] = {
            "spooled_max": self.spooled_max, "unflushed_max": self.unflushed_max,
            "spooled_at_end": status.get("spooled_events", 0), "store": status["store"],
            "flush_durations_sampled": self.durations,
        }
        if status.get("flush") is not None:
            out["flush"] = dataclasses.asdict(status["flush"])
        if status.get("collector") is not None:
            out["collector"] = dataclasses.asdict(status["collector"])
        return out


def replica(url: str, index: int, threads: int, window: int, stop: Any, out: Any, settings: dict[str, Any]) -> None:
    """A replica: ``threads`` threads tracking overlapping ids until ``stop`` is set; then a clean stop."""
    agg = Aggregator(database_url=url, window=f"{window}s", replica_id=f"replica-{index}", handle_sigterm=False,
                     **settings)
    agg.start()
    out.put(("started", index, os.getpid()))
    halt = threading.Event()
    truths: list[Truth] = []

    def work(seed: int) -> None:
        rng = random.Random(index * 100 + seed)
        truth: Truth = {}
        truths.append(truth)
        while not halt.is_set():
            for _ in range(20):
                workspace, user = rng.randrange(30) + 1, rng.randrange(300) + 1000
                allowed, denied = rng.randrange(3), rng.randrange(2)
                at = time.time()
                agg.track(uuid.UUID(int=workspace), uuid.UUID(int=user), allowed=allowed, denied=denied, at=at)
                _count(truth, window, at, workspace, user, allowed, denied)
            time.sleep(rng.uniform(0.003, 0.01))

    workers = [threading.Thread(target=work, args=(k,), name=f"track-{k}") for k in range(threads)]
    for w in workers:
        w.start()
    sampler = _Sampler(agg)
    while not stop.wait(0.1):
        sampler.sample()
    halt.set()
    for w in workers:
        w.join()
    agg.stop()
    out.put(("done", index, {"truth": _merge(truths), "figures": sampler.figures()}))


def victim(url: str, window: int, base: int, counts: Any, out: Any, settings: dict[str, Any]) -> None:
    """A replica that is SIGKILLed: one thread tracking a fresh user per call in a workspace of its own.

    ``counts[i]`` is the number of calls in the window ``base + i * window``, raised *before* each call,
    so it bounds what was tracked from above by at most the one call in progress when the kill came.
    Every call is ``allowed=1`` with a new user: a window's calls, users and requests are the same number.
    """
    agg = Aggregator(database_url=url, window=f"{window}s", replica_id="victim", handle_sigterm=False, **settings)
    agg.start()
    out.put(("started", -1, time.time()))
    workspace = uuid.UUID(int=VICTIM_WORKSPACE)
    k = 0
    while True:
        for _ in range(10):
            k += 1
            at = time.time()
            counts[(int(at // window) * window - base) // window] += 1
            agg.track(workspace, uuid.UUID(int=VICTIM_USERS + k), allowed=1, at=at)
        time.sleep(0.002)


def budget_replica(url: str, window: int, stop: Any, out: Any, settings: dict[str, Any], sigterm: bool) -> None:
    """A replica tracking a fresh user per call, fast, from one thread; stops on ``stop`` or (``sigterm``) SIGTERM.

    It waits a second after start (the parent measures its baseline RSS meanwhile) before tracking. With
    ``sigterm``, SIGTERM is left to aggregator's own handling: the truth is sent when SystemExit reaches the
    main thread, and the exit hook then stops the Aggregator, which spools what it cannot flush.
    """
    agg = Aggregator(database_url=url, window=f"{window}s", replica_id="budget", handle_sigterm=sigterm, **settings)
    agg.start()
    out.put(("started", 0, os.getpid()))
    time.sleep(1.0)
    halt = threading.Event()
    truth: dict[int, list[Any]] = {}  # window start -> [workspace ids, users (all fresh: a count), allowed, denied]
    tracked = [0]

    def work() -> None:
        k = 0
        while not halt.is_set():
            for _ in range(500):
                k += 1
                at = time.time()
                denied = k % 3 == 0
                agg.track(uuid.UUID(int=FRESH_WORKSPACES + k % 50), uuid.UUID(int=FRESH_USERS + k), allowed=1,
                          denied=int(denied), at=at)
                t = truth.get(start := int(at // window) * window) or truth.setdefault(start, [set(), 0, 0, 0])
                t[0].add(k % 50)
                t[1] += 1
                t[2] += 1
                t[3] += denied
            tracked[0] = k
            time.sleep(0.004)

    worker = threading.Thread(target=work, name="track")
    worker.start()
    out.put(("tracking", 0, time.time()))
    sampler = _Sampler(agg)

    def payload() -> dict[str, Any]:
        return {"truth": {s: (sorted(w), u, a, d) for s, (w, u, a, d) in truth.items()}, "tracked": tracked[0],
                "figures": sampler.figures()}

    try:
        while not stop.is_set():
            sampler.sample()
            time.sleep(0.1)
    finally:  # the stop event, or SystemExit from aggregator's SIGTERM handler
        halt.set()
        worker.join()
        if sigterm:
            out.put(("done", 0, payload()))  # the exit hook stops the Aggregator after this
    agg.stop()
    out.put(("done", 0, payload()))


def replay_spools(url: str, window: int, spool_dir: str, out: Any, settings: dict[str, Any]) -> None:
    """A new replica on the host: its start adopts and replays the spools in ``spool_dir``; it stops once none
    is left."""
    agg = Aggregator(database_url=url, window=f"{window}s", replica_id="successor", handle_sigterm=False,
                     spool_dir=spool_dir, **settings)
    agg.start(wait=30)
    deadline = time.monotonic() + 60
    while any(Path(spool_dir).rglob("*.spool")) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = sorted(str(p) for p in Path(spool_dir).rglob("*.spool"))
    agg.stop()
    out.put(("done", 0, {"spools_left": left}))
