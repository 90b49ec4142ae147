"""Issue #13, item 6: a simulated fleet of replicas flushing into one PostgreSQL, the collector beside it.

N logical replicas, each its own incarnation (writer id, replica id, flush sequence, watermark), share 2
worker processes of 10 connections each. A replica builds batches as ``flush.Flusher`` does (each id sent
once per window, counters, a watermark less the slack) and applies them with the library's own
``Store.apply_batch``, back to back: the fleet offers more than one PostgreSQL takes, so its rate is the
most the server sustains. The real ``Collector`` runs in the parent throughout; at the end every report
is compared with the ground truth the replicas kept. Beforehand the same processes run the same-run
reference: a plain asyncpg INSERT of the same rows, one transaction per batch, nothing else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import random
import statistics
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import asyncpg

from aggregator import collector, flush, health, migrate, store
from bench.figures import Check, Figure, Result
from bench.workload import SEED, Env

SPAWN_S = 4.0  # time given to the worker processes to start before the reference phase begins
HOT_USERS = 2_000  # users every replica may see (10% of draws): ids that several replicas send in one window
HOT_SHARE = 0.1
WORKSPACES = 1_000
LEASE = 300.0  # the collector's replica_lease: far above a replica's silence between flushes at saturation
COLLECT_INTERVAL = 0.5
PLAIN_TABLE = "bench_plain_ids"
_PLAIN_INSERT = (f"INSERT INTO {PLAIN_TABLE} (window_start, dim, id) SELECT * FROM "
                 "unnest($1::bigint[], $2::smallint[], $3::uuid[]) ORDER BY 1, 2, 3 ON CONFLICT DO NOTHING")
# Bytes of a table (total, heap, indexes), summed over its partitions if it has any (0 if it does not exist).
_SIZES = ("SELECT coalesce(sum(pg_total_relation_size(r)), 0)::bigint, coalesce(sum(pg_relation_size(r)), 0)::bigint, "
          "coalesce(sum(pg_indexes_size(r)), 0)::bigint FROM (SELECT relid AS r FROM "
          "pg_partition_tree(to_regclass($1)) WHERE isleaf UNION "
          "SELECT c.oid FROM pg_class c WHERE c.oid = to_regclass($1) AND c.relkind = 'r') AS t")
# The server's WAL position, and the rows written so far in its other databases (they share WAL and CPU with us).
OTHERS_AND_WAL = ("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, (SELECT coalesce(sum(tup_inserted "
                  "+ tup_updated + tup_deleted), 0)::bigint FROM pg_stat_database WHERE datname <> $1)")
Sample = tuple[float, int, float | None, float | None, int]  # (time, WAL, database CPU, server CPU, others' rows)
Done = tuple[float, float, float, int, int]  # a flush: (committed at, seconds holding a slot, waiting, ids, fallbacks)
_RUNS: dict[tuple[str, int, bool], FleetRun] = {}  # one run per server, size and mode, shared with capacity.py


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    replicas: int
    window: int = 15  # seconds; several windows close during a run
    windows: int = 4  # whole windows measured once every replica has registered
    reference_s: float = 15.0
    workers: int = 2
    connections: int = 10  # per worker process
    ids_per_flush: int = 20  # events per batch, each a user (90% new) in a workspace
    seed: int = SEED


@dataclasses.dataclass(slots=True)
class Truth:
    """What the replicas tracked in one window: what its report must say."""

    users: set[int] = dataclasses.field(default_factory=set)
    workspaces: set[int] = dataclasses.field(default_factory=set)
    allowed: int = 0
    denied: int = 0
    replicas: set[str] = dataclasses.field(default_factory=set)

    def merge(self, other: Truth) -> None:
        self.users |= other.users
        self.workspaces |= other.workspaces
        self.allowed += other.allowed
        self.denied += other.denied
        self.replicas |= other.replicas


@dataclasses.dataclass(slots=True)
class Phase:
    """One phase's figures over its measured period (the reference, or the fleet's whole windows)."""

    seconds: float
    flushes: int
    ids: int  # ids carried by those flushes (users and workspaces)
    service: list[float]  # seconds from getting a connection slot to the commit, per flush
    waits: list[float]  # seconds waiting for a connection slot
    client_cpu: float  # CPU seconds of the worker processes
    pg_cpu: float | None  # CPU seconds of the database's own backends (None: server not on this host)
    server_cpu: float | None  # CPU seconds of every process of the server, background ones included
    wal_bytes: int
    failures: dict[str, int]
    fallbacks: int  # id inserts that met a concurrent flush's same id and took the ON CONFLICT path
    others_wrote: int  # rows other databases of the server wrote meanwhile: WAL and whole-server CPU are theirs too

    @property
    def rate(self) -> float:
        return self.flushes / self.seconds

    def percentile(self, q: int) -> float:
        return statistics.quantiles(self.service, n=100, method="inclusive")[q - 1] if len(self.service) > 1 else \
            self.service[0]

    def per_flush(self, cpu: float | None) -> float | None:
        return None if cpu is None or not self.flushes else cpu / self.flushes


@dataclasses.dataclass(slots=True)
class FleetRun:
    plan: Plan
    reference: Phase
    fleet: Phase
    collections: list[float]  # seconds of Store.collect_window per window collected during the load
    latencies: list[float]  # window end to report, same windows
    truth: dict[int, Truth]  # window start -> what the replicas tracked in it
    until: float  # the end of the last window compared
    compared: int
    mismatches: list[str]
    late_batches: int
    runs: list[float]  # seconds of each Collector.run_once that wrote a report during the load (all its steps)
    deadlocks: int
    collector_failures: int
    parent_cpu: float  # the collector's process over the fleet period
    registered_s: float  # from the fleet's start until every replica had registered (its first, empty batch)
    stored_ids: int
    stored_bytes: int  # window_ids, table and indexes, at the end


class _Replica:
    """One logical replica: what it tracks (drawn), the ids it sent per window, its sequence."""

    def __init__(self, k: int, plan: Plan, shared: tuple[list[int], list[int]], began: float) -> None:
        self.name = f"fleet-{k}"
        self.rng = random.Random(plan.seed * 1_000_003 + k)
        self.writer = uuid.UUID(int=self.rng.getrandbits(128))
        self.plan = plan
        self.hot, self.workspaces = shared
        self.seq = 0
        self.last = began
        self.sent: dict[int, tuple[set[int], set[int]]] = {}

    def take(self, until: float, truth: dict[int, Truth] | None) -> dict[int, store.BatchWindow]:
        """The new ids and counters of the events tracked since the last batch, each in its own window."""
        rng, window = self.rng, self.plan.window
        parts: dict[int, store.BatchWindow] = {}
        for _ in range(self.plan.ids_per_flush):
            start = int(rng.uniform(self.last, until) // window) * window
            part = parts.get(start) or parts.setdefault(start, store.BatchWindow([], [], 0, 0))
            sent_workspaces, sent_users = self.sent.setdefault(start, (set(), set()))
            user = self.hot[rng.randrange(HOT_USERS)] if rng.random() < HOT_SHARE else rng.getrandbits(128)
            workspace = self.workspaces[rng.randrange(WORKSPACES)]
            if user not in sent_users:
                sent_users.add(user)
                part.users.append(user)
            if workspace not in sent_workspaces:
                sent_workspaces.add(workspace)
                part.workspaces.append(workspace)
            part.allowed += rng.randint(1, 3)
            part.denied += int(rng.random() < 0.05)
        self.last = until
        for start in [s for s in self.sent if s < int(until // window) * window - window]:
            del self.sent[start]  # as the Flusher: the current and previous window only
        if truth is None:
            return parts
        for start, part in parts.items():
            seen = truth.setdefault(start, Truth())
            seen.users.update(part.users)
            seen.workspaces.update(part.workspaces)
            seen.allowed += part.allowed
            seen.denied += part.denied
            seen.replicas.add(self.name)
        return parts

    def batch(self, parts: dict[int, store.BatchWindow], *, at: float, final: bool = False) -> store.Batch:
        self.seq += 1
        return store.Batch(seq=self.seq, windows=parts, events=sum(p.allowed + p.denied for p in parts.values()),
                           watermark=at - flush.WATERMARK_SLACK, final=final)


def _shared_ids(seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.getrandbits(128) for _ in range(HOT_USERS)], [rng.getrandbits(128) for _ in range(WORKSPACES)]


async def _until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.time()))


async def _sample_cpu(samples: list[tuple[float, float]]) -> None:
    while True:
        samples.append((time.time(), time.process_time()))
        await asyncio.sleep(0.25)


def _failure(exc: BaseException) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(code := getattr(seen, "sqlstate", None), str):
            return f"{type(exc).__name__} SQLSTATE {code}" + (" (deadlock)" if code == "40P01" else "")
        seen = seen.__cause__
    return f"{type(exc).__name__}: {str(exc)[:80]}"


# ---- the worker processes --------------------------------------------------------------------------


class _Fallbacks(logging.Handler):
    """Counts the store's ``ids_insert_fallback`` events: an id insert that met a concurrent flush's same id."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += getattr(record, "event", "") == "ids_insert_fallback"


