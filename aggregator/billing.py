"""Billable usage events: one per billable meter, window and dimension group with a quantity above zero.

An event's id is derived from what it counts (meter, window, group, late), never drawn at random, so a
re-delivery or a re-collection on any replica carries the same id and receivers can drop the duplicate.
The event matches the shipped Iglu schema ``SCHEMA``; identifiers in it are pseudonymized on the way out,
and so is its id: the group holds the raw dimensions, so the unkeyed id made here stays in the store and
what leaves is ``privacy.Pseudonymizer.event_id()`` of it, keyed, with the same window time.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any

from aggregator import exceptions, meters, reports

KIND = "billable_usage"
SCHEMA = "iglu:dev.aggregator/billable_usage/jsonschema/1-0-0"
# Dimensions of these names become top-level fields of the event; every other one goes to metadata.
TOP_LEVEL_DIMENSIONS = ("project_id", "namespace_id", "subject")
# The event's fields in schema order: the columns of a CSV export.
FIELDS = ("event_id", "event_type", "unit_of_measure", "realm", "timestamp", "quantity", "instance_id",
          "project_id", "namespace_id", "subject", "metadata")
# Longest realm and instance_id the schema accepts: settings that feed them should refuse longer values.
MAX_REALM = 128
MAX_INSTANCE_ID = 256

_VERSION_7 = 0x7
_VARIANT_RFC = 0b10
_MAX_UNIX_MS = (1 << 48) - 1


def event_id(meter: str, window_start: int, group_key: str, late: bool) -> uuid.UUID:
    """The event's UUIDv7 (RFC 9562): ``window_start`` as its millisecond time, SHA-256 of the rest as its bits.

    The timestamp makes ids sort by window; the hash makes the id of a (meter, window, group, late)
    the same on every call and every replica. It is not unique across different inputs by construction,
    only with the odds of a 74-bit hash collision within one millisecond (one window). Unkeyed, it lets
    anyone holding it confirm a guess of the raw dimensions: it is the store's id, never sent as it is.
    """
    unix_ms = window_start * 1000
    if isinstance(window_start, bool) or not isinstance(window_start, int) or not 0 <= unix_ms <= _MAX_UNIX_MS:
        raise exceptions.InvalidInput(
            f"window_start={window_start!r} must be epoch seconds from 0 to {_MAX_UNIX_MS // 1000} (a UUIDv7 time)")
    digest = hashlib.sha256(f"{meter}\x00{window_start}\x00{group_key}\x00{int(late)}".encode()).digest()
    bits = int.from_bytes(digest[:10], "big")  # 80 bits; the top 12 become rand_a, the low 62 rand_b
    rand_a = bits >> 68
    rand_b = bits & ((1 << 62) - 1)
    return uuid.UUID(int=unix_ms << 80 | _VERSION_7 << 76 | rand_a << 64 | _VARIANT_RFC << 62 | rand_b)


def billable_event(meter: meters.Meter, *, window_start: int, window_end: int, dimensions: Mapping[str, str],
                   quantity_units: int, late: bool, realm: str, instance_id: str | None = None,
                   group_key: str | None = None) -> dict[str, Any] | None:
    """The JSON-ready event for one group's figure, or None when ``quantity_units`` <= 0 (nothing to bill).

    ``group_key`` defaults to ``meters.group_key(dimensions)``; pass the key the store holds, in
    particular ``meters.OVERFLOW`` (with empty ``dimensions``) for the group that took records beyond
    ``max_groups``. ``quantity`` is an int when the meter has no decimals, else a float (JSON has one
    number type, and receivers read floats): a double is not exact, but for a decimal of at most 15
    significant digits its shortest text, which is what JSON carries, is that decimal again. So the
    quantity is exact below 10**15 units (a million at 9 decimals, a trillion at 3), and the nearest
    double above. Optional fields without a value are left out, never null.
    """
    if quantity_units <= 0:
        return None
    key = meters.group_key(dimensions) if group_key is None else group_key
    overflow = key == meters.OVERFLOW
    if overflow and dimensions:
        raise exceptions.InvalidInput(
            f"dimensions={dict(dimensions)!r} given for the {meters.OVERFLOW} group of meter {meter.name!r}; "
            "pass dimensions={} with it (its records come from many groups)")
    quantity: int | float = quantity_units if meter.decimals == 0 else float(meter.from_units(quantity_units))
    event: dict[str, Any] = {
        "event_id": str(event_id(meter.name, window_start, key, late)),
        "event_type": meter.event_type or meter.name,
        "unit_of_measure": meter.unit,
        "realm": realm,
        "timestamp": reports.iso_utc(window_end),
        "quantity": quantity,
    }
    if instance_id is not None:
        event["instance_id"] = instance_id
    for name in TOP_LEVEL_DIMENSIONS:
        if dimensions.get(name) is not None:
            event[name] = dimensions[name]
    metadata: dict[str, Any] = {
        "meter": meter.name, "window_start": reports.iso_utc(window_start),
        "window_end": reports.iso_utc(window_end), "late": late,
        "dimensions": {k: v for k, v in dimensions.items() if k not in TOP_LEVEL_DIMENSIONS},
    }
    if overflow:
        metadata["overflow"] = True
    event["metadata"] = metadata
    return event



__all__ = ["FIELDS", "KIND", "MAX_INSTANCE_ID", "MAX_REALM", "SCHEMA", "TOP_LEVEL_DIMENSIONS", "billable_event",
           "event_id"]
