"""The exceptions aggregator raises, all under one root.

    AggregatorError
    ├── InvalidInput (also ValueError)       bad argument to track(), a bad id or count
    │   └── InvalidType (also TypeError)     an argument of the wrong type
    ├── ConfigError (also ValueError)        a setting that cannot be used; names key and value
    ├── StoreError                           the database failed us
    │   ├── StoreUnavailable                 transient: connection lost, lock timeout; retried
    │   └── SchemaOutdated                   the schema is behind the code; run `aggregator db upgrade`
    └── NotRunning                           an operation that needs start() was called without it

Driver errors are translated in one place (``store.translate_errors``) with ``raise … from exc``.
"""

from __future__ import annotations


class AggregatorError(Exception):
    """Something went wrong in aggregator."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidInput(AggregatorError, ValueError):
    """An argument has a value aggregator cannot accept; nothing was recorded."""


class InvalidType(InvalidInput, TypeError):
    """An argument has a type aggregator cannot accept; nothing was recorded."""


class ConfigError(AggregatorError, ValueError):
    """A setting cannot be used."""


class StoreError(AggregatorError):
    """The database failed."""


class StoreUnavailable(StoreError):
    """The database could not be reached or the operation timed out; it is safe to retry."""


class SchemaOutdated(StoreError):
    """The database schema is older than this version of aggregator; run `aggregator db upgrade`."""


class NotRunning(AggregatorError):
    """This operation needs a started Aggregator (call start() or use `with`)."""