FALLBACKS = _Fallbacks()


def _worker(pipe: Connection, url: str, plan: Plan, ks: list[int], t_ref: float, t_fleet: float) -> None:
    try:
        logging.getLogger("aggregator").setLevel(logging.WARNING)
        counted = logging.getLogger("aggregator.store")
        counted.setLevel(logging.DEBUG)
        counted.addHandler(FALLBACKS)
        pipe.send(("done", asyncio.run(_work(pipe, url, plan, ks, t_ref, t_fleet))))
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
    finally:
        pipe.close()


async def _work(pipe: Connection, url: str, plan: Plan, ks: list[int], t_ref: float, t_fleet: float) -> dict[str, Any]:
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(_sample_cpu(samples))
    worker = _Worker(plan, ks)
    try:
        reference, reference_failures = await worker.reference(url, t_ref)
        truth, late = await worker.fleet(pipe, url, t_fleet)
    finally:
        sampler.cancel()
    samples.append((time.time(), time.process_time()))
    return {"reference": reference, "reference_failures": reference_failures, "fleet": worker.done,
            "failures": dict(worker.failures), "cpu": samples, "truth": truth, "late": late}


class _Worker:
    """One worker process's replicas: at most ``plan.connections`` transactions in flight, each one timed."""

    def __init__(self, plan: Plan, ks: list[int]) -> None:
        self.plan, self.ks = plan, ks
        self.shared = _shared_ids(plan.seed)
        self.gate = asyncio.Semaphore(plan.connections)
        self.failures: collections.Counter[str] = collections.Counter()
        self.done: list[Done] = []

    async def slot(self, apply: Callable[[], Awaitable[Any]], ids: int) -> None:
        """Run ``apply`` once a connection slot is free; a failure is counted, then retried unchanged (as the
        Flusher retries a batch)."""
        queued = time.perf_counter()
        while True:
            async with self.gate:
                began = time.perf_counter()
                try:
                    await apply()
                except Exception as exc:
                    self.failures[_failure(exc)] += 1
                else:
                    self.done.append((time.time(), time.perf_counter() - began, began - queued, ids, FALLBACKS.count))
                    return
            await asyncio.sleep(0.05)

    async def reference(self, url: str, t_ref: float) -> tuple[list[Done], dict[str, int]]:
        """The same batches as the fleet's, stored by a plain INSERT in one transaction each, for reference_s."""
        plan = self.plan
        pool = await asyncpg.create_pool(url, min_size=plan.connections, max_size=plan.connections)

        async def plain(k: int) -> None:
            sim = _Replica(k, dataclasses.replace(plan, seed=plan.seed + 1), self.shared, t_ref)
            await _until(t_ref)
            while (now := time.time()) < t_ref + plan.reference_s:
                rows = [(s, d, i.to_bytes(16, "big").hex()) for s, p in sim.take(now, None).items()
                        for d, ids in ((1, p.workspaces), (2, p.users)) for i in ids]

                async def insert(rows: list[tuple[int, int, str]] = rows) -> None:
                    async with pool.acquire() as conn, conn.transaction():
                        await conn.execute(_PLAIN_INSERT, *map(list, zip(*rows, strict=True)))
                if rows:  # (only if every event repeated an id sent: a statement with no rows)
                    await self.slot(insert, len(rows))
                else:
                    await asyncio.sleep(0)

        try:
            await asyncio.gather(*(plain(k) for k in self.ks))
        finally:
            await pool.close()
        measured, failures = list(self.done), dict(self.failures)
        self.done.clear()
        self.failures.clear()
        return measured, failures

    async def fleet(self, pipe: Connection, url: str, t_fleet: float) -> tuple[dict[int, Truth], int]:
        """Every replica registers (an empty batch: its first watermark), then flushes until the parent's stop
        time, then stops cleanly; returns the truth of what they tracked, and how many batches came late."""
        plan = self.plan
        db = store.Store(url, pool_size=plan.connections)
        truth: dict[int, Truth] = {}
        stop_at = [math.inf]
        registered = asyncio.Event()
        waiting = [len(self.ks)]
        late = [0]

        async def replica(k: int) -> None:
            await _until(t_fleet + random.Random(k).uniform(0, 1))
            sim = _Replica(k, plan, self.shared, time.time())

            async def apply(batch: store.Batch) -> None:
                result = await db.apply_batch(batch, writer_id=sim.writer, replica_id=sim.name, window=plan.window,
                                              now=time.time())
                late[0] += bool(result.late_windows)

            first = sim.batch({}, at=sim.last)
            await self.slot(functools.partial(apply, first), 0)
            sim.last = time.time()  # it tracks from its registration on: the collector knows it from then
            waiting[0] -= 1
            if not waiting[0]:
                registered.set()
            while (now := time.time()) < stop_at[0]:
                parts = sim.take(now, truth)
                batch = sim.batch(parts, at=now)
                await self.slot(functools.partial(apply, batch),
                                sum(len(p.users) + len(p.workspaces) for p in parts.values()))
            # A clean stop: what was tracked up to the end, in a final batch that marks the incarnation stopped.
            final = sim.batch(sim.take(stop_at[0] - 1e-3, truth), at=time.time(), final=True)
            await self.slot(functools.partial(apply, final), 0)

        async def control() -> None:
            await registered.wait()
            pipe.send(("registered", None))
            stop_at[0] = await asyncio.to_thread(pipe.recv)

        try:
            await asyncio.gather(control(), *(replica(k) for k in self.ks))
        finally:
            await db.close()
        return truth, late[0]


