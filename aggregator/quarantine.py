"""Poison isolation: an item that fails for a reason of its own is set aside, and its loop goes on.

Every loop (flush, collector, experience sweeper, billing step, delivery) runs each item's work through
``guard()``. An error that is not transient (anything but the database being away, a schema to upgrade,
or a cancellation, which propagate as before) sets the item aside with its reason: a row in the
``quarantine`` table (``store/quarantine.py``), one ``item_quarantined`` log line at error level, a count
in ``/metrics``. ``aggregator quarantine list`` shows the items, ``aggregator quarantine retry`` hands
them back to their loop. This module knows nothing of the database: callers say where an item is recorded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from aggregator import exceptions, logs

log = logs.get_logger("aggregator.quarantine")
T = TypeVar("T")

KINDS = ("flush", "window", "experience", "billable", "delivery")
MAX_REASON = 500  # characters of an exception's text kept as the reason
MAX_REF = 255

# Errors that say nothing about the item: the database is away (retried), or its schema is behind the
# code (an operator runs the upgrade). Setting items aside for them would empty the loop for nothing.
TRANSIENT: tuple[type[BaseException], ...] = (exceptions.StoreUnavailable, exceptions.SchemaOutdated)


@dataclasses.dataclass(frozen=True, slots=True)
class Item:
    """One item set aside: what it is (``kind``, ``ref``), why, and what a retry needs (``payload``)."""

    kind: str
    ref: str
    reason: str
    payload: Mapping[str, Any] | None = None

    def payload_json(self) -> str | None:
        return None if self.payload is None else json.dumps(self.payload, sort_keys=True)


class SetAside:
    """What ``guard()`` returns instead of the work's result when the item was set aside."""

    def __repr__(self) -> str:
        return "SET_ASIDE"


SET_ASIDE = SetAside()


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is about the database or the run (retry as before), not about the item."""
    return isinstance(exc, TRANSIENT) or not isinstance(exc, Exception)


def reason(exc: BaseException) -> str:
    """``Type: message`` of ``exc``, one line, at most MAX_REASON characters.

    Store errors reach here with the URL's secrets already scrubbed (``store.translate_errors``); values
    of the item itself are not secrets of ours (they are in the database beside it).
    """
    text = " ".join(str(exc).split()) or "(no message)"
    out = f"{type(exc).__name__}: {text}"
    return out if len(out) <= MAX_REASON else out[:MAX_REASON - 1] + "…"


def ref(*parts: object) -> str:
    """A reference made of ``parts``, each cut so that the whole fits the column (a 300-digit window start)."""
    shown = []
    for part in parts:
        text = str(part)
        shown.append(text if len(text) <= 40 else f"{text[:16]}…{text[-16:]}({len(text)} chars)")
    return "/".join(shown)[:MAX_REF]


def announce(item: Item, **fields: Any) -> None:
    """The one log line of an item set aside (``fields``: who set it aside, and the like)."""
    log.error("item_quarantined", kind=item.kind, ref=item.ref, reason=item.reason,
              hint=f"`aggregator quarantine list --kind {item.kind}` shows it; fix the cause, then "
                   "`aggregator quarantine retry --id ID`", **fields)


async def guard(kind: str, ref_: str, work: Callable[[], Awaitable[T]], *,
                set_aside: Callable[[Item], Awaitable[Any]], payload: Mapping[str, Any] | None = None,
                announced: bool = True, **fields: Any) -> T | SetAside:
    """Run one item's ``work``; if it fails for a reason of its own, ``set_aside`` the item and return SET_ASIDE.

    Transient errors (``is_transient``) propagate unchanged, so the loop retries as it always did.
    ``announced=False``: the caller logs (``announce``) once the item is durably set aside, for when
    ``set_aside`` only collects items for a commit that is still to come.
    """
    try:
        return await work()
    except Exception as exc:
        if is_transient(exc):
            raise
        item = Item(kind, ref_, reason(exc), payload)
        await set_aside(item)
        if announced:
            announce(item, **fields)
        return SET_ASIDE
