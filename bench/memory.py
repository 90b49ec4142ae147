"""Row 6: memory per distinct id held in-process, against a set of ``uuid.UUID``.

The row's figure is tracemalloc's count of live bytes: what the ids hold, which is what the next
window reuses. Resident memory (``/proc/self/statm`` after ``gc.collect()``) is shown beside it: it
also counts the allocator's free blocks left by the transient objects of the calls (the UUIDs the
caller made, the buffer), reusable but not returned to the OS. Each side and repetition runs in a
fresh spawned process, so none inherits another's heap. tracemalloc slows allocation about 20-fold,
so it runs fewer repetitions. Peak growth comes from ``VmHWM`` after resetting it
(``/proc/self/clear_refs``). A process leaves with ``os._exit`` once it has reported, so the pending
ids are never flushed: writing them is not what this row measures.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import random
import re
import time
import tracemalloc
import uuid
from multiprocessing.connection import Connection
from pathlib import Path

from aggregator import Aggregator, logs
from bench import figures, hotpath
from bench.figures import Check, Figure, Result
from bench.workload import SEED, Env

# track() appends to a buffer that a background job folds into the window's sets (every 0.2 s
# today); waiting this long lets it finish, so "held" means what stays, not what is in flight.
SETTLE_SECONDS = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


def memory(env: Env) -> Result:
    n = env.sizes.memory_ids
    result = Result("memory", "memory per distinct id held in-process")
    held: list[float] = []
    unsettled: list[float] = []
    peak: list[float] = []
    peer: list[float] = []
    locked: list[float] = []
    traced = [_in_child("ours-traced", n, env.sqlite.fresh(), SEED + rep)["held"]
              for rep in range(env.sizes.memory_traced_reps)]
    for rep in range(env.sizes.memory_reps):
        ours = _in_child("ours", n, env.sqlite.fresh(), SEED + rep)
        held.append(ours["held"])
        unsettled.append(ours["after_loop"])
        peak.append(ours["peak"])
        peer.append(_in_child("set", n, "", SEED + rep)["held"])
        locked.append(_in_child("locked", n, "", SEED + rep)["held"])
    result.ours = Figure(traced, "B/id")
    sets = Figure(peer, "B/id")
    result.checks = [
        Check(target="<= 100 B/id", passed=figures.at_most(result.ours.median, 100.0)),
        Check(peer="ours, resident memory growth (incl. allocator free blocks)", figure=Figure(held, "B/id")),
        Check(peer="set of uuid.UUID", figure=sets, ratio_label="set/ours", ratio=sets.median / result.ours.median),
        Check(peer="lock + 2 sets + 2 ints (ints added directly, no buffer)", figure=Figure(locked, "B/id")),
        Check(peer="ours right after the loop (buffer not yet folded)", figure=Figure(unsettled, "B/id")),
        Check(peer="ours, peak growth during the loop", figure=Figure(peak, "B/id")),
    ]
    result.notes = [
        f"ours: tracemalloc live-byte growth per id, {n:,} distinct users in one workspace tracked on a started "
        "Aggregator (window=1h, flush_interval=1h: nothing flushed), read once the background fold has emptied "
        f"the buffer and after gc.collect(); {env.sizes.memory_traced_reps} repetitions (tracemalloc is slow)",
        f"the other lines: resident-memory growth, read {SETTLE_SECONDS:g} s after the loop and gc.collect(); "
        "a fresh spawned process per side and repetition",
        "both sides get UUIDs created inside the measured region (uuid.UUID(bytes=...) from pre-drawn bytes); "
        "ours keeps only each one's 128-bit int, the set keeps the UUID objects themselves",
        "RSS counts memory the allocator keeps after frees (the caller's UUID objects and the buffer, freed "
        "between the ids we keep), so it errs high; those blocks are reused by the next window's calls",
    ]
    result.params = {"ids": n, "repetitions": env.sizes.memory_reps, "traced_repetitions": env.sizes.memory_traced_reps,
                     "settle_s": SETTLE_SECONDS, "method": "tracemalloc (row), rss (beside it)"}
    return result


def _in_child(side: str, n: int, database_url: str, seed: int) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_measure, args=(send, side, n, database_url, seed), name=f"bench-memory-{side}")
    child.start()
    send.close()
    try:
        answer: dict[str, float] | str = receive.recv()
    except EOFError:
        answer = "the measuring process died"
    child.join()
    if isinstance(answer, str):
        raise RuntimeError(f"memory measurement ({side}) failed: {answer} (exit code {child.exitcode})")
    return answer


def _measure(send: Connection, side: str, n: int, database_url: str, seed: int) -> None:
    """In the child: bytes per id for one side; reports through ``send`` and exits at once."""
    try:
        logs.configure(level="warning")
        rng = random.Random(seed)
        raw = [rng.randbytes(16) for _ in range(n)]
        make = uuid.UUID
        workspace = make(bytes=rng.randbytes(16), version=4)
        if side in ("set", "locked"):
            before = _settled_rss()
            _reset_peak()
            if side == "set":
                ids = {make(bytes=value, version=4) for value in raw}
                assert len(ids) == n
            else:
                record = hotpath.LockedSets().record
                for value in raw:
                    record(workspace, make(bytes=value, version=4))
            held = _settled_rss() - before
            send.send({"held": held / n, "after_loop": held / n, "peak": (_peak() - before) / n})
            return
        agg = Aggregator(database_url=database_url, window="1h", flush_interval="1h", collect=False,
                         handle_sigterm=False).start()
        track = agg.track
        if side == "ours-traced":
            gc.collect()
            tracemalloc.start()
            start = tracemalloc.get_traced_memory()[0]
            for value in raw:
                track(workspace, make(bytes=value, version=4))
            while agg._tracker._buffer:  # the background fold, slowed by tracing too
                time.sleep(0.1)
            gc.collect()
            live = tracemalloc.get_traced_memory()[0] - start
            send.send({"held": live / n, "after_loop": live / n, "peak": live / n})
            return
        before = _settled_rss()
        _reset_peak()
        for value in raw:
            track(workspace, make(bytes=value, version=4))
        after_loop = _settled_rss() - before
        time.sleep(SETTLE_SECONDS)
        held = _settled_rss() - before
        peak = _peak() - before
        if agg.status()["pending_events"] != n:
            raise AssertionError(f"{agg.status()['pending_events']} events pending, expected {n}")
        send.send({"held": held / n, "after_loop": after_loop / n, "peak": peak / n})
    except BaseException as exc:
        send.send(f"{type(exc).__name__}: {exc}")
    finally:
        send.close()
        os._exit(0)


def _settled_rss() -> int:
    gc.collect()
    return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def _peak() -> int:
    found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    assert found is not None
    return int(found.group(1)) * 1024
