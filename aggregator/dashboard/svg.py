"""Charts as SVG text, drawn on the server: the dashboard ships no JavaScript chart library and works offline.

A figure is a pure function of its panels. Each bar segment and each point carries a ``<title>`` with its
exact number (read by screen readers and shown on hover) and ``data-*`` attributes (window, series,
value) that tests and scripts read. Every text is escaped, and characters XML cannot carry at all are
replaced by U+FFFD, so whatever a meter name or dimension value holds, the output is well-formed XML.
Colours are presentation attributes, not ``style``: the page's CSP forbids inline styles.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import html
import math
import re
from collections.abc import Iterable, Sequence

from aggregator import reports

Number = int | float | decimal.Decimal

WIDTH = 960
PLOT_HEIGHT = 160
LEFT, RIGHT = 64, 16  # room for the y axis labels, and a margin
MARKER_BAND = 16  # above the plot: where an incomplete window's marker sits
LEGEND_ROW = 18
LEGEND_LABEL = 40  # characters of a legend entry; the full text is in its <title>
LATE_OPACITY = "0.4"  # late segments: the series' colour, lighter
# Okabe-Ito: told apart also by readers with colour vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
INCOMPLETE = "#D55E00"
INK, GRID, FAINT = "#222222", "#dddddd", "#666666"

# What XML 1.0 cannot carry even escaped: control characters, lone surrogates, U+FFFE and U+FFFF.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_ATTRIBUTE_WHITESPACE = str.maketrans({"\t": "&#9;", "\n": "&#10;"})


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    """One report window: a column of every panel; ``replicas_missing`` > 0 marks it incomplete."""

    start: dt.datetime
    end: dt.datetime
    replicas_missing: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class Series:
    """One named quantity, one value per window (None: nothing to draw there).

    As bars, the series of one ``stack`` pile up in each window, and stacks stand side by side; as a line,
    its points are joined. ``data`` adds ``data-*`` attributes to every mark (a meter's dimensions, say).
    """

    key: str
    label: str
    values: Sequence[Number | None]
    color: str
    late: bool = False
    stack: int = 0
    data: Sequence[tuple[str, str]] = ()
    legend: str = ""  # a shorter label for the legend (its <title> and the marks' keep the full one)


@dataclasses.dataclass(frozen=True, slots=True)
class Panel:
    """One chart: a title, an axis in ``unit``, a column per window, bars and lines over them."""

    key: str
    title: str
    unit: str
    windows: Sequence[Window]
    bars: Sequence[Series] = ()
    lines: Sequence[Series] = ()
    subtitle: str = ""


def text(value: str) -> str:
    """``value`` as XML character data: escaped, with characters XML cannot carry replaced by U+FFFD.

    A carriage return is written as a reference: a parser would read a literal one as a line feed.
    """
    return html.escape(_NOT_XML.sub("\ufffd", value), quote=True).replace("\r", "&#13;")


def attribute(value: str) -> str:
    """``value`` inside a double-quoted XML attribute; tabs and line feeds kept (a parser would make them spaces)."""
    return text(value).translate(_ATTRIBUTE_WHITESPACE)


def number(value: Number) -> str:
    """A value as shown in titles and ``data-value``: exact (an int, a decimal as written, a float's repr)."""
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, float):
        return repr(value)
    return str(value)


def scale(top: float) -> tuple[float, float]:
    """A round axis maximum at or above ``top`` and its tick step: 1, 2 or 5 times a power of ten, at most 5 steps."""
    if not math.isfinite(top) or top <= 0:
        return 1.0, 1.0
    rough = top / 4
    magnitude = 10.0 ** math.floor(math.log10(rough))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= rough)
    axis_max = math.ceil(top / step - 1e-9) * step
    return (axis_max, step) if math.isfinite(axis_max) else (top, top / 4)  # near the largest float


def figure(title: str, panels: Sequence[Panel], *, empty: str = "nothing to show in this range",
           note: str = "") -> str:
    """An SVG document of ``panels`` one under the other; ``empty`` is shown when there are none."""
    parts: list[str] = []
    y = 0
    if note:
        parts.append(_text_at(LEFT, 14, note, css="note", fill=INCOMPLETE))
        y = 22
    for panel in panels:
        body, height = _panel(panel, y)
        parts.append(body)
        y += height
    if not panels:
        parts.append(_text_at(LEFT, y + 24, empty, css="empty", fill=FAINT))
        y += 40
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {y}" width="{WIDTH}" height="{y}" '
            f'font-family="sans-serif" font-size="11" data-panels="{len(panels)}"><title>{text(title)}</title>'
            + "".join(parts) + "</svg>")


