"""Event ids that leave are keyed: stable per item, but no guess of the raw identifiers behind them can be checked.

The finding: a billable event's id was an unkeyed hash of meter, window and raw dimensions, and an
experience failure's a UUIDv5 of the raw correlation id, so one exported id and a list of candidates gave
the raw project, namespace and runner back. The store keeps that unkeyed id (the outbox's idempotency
key); writers and exports get ``privacy.Pseudonymizer.event_id()`` of it.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from aggregator import Aggregator, ConfigError, billing, experiences, export, meters, privacy, store, writers
from aggregator.client import new_correlation_id
from aggregator.writers import Envelope, Outcome
from tests.helpers import T0, FakeClock, manual
from tests.test_outbox import KEY, wait_for

OTHER_KEY = "o" * 32
METERS = {"ci_minutes": {"aggregation": "sum", "unit": "seconds", "decimals": 3, "billable": True,
                         "dimensions": ["project_id", "namespace_id", "runner"]}}
# 100 projects x 10 namespaces x 10 runners: the 10,000 candidates of the measured attack.
PROJECTS = [f"project-{n}" for n in range(100)]
NAMESPACES = [f"group-{n}" for n in range(10)]
RUNNERS = [f"{os}-{size}" for os in ("linux", "windows") for size in ("small", "medium", "large", "xlarge", "gpu")]
TRUTH = {"project_id": "project-42", "namespace_id": "group-7", "runner": "linux-large"}


class Recording(writers.Writer):
    """A writer double: keeps every batch it is handed, and asks for a retry of the first one (a redelivery)."""

    type = "recording"

    def __init__(self, name: str = "events") -> None:
        super().__init__(name)
        self.batches: list[list[Envelope]] = []

    @classmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Recording:
        return cls(name)

    async def send(self, batch: Sequence[Envelope]) -> list[Outcome]:
        self.batches.append(list(batch))
        if len(self.batches) == 1:
            return [Outcome.retry("collector answered 503")] * len(batch)
        return [Outcome.delivered()] * len(batch)

    def sent(self, kind: str) -> list[Envelope]:
        """The envelopes of ``kind``, in the order they were handed over (a redelivery appears twice)."""
        return [e for batch in self.batches for e in batch if e.kind == kind]


def deliver_twice(agg: Aggregator, sink: Recording, clock: FakeClock) -> None:
    """Let the first delivery fail and the retry succeed."""
    wait_for(lambda: len(sink.batches) == 1)
    clock.t += 2  # past the 1 s backoff
    agg._deliverer.wake()  # type: ignore[union-attr]
    wait_for(lambda: len(sink.batches) == 2)


def unkeyed_billable_candidates() -> dict[uuid.UUID, dict[str, str]]:
    """What an attacker computes from one exported event's window: every candidate group's unkeyed id."""
    return {billing.event_id("ci_minutes", T0, meters.group_key(dims), False): dims
            for dims in ({"project_id": p, "namespace_id": n, "runner": r}
                         for p, n, r in itertools.product(PROJECTS, NAMESPACES, RUNNERS))}


def export_billable(url: str, key: str, out: Path) -> list[dict[str, str]]:
    async def run() -> Path | None:
        db = store.Store(url)
        try:
            result = await export.export_csv(db, privacy.Pseudonymizer(key), since=0, out_dir=out,
                                             kind=billing.KIND)
            return result.path
        finally:
            await db.close()

    path = asyncio.run(run())
    assert path is not None
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def billed_twice(database_url: str, minutes: float) -> Recording:
    """A replica records ``minutes`` of ci_minutes for TRUTH, reports the window and delivers it twice."""
    clock = FakeClock()
    sink = Recording()
    agg = manual(database_url, clock, meters=METERS, writers=[sink], pseudonym_key=KEY,
                 outbox={"backoff_initial": "1s"}).start()
    try:
        agg.record("ci_minutes", minutes, TRUTH)
        agg.flush()
        clock.past_window(T0)
        agg.collect()
        deliver_twice(agg, sink, clock)
    finally:
        agg.stop()
    return sink


def test_billable_event_id_cannot_be_brute_forced_back_to_raw_dimensions(database_url: str, tmp_path: Path) -> None:
    """The finding's attack, replayed: the stored (unkeyed) id is among 10,000 candidates' ids, but the id a
    writer got and the id an export wrote match none of them. Both are the same keyed UUIDv7, whose time is
    still the window's start."""
    sink = billed_twice(database_url, 90.5)
    candidates = unkeyed_billable_candidates()
    assert len(candidates) == 10_000
    stored = billing.event_id("ci_minutes", T0, meters.group_key(TRUTH), False)
    assert candidates[stored] == TRUTH  # the attack works on the unkeyed id: it must never leave
    sent = sink.sent(billing.KIND)[-1]
    (row,) = export_billable(database_url, KEY, tmp_path / "out")
    assert sent.event_id == uuid.UUID(sent.data["event_id"]) == uuid.UUID(row["event_id"])
    assert sent.event_id not in candidates and sent.event_id != stored
    window_ms = T0 * 1000
    assert (7, window_ms) == (sent.event_id.version, sent.event_id.int >> 80)