# ---- the parent: collector, server sampler, ground truth ------------------------------------------


class ServerCpu:
    """CPU seconds of a PostgreSQL server on this host, from /proc: its processes, and one database's backends.

    A backend's title names its database (``postgres: 15/main: user DB host(port) state``); the CPU of
    children that exited is in the postmaster's ``cutime``/``cstime``, so the server's total misses nothing.
    """

    def __init__(self, postmaster: int, database: str, exclude: int) -> None:
        self.postmaster, self.database, self.exclude = postmaster, database, exclude
        self.tick = os.sysconf("SC_CLK_TCK")

    @classmethod
    async def find(cls, conn: asyncpg.Connection, database: str) -> ServerCpu | None:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        try:
            return cls(int(_stat(pid)[1]), database, pid)
        except (OSError, IndexError, ValueError):
            return None  # the server runs elsewhere: no CPU figures

    def read(self) -> tuple[float, float]:
        """(this database's backends, the whole server) in CPU seconds."""
        own = _stat(self.postmaster)
        server, ours = sum(int(v) for v in own[11:15]), 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (self.postmaster, self.exclude):
                continue
            try:
                fields = _stat(int(entry.name))
                if int(fields[1]) != self.postmaster:
                    continue
                cpu = int(fields[11]) + int(fields[12])
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            server += cpu
            ours += cpu if self.database in title else 0
        return ours / self.tick, server / self.tick


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name: state is [0], ppid [1], utime [11] ... cstime [14]."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class TimedStore(store.Store):
    """The collector's store, timing each window it collects (the collect path itself is unchanged)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, pool_size=2)
        self.collected: dict[int, tuple[float, float]] = {}  # window start -> (seconds, finished at)

    async def collect_window(self, start: int, **kwargs: Any) -> dict[str, Any] | None:
        began = time.perf_counter()
        row = await super().collect_window(start, **kwargs)
        if row is not None:
            self.collected[start] = (time.perf_counter() - began, time.time())
        return row


def run(url: str, plan: Plan, timeout: float | None = None) -> FleetRun:
    """Run the fleet against the migrated PostgreSQL database at ``url``; its tables are written."""
    return asyncio.run(_run(url, plan, timeout or 600.0 + plan.replicas / 10))


async def _run(url: str, plan: Plan, timeout: float) -> FleetRun:
    database = url.rsplit("/", 1)[1].split("?")[0]
    monitor = await asyncpg.connect(url)
    await monitor.execute(f"CREATE TABLE IF NOT EXISTS {PLAIN_TABLE} (LIKE window_ids INCLUDING ALL)")
    cpu = await ServerCpu.find(monitor, database)
    deadlocks_before = await monitor.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = $1", database)
    t_ref = time.time() + SPAWN_S
    t_fleet = t_ref + plan.reference_s + 1.0
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for w in range(plan.workers):
        mine, theirs = context.Pipe()
        process = context.Process(target=_worker, name=f"bench-fleet-{w}", daemon=True,
                                  args=(theirs, url, plan, list(range(w, plan.replicas, plan.workers)), t_ref, t_fleet))
        process.start()
        theirs.close()
        pipes.append(mine)
        processes.append(process)
    server: list[Sample] = []
    db = TimedStore(url)
    contact = health.Contact()
    contact.succeeded()
    judge = collector.Collector(db, collector_id="bench-collector", grace=0.0, id_retention=2 * 86400.0,
                                lease=LEASE, max_delay=3 * LEASE, contact=contact)
    stop_at = math.inf
    parent_cpu: list[tuple[float, float]] = []

    async def sample() -> None:
        while True:
            ours, whole = cpu.read() if cpu is not None else (None, None)
            lsn, others = await monitor.fetchrow(OTHERS_AND_WAL, database)
            server.append((time.time(), int(lsn), ours, whole, int(others)))
            await asyncio.sleep(0.25)

    runs: list[tuple[float, float]] = []  # (seconds, ended at) of the collector's runs that wrote a report

    async def collect() -> None:
        await _until(t_fleet)
        while True:
            began = time.perf_counter()
            with contextlib.suppress(Exception):  # counted in judge.stats; the next run retries
                if await judge.run_once():
                    runs.append((time.perf_counter() - began, time.time()))
            await asyncio.sleep(COLLECT_INTERVAL)

    background = [asyncio.create_task(sample()), asyncio.create_task(collect()),
                  asyncio.create_task(_sample_cpu(parent_cpu))]
    try:
        for pipe in pipes:
            _expect(await _receive(pipe, timeout), "registered")
        registered_s = time.time() - t_fleet
        stop_at = (time.time() // plan.window + 1) * plan.window + plan.windows * plan.window
        for pipe in pipes:
            pipe.send(stop_at)
        answers = [_expect(await _receive(pipe, stop_at - time.time() + 120), "done") for pipe in pipes]
        deadline = time.time() + 60
        while await db.open_windows(ended_by=stop_at) and time.time() < deadline:
            await asyncio.sleep(COLLECT_INTERVAL)
        reports = await db.reports()
        deadlocks = await monitor.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = $1", database)
        stored = (await monitor.fetchval("SELECT count(*) FROM window_ids"), (await sizes(monitor, "window_ids"))[0])
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
        await db.close()
        await monitor.close()
    truth: dict[int, Truth] = {}
    for answer in answers:
        for start, part in answer["truth"].items():
            truth.setdefault(start, Truth()).merge(part)
    compared, mismatches = compare(truth, reports, window=plan.window, until=stop_at)
    measured_from = stop_at - plan.windows * plan.window
    under_load = {s: c for s, c in db.collected.items() if c[1] < stop_at}
    return FleetRun(
        plan=plan,
        reference=_phase([a["reference"] for a in answers], [a["cpu"] for a in answers], server,
                         t_ref + min(1.0, plan.reference_s / 4), t_ref + plan.reference_s,
                         [a["reference_failures"] for a in answers]),
        fleet=_phase([a["fleet"] for a in answers], [a["cpu"] for a in answers], server, measured_from, stop_at,
                     [a["failures"] for a in answers]),
        collections=[c[0] for c in under_load.values()],
        latencies=[c[1] - (s + plan.window) for s, c in under_load.items()],
        truth=truth, until=stop_at, compared=compared, mismatches=mismatches,
        late_batches=sum(a["late"] for a in answers),
        runs=[seconds for seconds, at in runs if at < stop_at],
        deadlocks=int(deadlocks - deadlocks_before), collector_failures=judge.stats.failures,
        parent_cpu=_at(parent_cpu, stop_at) - _at(parent_cpu, measured_from), registered_s=registered_s,
        stored_ids=stored[0], stored_bytes=stored[1])


async def sizes(conn: asyncpg.Connection, table: str) -> tuple[int, int, int]:
    """(total, heap, indexes) bytes of ``table`` and its partitions."""
    total, heap, indexes = await conn.fetchrow(_SIZES, table)
    return int(total), int(heap), int(indexes)


async def _receive(pipe: Connection, timeout: float) -> tuple[str, Any]:
    def wait() -> tuple[str, Any]:
        if not pipe.poll(timeout):
            raise TimeoutError(f"a fleet worker sent nothing in {timeout:.0f} s")
        try:
            message: tuple[str, Any] = pipe.recv()
        except EOFError:
            raise RuntimeError("a fleet worker died without a word") from None
        return message
    return await asyncio.to_thread(wait)


def _expect(message: tuple[str, Any], kind: str) -> Any:
    if message[0] != kind:
        raise RuntimeError(f"a fleet worker failed:\n{message[1]}")
    return message[1]


def _at(samples: list[tuple[float, float]], moment: float) -> float:
    """A cumulative quantity at ``moment``, interpolated between its samples."""
    times = [t for t, _ in samples]
    i = min(max(1, next((n for n, t in enumerate(times) if t >= moment), len(times) - 1)), len(times) - 1)
    (t0, v0), (t1, v1) = samples[i - 1], samples[i]
    return v0 + (v1 - v0) * min(max((moment - t0) / (t1 - t0), 0.0), 1.0) if t1 > t0 else v1


def _phase(done: list[list[Done]], cpus: list[list[tuple[float, float]]],
           server: list[Sample], begin: float, end: float,
           failures: list[dict[str, int]]) -> Phase:
    """The figures of [begin, end], trimmed to the server's samples inside it so that every figure spans one period."""
    inside = [s for s in server if begin <= s[0] <= end]
    if len(inside) < 2:
        raise RuntimeError(f"the server was sampled {len(inside)} times in a phase of {end - begin:.1f} s")
    first, last = inside[0], inside[-1]
    a, b = first[0], last[0]
    flushes = [d for part in done for d in part if a <= d[0] < b]
    counted = [[d[4] for d in part if a <= d[0] < b] or [0] for part in done]  # a running count per worker
    ours = None if first[2] is None or last[2] is None else last[2] - first[2]
    whole = None if first[3] is None or last[3] is None else last[3] - first[3]
    return Phase(seconds=b - a, flushes=len(flushes), ids=sum(d[3] for d in flushes),
                 fallbacks=sum(max(c) - min(c) for c in counted),
                 service=[d[1] for d in flushes], waits=[d[2] for d in flushes],
                 client_cpu=sum(_at(c, b) - _at(c, a) for c in cpus), pg_cpu=ours, server_cpu=whole,
                 wal_bytes=last[1] - first[1], others_wrote=last[4] - first[4],
                 failures=dict(sum(map(collections.Counter, failures), collections.Counter())))


