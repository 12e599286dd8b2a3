"""One helper the line-API widgets share."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip


def fit_line(segments: list[Segment], width: int, base: Style) -> Strip:
    """A strip of exactly ``width`` cells: ``segments`` on the widget's ``base`` style, cut or padded."""
    return Strip(Segment.apply_style(segments, base)).adjust_cell_length(width, base)
