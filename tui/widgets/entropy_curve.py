"""One sample's uncertainty per round: its mean token entropy and its option entropy as two braille
curves over the same round axis, each on its own scale (token entropy on the left axis, option
entropy on the right: the two differ in size, and one axis would flatten the smaller), and the
legend of the entropy colouring of the response's tokens."""

from __future__ import annotations

import math

import numpy as np
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

from tui.colors import format_value, scale_color
from tui.widgets.curve import braille_canvas, round_axis, round_column
from tui.widgets.lines import BaseStyleCache, fit_line

MIN_PLOT = 4  # fewer plot cells than this: the value axes are left out


def axis_label(value: float) -> str:
    """An axis end in at most 5 characters (two significant digits: the title line has the exact values)."""
    return f"{value:.2g}" if math.isfinite(value) and abs(value) < 1e4 else format_value(value)


def _range(values: np.ndarray) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return None
    lo, hi = float(finite.min()), float(finite.max())
    return (max(0.0, lo - 0.5), hi + 0.5) if hi - lo < 1e-12 else (lo, hi)  # an entropy is never below 0


class EntropyCurve(BaseStyleCache, Widget):
    """Title line ``tok 1.01  opt 0.74`` (the shown round's values, each in its curve's colour),
    the two curves (the shown round's column highlighted), and the round axis. An open-ended task
    (option entropy all NaN) shows the token curve alone."""

    COMPONENT_CLASSES = {"entropy--token", "entropy--option", "entropy--current", "entropy--axis"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.token = np.zeros(0)
        self.option = np.zeros(0)
        self.current_round = 0
        self._lines: list[Strip] | None = None
        self._lines_size = (0, 0)

    def show(self, token: np.ndarray, option: np.ndarray, current_round: int) -> None:
        """Show ``token [R]`` and ``option [R]`` entropies (nats; NaN = none) at round ``current_round`` (0-based)."""
        self.token = np.asarray(token, dtype=np.float64)
        self.option = np.asarray(option, dtype=np.float64)
        self.current_round = current_round
        self._lines = None
        self.refresh()

    def clear(self) -> None:
        self.show(np.zeros(0), np.zeros(0), 0)

    def _layout(self) -> list[Strip]:
        width, height = self.size
        base = self.base_style
        tok_style, opt_style = self.get_component_rich_style("entropy--token"), self.get_component_rich_style("entropy--option")
        current_style = self.get_component_rich_style("entropy--current")
        n = len(self.token)
        t = min(self.current_round, max(0, n - 1))
        tok_range, opt_range = _range(self.token), _range(self.option)
        title: list[Segment] = []
        if n:
            title.append(Segment(f"tok {format_value(float(self.token[t]))}", tok_style))
            if opt_range is not None:
                title += [Segment(" "), Segment(f"opt {format_value(float(self.option[t]))}", opt_style)]
        lines = [fit_line(title, width, base)]
        if tok_range is None and opt_range is None:
            lines += [fit_line([Segment("no values" if i == 0 else "")], width, base) for i in range(max(0, height - 1))]
            return lines[:height]
        rows = height - 2
        labels_left = [axis_label(v) for v in tok_range[::-1]] if tok_range else []
        labels_right = [axis_label(v) for v in opt_range[::-1]] if opt_range else []
        left_w = max(map(len, labels_left), default=0) + 1 if labels_left else 1
        right_w = max(map(len, labels_right), default=0) + 1 if labels_right else 0
        cols = width - left_w - right_w
        if cols < MIN_PLOT:  # too narrow for the value axes: the plot alone
            left_w, right_w, cols = 1, 0, width - 1
        if rows < 1 or cols < 2:
            lines += [fit_line([], width, base) for _ in range(max(0, height - 1))]
            return lines[:height]
        empty = [[0] * cols for _ in range(rows)]
        tok_grid = braille_canvas(self.token, cols, rows, *tok_range) if tok_range else empty
        opt_grid = braille_canvas(self.option, cols, rows, *opt_range) if opt_range else empty
        current_col = round_column(t, n, cols)
        for r in range(rows):
            edge = r in (0, rows - 1)
            k = 0 if r == 0 else 1
            segments = []
            if left_w > 1 and edge and labels_left:
                segments.append(Segment(f"{labels_left[k]:>{left_w - 1}}", tok_style))
                segments.append(Segment("┤"))
            else:
                segments.append(Segment(" " * (left_w - 1) + "│"))
            for c in range(cols):
                a, b = tok_grid[r][c], opt_grid[r][c]
                style = opt_style if b else tok_style
                if c == current_col:
                    style = style + current_style
                segments.append(Segment(chr(0x2800 + (a | b)), style))
            if right_w:
                segments.append(Segment("├", None) if edge else Segment("│"))
                if edge:
                    segments.append(Segment(f"{labels_right[k]:<{right_w - 1}}", opt_style))
            lines.append(fit_line(segments, width, base))
        axis_style = self.get_component_rich_style("entropy--axis")
        axis = round_axis(n, cols, t, None, current_style, axis_style)
        lines.append(fit_line([Segment(" " * (left_w - 1) + "└"), *axis, Segment("┘" if right_w else "")], width, base))
        return lines[:height]

    def render_line(self, y: int) -> Strip:
        if self._lines is None or self._lines_size != tuple(self.size):
            self._lines, self._lines_size = self._layout(), tuple(self.size)
        return self._lines[y] if y < len(self._lines) else Strip.blank(self.size.width, self.rich_style)


def colour_legend(scale_max: float, coloured: bool, width: int = 6) -> Text:
    """The legend of the response tokens' colouring, for a border subtitle: ``token H 0 ▇▇▇▇ 1.92``
    (the bar low to high on the TUI's one scale, :func:`tui.colors.scale_color`), or a note that
    colouring is off (``t`` turns it on)."""
    if not coloured:
        return Text("tokens uncoloured (t)")
    text = Text("token H 0 ")
    for i in range(width):
        text.append(" ", Style(bgcolor=scale_color(i / max(1, width - 1))))
    text.append(f" {format_value(scale_max) if math.isfinite(scale_max) else '–'} nats")
    return text
