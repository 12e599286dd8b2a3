"""The round's option probabilities p̂(o) as horizontal bars; the gold option and the answer marked."""

from __future__ import annotations

import math

import numpy as np
from rich.segment import Segment
from textual.strip import Strip
from textual.widget import Widget

from workbench.printable import visible
from tui.widgets.lines import BaseStyleCache, fit_line

_EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int) -> str:
    """A bar of ``fraction`` of ``width`` cells, to an eighth of a cell, padded to ``width``."""
    if not math.isfinite(fraction) or width <= 0:
        return " " * max(0, width)
    eighths = round(min(1.0, max(0.0, fraction)) * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (_EIGHTHS[rest] if rest else "")).ljust(width)[:width]


class OptionBars(BaseStyleCache, Widget):
    """One line per option: ``a ███▌   0.45✓◀ label`` (✓ gold, ◀ the round's answer)."""

    COMPONENT_CLASSES = {"options--bar", "options--gold", "options--answer"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.options: tuple[str, ...] = ()
        self.probs = np.zeros(0, dtype=np.float32)
        self.gold = -1
        self.answer = -1
        self.message = ""  # shown when there are no options

    def show(self, options: tuple[str, ...], probs: np.ndarray, gold: int, answer: int) -> None:
        resized = len(options) != len(self.options)
        self.options, self.probs, self.gold, self.answer = options, np.asarray(probs, dtype=np.float32), gold, answer
        self.message = "no options (open-ended task)"
        self.refresh(layout=resized)

    def clear(self, message: str = "") -> None:
        """No bars; ``message`` instead (e.g. while a model loads)."""
        self.options, self.probs, self.message = (), np.zeros(0, dtype=np.float32), message
        self.refresh(layout=True)

    def get_content_height(self, container, viewport, width: int) -> int:
        return max(1, len(self.options))

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.base_style
        if not self.options:
            return fit_line([Segment(self.message if y == 0 else "")], width, base)
        if y >= len(self.options):
            return Strip.blank(width, base)
        p = float(self.probs[y]) if y < len(self.probs) else math.nan
        letter = f"{chr(ord('a') + y)} " if y < 26 else f"{y} "
        number = f" {p:4.2f}" if math.isfinite(p) else "    –"
        gold, answer = ("✓" if y == self.gold else " "), ("◀" if y == self.answer else " ")
        bar_width = max(4, min(20, (width - len(letter) - len(number) - 2) // 2))
        segments = [
            Segment(letter),
            Segment(bar(p, bar_width), self.get_component_rich_style("options--bar")),
            Segment(number),
            Segment(gold, self.get_component_rich_style("options--gold")),
            Segment(answer, self.get_component_rich_style("options--answer")),
            Segment(" " + visible(self.options[y]).replace("\n", " ")),
        ]
        return fit_line(segments, width, base)