# Every figure a report has, from the truth of its window: what the replicas tracked, nobody missing, nothing late.
FIELDS: dict[str, Callable[[Truth], int]] = {
    "unique_workspaces": lambda t: len(t.workspaces), "unique_users": lambda t: len(t.users),
    "allowed_requests": lambda t: t.allowed, "denied_requests": lambda t: t.denied,
    "replicas": lambda t: len(t.replicas), "replicas_missing": lambda t: 0,
    "late_allowed_requests": lambda t: 0, "late_denied_requests": lambda t: 0,
    "late_unique_workspaces": lambda t: 0, "late_unique_users": lambda t: 0,
}


def compare(truth: dict[int, Truth], reports: list[dict[str, Any]], *, window: int,
            until: float) -> tuple[int, list[str]]:
    """How many windows ending by ``until`` were compared, and every difference between a report and the truth."""
    by_start = {int(r["window_start"]): r for r in reports}
    mismatches, compared = [], 0
    for start in sorted(set(truth) | set(by_start)):
        if start + window > until:
            if truth.get(start, Truth()).allowed:
                mismatches.append(f"window {start}: data tracked after the run's end")
            continue
        compared += 1
        expected = {name: figure(truth.get(start, Truth())) for name, figure in FIELDS.items()}
        if start not in by_start:
            mismatches.append(f"window {start}: no report, expected {expected}")
            continue
        actual = {name: int(by_start[start][name]) for name in FIELDS}
        if actual != expected:
            mismatches.append(f"window {start}: " + ", ".join(
                f"{name} {actual[name]:,} != {expected[name]:,}" for name in FIELDS if actual[name] != expected[name]))
    return compared, mismatches


