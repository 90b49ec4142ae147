"""The SQL store: every statement aggregator runs, for SQLite and PostgreSQL, behind one ``Store``.

``core``: the Store itself: the engine, its transactions, the window locks, and the two transactions that
carry the mechanism, ``apply_batch`` (a flush) and ``collect_window`` (a report). The parts below are mixed into it.
``batches``: what a flush hands the store (``Batch``, ``BatchWindow``) and gets back (``BatchResult``).
``ids``: a window's distinct ids, inserted once whoever sends them (the insert plans per dialect).
``watermarks``: what the collector asks about replicas: incarnations, watermarks, heartbeats, open windows.
``collect``: a report's numbers, reports read back, id partitions kept ahead (``partitions``), retention.
``meters``, ``experiences``, ``distinct``: what declared meters, journeys and range distinct add to a
flush and a report. ``outbox``: reports and events queued for the writers, leased and settled.
``quarantine``: items set aside, handed back and released in the commit that processes them.
``errors``: driver errors turned into ours; ``connect``: how the engine is opened; ``base``: what parts may use.
"""

from aggregator.store.batches import Batch, BatchResult, BatchWindow
from aggregator.store.core import POOL_SIZE, Store
from aggregator.store.errors import translate_errors, translated
from aggregator.store.watermarks import DueWindow, Incarnation

__all__ = [
    "POOL_SIZE",
    "Batch",
    "BatchResult",
    "BatchWindow",
    "DueWindow",
    "Incarnation",
    "Store",
    "translate_errors",
    "translated",
]
