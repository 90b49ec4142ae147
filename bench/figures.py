"""Measured figures, the checks held against the issue's targets, and the one table they print as.

A figure is every repetition's value, shown as ``median [min-max]``; ratios are ratios of medians.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

COLUMNS = ("benchmark", "ours", "peer(s)", "ratio", "target", "PASS/MISS")


@dataclasses.dataclass(slots=True)
class Figure:
    """Repeated measurements of one quantity."""

    samples: list[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def text(self) -> str:
        if len(self.samples) == 1:
            return f"{number(self.median)} {self.unit}"
        return f"{number(self.median)} [{number(min(self.samples))}-{number(max(self.samples))}] {self.unit}"

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": min(self.samples), "max": max(self.samples), "unit": self.unit,
                "samples": self.samples}


@dataclasses.dataclass(slots=True)
class Check:
    """One line of a row: a peer's figure and/or a ratio, and the target it is held to (if any)."""

    peer: str = ""
    figure: Figure | None = None
    ratio_label: str = ""
    ratio: float | None = None
    target: str = ""  # empty: shown for information, no target
    passed: bool | None = None  # None under a target: not checked (quick sizes)

    @property
    def verdict(self) -> str:
        if not self.target:
            return ""
        if self.passed is None:
            return "n/c"
        return "PASS" if self.passed else "MISS"

    def as_json(self) -> dict[str, Any]:
        return {"peer": self.peer or None, "peer_figure": self.figure.as_json() if self.figure else None,
                "ratio_label": self.ratio_label or None, "ratio": self.ratio, "target": self.target or None,
                "result": self.verdict or None}


@dataclasses.dataclass(slots=True)
class Result:
    """One benchmark row: our figure, its checks, notes on how it was measured."""

    name: str
    title: str
    ours: Figure | None = None
    checks: list[Check] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {"title": self.title, "ours": self.ours.as_json() if self.ours else None,
                "checks": [c.as_json() for c in self.checks], "notes": self.notes, "params": self.params,
                "error": self.error, "seconds": round(self.seconds, 3)}


def number(value: float) -> str:
    """Three significant figures or so, with thousands separators, never in exponent form."""
    size = abs(value)
    if size >= 100:
        return f"{value:,.0f}"
    if size >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def ratio_text(label: str, value: float | None) -> str:
    return "" if value is None else f"{label} {value:.2f}x"


def at_most(value: float, limit: float, checked: bool = True) -> bool | None:
    return value <= limit if checked else None


def at_least(value: float, limit: float, checked: bool = True) -> bool | None:
    return value >= limit if checked else None


def table(results: list[Result]) -> str:
    """Every row as aligned text; a row with several checks takes one line per check."""
    lines: list[tuple[str, ...]] = []
    for result in results:
        if result.error is not None:
            lines.append((result.name, "ERROR", result.error.splitlines()[0][:100], "", "", "ERROR"))
            continue
        ours = result.ours.text() if result.ours else ""
        for index, check in enumerate(result.checks or [Check()]):
            peer = f"{check.peer}: {check.figure.text()}" if check.figure else check.peer
            lines.append((result.name if index == 0 else "", ours if index == 0 else "", peer,
                          ratio_text(check.ratio_label, check.ratio), check.target, check.verdict))
    widths = [max(len(row[i]) for row in [COLUMNS, *lines]) for i in range(len(COLUMNS))]
    render = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
              for row in [COLUMNS, *lines]]
    render.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(render)


def summary(results: list[Result]) -> str:
    verdicts = [c.verdict for r in results for c in r.checks if c.verdict]
    errors = sum(r.error is not None for r in results)
    parts = [f"{verdicts.count(v)} {v}" for v in ("PASS", "MISS", "n/c") if v in verdicts]
    if errors:
        parts.append(f"{errors} ERROR")
    return ", ".join(parts) + ("  (n/c: target not checked at --quick sizes)" if "n/c" in verdicts else "")