# ---- the rows --------------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database(env: Env, label: str) -> Iterator[str]:
    """A fresh migrated database ``bench_fleet_<pid>_<label>`` on the bench's server, dropped afterwards."""
    name = f"bench_fleet_{os.getpid()}_{label}"
    asyncio.run(env.scratch.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"'))
    try:
        url = env.scratch.url(name)
        asyncio.run(migrate.upgrade_url(url))
        yield url
    finally:
        asyncio.run(env.scratch.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def plan_for(env: Env, replicas: int) -> Plan:
    if env.quick:
        return Plan(replicas=replicas, window=2, windows=2, reference_s=2.0)
    return Plan(replicas=replicas)


def measured(env: Env, replicas: int) -> FleetRun:
    """The fleet of this size on the bench's server, run once per bench run (capacity.py reuses it)."""
    key = (env.database_url, replicas, env.quick)
    if key not in _RUNS:
        with scratch_database(env, str(replicas)) as url:
            _RUNS[key] = run(url, plan_for(env, replicas))
    return _RUNS[key]


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.2f} ms"


def row(env: Env, replicas: int) -> Result:
    """Issue #13, item 6: sustained flushes, their latency and CPU, collection and exactness under load."""
    fleet_run = measured(env, replicas)
    plan, f, r = fleet_run.plan, fleet_run.fleet, fleet_run.reference
    measured_from = fleet_run.until - plan.windows * plan.window
    result = Result(f"fleet_{replicas}", f"{replicas:,} simulated replicas flushing into one PostgreSQL, "
                                         "the collector beside them")
    result.ours = Figure([f.rate], "flushes/s")
    failed = sum(f.failures.values())
    collections = Figure([c * 1000 for c in fleet_run.collections] or [math.nan], "ms")
    pg, client = f.per_flush(f.pg_cpu), f.per_flush(f.client_cpu)
    loaded = [t for s, t in fleet_run.truth.items() if measured_from <= s < fleet_run.until]
    sized = statistics.mean(len(t.users) + len(t.workspaces) for t in loaded) if loaded else 0.0
    result.checks = [
        Check(peer=f"plain asyncpg INSERT of the same rows, 1 transaction per batch: {r.rate:,.0f} tx/s",
              ratio_label="ours/plain", ratio=f.rate / r.rate),
        Check(peer=f"flush p50 / p99 holding a connection: {_ms(f.percentile(50))} / {_ms(f.percentile(99))}; "
                   f"plain INSERT {_ms(r.percentile(50))} / {_ms(r.percentile(99))}",
              ratio_label="p50 ours/plain", ratio=f.percentile(50) / r.percentile(50)),
        Check(peer=f"PostgreSQL CPU per flush: {_ms(pg)} (the whole server: {_ms(f.per_flush(f.server_cpu))}); "
                   f"plain INSERT {_ms(r.per_flush(r.pg_cpu))}", ratio_label="ours/plain",
              ratio=_ratio(pg, r.per_flush(r.pg_cpu))),
        Check(peer=f"client CPU per flush: {_ms(client)} (PostgreSQL/clients {_ratio(pg, client) or math.nan:.2f}x); "
                   f"plain INSERT {_ms(r.per_flush(r.client_cpu))}", ratio_label="ours/plain",
              ratio=_ratio(client, r.per_flush(r.client_cpu))),
        Check(peer=f"collection per window under load ({len(fleet_run.collections)} windows of {sized:,.0f} ids)",
              figure=collections,
              ratio_label="of the window", ratio=collections.median / 1000 / plan.window),
        Check(peer=f"failed flush attempts {failed}, deadlocks {fleet_run.deadlocks}, late batches "
                   f"{fleet_run.late_batches}, failed collections {fleet_run.collector_failures}", target="none",
              passed=not (failed or fleet_run.deadlocks or fleet_run.late_batches or fleet_run.collector_failures)),
        Check(peer=f"reports exact against the fleet's truth: {fleet_run.compared - len(fleet_run.mismatches)} of "
                   f"{fleet_run.compared}", target="all", passed=fleet_run.compared > 0 and not fleet_run.mismatches),
    ]
    latencies = Figure(fleet_run.latencies or [math.nan], "s")
    result.notes = [
        f"{replicas:,} incarnations over {plan.workers} processes x {plan.connections} connections "
        f"(Store pool_size={plan.connections}, at most {plan.connections} batches in flight per process); each "
        f"batch: {plan.ids_per_flush} events, 90% new users and 10% from {HOT_USERS:,} shared ones, each in one of "
        f"{WORKSPACES:,} shared workspaces, placed in the windows of their moments since the last batch; "
        f"flushed back to back through Store.apply_batch with the watermark (now - {flush.WATERMARK_SLACK:g} s)",
        f"window {plan.window} s; figures over the {plan.windows} whole windows after every replica registered "
        f"({f.seconds:.1f} s, {f.flushes:,} flushes, {f.ids / max(f.flushes, 1):.1f} ids each); each replica "
        f"flushed every {plan.replicas / f.rate:.2f} s on average; the reference: {r.seconds:.1f} s, same processes, "
        "connections and batches, into a table LIKE window_ids INCLUDING ALL (ON CONFLICT DO NOTHING)",
        "CPU: the worker processes' process_time; PostgreSQL: /proc of the backends of the run's database (the "
        "collector's included), and of every server process; all over the same period, on the same 2 shared cores; "
        f"WAL: {f.wal_bytes / max(f.flushes, 1):,.0f} B per flush ({r.wal_bytes / max(r.flushes, 1):,.0f} plain); "
        f"the collector's process: {fleet_run.parent_cpu:.1f} CPU s; other databases wrote {f.others_wrote:,} rows "
        f"meanwhile ({r.others_wrote:,} during the reference): the WAL and whole-server figures count their share",
        f"a Collector (lease {LEASE:g} s, grace 0) every {COLLECT_INTERVAL:g} s in the parent; collection = "
        f"Store.collect_window; window end to report: {latencies.text()}; waiting for a connection slot: "
        f"p50 {_ms(statistics.median(f.waits))}; all {replicas:,} registered {fleet_run.registered_s:.1f} s after "
        f"the start; the collector's runs that wrote a report (all their steps, range distinct's rollup too): "
        f"{Figure([r * 1000 for r in fleet_run.runs] or [math.nan], 'ms').text()}; "
        f"id inserts that met a concurrent flush's same ids and fell back to ON CONFLICT: {f.fallbacks:,} "
        f"({f.fallbacks / max(f.flushes, 1):.0%} of the flushes)",
        "exact: every window's report has unique workspaces and users, allowed, denied and replicas equal to the "
        "truth the replicas kept, and replicas_missing and the late figures 0",
        *(f"MISMATCH {m}" for m in fleet_run.mismatches[:5]), *(f"failure {k}: {n}" for k, n in f.failures.items()),
    ]
    result.params = {"replicas": replicas, "window_s": plan.window, "windows": plan.windows,
                     "workers": plan.workers, "connections": plan.connections, "ids_per_flush": plan.ids_per_flush,
                     "stored_ids": fleet_run.stored_ids, "stored_bytes": fleet_run.stored_bytes,
                     "pg_cpu_per_flush_s": pg, "client_cpu_per_flush_s": client, "ids_per_window": sized,
                     "fallbacks": f.fallbacks, "registered_s": fleet_run.registered_s}
    return result
