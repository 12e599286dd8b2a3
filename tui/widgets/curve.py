"""A per-round curve drawn with braille dots (2 × 4 per cell): one metric over rounds, the current
round's column highlighted, the convergence round marked ``▲`` on the round axis."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from tui.colors import format_value
from tui.widgets.lines import BaseStyleCache, fit_line

AXIS_WIDTH = 8  # "-9e-03 ┤"
_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))  # [dot row % 4][dot column % 2]


@dataclass(frozen=True)
class CurveData:
    """One metric per round: ``values [R]`` (NaN = none), a title (may be ""; the first line then
    holds only the current value), the round shown (0-based) and the convergence round (1-based,
    as :func:`workbench.analysis.summary.convergence_round` gives it)."""

    title: str
    values: tuple[float, ...]
    current_round: int = 0
    converged: int | None = None


def braille_canvas(values: np.ndarray, cols: int, rows: int, lo: float, hi: float) -> list[list[int]]:
    """``rows × cols`` braille bit masks of the polyline through ``values`` (one point per round,
    spread over the width; NaN points break the line)."""
    grid = [[0] * cols for _ in range(rows)]
    dots_x, dots_y = 2 * cols, 4 * rows
    n = len(values)

    def point(t: int) -> tuple[int, int] | None:
        v = values[t]
        if not math.isfinite(v):
            return None
        x = (dots_x - 1) // 2 if n == 1 else round(t * (dots_x - 1) / (n - 1))
        frac = 0.5 if hi <= lo else (v - lo) / (hi - lo)
        y = round((1 - min(1.0, max(0.0, frac))) * (dots_y - 1))
        return x, y

    def plot(x: int, y: int) -> None:
        grid[y // 4][x // 2] |= _BITS[y % 4][x % 2]

    points = [point(t) for t in range(n)]
    for t, p in enumerate(points):
        if p is None:
            continue
        plot(*p)
        q = points[t + 1] if t + 1 < n else None
        if q is None:
            continue
        (x0, y0), (x1, y1) = p, q
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for s in range(steps + 1):
            plot(round(x0 + (x1 - x0) * s / steps), round(y0 + (y1 - y0) * s / steps))
    return grid


def round_column(t: int, n_rounds: int, cols: int) -> int:
    """The cell column of round ``t`` (0-based) on a plot ``cols`` cells wide."""
    dots_x = 2 * cols
    x = (dots_x - 1) // 2 if n_rounds == 1 else round(t * (dots_x - 1) / (n_rounds - 1))
    return x // 2


def round_ticks(n_rounds: int, cols: int) -> dict[int, int]:
    """Which rounds get a number on a round axis ``cols`` cells wide: round (0-based) → the cell
    its number starts at. The first, the last, then every round in order, each placed only where
    it keeps a blank cell to its neighbours. The same whatever round is shown, so stepping never
    moves a label."""
    taken = [False] * cols
    out: dict[int, int] = {}
    for t in dict.fromkeys([0, n_rounds - 1, *range(n_rounds)]):
        text = str(t + 1)
        c = round_column(t, n_rounds, cols)
        start = min(max(0, c - len(text) // 2), cols - len(text))
        if start < 0 or any(taken[max(0, start - 1):start + len(text) + 1]):
            continue
        taken[start:start + len(text)] = [True] * len(text)
        out[t] = start
    return out


def round_axis(n_rounds: int, cols: int, current: int, converged: int | None, current_style: Style,
               converged_style: Style) -> list[Segment]:
    """The round axis under a plot ``cols`` cells wide: :func:`round_ticks`' numbers, the current
    round's (0-based) in ``current_style``; the convergence round (1-based) as ``▲`` in its column
    when that cell is blank, else its number drawn in ``converged_style`` (a label is never
    replaced). Returns ``cols`` one-cell segments."""
    axis = [" "] * cols
    styles: list[Style | None] = [None] * cols
    for t, start in round_ticks(n_rounds, cols).items():
        for k, ch in enumerate(str(t + 1)):
            axis[start + k] = ch
            if t == current:
                styles[start + k] = current_style
            elif converged is not None and t == converged - 1:
                styles[start + k] = converged_style
    if converged is not None and 1 <= converged <= n_rounds:
        c = round_column(converged - 1, n_rounds, cols)
        if axis[c] == " ":
            axis[c], styles[c] = "▲", converged_style
    return [Segment(ch, st) for ch, st in zip(axis, styles)]


class Curve(BaseStyleCache, Widget):
    """One :class:`CurveData`, fitted to the widget's size (title line, plot, round axis)."""

    COMPONENT_CLASSES = {"curve--line", "curve--current", "curve--converged", "curve--title"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.data = CurveData("", ())
        self._lines: list[Strip] | None = None
        self._lines_size = (0, 0)  # the size the cached lines were laid out for

    def show(self, data: CurveData) -> None:
        self.data = data
        self._lines = None
        self.refresh()

    def _layout(self) -> list[Strip]:
        width, height = self.size
        base = self.base_style
        data = self.data
        values = np.asarray(data.values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        n = len(values)
        title = data.title
        if n:
            current = values[min(data.current_round, n - 1)]
            title += f"{' ' if title else ''}r{data.current_round + 1} = {format_value(current)}"
        if data.converged is not None:
            title += f"  ▲ converged r{data.converged}"
        lines = [fit_line([Segment(title, self.get_component_rich_style("curve--title"))], width, base)]
        rows, cols = height - 2, width - AXIS_WIDTH
        if rows < 1 or cols < 2 or not finite.size:
            message = "" if finite.size or (not n and data.title) else "no values"  # an empty curve with a title: the title says why
            lines += [fit_line([Segment(message if i == 0 else "")], width, base) for i in range(max(0, height - 1))]
            return lines[:height]
        lo, hi = float(finite.min()), float(finite.max())
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        grid = braille_canvas(values, cols, rows, lo, hi)
        line_style = self.get_component_rich_style("curve--line")
        current_style = self.get_component_rich_style("curve--current")
        current_col = round_column(min(data.current_round, n - 1), n, cols)
        for r in range(rows):
            label = format_value(hi) if r == 0 else format_value(lo) if r == rows - 1 else ""
            segments = [Segment(f"{label:>6} ┤" if label else "       │")]
            for c in range(cols):
                ch = chr(0x2800 + grid[r][c])
                segments.append(Segment(ch, line_style + current_style if c == current_col else line_style))
            lines.append(fit_line(segments, width, base))
        converged_style = self.get_component_rich_style("curve--converged")
        axis = round_axis(n, cols, data.current_round, data.converged, current_style, converged_style)
        segments = [Segment(" " * (AXIS_WIDTH - 1) + "└"), *axis]
        lines.append(fit_line(segments, width, base))
        return lines

    def render_line(self, y: int) -> Strip:
        if self._lines is None or self._lines_size != tuple(self.size):  # a resize may come after a paint at the new size
            self._lines, self._lines_size = self._layout(), tuple(self.size)
        return self._lines[y] if y < len(self._lines) else Strip.blank(self.size.width, self.rich_style)
