"""The fleet benchmark (bench/fleet.py) in miniature, against real PostgreSQL: its exactness check is real.

20 logical replicas in 2 processes flush through Store.apply_batch while the real Collector runs; every
report must equal the ground truth the replicas kept, and the same comparison must fail on a truth one id
or one request off, so that a passing benchmark row means real figures were compared.
"""

from __future__ import annotations

import asyncio
import copy

import asyncpg

from bench import fleet


async def _reports(url: str) -> list[dict[str, object]]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(row) for row in await conn.fetch("SELECT * FROM reports ORDER BY window_start")]
    finally:
        await conn.close()


def _fields(mismatches: list[str]) -> list[str]:
    """The report fields named by ``compare``'s mismatches ("window S: field actual != expected, ...")."""
    return [part.split(" ")[0] for m in mismatches for part in m.split(": ", 1)[1].split(", ")]


def test_a_tiny_fleet_reports_exactly_and_the_check_catches_one_id_or_request_off(pg_url: str) -> None:
    """20 replicas, 2 whole windows of 2 s: every window's report equals the truth, with data from all 20 in
    the measured windows, no flush failed; a truth short of one user, or one allowed request over, differs."""
    run = fleet.run(pg_url, fleet.Plan(replicas=20, window=2, windows=2, reference_s=1.0), timeout=120)
    reports = asyncio.run(_reports(pg_url))
    assert run.mismatches == []
    assert run.compared >= 2
    assert (run.late_batches, sum(run.fleet.failures.values())) == (0, 0)
    assert sum(1 for r in reports if r["unique_users"] and r["allowed_requests"] and r["replicas"] == 20) >= 2
    assert run.fleet.flushes > 0 and run.reference.flushes > 0

    busy = max(run.truth, key=lambda start: len(run.truth[start].users))
    one_user_short = copy.deepcopy(run.truth)
    one_user_short[busy].users.pop()
    one_request_over = copy.deepcopy(run.truth)
    one_request_over[busy].allowed += 1
    assert fleet.compare(run.truth, reports, window=2, until=run.until)[1] == []
    assert _fields(fleet.compare(one_user_short, reports, window=2, until=run.until)[1]) == ["unique_users"]
    assert _fields(fleet.compare(one_request_over, reports, window=2, until=run.until)[1]) == ["allowed_requests"]
