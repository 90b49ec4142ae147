"""Delivery: one loop per writer takes due items from the outbox, sends them, and settles each one.

report → outbox (same commit) → delivery loop → writer. An item is marked delivered only after its
writer said so; a failure is retried with exponential backoff and jitter up to ``max_attempts``, then
the item is dead-lettered with its last error (``aggregator outbox retry`` revives it). An item that
cannot even be rendered is set aside (quarantine.py): dead-lettered at once, its reason in the quarantine. Loops are
independent, so one writer that fails or hangs never delays another. Identifiers are pseudonymized
here, the one place every outgoing item passes, before any writer sees them, and so are event ids
derived from identifiers: the row keeps its unkeyed id, the writer gets the keyed one (privacy.py).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from aggregator import billing, config, exceptions, experiences, logs, privacy, quarantine, store
from aggregator.store.outbox import Settlement
from aggregator.writers import Envelope, Outcome, Writer

log = logs.get_logger("aggregator.outbox")


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff before attempt n+1: ``initial * 2**(n-1)``, capped at ``maximum``, then jittered to 50-100%."""

    max_attempts: int = 12
    initial: float = 1.0
    maximum: float = 600.0

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        base = min(self.maximum, self.initial * 2 ** min(attempts - 1, 62))
        return float(base * (0.5 + 0.5 * (rng or random).random()))  # jitter: replicas retrying together spread out


@dataclasses.dataclass(slots=True)
class WriterStats:
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    rounds: int = 0
    last_error: str | None = None


def sent_kinds(settings: config.Settings) -> list[str]:
    """The kinds of items this configuration queues for its writers."""
    kinds = ["usage_report", experiences.FAILURE_KIND, experiences.SLI_KIND]
    return kinds + ([billing.KIND] if any(m.billable for m in settings.meters) else [])


