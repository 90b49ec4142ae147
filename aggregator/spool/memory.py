"""Estimates of the memory a flush batch holds in the flusher, which weighs them against its spill budget.

Measured once, not accounted: it must never walk a batch deeper than its lengths, nor touch a file.
"""

from __future__ import annotations

from aggregator import store

# Memory estimates for the budget, measured with tracemalloc on 64-bit CPython 3.11 (bench/spool.py
# measures them again): a set of 128-bit ints costs 76-100 bytes per id past 50,000 ids (48 the int
# object, the rest the hash table, whose fill varies between doublings), up to 153 for smaller sets
# just past a fourfold resize. A batch's lists hold the same ints at 56 bytes per id, beside the set of
# them the flusher keeps until the store confirms: ~100 per id in all. An estimate, not an accounting.
BYTES_PER_ID = 100
WINDOW_BYTES = 250  # a BatchWindow with its two lists and dict entry (measured 236)
METER_GROUP_BYTES = 800  # a GroupData with two dimensions, its key and empty distinct set (753)
DISTINCT_BYTES = 160  # a uuid.UUID in a distinct set (151)
METER_RECORD_BYTES = 700  # an Identified record with two dimensions, and its key (638)
CHECKPOINT_BYTES = 400  # a Checkpoint with short strings, plus its meta's length (251 with shared strings)
BATCH_BYTES = 300


def batch_bytes(batch: store.Batch) -> int:
    """A rough estimate of the memory ``batch`` holds as the flusher holds it (see BYTES_PER_ID), for the budget."""
    ids = sum(len(window.workspaces) + len(window.users) for window in batch.windows.values())
    size = BATCH_BYTES + len(batch.windows) * WINDOW_BYTES + ids * BYTES_PER_ID
    size += sum(CHECKPOINT_BYTES + len(checkpoint.meta or "") for checkpoint in batch.checkpoints)
    if batch.meters is not None:
        groups, identified = batch.meters.groups, batch.meters.identified
        size += len(groups) * METER_GROUP_BYTES + len(identified) * METER_RECORD_BYTES
        size += sum(len(data.distinct) for data in groups.values()) * DISTINCT_BYTES
    return size
