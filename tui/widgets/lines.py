"""One helper the line-API widgets share."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip


def fit_line(segments: list[Segment], width: int, base: Style) -> Strip:
    """A strip of exactly ``width`` cells: ``segments`` on the widget's ``base`` style, cut or padded."""
    return Strip(Segment.apply_style(segments, base)).adjust_cell_length(width, base)


class BaseStyleCache:
    """Mixin for line-API widgets: the widget's base Rich style, computed once per style change
    rather than once per drawn line (``Widget.rich_style`` walks the ancestors each time), and
    :meth:`styles_once` for the styles a widget combines from it."""

    _base_style: Style | None = None
    _derived_styles: dict | None = None

    def notify_style_update(self) -> None:
        self._base_style = None
        self._derived_styles = None
        super().notify_style_update()  # type: ignore[misc]

    def styles_once(self, make) -> dict:
        """``make()`` (a dict of Rich styles), called again only after the widget's styles change."""
        if self._derived_styles is None:
            self._derived_styles = make()
        return self._derived_styles

    @property
    def base_style(self) -> Style:
        if self._base_style is None:
            self._base_style = self.rich_style  # type: ignore[attr-defined]
        return self._base_style
