"""Durations and sizes as settings write them: "10s", "30m", "1h", "250ms", "2d", "64MiB", or a number.

Pure parsing for settings, daemon options and writer tables; a refusal raises ConfigError naming the key.
Never imports settings, the store or anything above them: every layer may use it.
"""

from __future__ import annotations

import re

from aggregator import exceptions

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: str | float | int, *, key: str, zero: bool = False) -> float:
    """Seconds in ``value`` ("10s", "30m", "1h", "250ms", "2d", or a number of seconds); ``zero``: 0 allowed."""
    if isinstance(value, bool):
        raise exceptions.ConfigError(f"{key}={value!r} is not a duration; use e.g. '10s', '30m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise exceptions.ConfigError(
            f"{key}={value!r} is not a duration; use a number with a unit: ms, s, m, h or d (e.g. '30m')"
        )
    if not (seconds > 0 or zero and seconds == 0) or seconds == float("inf"):
        raise exceptions.ConfigError(f"{key}={value!r} must be {'zero or more' if zero else 'longer than zero'}")
    return seconds


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30, None: 1}


def parse_size(value: str | int, *, key: str) -> int:
    """Bytes in ``value`` ("64MiB", "500MB", "1GiB", or a number of bytes); at least 1 MiB."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise exceptions.ConfigError(f"{key}={value!r} is not a size; use e.g. '64MiB' or '1GiB'")
    match = _SIZE.match(str(value))
    if match is None:
        raise exceptions.ConfigError(f"{key}={value!r} is not a size; use a number with a unit: B, KiB, MiB, GiB, "
                                     "KB, MB or GB (e.g. '64MiB')")
    size = int(float(match.group(1)) * _UNIT_BYTES[(match.group(2) or "").lower() or None])
    if size < 2**20:
        raise exceptions.ConfigError(f"{key}={value!r} is below the least budget of 1MiB")
    return size


def parse_window(value: str | float | int, *, key: str) -> float:
    """A report window: a whole number of seconds that divides a day, or whole days."""
    seconds = parse_duration(value, key=key)
    if seconds < 1 or seconds != int(seconds) or 86400 % seconds and seconds % 86400:
        raise exceptions.ConfigError(
            f"{key}={value!r} must be a whole number of seconds that divides a day "
            "(or is a whole number of days), e.g. '10s', '5m', '30m', '1h'"
        )
    return seconds
