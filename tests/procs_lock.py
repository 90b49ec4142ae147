"""Child processes of tests/test_report_lock.py (multiprocessing 'spawn')."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from tests.helpers import T0, FakeClock, manual


def freeze_holding_the_report_lock(url: str, ready: str) -> None:
    """A collector that takes the report-order lock for the first due window and then freezes (the parent kills it)."""

    async def on_ordered() -> None:
        Path(ready).write_text(str(os.getpid()))
        await asyncio.sleep(3600)  # idle in transaction, holding the lock, like a stopped process

    clock = FakeClock()
    clock.past_window(T0 + 60)
    agg = manual(url, clock, replica_id="frozen", on_collector_ordered=on_ordered)
    agg.start()
    agg.collect()
