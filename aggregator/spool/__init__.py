"""The local spool: flush batches kept on disk, in order, while the store cannot be reached; this is its face.

Behind it: ``file`` (one SQLite file per incarnation, flock-owned, adopted once its process is gone),
``codec`` (a batch as versioned, checksummed bytes), ``disk``, ``errors`` and ``memory``. It must never
lose a batch silently (an unreadable file is set aside as ``*.corrupt``) nor store one in a form another
version cannot identify (each payload starts with its format version; no pickle).
"""

from __future__ import annotations

from aggregator.spool.codec import FORMAT, decode, encode
from aggregator.spool.disk import SUFFIX, default_directory
from aggregator.spool.errors import SpoolCorrupt, SpoolError, SpoolVersionError
from aggregator.spool.file import APPLICATION_ID, FILE_FORMAT, Spool
from aggregator.spool.memory import (
    BATCH_BYTES,
    BYTES_PER_ID,
    CHECKPOINT_BYTES,
    DISTINCT_BYTES,
    METER_GROUP_BYTES,
    METER_RECORD_BYTES,
    WINDOW_BYTES,
    batch_bytes,
)

__all__ = [
    "APPLICATION_ID",
    "BATCH_BYTES",
    "BYTES_PER_ID",
    "CHECKPOINT_BYTES",
    "DISTINCT_BYTES",
    "FILE_FORMAT",
    "FORMAT",
    "METER_GROUP_BYTES",
    "METER_RECORD_BYTES",
    "SUFFIX",
    "WINDOW_BYTES",
    "Spool",
    "SpoolCorrupt",
    "SpoolError",
    "SpoolVersionError",
    "batch_bytes",
    "decode",
    "default_directory",
    "encode",
]
