"""The local spool: how fast batches go to disk during an outage and come back, against raw SQLite.

Ours is ``aggregator.spool`` end to end: ``append()`` (encode, insert, fsynced commit) of batches of
10,000 ids, then ``first()`` + ``remove()`` until empty (read, decode, delete), as a replay does. The
physical reference, measured in the same run on the same disk, stores the same encoded bytes in a bare
SQLite table with the same settings (WAL, ``synchronous=FULL``, one commit per batch), then reads and
deletes them without decoding: what remains of the gap is our encoding and bookkeeping. Beside it, the
codec alone, and the memory an id costs in a set (tracemalloc), the figure behind ``spool.BYTES_PER_ID``.
"""

from __future__ import annotations

import gc
import random
import sqlite3
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

from aggregator import experiences, meters, spool, store
from bench import figures
from bench.figures import Check, Figure, Result
from bench.workload import SEED, Env

IDS_PER_BATCH = 10_000
WORKSPACES_PER_BATCH = 1_000  # the rest are users
TARGET_IDS_PER_S = 1_000_000


def run(quick: bool, directory: Path | None = None) -> dict[str, Any]:
    """Every figure of the row, each a Figure over the repetitions; ``directory``: where files go (a temp dir)."""
    batches_n, reps = (20, 3) if quick else (200, 5)
    rng = random.Random(SEED)
    batches = [_batch(rng, seq) for seq in range(1, batches_n + 1)]
    payloads = [spool.encode(batch) for batch in batches]
    ids = batches_n * IDS_PER_BATCH
    samples: dict[str, list[float]] = {}

    def keep(name: str, seconds: float, count: int) -> None:
        samples.setdefault(name, []).append(count / seconds)

    with tempfile.TemporaryDirectory(prefix="spool-", dir=directory) as tmp:
        for rep in range(reps):
            folder = Path(tmp) / f"rep{rep}"
            write, replay = _ours(folder / "ours", batches)
            ref_write, ref_replay = _reference(folder / "reference.db", payloads)
            for name, seconds in (("write", write), ("replay", replay), ("reference_write", ref_write),
                                  ("reference_replay", ref_replay)):
                keep(f"{name}_batches_per_s", seconds, batches_n)
                keep(f"{name}_ids_per_s", seconds, ids)
            began = time.perf_counter()
            for batch in batches:
                spool.encode(batch)
            keep("encode_ids_per_s", time.perf_counter() - began, ids)
            began = time.perf_counter()
            for payload in payloads:
                spool.decode(payload)
            keep("decode_ids_per_s", time.perf_counter() - began, ids)
    out: dict[str, Any] = {name: Figure(values, "batches/s" if "batches" in name else "ids/s")
                           for name, values in samples.items()}
    out["payload_bytes_per_id"] = Figure([len(payloads[0]) / IDS_PER_BATCH], "B/id")
    out.update(memory(100_000 if quick else 1_000_000))
    out["params"] = {"batches": batches_n, "ids_per_batch": IDS_PER_BATCH, "repetitions": reps,
                     "filesystem": _filesystem(Path(directory or tempfile.gettempdir()))}
    return out


def throughput(env: Env) -> Result:
    """The row for bench/run.py."""
    found = run(env.quick, env.tmp)
    result = Result("spool", "spool write and replay of 10,000-id batches, against raw SQLite")
    result.ours = found["write_ids_per_s"]
    write_ratio = found["write_ids_per_s"].median / found["reference_write_ids_per_s"].median
    replay_ratio = found["replay_ids_per_s"].median / found["reference_replay_ids_per_s"].median
    quick = env.quick
    result.checks = [
        # A memory budget's worth of ids (64 MiB, ~670,000 ids) goes to disk in under a second.
        Check(target=f">= {TARGET_IDS_PER_S:,} ids/s",
              passed=figures.at_least(found["write_ids_per_s"].median, TARGET_IDS_PER_S, not quick)),
        Check(peer="raw SQLite insert of the same bytes", figure=found["reference_write_ids_per_s"],
              ratio_label="ours/raw", ratio=write_ratio),
        # Replay outpaces the store (pg_flush applies ~330,000 ids/s): the store sets the pace of a replay.
        Check(peer="ours, replay (first + decode + remove)", figure=found["replay_ids_per_s"],
              target=f">= {TARGET_IDS_PER_S:,} ids/s",
              passed=figures.at_least(found["replay_ids_per_s"].median, TARGET_IDS_PER_S, not quick)),
        Check(peer="raw SQLite read + delete of the same bytes", figure=found["reference_replay_ids_per_s"],
              ratio_label="ours/raw", ratio=replay_ratio),
        Check(peer="encode alone", figure=found["encode_ids_per_s"]),
        Check(peer="decode alone", figure=found["decode_ids_per_s"]),
        Check(peer="set of 128-bit ints, tracemalloc", figure=found["set_bytes_per_id"],
              ratio_label="BYTES_PER_ID/set", ratio=spool.BYTES_PER_ID / found["set_bytes_per_id"].median),
    ]
    params = found["params"]
    result.notes = [
        f"{params['batches']} batches of {IDS_PER_BATCH:,} ids ({WORKSPACES_PER_BATCH:,} workspaces, the rest users) "
        f"in one window, {params['repetitions']} repetitions, each on fresh files on {params['filesystem']}",
        "write: Spool.append (encode + insert + fsynced commit) per batch; replay: first() + remove() until empty",
        "raw SQLite: the same encoded bytes in a bare (seq, payload) table, WAL, synchronous=FULL, one commit per "
        "batch; then read + delete in seq order, no decoding",
        f"payload: {found['payload_bytes_per_id'].median:.1f} B per id on disk (16 B id + framing)",
        f"memory per id (tracemalloc): set {found['set_bytes_per_id'].text()}, list "
        f"{found['list_bytes_per_id'].text()}; batch_bytes()/traced for a mixed batch: "
        f"{found['estimate_over_traced'].median:.2f}",
    ]
    result.params = params
    return result


