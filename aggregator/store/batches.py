"""What a flush hands the store (a ``Batch`` of per-window parts, meter records, checkpoints) and what it gets back.

Plain values, built by the flusher and the spool: nothing here may touch the database.
"""

from __future__ import annotations

import dataclasses

from aggregator import experiences as journeys  # the names store/core.py gives them
from aggregator import meters as metering  # not `meters`: a field of Batch has that name


@dataclasses.dataclass(slots=True)
class BatchWindow:
    """One window's part of a flush batch: ids (``UUID.int``) not yet sent, and counter increments."""

    workspaces: list[int]
    users: list[int]
    allowed: int
    denied: int

    def is_empty(self) -> bool:
        return not (self.workspaces or self.users or self.allowed or self.denied)


@dataclasses.dataclass(slots=True)
class Batch:
    """A flush batch with the sequence number that makes its application idempotent."""

    seq: int
    windows: dict[int, BatchWindow]
    events: int
    meters: metering.MeterBatch | None = None  # record()s of declared meters
    checkpoints: list[journeys.Checkpoint] = dataclasses.field(default_factory=list)
    # The replica's clock when this batch's state was swapped out (less a slack): everything the
    # replica tracked before it is in this batch or an earlier one. Published with the batch.
    watermark: float | None = None
    final: bool = False  # a clean stop's last batch: the incarnation is marked stopped with it



@dataclasses.dataclass(slots=True)
class BatchResult:
    applied: bool  # False: this batch had been committed before (an ambiguous commit), skipped now
    late_windows: list[int]  # windows of the batch that were already reported
    late_target: int | None  # the open window the late data was counted in
    overflowed: int = 0  # meter records that went to an __overflow__ group
    checkpoints: int = 0  # checkpoints applied (retries of applied ones not counted)
