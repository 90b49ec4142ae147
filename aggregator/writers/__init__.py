"""Writers: where outbox items go once they leave the database (report → outbox → writer).

A writer gets batches of ``Envelope``s, identifiers already pseudonymized by the outbox, and answers
each with an ``Outcome``: delivered, retry later, or rejected for good (dead-letter). It never raises
for a delivery failure; an exception out of ``send()`` counts as "retry" for the whole batch. Writers
are built from configuration tables (``[writers.NAME]`` in the daemon's TOML file) by ``build()``.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

from aggregator import exceptions

# The writer types, by the ``type`` key of their configuration table (default: the table's name).
TYPES: dict[str, str] = {
    "jsonl": "aggregator.writers.jsonl:JsonlWriter",
    "snowplow": "aggregator.writers.snowplow:SnowplowWriter",
}


@dataclasses.dataclass(frozen=True, slots=True)
class Envelope:
    """One outbox item, ready to leave: ``data`` holds no raw identifier (see privacy.py)."""

    event_id: uuid.UUID  # stable per (item, writer): receivers drop duplicates by it; keyed (see privacy.py)
    kind: str  # "usage_report", ...
    schema: str  # Iglu URI of ``data``'s JSON Schema as queued, e.g. iglu:dev.aggregator/usage_report/jsonschema/1-0-1
    occurred_at: float  # epoch seconds of what the item describes (a report: its generation time)
    data: Mapping[str, Any]
    attempt: int = 1  # 1 on the first try

    def to_dict(self) -> dict[str, Any]:
        """The envelope as one JSON-ready object (the jsonl line, the CSV row's source)."""
        return {"event_id": str(self.event_id), "kind": self.kind, "schema": self.schema, "data": dict(self.data)}


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one envelope."""

    status: Literal["delivered", "retry", "rejected"]
    error: str | None = None

    @classmethod
    def delivered(cls) -> Outcome:
        return cls("delivered")

    @classmethod
    def retry(cls, error: str) -> Outcome:
        """A transient failure (timeout, 5xx, disk full): the outbox retries with backoff."""
        return cls("retry", error)

    @classmethod
    def rejected(cls, error: str) -> Outcome:
        """A permanent failure (invalid event, 4xx): the item goes to dead-letter at once."""
        return cls("rejected", error)


class Writer(abc.ABC):
    """A destination for outbox items. One instance per configured writer, used by one delivery loop."""

    type: ClassVar[str]
    max_batch: int = 100  # most envelopes handed to one send()

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    @abc.abstractmethod
    def from_config(cls, name: str, options: Mapping[str, Any]) -> Writer:
        """Build from the ``[writers.NAME]`` table; raise ConfigError naming ``writers.NAME.KEY`` and the fix."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources (directories, HTTP clients); raise ConfigError if the writer cannot work."""

    @abc.abstractmethod
    async def send(self, batch: Sequence[Envelope]) -> list[Outcome]:
        """Deliver ``batch``; one Outcome per envelope, in order. Durable on "delivered"."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; called once, after the last send()."""


def build(name: str, options: Mapping[str, Any]) -> Writer:
    """The writer configured by table ``[writers.NAME]``; its ``type`` defaults to NAME."""
    if not isinstance(options, Mapping):
        raise exceptions.ConfigError(f"writers.{name} must be a table of options, not {options!r}")
    kind = options.get("type", name)
    target = TYPES.get(kind) if isinstance(kind, str) else None
    if target is None:
        raise exceptions.ConfigError(
            f"writers.{name}.type={kind!r} is not a writer type; use one of: {', '.join(sorted(TYPES))}")
    module, _, attribute = target.partition(":")
    cls: type[Writer] = getattr(importlib.import_module(module), attribute)
    return cls.from_config(name, {k: v for k, v in options.items() if k != "type"})


def unknown_keys(name: str, options: Mapping[str, Any], known: Sequence[str]) -> None:
    """Raise ConfigError if ``options`` has keys outside ``known`` (a typo must not be ignored)."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise exceptions.ConfigError(
            f"writers.{name}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")


__all__ = ["TYPES", "Envelope", "Outcome", "Writer", "build", "unknown_keys"]