def _panel(panel: Panel, top: int) -> tuple[str, int]:
    parts = [f'<g class="panel" data-panel="{attribute(panel.key)}" data-unit="{attribute(panel.unit)}">',
             _text_at(8, top + 16, panel.title, css="panel-title", weight="bold", size=13)]
    y = top + 22
    if panel.subtitle:
        parts.append(_text_at(8, y + 12, panel.subtitle, css="subtitle", fill=FAINT))
        y += 16
    legend, rows = _legend([*panel.bars, *panel.lines], y + 6)
    parts.append(legend)
    y += 6 + rows * LEGEND_ROW
    if not panel.windows:
        parts.append(_text_at(LEFT, y + 24, "no reports in this range", css="empty", fill=FAINT) + "</g>")
        return "".join(parts), y + 40 - top
    plot_top = y + MARKER_BAND
    axis_max, step = scale(max(_highest(panel), default=0.0))
    parts.append(_axis(panel, plot_top, axis_max, step))
    width = (WIDTH - LEFT - RIGHT) / len(panel.windows)
    stacks = max((s.stack for s in panel.bars), default=0) + 1
    parts.extend(_lines(panel, plot_top, axis_max, width))
    for index, window in enumerate(panel.windows):
        parts.append(_column(panel, index, window, plot_top, axis_max, width, stacks))
    parts.append("</g>")
    return "".join(parts), plot_top + PLOT_HEIGHT + 34 - top


def _highest(panel: Panel) -> Iterable[float]:
    """Each window's tallest stack, and every line value: what the axis must reach."""
    for index in range(len(panel.windows)):
        piles: dict[int, float] = {}
        for series in panel.bars:
            piles[series.stack] = piles.get(series.stack, 0.0) + _height(series.values[index])
        yield from piles.values()
        yield from (_height(series.values[index]) for series in panel.lines)


def _height(value: Number | None) -> float:
    """A value as a length: nothing drawn for None, NaN or a negative amount."""
    if value is None:
        return 0.0
    found = float(value)
    return found if math.isfinite(found) and found > 0 else 0.0


def _axis(panel: Panel, plot_top: int, axis_max: float, step: float) -> str:
    bottom = plot_top + PLOT_HEIGHT
    parts = ['<g class="axis" aria-hidden="true">']
    ticks = round(axis_max / step)
    for n in range(ticks + 1):
        value = n * step
        y = bottom - value / axis_max * PLOT_HEIGHT
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        parts.append(_text_at(LEFT - 6, y + 4, _tick(value), anchor="end", fill=FAINT))
    parts.append(_text_at(4, plot_top - 8, panel.unit, fill=FAINT))
    width = (WIDTH - LEFT - RIGHT) / len(panel.windows)
    every = math.ceil(len(panel.windows) / 8)
    shown = _time_format(panel.windows)
    for index in range(0, len(panel.windows), every):
        x = LEFT + (index + 0.5) * width
        parts.append(_text_at(x, bottom + 14, panel.windows[index].start.strftime(shown), anchor="middle", fill=FAINT))
    parts.append(_text_at(WIDTH - RIGHT, bottom + 28, "window start (UTC)", anchor="end", fill=FAINT))
    parts.append("</g>")
    return "".join(parts)


def _tick(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.3g}"


def _time_format(windows: Sequence[Window]) -> str:
    """Seconds when a window is shorter than a minute; the date too when the windows span days."""
    seconds = any((w.end - w.start).total_seconds() < 60 or w.start.second for w in windows)
    clock = "%H:%M:%S" if seconds else "%H:%M"
    return clock if len({w.start.date() for w in windows}) == 1 else "%m-%d " + clock


def _when(window: Window) -> str:
    end = window.end.strftime("%H:%M:%S" if window.end.date() == window.start.date() else "%Y-%m-%d %H:%M:%S")
    return f"window {window.start:%Y-%m-%d %H:%M:%S} to {end} UTC"


