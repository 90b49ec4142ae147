"""What every benchmark shares: the sizes of a run, ids drawn with a fixed seed, fresh databases.

Ids are ``uuid.UUID`` objects made before any timed region (version-4 shaped, random bits from a
seeded RNG), and the (workspace, user) pairs are drawn in advance, so drawing is never timed.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from pathlib import Path

from aggregator import Aggregator
from bench import databases

SEED = 4  # the number: any fixed value makes runs comparable
WORKSPACES = 1_000
USERS = 10_000

Pair = tuple[uuid.UUID, uuid.UUID]


@dataclasses.dataclass(frozen=True, slots=True)
class Sizes:
    calls: int  # track() calls per repetition (rows 1-2)
    thread_calls: int  # track() calls per repetition (row 3): long enough to include background drains
    reps: int  # repetitions of the cheap rows (1-3, 6)
    pg_reps: int  # repetitions of the PostgreSQL rows (4, 5)
    flush_ids: int  # distinct users flushed at once (row 4)
    naive_sample: int  # rows inserted by the naive ORM peer, then scaled (row 4)
    collect_ids: int  # distinct users in the collected window (row 5)
    replicas: int  # contributions rows in the collected window (row 5)
    memory_ids: int  # distinct users held in memory (row 6)
    memory_reps: int  # three processes each
    memory_traced_reps: int  # our side under tracemalloc (~30 s per million ids)
    daemon_seconds: float  # how long the HTTP clients send (row 7)
    daemon_clients: int
    journeys: int = 10_000  # experiences applied in one flush (extra row)


FULL = Sizes(calls=200_000, thread_calls=1_000_000,
             reps=5, pg_reps=3, flush_ids=1_000_000, naive_sample=5_000, collect_ids=1_000_000,
             replicas=1_000, memory_ids=1_000_000, memory_reps=5, memory_traced_reps=3, daemon_seconds=10.0,
             daemon_clients=2)
QUICK = Sizes(calls=20_000, thread_calls=50_000,
              reps=3, pg_reps=2, flush_ids=50_000, naive_sample=500, collect_ids=50_000,
              replicas=1_000, memory_ids=100_000, memory_reps=2, memory_traced_reps=1, daemon_seconds=2.0,
              daemon_clients=2, journeys=500)


def random_uuids(rng: random.Random, n: int) -> list[uuid.UUID]:
    return [uuid.UUID(bytes=rng.randbytes(16), version=4) for _ in range(n)]


def id_space(seed: int = SEED) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """The 1,000 workspace ids and 10,000 user ids that the hot-path rows draw from."""
    rng = random.Random(seed)
    return random_uuids(rng, WORKSPACES), random_uuids(rng, USERS)


def draw_pairs(n: int, seed: int = SEED) -> list[Pair]:
    workspaces, users = id_space(seed)
    rng = random.Random(seed + 1)
    return [(workspaces[rng.randrange(WORKSPACES)], users[rng.randrange(USERS)]) for _ in range(n)]


class Env:
    """One run's settings and the resources its rows share (created on first use, closed at the end)."""

    def __init__(self, sizes: Sizes, *, quick: bool, database_url: str, tmp: Path) -> None:
        self.sizes = sizes
        self.quick = quick
        self.database_url = database_url
        self.tmp = tmp
        self.sqlite = databases.SqliteFiles(tmp)
        self._pairs: dict[int, list[Pair]] = {}
        self._scratch: databases.PostgresScratch | None = None

    def pairs(self, n: int) -> list[Pair]:
        if n not in self._pairs:
            self._pairs[n] = draw_pairs(n)
        return self._pairs[n]

    @property
    def scratch(self) -> databases.PostgresScratch:
        if self._scratch is None:
            self._scratch = databases.PostgresScratch(self.database_url)
        return self._scratch

    def embedded(self) -> Aggregator:
        """A started Aggregator on a fresh SQLite file that neither flushes nor collects on its own.

        window and flush_interval of 1h: no scheduled flush lands inside a timed loop. collect=False:
        collecting is per window, not per event, and would run on this process's CPU at random.
        """
        return Aggregator(database_url=self.sqlite.fresh(), window="1h", flush_interval="1h", collect=False,
                          handle_sigterm=False).start()

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
