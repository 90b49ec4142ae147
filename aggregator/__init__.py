"""aggregator: exactly-once usage aggregation across replicas, on SQLite or PostgreSQL.

The data path, one module each: tracker → flush → store → collector → reports → outbox → writers;
meters.py and experiences.py feed the same flush and collector (record(), checkpoint()).
"""

from aggregator.exceptions import (
    AggregatorError,
    ConfigError,
    InvalidInput,
    InvalidType,
    NotRunning,
    SchemaOutdated,
    StoreError,
    StoreUnavailable,
)
from aggregator.meters import Meter
from aggregator.reports import Report
from aggregator.runtime import Aggregator

__all__ = [
    "Aggregator",
    "AggregatorError",
    "ConfigError",
    "InvalidInput",
    "InvalidType",
    "Meter",
    "NotRunning",
    "Report",
    "SchemaOutdated",
    "StoreError",
    "StoreUnavailable",
]