class Deliverer:
    """The delivery loops of one replica, one per writer, on the replica's event loop."""

    def __init__(self, db: store.Store, writers: Sequence[Writer], pseudonymizer: privacy.Pseudonymizer, *,
                 claimer: str, policy: RetryPolicy = RetryPolicy(), poll_interval: float = 5.0,
                 lease: float = 300.0, clock: Callable[[], float] = time.time,
                 kinds: Sequence[str] = ("usage_report",)) -> None:
        names = [w.name for w in writers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise exceptions.ConfigError(f"writer name(s) {', '.join(duplicates)} used twice; names must be unique")
        self.store = db
        self.writers = list(writers)
        self.pseudonymizer = pseudonymizer
        self.claimer = claimer
        self.policy = policy
        self.poll_interval = poll_interval
        self.lease = lease
        self.kinds = list(kinds)  # what the writers will be sent: their identifiers need a key or the allowlist
        self.stats = {w.name: WriterStats() for w in writers}
        self._clock = clock
        self._wake = {w.name: asyncio.Event() for w in writers}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._opened: list[Writer] = []

    @classmethod
    def from_settings(cls, db: store.Store, writers: Sequence[Writer], settings: config.Settings, *,
                      clock: Callable[[], float] = time.time) -> Deliverer:
        d = settings.delivery
        return cls(db, writers, privacy.Pseudonymizer(d.pseudonym_key, d.pseudonym_allowlist),
                   claimer=settings.replica_id, policy=RetryPolicy(d.max_attempts, d.backoff_initial, d.backoff_max),
                   poll_interval=d.poll_interval, clock=clock, kinds=sent_kinds(settings))

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.writers]

    async def start(self) -> None:
        """Check each writer can emit what it would send, open it, and start its loop."""
        for writer in self.writers:
            self.pseudonymizer.require(self.kinds, f"writer {writer.name!r}")
        try:
            for writer in self.writers:
                await writer.open()
                self._opened.append(writer)
        except BaseException:
            await self._close_writers()
            raise
        self._tasks = [asyncio.create_task(self._loop(w), name=f"aggregator-deliver-{w.name}") for w in self.writers]
        log.info("delivery_started", writers=self.names, claimer=self.claimer)

    def wake(self) -> None:
        """New items are queued (a report was written): look now instead of at the next poll."""
        for event in self._wake.values():
            event.set()

    async def stop(self, drain_timeout: float) -> None:
        """Let each loop finish its round, deliver what is due within ``drain_timeout``, close writers."""
        self._stopping = True
        self.wake()
        deadline = time.monotonic() + drain_timeout
        try:
            if self._tasks:
                done, pending = await asyncio.wait(self._tasks, timeout=max(deadline - time.monotonic(), 0))
                for task in pending:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)
            remaining = {w.name: 0 for w in self.writers}
            for writer in self.writers:
                remaining[writer.name] = await self._drain(writer, deadline)
            left = {name: n for name, n in remaining.items() if n}
            if left:
                log.warning("delivery_drain_incomplete", left_batches=left, note="items stay queued for the next start")
        finally:
            await self._close_writers()

    async def deliver_once(self, writer: Writer) -> int:
        """One round for ``writer``: lease due items, send, settle. Returns how many were leased."""
        now = self._clock()
        rows = await self.store.claim_outbox(writer.name, now=now, limit=writer.max_batch, claimer=self.claimer,
                                             lease=self.lease)
        if not rows:
            return 0
        stats = self.stats[writer.name]
        stats.rounds += 1
        leased = len(rows)
        rows, envelopes, set_aside = await self._render(writer, rows)
        began = time.monotonic()
        outcomes: list[Outcome] = []
        try:
            if envelopes:
                outcomes = await asyncio.wait_for(writer.send(envelopes), timeout=self.lease / 2)
            if len(outcomes) != len(envelopes):
                outcomes = [Outcome.retry(f"writer returned {len(outcomes)} outcomes for {len(envelopes)} items")
                            ] * len(envelopes)
        except (asyncio.TimeoutError, Exception) as exc:  # a writer bug or hang must not stop the loop
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            outcomes = [Outcome.retry(f"writer {writer.name!r} raised {error}")] * len(envelopes)
        settlements = [self._settle(row, outcome) for row, outcome in zip(rows, outcomes, strict=True)] + set_aside
        await self.store.settle_outbox(self.claimer, settlements, now=self._clock())
        counts = collections.Counter(s.status for s in settlements)
        stats.delivered += counts["delivered"]
        stats.retried += counts["pending"]
        stats.dead += counts["dead"]
        failed = [o.error for o in outcomes if o.status != "delivered"] + [d.error for d in set_aside]
        if failed:
            stats.last_error = failed[-1]
            log.warning("delivery_failed", writer=writer.name, items=leased, delivered=counts["delivered"],
                        retry=counts["pending"], dead=counts["dead"], error=failed[-1])
        log.debug("delivery", writer=writer.name, items=leased, delivered=counts["delivered"],
                  duration_ms=round((time.monotonic() - began) * 1000, 2))
        return leased

    # ---- inside ----------------------------------------------------------------------------------

    async def _render(self, writer: Writer, rows: list[dict[str, Any]]
                      ) -> tuple[list[dict[str, Any]], list[Envelope], list[Settlement]]:
        """The rows that could be made into envelopes, their envelopes, and dead settlements for the others.

        An item that cannot even be rendered (a payload edited by hand, a kind this version does not know)
        is set aside: dead-lettered with the quarantine's reason, so the writer's queue moves on.
        """
        kept: list[dict[str, Any]] = []
        envelopes: list[Envelope] = []
        dead: list[Settlement] = []
        for row in rows:
            async def render(row: dict[str, Any] = row) -> Envelope:
                return self._envelope(row)

            async def set_aside(item: quarantine.Item, row: dict[str, Any] = row) -> None:
                await self.store.set_aside(item, now=self._clock(), by=self.claimer)
                dead.append(Settlement(row["id"], "dead", row["attempts"] + 1, row["next_attempt_at"],
                                       f"quarantined: {item.reason}"))

            envelope = await quarantine.guard("delivery", str(row["id"]), render, set_aside=set_aside,
                                              payload={"outbox_id": row["id"], "writer": writer.name,
                                                       "kind": row["kind"]}, writer=writer.name)
            if not isinstance(envelope, quarantine.SetAside):
                kept.append(row)
                envelopes.append(envelope)
        return kept, envelopes, dead

    def _envelope(self, row: dict[str, Any]) -> Envelope:
        # The item's own schema, not today's: an item queued by an earlier version (a usage_report 1-0-0,
        # without replicas_missing) is valid under the schema it was queued with, and goes out as such.
        data = self.pseudonymizer.apply(row["kind"], json.loads(row["payload"]))
        return Envelope(event_id=self.pseudonymizer.event_id(row["kind"], row["event_id"]), kind=row["kind"],
                        schema=row["schema_uri"], occurred_at=row["occurred_at"], data=data,
                        attempt=row["attempts"] + 1)

    def _settle(self, row: dict[str, Any], outcome: Outcome) -> Settlement:
        attempts = row["attempts"] + 1
        if outcome.status == "delivered":
            return Settlement(row["id"], "delivered", attempts, row["next_attempt_at"])
        if outcome.status == "rejected" or attempts >= self.policy.max_attempts:
            return Settlement(row["id"], "dead", attempts, row["next_attempt_at"], outcome.error)
        return Settlement(row["id"], "pending", attempts, self._clock() + self.policy.delay(attempts), outcome.error)

    async def _loop(self, writer: Writer) -> None:
        wake = self._wake[writer.name]
        while not self._stopping:
            wake.clear()
            try:
                leased = await self.deliver_once(writer)
            except exceptions.StoreError as exc:  # the database is away: items stay queued; try later
                log.warning("delivery_store_error", writer=writer.name, error=str(exc))
                leased = 0
            if leased < writer.max_batch and not self._stopping:
                try:
                    await asyncio.wait_for(wake.wait(), timeout=self.poll_interval)
                except asyncio.TimeoutError:
                    pass

    async def _drain(self, writer: Writer, deadline: float) -> int:
        """Deliver due items until none are left or the deadline passes; returns rounds cut short (0 or 1)."""
        while time.monotonic() < deadline:
            try:
                leased = await asyncio.wait_for(self.deliver_once(writer), timeout=max(deadline - time.monotonic(), 0))
            except (asyncio.TimeoutError, exceptions.StoreError):
                return 1
            if leased < writer.max_batch:
                return 0
        return 1

    async def _close_writers(self) -> None:
        while self._opened:
            writer = self._opened.pop()
            try:
                await writer.close()
            except Exception as exc:  # closing one writer must not keep the others open
                log.warning("writer_close_failed", writer=writer.name, error=f"{type(exc).__name__}: {exc}")