def memory(n: int) -> dict[str, Figure]:
    """tracemalloc's live bytes per id for a set and a list of fresh 128-bit ints, and batch_bytes()'s accuracy."""
    rng = random.Random(SEED)
    raw = [rng.getrandbits(128) | 1 << 127 for _ in range(n)]  # all 128 bits wide, as UUID ints mostly are
    set_cost = _traced(lambda: {value + 0 for value in raw}) / n  # + 0: a new int object, as the tracker keeps
    list_cost = _traced(lambda: [value + 0 for value in raw]) / n
    estimate = _traced(lambda: _mixed_batch(random.Random(SEED)))
    ratio = spool.batch_bytes(_mixed_batch(random.Random(SEED))) / estimate
    return {"set_bytes_per_id": Figure([set_cost], "B/id"), "list_bytes_per_id": Figure([list_cost], "B/id"),
            "estimate_over_traced": Figure([ratio], "x")}


def _ours(folder: Path, batches: list[store.Batch]) -> tuple[float, float]:
    box = spool.Spool.create(folder, uuid.uuid4(), "bench")
    began = time.perf_counter()
    for batch in batches:
        box.append(batch)
    write = time.perf_counter() - began
    began = time.perf_counter()
    while (replayed := box.first()) is not None:
        box.remove(replayed.seq)
    replay = time.perf_counter() - began
    box.close()
    return write, replay


def _reference(path: Path, payloads: list[bytes]) -> tuple[float, float]:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("CREATE TABLE batches (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
    began = time.perf_counter()
    for seq, payload in enumerate(payloads, 1):
        db.execute("INSERT INTO batches VALUES (?, ?)", (seq, payload))
    write = time.perf_counter() - began
    began = time.perf_counter()
    while (row := db.execute("SELECT seq, payload FROM batches ORDER BY seq LIMIT 1").fetchone()) is not None:
        db.execute("DELETE FROM batches WHERE seq = ?", (row[0],))
    replay = time.perf_counter() - began
    db.close()
    return write, replay


def _batch(rng: random.Random, seq: int) -> store.Batch:
    ids = [rng.getrandbits(128) for _ in range(IDS_PER_BATCH)]
    window = store.BatchWindow(workspaces=ids[:WORKSPACES_PER_BATCH], users=ids[WORKSPACES_PER_BATCH:],
                               allowed=IDS_PER_BATCH, denied=seq)
    return store.Batch(seq=seq, windows={1_800_000_000: window}, events=IDS_PER_BATCH, watermark=1.8e9 + seq)


def _mixed_batch(rng: random.Random) -> store.Batch:
    """A batch with every kind of content, in the proportions of a busy replica."""
    window = store.BatchWindow(workspaces=[rng.getrandbits(128) | 1 << 127 for _ in range(2_000)],
                               users=[rng.getrandbits(128) | 1 << 127 for _ in range(20_000)], allowed=1, denied=0)
    metered = meters.MeterBatch()
    for index in range(500):
        dimensions = {"region": f"eu-{index % 7}", "plan": f"plan-{index}"}
        group = meters.group_key(dimensions)
        data = metered.groups[(1_800_000_000, "requests", group)] = meters.GroupData(dimensions, 5, 5)
        data.distinct.update(uuid.UUID(int=rng.getrandbits(128)) for _ in range(10))
        event_id = str(uuid.UUID(int=rng.getrandbits(128)))
        metered.identified[("requests", event_id)] = meters.Identified(
            event_id, "requests", 1_800_000_000, group, dict(dimensions), 3, None)
    checkpoints = [experiences.Checkpoint(
        correlation_id=f"01J9Z3K8Q6W5N2B7R4T1V{index:05d}", experience_id="checkout", checkpoint="start",
        type="web", feature_category="payments", urgency="sync_fast", client_timestamp=1.8e9 + index,
        received_at=1.8e9 + index) for index in range(500)]
    return store.Batch(seq=1, windows={1_800_000_000: window}, events=23_000, meters=metered,
                       checkpoints=checkpoints, watermark=1.8e9)


def _traced(make: Any) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()
        gc.collect()
        live = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return float(live)


def _filesystem(path: Path) -> str:
    """The type of the filesystem under ``path`` (fsync costs differ by orders of magnitude)."""
    best, kind = "", "unknown filesystem"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return f"{kind} ({best or '?'})"