def test_billable_event_ids_are_stable_across_deliveries_and_differ_between_keys(
        database_url: str, tmp_path: Path) -> None:
    """A redelivered event carries the id of its first delivery, in the envelope and the event; an export
    under the same key writes that id again, and under another key another id."""
    sink = billed_twice(database_url, 12.25)
    first, second = sink.sent(billing.KIND)
    assert (second.attempt, first.event_id) == (2, second.event_id)
    assert first.data["event_id"] == second.data["event_id"] == str(first.event_id)
    (again,) = export_billable(database_url, KEY, tmp_path / "same")
    (other,) = export_billable(database_url, OTHER_KEY, tmp_path / "other")
    assert str(first.event_id) == again["event_id"] != other["event_id"]
    assert uuid.UUID(other["event_id"]).int >> 80 == T0 * 1000  # another key, the same window time


def test_experience_failure_event_id_cannot_be_brute_forced_back_to_the_correlation_id(database_url: str) -> None:
    """A timed-out journey's failure event: its id is not the UUIDv5 of any candidate correlation id (the
    true one included), the same on both deliveries, and a UUIDv5 still; the outbox row keeps the unkeyed id."""
    clock = FakeClock()
    sink = Recording()
    agg = manual(database_url, clock, urgencies={"sync_fast": "10s"}, writers=[sink], pseudonym_key=KEY,
                 outbox={"backoff_initial": "1s"}).start()
    stale = new_correlation_id()
    try:
        agg.checkpoint_many([{"correlation_id": stale, "experience_id": "http_request", "checkpoint": "start",
                              "type": "web", "feature_category": "source_code", "urgency": "sync_fast",
                              "client_timestamp": "2027-01-15T08:00:01Z"}])
        agg.flush()
        clock.t = T0 + 1 + 11  # past sync_fast's 10 s lifetime
        agg.collect()
        deliver_twice(agg, sink, clock)

        async def rows() -> list[dict[str, Any]]:
            return await agg._store.outbox_items()  # type: ignore[union-attr]

        (row,) = [r for r in agg._call(rows) if r["kind"] == experiences.FAILURE_KIND]
    finally:
        agg.stop()
    first, second = sink.sent(experiences.FAILURE_KIND)
    candidates = {store.outbox.event_id(experiences.FAILURE_KIND, cid, sink.name)
                  for cid in [stale.upper()] + [new_correlation_id() for _ in range(9_999)]}
    assert row["event_id"] == store.outbox.event_id(experiences.FAILURE_KIND, stale.upper(), sink.name)
    assert first.event_id == second.event_id and first.event_id not in candidates
    assert first.event_id.version == 5


def test_experience_failure_event_ids_differ_between_keys() -> None:
    """The same queued failure leaves with one id per key; neither is the queued (unkeyed) id."""
    internal = store.outbox.event_id(experiences.FAILURE_KIND, new_correlation_id(), "events")
    ours, theirs = (privacy.Pseudonymizer(k).event_id(experiences.FAILURE_KIND, internal) for k in (KEY, OTHER_KEY))
    assert ours == privacy.Pseudonymizer(KEY).event_id(experiences.FAILURE_KIND, internal)
    assert len({internal, ours, theirs}) == 3
    assert (ours.version, theirs.version) == (5, 5)


def test_ids_of_kinds_without_identifiers_leave_as_queued() -> None:
    """A report's and an SLI's ids derive from windows and names, no identifier: they are not rekeyed."""
    report = store.outbox.event_id("usage_report", T0, "events")
    sli = store.outbox.event_id(experiences.SLI_KIND, f"{T0}/http_request/sync_fast", "events")
    pseudonymizer = privacy.Pseudonymizer(KEY)
    assert (report, sli) == (pseudonymizer.event_id("usage_report", report),
                             pseudonymizer.event_id(experiences.SLI_KIND, sli))


def test_without_a_key_ids_from_identifiers_leave_only_if_those_leave_in_clear() -> None:
    """No key: a billable id is refused (ConfigError naming the fields and the key), as is a writer that would
    send one; with every billable identifier allowlisted (they leave in clear anyway) the id leaves as stored."""
    internal = billing.event_id("ci_minutes", T0, meters.group_key(TRUTH), False)
    with pytest.raises(ConfigError, match="project_id.*AGGREGATOR_PSEUDONYM_KEY"):
        privacy.Pseudonymizer(None).event_id(billing.KIND, internal)
    with pytest.raises(ConfigError, match="no pseudonym_key is set"):
        privacy.Pseudonymizer(None).require([billing.KIND], "writer 'events'")
    clear = privacy.Pseudonymizer(None, allowlist=privacy.IDENTIFIER_FIELDS[billing.KIND])
    assert internal == clear.event_id(billing.KIND, internal)
