"""A layers × rounds heatmap of one concept score, drawn line by line, with its colour legend."""

from __future__ import annotations

import math

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

from tui.colors import cell_style, format_cell, format_value, legend_bar
from tui.widgets.lines import BaseStyleCache, fit_line

LABEL_WIDTH = 4  # "L12 "


def cell_width_for(screen_width: int) -> int:
    """Heatmap cells are 2 cells wide on a narrow terminal, 4 on a medium one, and 6 (wide
    enough to print each value) from 160 columns."""
    return 2 if screen_width < 100 else 4 if screen_width < 160 else 6


class ConceptHeatmap(BaseStyleCache, Widget):
    """Rows are the probe's layers (as many as fit, around the selected one), columns the rounds; the selected (layer, round) cell is marked
    ``◆`` (its value bold and underlined where cells are wide enough to print values); the last two lines are the legend of the one colour scale (the probe score's 1st–99th
    percentile over the whole run): the colour bar, then its two ends."""

    COMPONENT_CLASSES = {"heatmap--selected-label"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.values = np.zeros((0, 0), dtype=np.float32)  # [R, L]
        self.layer_labels: tuple[int, ...] = ()
        self.value_range = (0.0, 1.0)
        self.current_round = 0
        self.layer_index = 0
        self.label = ""
        self.cell_width = 2
        self._drawn_cell_width = 2

    def show(self, values: np.ndarray, layers: tuple[int, ...], value_range: tuple[float, float], current_round: int,
             layer_index: int, label: str) -> None:
        """Draw ``values [R, L]`` (R rounds so far, L = len(layers)) on the scale ``value_range``."""
        values = np.asarray(values, dtype=np.float32)
        resized = values.shape != self.values.shape or layers != self.layer_labels or self.cell_width != self._drawn_cell_width
        self.values, self._drawn_cell_width = values, self.cell_width
        self.layer_labels, self.value_range, self.label = layers, value_range, label
        self.current_round, self.layer_index = current_round, layer_index
        self.refresh(layout=resized)

    def clear(self, label: str = "") -> None:
        self.show(np.zeros((0, 0), dtype=np.float32), (), (0.0, 1.0), 0, 0, label)

    @property
    def n_rounds(self) -> int:
        return self.values.shape[0]

    def get_content_height(self, container, viewport, width: int) -> int:
        return len(self.layer_labels) + 3 if self.layer_labels else 1

    def layer_window(self) -> range:
        """The layers (indices) drawn: all of them when they fit between the round header and the
        two legend lines, else as many as fit, centred on the selected layer."""
        rows = max(1, self.size.height - 3)
        n = len(self.layer_labels)
        if n <= rows:
            return range(n)
        start = min(max(0, self.layer_index - rows // 2), n - rows)
        return range(start, start + rows)

    def get_content_width(self, container, viewport) -> int:
        return max(LABEL_WIDTH + self.cell_width * max(1, self.n_rounds), 14)

    def selected_value(self) -> float:
        if not self.layer_labels or not self.n_rounds:
            return math.nan
        return float(self.values[min(self.current_round, self.n_rounds - 1), self.layer_index])

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.base_style
        if not self.layer_labels:
            return fit_line([Segment(self.label or "no probe tracked in this run" if y == 0 else "")], width, base)
        cw = self.cell_width
        lo, hi = self.value_range
        window = self.layer_window()
        if y == 0:  # title: the rounds, the current one reversed; ↕ when not every layer fits
            segments = [Segment(("rnd" if len(window) == len(self.layer_labels) else "r ↕").ljust(LABEL_WIDTH)[:LABEL_WIDTH])]
            for t in range(self.n_rounds):
                segments.append(Segment(str(t + 1).center(cw)[:cw], Style(reverse=t == self.current_round, bold=t == self.current_round)))
            return fit_line(segments, width, base)
        if y == len(window) + 1:
            return fit_line(legend_bar(width), width, base)
        if y == len(window) + 2:
            left, right = format_value(lo), format_value(hi)
            return fit_line([Segment(left + right.rjust(width - len(left)))], width, base)
        if not 1 <= y <= len(window):
            return Strip.blank(width, base)
        row = window[y - 1]
        selected = row == self.layer_index
        label_style = self.get_component_rich_style("heatmap--selected-label") if selected else None
        segments = [Segment(f"L{self.layer_labels[row]}".ljust(LABEL_WIDTH)[:LABEL_WIDTH], label_style)]
        for t in range(self.n_rounds):
            value = float(self.values[t, row])
            style = cell_style(value, lo, hi)
            here = selected and t == self.current_round
            if cw >= 6:
                text = format_cell(value).rjust(cw - 1)[: cw - 1] + " "
                if here:
                    style += Style(bold=True, underline=True)
            else:
                text = ("◆" if here else "").center(cw)
            segments.append(Segment(text, style))
        return fit_line(segments, width, base)
