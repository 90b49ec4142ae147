"""Issue #13, item 5: the capacity model: what one PostgreSQL carries, from figures measured in this run.

``python -m bench --only capacity`` takes the fleet of 1,000 replicas (bench/fleet.py; run now unless this
run already did) for the cost of a flush, then measures on fresh ``bench_fleet_*`` databases: one large
flush (the cost per id), the real collect path on windows of 10^5, 10^6 and 10^7 ids filled with
``generate_series`` (against a bare count of the same ids), the bytes each stored id takes and the WAL
it writes, and the connections one started Aggregator holds, directly and through PgBouncer. The model
and the settings that move it are in docs/capacity.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pwd
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy as sa

from aggregator import Aggregator, collector, health, store
from bench import fleet
from bench.figures import Check, Figure, Result
from bench.workload import Env

FLEET = 1_000  # the fleet whose flushes the model is built on
COLLECT_LIMIT_S = 2.0
WORKSPACES = 1_000
REPLICAS = 1_000  # contributions rows of a filled window
PROCESSES_BEHIND_POOLER = 3
POOL_SIZE = getattr(store, "POOL_SIZE", 5)  # a Store's pool: up to twice this many connections at once
INTERVALS = (("10 s", 10), ("60 s", 60), ("5 min", 300))  # flush intervals the model is tabled for
FLUSH_REPS = 3
_OTHERS = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"


def capacity(env: Env, *, largest: int = 1_000_000) -> Result:
    """The model's figures; ``largest``: the biggest window collected (10^7 takes ~10 minutes here, so on request)."""
    sizes = (10_000, 100_000) if env.quick else tuple(n for n in (100_000, 1_000_000, 10_000_000) if n <= largest)
    big = 20_000 if env.quick else 200_000
    run = fleet.measured(env, FLEET)
    per_id = _flush_per_id(env, big)
    collections = [_collection(env, n) for n in sizes]
    connections = _connections(env)
    result = _model(env, run, per_id, collections, connections, sizes)
    result.name = "capacity_1e7" if largest >= 10_000_000 else "capacity"
    return result


# ---- measurements ----------------------------------------------------------------------------------


def _flush_per_id(env: Env, n: int) -> dict[str, Any]:
    """apply_batch of ``n`` new user ids into an empty window, FLUSH_REPS times: CPU (median) and WAL (least) per id.

    The WAL position is the whole server's: other databases' writes only add to it, so the least of the
    repetitions is the closest to ours alone (and the rows they wrote meanwhile are kept to say so).
    """
    with fleet.scratch_database(env, "flush") as url:
        samples = [asyncio.run(_flush_once(url, n, hours_ago=rep + 1)) for rep in range(FLUSH_REPS)]
    return {"ids": n, **{key: statistics.median(s[key] for s in samples) for key in ("wall_s", "client_s", "pg_s")},
            "wal_b": min(s["wal_b"] for s in samples), "others_wrote": min(s["others_wrote"] for s in samples)}


async def _flush_once(url: str, n: int, *, hours_ago: int) -> dict[str, float]:
    conn = await asyncpg.connect(url)
    database = sa.make_url(url).database or ""
    cpu = await fleet.ServerCpu.find(conn, database)
    db = store.Store(url, pool_size=1)
    start = (int(time.time()) // 3600 - hours_ago) * 3600
    users = [uuid.uuid4().int for _ in range(n)]
    try:
        await db.ping()
        lsn, others = await conn.fetchrow(fleet.OTHERS_AND_WAL, database)
        before = (cpu.read()[0] if cpu else 0.0, time.process_time(), time.perf_counter())
        batch = store.Batch(seq=1, windows={start: store.BatchWindow([], users, n, 0)}, events=n,
                            watermark=time.time() - 1)
        await db.apply_batch(batch, writer_id=uuid.uuid4(), replica_id="capacity", window=3600, now=time.time())
        wall, client = time.perf_counter() - before[2], time.process_time() - before[1]
        server = (cpu.read()[0] if cpu else math.nan) - before[0]
        lsn_after, others_after = await conn.fetchrow(fleet.OTHERS_AND_WAL, database)
        stored = await conn.fetchval("SELECT count(*) FROM window_ids WHERE window_start = $1", start)
    finally:
        await db.close()
        await conn.close()
    if stored != n:
        raise AssertionError(f"the flush stored {stored:,} ids, expected {n:,}")
    return {"wall_s": wall / n, "client_s": client / n, "pg_s": server / n, "wal_b": (lsn_after - lsn) / n,
            "others_wrote": others_after - others}


def _collection(env: Env, n: int) -> dict[str, Any]:
    """A window of ``n`` users and 1,000 workspaces, filled with SQL, collected by the real Collector."""
    with fleet.scratch_database(env, f"collect_{n}") as url:
        return asyncio.run(_collect_once(url, n))


async def _explained_wal(conn: asyncpg.Connection, statement: str, *args: Any) -> int:
    """Run ``statement`` under EXPLAIN (ANALYZE, WAL): the WAL bytes it wrote itself, whatever else the server does."""
    plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, WAL, FORMAT JSON) {statement}", *args))
    return int(plan[0]["Plan"].get("WAL Bytes", 0))