def _column(panel: Panel, index: int, window: Window, plot_top: int, axis_max: float, width: float,
            stacks: int) -> str:
    """One window: its bar segments and points, each with its exact value; a marker when incomplete."""
    start, end = reports.iso_utc(window.start), reports.iso_utc(window.end)
    parts = [f'<g class="window" data-window-start="{start}" data-window-end="{end}" '
             f'data-replicas-missing="{window.replicas_missing}" '
             f'data-complete="{"true" if window.replicas_missing == 0 else "false"}">']
    x0 = LEFT + index * width
    bottom = plot_top + PLOT_HEIGHT
    if window.replicas_missing:
        middle = x0 + width / 2
        parts.append(f'<rect class="incomplete-band" x="{x0:.2f}" y="{plot_top}" width="{width:.2f}" '
                     f'height="{PLOT_HEIGHT}" fill="{INCOMPLETE}" fill-opacity="0.08"/>')
        parts.append(f'<path class="incomplete" role="img" d="M{middle - 5:.2f} {plot_top - MARKER_BAND + 1} '
                     f'h10 l-5 9 z" fill="{INCOMPLETE}"><title>{_missing(window)}</title></path>')
    bar_width = width * 0.8 / stacks
    piles = [0.0] * stacks
    for series in panel.bars:
        value = series.values[index]
        if value is None:
            continue
        height = _height(value) / axis_max * PLOT_HEIGHT
        piles[series.stack] += height
        x = x0 + width * 0.1 + series.stack * bar_width
        parts.append(f'<rect class="bar{" late" if series.late else ""}" role="img" x="{x:.2f}" '
                     f'y="{bottom - piles[series.stack]:.2f}" width="{bar_width:.2f}" height="{height:.2f}" '
                     f'fill="{series.color}"{_opacity(series)}{_data(series, start, value)}>'
                     f"<title>{_title(panel, series, value, window)}</title></rect>")
    for series in panel.lines:
        value = series.values[index]
        if value is None:
            continue
        y = bottom - _height(value) / axis_max * PLOT_HEIGHT
        parts.append(f'<circle class="point" role="img" cx="{x0 + width / 2:.2f}" cy="{y:.2f}" r="3" '
                     f'fill="{series.color}"{_data(series, start, value)}>'
                     f"<title>{_title(panel, series, value, window)}</title></circle>")
    parts.append("</g>")
    return "".join(parts)


def _missing(window: Window) -> str:
    missing = window.replicas_missing
    return text(f"incomplete: {missing} replica{'s' if missing != 1 else ''} missing, {_when(window)}; their "
                "data, if it comes, counts late in a later window")


def _lines(panel: Panel, plot_top: int, axis_max: float, width: float) -> Iterable[str]:
    """Each line series as polylines through its points, broken where a window has no value."""
    bottom = plot_top + PLOT_HEIGHT
    for series in panel.lines:
        runs: list[list[str]] = [[]]
        for index, value in enumerate(series.values):
            if value is None:
                runs.append([])
                continue
            y = bottom - _height(value) / axis_max * PLOT_HEIGHT
            runs[-1].append(f"{LEFT + (index + 0.5) * width:.2f},{y:.2f}")
        for run in runs:
            if len(run) > 1:
                yield (f'<polyline class="line" aria-hidden="true" points="{" ".join(run)}" fill="none" '
                       f'stroke="{series.color}" stroke-width="1.5"/>')


def _opacity(series: Series) -> str:
    return f' fill-opacity="{LATE_OPACITY}"' if series.late else ""


def _data(series: Series, start: str, value: Number) -> str:
    extra = "".join(f' data-{name}="{attribute(given)}"' for name, given in series.data)
    return (f' data-series="{attribute(series.key)}" data-window-start="{start}" data-value="{number(value)}"'
            f' data-late="{"true" if series.late else "false"}"{extra}')


def _title(panel: Panel, series: Series, value: Number, window: Window) -> str:
    unit = f" {panel.unit}" if panel.unit else ""
    return text(f"{series.label}: {number(value)}{unit}, {_when(window)}")


def _legend(series: Sequence[Series], top: int) -> tuple[str, int]:
    """Swatches and labels, wrapped into rows; returns the markup and the number of rows."""
    if not series:
        return "", 0
    parts = ['<g class="legend">']
    x, row = LEFT, 0
    for one in series:
        label = one.legend or one.label
        label = label if len(label) <= LEGEND_LABEL else label[:LEGEND_LABEL - 1] + "\u2026"
        width = 18 + 5.6 * len(label)
        if x + width > WIDTH - RIGHT and x > LEFT:
            x, row = LEFT, row + 1
        y = top + row * LEGEND_ROW
        parts.append(f'<g class="legend-entry" data-series="{attribute(one.key)}"><title>{text(one.label)}</title>'
                     f'<rect x="{x}" y="{y}" width="10" height="10" fill="{one.color}"{_opacity(one)}/>'
                     + _text_at(x + 14, y + 9, label) + "</g>")
        x += int(width) + 12
    parts.append("</g>")
    return "".join(parts), row + 1


def _text_at(x: float, y: float, content: str, *, css: str = "", anchor: str = "start", fill: str = INK,
             weight: str = "", size: int = 0) -> str:
    extra = (f' class="{css}"' if css else "") + (f' font-weight="{weight}"' if weight else "") + (
        f' font-size="{size}"' if size else "") + (f' text-anchor="{anchor}"' if anchor != "start" else "")
    return f'<text x="{x:.2f}" y="{y:.2f}" fill="{fill}"{extra}>{text(content)}</text>'


__all__ = ["PALETTE", "Number", "Panel", "Series", "Window", "attribute", "figure", "number", "scale", "text"]
