"""The one colour scale of the TUI (viridis: perceptually uniform, readable by colour-blind people),
used by the heatmap and the entropy-coloured tokens, with a legend to match."""

from __future__ import annotations

import math
from functools import lru_cache

from rich.color import Color
from rich.segment import Segment
from rich.style import Style

# viridis at 9 evenly spaced points, from matplotlib's table
_STOPS = [
    (0x44, 0x01, 0x54), (0x47, 0x2C, 0x7A), (0x3B, 0x51, 0x8B), (0x2C, 0x71, 0x8E), (0x21, 0x90, 0x8C),
    (0x27, 0xAD, 0x81), (0x5C, 0xC8, 0x63), (0xAA, 0xDC, 0x32), (0xFD, 0xE7, 0x25),
]
MISSING = Color.from_rgb(60, 60, 60)  # NaN: no value (sample not done, empty response)


def scale_fraction(value: float, lo: float, hi: float) -> float:
    """Where ``value`` lies on ``[lo, hi]``, clipped to ``[0, 1]``; NaN stays NaN."""
    if not math.isfinite(value):
        return math.nan
    if hi <= lo:
        return 0.5
    return min(1.0, max(0.0, (value - lo) / (hi - lo)))


def _scale_rgb(fraction: float) -> tuple[int, int, int] | None:
    if not math.isfinite(fraction):
        return None
    x = min(1.0, max(0.0, fraction)) * (len(_STOPS) - 1)
    i = min(int(x), len(_STOPS) - 2)
    t = x - i
    r, g, b = (round(a + (c - a) * t) for a, c in zip(_STOPS[i], _STOPS[i + 1]))
    return r, g, b


def scale_color(fraction: float) -> Color:
    """The scale's colour at ``fraction`` in ``[0, 1]`` (linear between the stops); grey for NaN."""
    rgb = _scale_rgb(fraction)
    return MISSING if rgb is None else Color.from_rgb(*rgb)


def readable_on(background: Color) -> Color:
    """Black or white, whichever reads better on ``background``."""
    r, g, b = background.get_truecolor()
    return Color.from_rgb(0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else Color.from_rgb(255, 255, 255)


def cell_style(value: float, lo: float, hi: float) -> Style:
    """Background on the scale for ``value``, with a readable foreground (one Style object per
    colour, so drawing a line builds none)."""
    return _cell_style(_scale_rgb(scale_fraction(value, lo, hi)))


@lru_cache(maxsize=4096)
def _cell_style(rgb: tuple[int, int, int] | None) -> Style:
    bg = MISSING if rgb is None else Color.from_rgb(*rgb)
    return Style(bgcolor=bg, color=readable_on(bg))


def format_value(value: float) -> str:
    """A number in at most 6 characters (the legend's and the heatmap's labels)."""
    if not math.isfinite(value):
        return "–"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-2):
        return f"{value:.0e}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def format_cell(value: float) -> str:
    """A number in at most 5 characters, for a heatmap cell (``-0.47``, ``15.2``, ``-152``)."""
    if not math.isfinite(value):
        return "–"
    if abs(value) < 9.995:
        return f"{value:.2f}"
    if abs(value) < 99.95:
        return f"{value:.1f}"
    return f"{value:.0f}" if abs(value) < 99999.5 else f"{value:.0e}"


@lru_cache(maxsize=64)
def _legend_bar(width: int) -> tuple[Segment, ...]:
    return tuple(Segment(" ", Style(bgcolor=scale_color(i / max(1, width - 1)))) for i in range(width))


def legend_bar(width: int) -> list[Segment]:
    """The colour bar of the scale, low to high, ``width`` cells wide."""
    return list(_legend_bar(width))