async def _collect_once(url: str, n: int) -> dict[str, Any]:
    start = (int(time.time()) // 3600 - 2) * 3600
    database = sa.make_url(url).database or ""
    conn = await asyncpg.connect(url)
    try:
        began = time.perf_counter()
        async with conn.transaction():
            await conn.execute("INSERT INTO windows (window_start, window_end) VALUES ($1, $2)", start, start + 3600)
            fill_wal = 0
            for dim, prefix, count in ((1, "w", WORKSPACES), (2, "u", n)):
                fill_wal += await _explained_wal(
                    conn, "INSERT INTO window_ids (window_start, dim, id) SELECT $1::bigint, $2::smallint, "
                          "md5($3 || i)::uuid FROM generate_series(1, $4::int) AS i", start, dim, prefix, count)
            await conn.execute("INSERT INTO contributions (window_start, replica_id, allowed, denied, ontime) "
                               "SELECT $1, 'replica-' || i, 1000, 1, true FROM generate_series(1, $2) AS i",
                               start, REPLICAS)
        fill_s = time.perf_counter() - began
        await conn.execute("ANALYZE")  # no VACUUM: as right after real flushes (autovacuum sets it later)
        _, heap, indexes = await fleet.sizes(conn, "window_ids")
        db = fleet.TimedStore(url)
        judge = collector.Collector(db, collector_id="capacity", grace=0.0, id_retention=2 * 86400.0, lease=10.0,
                                    max_delay=10.0, contact=health.Contact())
        (lsn, others), began, error = await conn.fetchrow(fleet.OTHERS_AND_WAL, database), time.perf_counter(), ""
        try:
            written = await judge.run_once()
        except Exception as exc:  # a finding, not a crash of the row: the window could not be reported
            written, error = [], f"{type(exc).__name__}: {str(exc).split(': ')[-1][:120]}"
        run_s = time.perf_counter() - began
        lsn_after, others_after = await conn.fetchrow(fleet.OTHERS_AND_WAL, database)
        await db.close()
        began = time.perf_counter()
        counted = await conn.fetch("SELECT dim, count(*) FROM window_ids WHERE window_start = $1 GROUP BY dim", start)
        count_s = time.perf_counter() - began
        rollup = (await fleet.sizes(conn, "day_ids"))[0]
    finally:
        await conn.close()
    if not error and [(r.unique_users, r.unique_workspaces) for r in written] != [(n, WORKSPACES)] or len(counted) != 2:
        raise AssertionError(f"collection of {n:,} ids wrote {written}")
    rows = n + WORKSPACES
    return {"ids": n, "collect_s": db.collected.get(start, (run_s, 0.0))[0], "error": error, "run_s": run_s,
            "count_s": count_s, "fill_s": fill_s, "heap_b": heap / rows, "index_b": indexes / rows,
            "rollup_b": rollup / rows, "fill_wal_b": fill_wal / rows, "collect_wal_b": (lsn_after - lsn) / rows,
            "others_wrote": others_after - others}


def _connections(env: Env) -> dict[str, Any]:
    """pg_stat_activity rows held by started, idle Aggregators: one directly, several through PgBouncer."""
    with fleet.scratch_database(env, "connections") as url:
        database = sa.make_url(url).database or ""
        found: dict[str, Any] = {}
        agg = Aggregator(database_url=url, handle_sigterm=False).start(wait=30)
        try:
            time.sleep(2.0)
            found["idle"] = _count(env, database)
            agg.flush()
            agg.collect()
            found["after_flush_and_collect"] = _count(env, database)
        finally:
            agg.stop()
        pgbouncer = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
        if pgbouncer is None:
            return found
        with _pooler(pgbouncer, env.scratch.admin_url) as port:
            pooled = sa.make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
            aggs = [Aggregator(database_url=pooled, database_pooler="transaction", handle_sigterm=False).start(wait=30)
                    for _ in range(PROCESSES_BEHIND_POOLER)]
            try:
                for agg in aggs:
                    agg.flush()
                    agg.collect()
                time.sleep(2.0)
                found["pooled_clients"] = _clients(port)
                found["pooled_server"] = _count(env, database)
            finally:
                for agg in aggs:
                    agg.stop()
        return found


def _count(env: Env, database: str) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(env.scratch.admin_url)
        try:
            return int(await conn.fetchval(_OTHERS, database))
        finally:
            await conn.close()
    return asyncio.run(count())


def _clients(port: int) -> int:
    """Established TCP connections to PgBouncer's port (its side of each client connection)."""
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[1].endswith(f":{port:04X}") and line.split()[3] == "01")


