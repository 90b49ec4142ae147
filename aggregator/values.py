"""The one edge where a value from outside is bounded: ids, counts, times, decimals, text, names, JSON.

Pure and synchronous (no I/O, no clock of its own). ``track()``, ``record()``, ``checkpoint()``, the HTTP
API and ``aggregator.client`` check their values here, so what one accepts the others accept, and every
check costs bounded time *before* any conversion (a 300,000-digit exponent is refused by its length,
not computed). Everything refused raises ``InvalidInput`` (or ``InvalidType``) naming the value and the fix.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import math
import re
import uuid
from collections.abc import Mapping
from typing import Any

from aggregator import exceptions

# Per-call ceiling on a count: far above any real request count, far below 64-bit overflow.
MAX_COUNT = 2**32 - 1
# Integers given as text (a dimension, a distinct value) or inside JSON: what a signed 64-bit column holds.
MAX_INT = 2**63 - 1
MAX_TEXT = 256  # characters of a dimension or distinct value
# A decimal given as text: at most this many characters, an exponent of at most 4 digits, and a
# magnitude of at most 10**MAX_DECIMAL_EXPONENT (sums are far below: one record is at most ~4.3e12).
MAX_DECIMAL_TEXT = 64
MAX_DECIMAL_EXPONENT = 30
MAX_JSON_DEPTH = 32
MAX_JSON_NODES = 10_000
# Every time, whatever the settings: from the epoch to 2100-01-01T00:00:00Z (formatted and stored safely).
EARLIEST = 0.0
LATEST = 4_102_444_800.0
MAX_TIME_TEXT = 64

_DECIMAL = re.compile(r"[+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
# Control characters (NUL included: PostgreSQL text cannot hold it) and lone surrogates (not UTF-8).
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclasses.dataclass(frozen=True, slots=True)
class TimeRange:
    """The event times accepted around now: ``past`` seconds before it, ``future`` seconds after it.

    Settings ``max_event_age`` (default 1 day) and ``max_event_future`` (default 5 minutes).
    """

    past: float = 86400.0
    future: float = 300.0

    def describe(self) -> str:
        return f"from {self.past:g}s before now (max_event_age) to {self.future:g}s after it (max_event_future)"


DEFAULT_RANGE = TimeRange()


def uuid_int(value: object, name: str) -> int:
    """``value`` (a UUID or its string form) as a 128-bit int; raises naming ``name`` otherwise.

    Strings are parsed strictly: the canonical ``8-4-4-4-12`` form, 32 hex digits, or either inside
    ``{}`` or after ``urn:uuid:``. (``uuid.UUID`` itself also takes strings with spaces, signs or
    underscores, as other UUIDs than they look like; those are refused here.)
    """
    if type(value) is uuid.UUID:
        return value.int
    if isinstance(value, str):
        text = value[9:] if value.startswith("urn:uuid:") else value
        if text[:1] == "{" and text[-1:] == "}":
            text = text[1:-1]
        if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
            text = text[:8] + text[9:13] + text[14:18] + text[19:23] + text[24:]
        if len(text) == 32:
            try:
                raw = bytes.fromhex(text)  # hex digits and (ignored) spaces only
            except ValueError:
                raw = b""
            if len(raw) == 16:  # so there were no spaces
                return int.from_bytes(raw, "big")
        raise exceptions.InvalidInput(
            f"{name}={shown(value)} is not a UUID; pass a uuid.UUID or a string like "
            "'123e4567-e89b-12d3-a456-426614174000'"
        )
    if isinstance(value, uuid.UUID):
        return value.int
    raise exceptions.InvalidType(f"{name}={shown(value)} is a {type(value).__name__}, not a UUID or UUID string")


def count(value: object, name: str) -> int:
    """``value`` checked as a request count: an int (not a bool) from 0 to MAX_COUNT."""
    if type(value) is not int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise exceptions.InvalidType(f"{name}={shown(value)} is a {type(value).__name__}; pass an int >= 0")
        value = int(value)
    if not 0 <= value <= MAX_COUNT:
        raise exceptions.InvalidInput(f"{name}={shown(value)} is out of range; pass an int from 0 to {MAX_COUNT}")
    return value


def moment(value: object, name: str = "at", *, now: float | None = None, within: TimeRange | None = None) -> float:
    """An event time (aware datetime, ISO 8601 text with an offset, or epoch seconds) as epoch seconds.

    Always between EARLIEST and LATEST; with ``now``, also within ``within`` (default DEFAULT_RANGE) of it.
    """
    seconds: float
    given = value
    if isinstance(value, str):
        value = _iso(value, name)
    if isinstance(value, dt.datetime):
        if value.utcoffset() is None:
            raise exceptions.InvalidInput(
                f"{name}={shown(given)} is a naive datetime: it needs a UTC offset; pass e.g. "
                "datetime.now(timezone.utc) or '2026-01-31T12:00:00Z'")
        try:
            seconds = value.timestamp()
        except (OverflowError, ValueError):
            seconds = math.nan
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value) if -LATEST <= value <= 2 * LATEST else math.nan  # no float() of a huge int
    else:
        raise exceptions.InvalidType(
            f"{name}={shown(value)} is a {type(value).__name__}; pass an aware datetime or epoch seconds")
    if not EARLIEST <= seconds <= LATEST:  # NaN fails too
        what = "a time" if isinstance(value, dt.datetime) else "a valid epoch time in seconds"
        raise exceptions.InvalidInput(
            f"{name}={shown(given)} is not {what} between 1970 and 2100; pass an aware datetime or epoch seconds")
    if now is not None:
        bounds = within or DEFAULT_RANGE
        if not now - bounds.past <= seconds <= now + bounds.future:
            offset = seconds - now
            where = f"{-offset:.0f}s in the past" if offset < 0 else f"{offset:.0f}s in the future"
            raise exceptions.InvalidInput(
                f"{name}={shown(given)} is {where}; accepted times run {bounds.describe()}: send events "
                "sooner, or raise the setting")
    return seconds


def _iso(text: str, name: str) -> dt.datetime:
    if len(text) > MAX_TIME_TEXT:
        raise exceptions.InvalidInput(f"{name}={shown(text)} is not ISO 8601 (too long); e.g. 2026-01-31T12:00:00Z")
    try:
        return dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise exceptions.InvalidInput(
            f"{name}={shown(text)} is not ISO 8601; e.g. 2026-01-31T12:00:00.250Z") from None


def decimal_number(value: object, name: str) -> decimal.Decimal:
    """A non-negative amount (int, float, Decimal or decimal text) as an exact Decimal of bounded size.

    Text is checked on its length, digits and exponent before it is converted, so no input costs more
    than a few microseconds; the magnitude is at most ``10**MAX_DECIMAL_EXPONENT``.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | decimal.Decimal | str):
        raise exceptions.InvalidType(f"{name}={shown(value)} is a {type(value).__name__}; pass a number >= 0")
    if isinstance(value, int):
        if not 0 <= value <= 10**MAX_DECIMAL_EXPONENT:
            raise exceptions.InvalidInput(f"{name}={shown(value)} is out of range; pass a number >= 0 and at most "
                                          f"1e{MAX_DECIMAL_EXPONENT}")
        return decimal.Decimal(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise exceptions.InvalidInput(f"{name}={value!r} must be a finite number >= 0")
        value = repr(value)
    if isinstance(value, str):
        if len(value) > MAX_DECIMAL_TEXT or not _DECIMAL.fullmatch(value):
            raise exceptions.InvalidInput(
                f"{name}={shown(value)} is not a decimal number of at most {MAX_DECIMAL_TEXT} characters "
                "(digits, one '.', an exponent of at most 4 digits); e.g. '12.5' or '1.25e3'")
        number = decimal.Decimal(value)
    else:
        number = value
        if not number.is_finite() or len(number.as_tuple().digits) > MAX_DECIMAL_TEXT:
            raise exceptions.InvalidInput(f"{name}={shown(number)} must be finite, of at most {MAX_DECIMAL_TEXT} "
                                          "digits")
    # The exponent first: comparing a number of a 9,999-digit exponent is what must not happen.
    if number < 0 or (number and not -MAX_DECIMAL_EXPONENT * 2 <= number.adjusted() <= MAX_DECIMAL_EXPONENT) or (
            number > 10**MAX_DECIMAL_EXPONENT):
        raise exceptions.InvalidInput(f"{name}={shown(value)} is out of range; pass a number >= 0 and at most "
                                      f"1e{MAX_DECIMAL_EXPONENT}, with at most {MAX_DECIMAL_EXPONENT * 2} decimals")
    return number


def text(value: object, name: str, *, maximum: int = MAX_TEXT) -> str:
    """A dimension or distinct value as text: a string, an int or a UUID; bounded and storable everywhere."""
    if isinstance(value, bool) or not isinstance(value, str | int | uuid.UUID):
        raise exceptions.InvalidType(f"{name}={shown(value)} is a {type(value).__name__}; pass a string, int or UUID")
    if isinstance(value, int):
        if not -MAX_INT <= value <= MAX_INT:  # str() of a 5,000-digit int raises (and costs); refuse it first
            raise exceptions.InvalidInput(f"{name}={shown(value)} is out of range; pass an int within +-(2**63-1) "
                                          "or a string")
        return str(value)
    out = str(value)
    if not 0 < len(out) <= maximum:
        raise exceptions.InvalidInput(f"{name}={shown(value)} must be 1-{maximum} characters")
    bad = _UNSTORABLE.search(out)
    if bad is not None:
        raise exceptions.InvalidInput(f"{name}={shown(value)} holds the control character or lone surrogate "
                                      f"{bad.group()!r} at {bad.start()}; remove it")
    return out


def name(value: object, what: str, pattern: re.Pattern[str], rule: str) -> str:
    """``value`` matched *whole* against ``pattern`` (``$`` would let ``"name\\n"`` through); ``rule`` says how."""
    if not isinstance(value, str):
        raise exceptions.InvalidType(f"{what}={shown(value)} is a {type(value).__name__}; pass a string")
    if pattern.fullmatch(value) is None:
        raise exceptions.InvalidInput(f"{what}={shown(value)} must be {rule}")
    return value


def json_object(value: object, what: str, *, max_depth: int = MAX_JSON_DEPTH,
                max_nodes: int = MAX_JSON_NODES) -> dict[str, Any]:
    """A JSON object of plain values, walked without recursion: depth, size, ints and floats bounded.

    Returns ``value`` itself; it is safe to ``json.dumps`` afterwards (no RecursionError, no 4,300-digit
    int conversion, no NaN).
    """
    if not isinstance(value, Mapping):
        raise exceptions.InvalidType(f"{what} is a {type(value).__name__}; pass a JSON object (a dict)")
    # Exact types first (JSON parsed by the API is only these): a type() lookup, not isinstance chains.
    stack: list[tuple[object, int]] = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise exceptions.InvalidInput(f"{what} has more than {max_nodes} values; send less")
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if not -MAX_INT <= item <= MAX_INT:  # type: ignore[operator]
                raise exceptions.InvalidInput(f"{what}: the int {shown(item)} is out of range; at most 2**63-1")
        elif kind is float:
            if not math.isfinite(item):  # type: ignore[arg-type]
                raise exceptions.InvalidInput(f"{what}: {item!r} is not a finite number")
        elif isinstance(item, Mapping):
            if depth > max_depth:
                raise exceptions.InvalidInput(f"{what} is nested deeper than {max_depth} levels; flatten it")
            for key, inner in item.items():
                if type(key) is not str:
                    raise exceptions.InvalidType(f"{what}: key {shown(key)} is a {type(key).__name__}; keys are "
                                                 "strings")
                stack.append((inner, depth + 1))
        elif isinstance(item, list | tuple):
            if depth > max_depth:
                raise exceptions.InvalidInput(f"{what} is nested deeper than {max_depth} levels; flatten it")
            stack.extend((inner, depth + 1) for inner in item)
        elif isinstance(item, str | bool):
            continue
        elif isinstance(item, int):
            if not -MAX_INT <= item <= MAX_INT:
                raise exceptions.InvalidInput(f"{what}: the int {shown(item)} is out of range; at most 2**63-1")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise exceptions.InvalidInput(f"{what}: {item!r} is not a finite number")
        else:
            raise exceptions.InvalidType(f"{what}: {shown(item)} is a {type(item).__name__}; pass plain dicts, "
                                         "lists, strings, numbers, booleans and None")
    return dict(value)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error names the value without echoing a megabyte of it."""
    if isinstance(value, int) and not isinstance(value, bool) and not -10**60 < value < 10**60:
        return f"<an int of about {value.bit_length() * 0.30103:.0f} digits>"
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit - 3] + "..."