@contextlib.contextmanager
def _pooler(binary: str, server_url: str) -> Iterator[int]:
    """A PgBouncer in transaction mode in front of ``server_url``'s server (as ``postgres`` when run as root)."""
    server = sa.make_url(server_url)
    base = Path(tempfile.mkdtemp(prefix="bench-fleet-pgbouncer-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    user = server.username or pwd.getpwuid(os.geteuid()).pw_name
    (base / "users.txt").write_text(f'"{user}" "{server.password or ""}"\n')
    (base / "pgbouncer.ini").write_text(
        f"[databases]\n* = host={server.host or '127.0.0.1'} port={server.port or 5432}\n[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\nauth_type = trust\n"
        f"auth_file = {base / 'users.txt'}\npool_mode = transaction\ndefault_pool_size = 20\n"
        f"max_client_conn = 1000\nlogfile = {base / 'log'}\n")
    command = [binary, str(base / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        account = pwd.getpwnam("postgres")
        for path in (base, *base.iterdir()):
            os.chown(path, account.pw_uid, account.pw_gid)
        command = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}", "--clear-groups", *command]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {(base / 'log').read_text()[-2000:]}") from None
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(base, ignore_errors=True)


# ---- the model -------------------------------------------------------------------------------------


def _ids_at_limit(points: list[tuple[int, float]]) -> float:
    """Where a line through the two largest (ids, seconds) points reaches COLLECT_LIMIT_S (nan: too few points)."""
    if len(points) < 2:
        return float("nan")
    (n0, t0), (n1, t1) = points[-2:]
    slope = (t1 - t0) / (n1 - n0)
    return n1 + (COLLECT_LIMIT_S - t1) / slope if slope > 0 else float("inf")


def _model(env: Env, run: fleet.FleetRun, per_id: dict[str, Any], collections: list[dict[str, Any]],
           connections: dict[str, Any], sizes: tuple[int, ...]) -> Result:
    f = run.fleet
    ids_per_flush = f.ids / f.flushes
    # The database's own backends (the collector's included): other databases on a shared server never count
    # there, while the whole server's figure takes their share too (an upper bound, shown beside it).
    pg_per_flush = f.per_flush(f.pg_cpu) or math.nan
    server_per_flush = f.per_flush(f.server_cpu) or math.nan
    client_per_flush = f.client_cpu / f.flushes
    fixed_pg = max(pg_per_flush - ids_per_flush * per_id["pg_s"], 0.0)  # per transaction; the rest is per id
    reported = [c for c in collections if not c["error"]]
    limit = _ids_at_limit([(c["ids"], c["collect_s"]) for c in reported])
    limit_run = _ids_at_limit([(c["ids"], c["run_s"]) for c in reported])
    stored_b = run.stored_bytes / max(run.stored_ids, 1)
    largest = collections[-1]

    def cost(ids: int) -> float:
        """PostgreSQL CPU seconds of a flush of ``ids`` new ids: the fleet's, plus or less the large flush's slope."""
        return pg_per_flush + (ids - ids_per_flush) * float(per_id["pg_s"])

    result = Result("capacity", f"capacity of one PostgreSQL, from the fleet of {FLEET:,} and measured sizes")
    result.ours = Figure([f.rate * 60], "replicas at a 60 s flush interval (this machine)")
    result.checks = [
        Check(peer=f"per dedicated PostgreSQL core, at 60 s: {60 / pg_per_flush:,.0f} replicas (PostgreSQL CPU "
                   f"{pg_per_flush * 1000:.2f} ms a flush of {ids_per_flush:.0f} ids = {fixed_pg * 1000:.2f} ms + "
                   f"{per_id['pg_s'] * 1e6:.2f} us/id; whole server {server_per_flush * 1000:.2f} ms)",
              ratio_label="PostgreSQL/client CPU", ratio=pg_per_flush / client_per_flush),
        *(Check(peer=f"collect a window of {c['ids']:,} ids: " + (
                    f"report {c['collect_s']:.2f} s, then the run FAILED after {c['run_s']:.1f} s ({c['error']})"
                    if c["error"] else
                    f"report {c['collect_s']:.2f} s; the collector's whole run, range distinct's rollup "
                    f"included, {c['run_s']:.2f} s")
                + "; a bare count of the same ids", figure=Figure([c["count_s"] * 1000], "ms"),
                ratio_label="report/count", ratio=c["collect_s"] / c["count_s"], target="reported",
                passed=not c["error"]) for c in collections),
        Check(peer=f"ids per window before its report takes {COLLECT_LIMIT_S:g} s: {limit:,.0f}; before the "
                   f"collector's whole run does: {limit_run:,.0f} (linear through the largest two sizes measured)"),
        Check(peer=f"bytes per stored id in window_ids: {stored_b:.0f} (fleet flushes), "
                   f"{largest['heap_b'] + largest['index_b']:.0f} (filled: heap {largest['heap_b']:.0f} + index "
                   f"{largest['index_b']:.0f}); day rollup {largest['rollup_b']:.0f} per id"),
        Check(peer=f"WAL per 10^6 ids: flush path {per_id['wal_b']:.0f} MB, the fleet's small flushes "
                   f"{f.wal_bytes / max(f.ids, 1):.0f} MB, one INSERT ... SELECT {largest['fill_wal_b']:.0f} MB, "
                   f"the collector's run (rollup) {largest['collect_wal_b']:.0f} MB"),
        Check(peer=f"connections held by one idle started Aggregator: {connections['idle']} (after a flush and a "
                   f"collection {connections['after_flush_and_collect']}); code: at most 2 x POOL_SIZE = "
                   f"{2 * POOL_SIZE} at once"
                   + (f"; {PROCESSES_BEHIND_POOLER} through PgBouncer: {connections['pooled_clients']} client, "
                      f"{connections['pooled_server']} server connections" if "pooled_server" in connections else
                      "; PgBouncer not installed")),
    ]
    result.notes = [
        f"replicas per PostgreSQL = flush interval x flushes/s: this machine sustained {f.rate:,.1f} flushes/s with "
        f"the {FLEET:,} replicas' 2 client processes on the same 2 shared cores (clients {client_per_flush * 1000:.2f} "
        "ms CPU a flush); per dedicated core = flush interval / PostgreSQL CPU per flush (CPU only: WAL fsyncs, "
        "I/O and the server's background processes not counted)",
        *(f"replicas per dedicated PostgreSQL core with {ids:,} new ids per flush ({cost(ids) * 1000:.2f} ms a "
          "flush), at a flush interval of " + ", ".join(f"{label}: {interval / cost(ids):,.0f}"
                                                        for label, interval in INTERVALS)
          for ids in (round(ids_per_flush), 1_000, 10_000)),
        f"large flush: {per_id['ids']:,} new ids in one apply_batch, median of {FLUSH_REPS}: client "
        f"{per_id['client_s'] * 1e6:.2f} us/id, PostgreSQL {per_id['pg_s'] * 1e6:.2f} us/id, wall "
        f"{per_id['wall_s'] * 1e6:.2f} us/id; WAL the least of the {FLUSH_REPS} ({per_id['others_wrote']:,} rows "
        "written by other databases meanwhile)",
        *(f"window of {c['ids']:,}: fill {c['fill_s']:.1f} s; Collector.run_once {c['run_s']:.2f} s, of which "
          f"collect_window {c['collect_s']:.2f} s; heap {c['heap_b']:.0f} + index {c['index_b']:.0f} B/id; WAL: "
          f"fill {c['fill_wal_b']:.0f} B/id, collector's run {c['collect_wal_b']:.0f} B/id ({c['others_wrote']:,} "
          "rows written by other databases meanwhile)" for c in collections),
        "collection: the real Collector.run_once on a window filled with generate_series (md5 ids, random order), "
        "ANALYZE, no VACUUM; the reference is SELECT dim, count(*) of the same window right after; one collection "
        "per size (a window is collected once), each size on a fresh database",
        "WAL: the fill's from EXPLAIN (ANALYZE, WAL), its own; the others are differences of the server's WAL "
        "position, other databases' writes included (their rows are counted to say so), full-page images after "
        "checkpoints included",
    ]
    result.params = {"fleet": FLEET, "sizes": list(sizes), "per_id": per_id, "collections": collections,
                     "connections": connections, "ids_per_window_at_2s": limit,
                     "ids_per_window_at_2s_whole_run": limit_run, "stored_b_per_id": stored_b,
                     "server_cpu_per_flush_s": server_per_flush, "pg_cpu_per_flush_s": pg_per_flush,
                     "fixed_pg_cpu_per_flush_s": fixed_pg, "flushes_per_s": f.rate,
                     "client_cpu_per_flush_s": client_per_flush, "wal_per_flush_b": f.wal_bytes / f.flushes,
                     "quick": env.quick}
    return result
