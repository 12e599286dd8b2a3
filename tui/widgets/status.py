"""The one-line header of every screen: model, protocol, status, ``round r/R`` and what is selected."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from workbench.printable import visible


class StatusLine(Static):
    """Shows ``(label, value)`` pairs separated by ``│``; values are literal text."""

    COMPONENT_CLASSES = {"status--label", "status--value", "status--alert"}

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id, markup=False)

    def show(self, parts: list[tuple[str, str]], alert: str = "", spare: tuple[int, ...] = (), fit: int | None = None) -> None:
        """Show ``parts`` (and ``alert`` last). The line is cut with an ellipsis where the widget
        ends; before that, the parts at the indices ``spare`` are left out, in that order, while
        the first ``fit`` parts (default: all) and the alert are wider than the widget."""
        width = self.size.width or self.app.size.width
        fit = len(parts) if fit is None else fit
        shown = list(range(len(parts)))
        for index in spare:
            if self._line([parts[k] for k in shown if k < fit], alert).cell_len <= width:
                break
            shown.remove(index)
        self.update(self._line([parts[k] for k in shown], alert), layout=False)  # one line high whatever it says

    def _line(self, parts: list[tuple[str, str]], alert: str) -> Text:
        text = Text(end="", no_wrap=True, overflow="ellipsis")
        label_style = self.get_component_rich_style("status--label")
        value_style = self.get_component_rich_style("status--value")
        for k, (label, value) in enumerate(parts):
            if k:
                text.append(" │ ", label_style)
            if label:
                text.append(f"{label} ", label_style)
            text.append(visible(value).replace("\n", " "), value_style)
        if alert:
            text.append(" │ ", label_style)
            text.append(visible(alert).replace("\n", " "), self.get_component_rich_style("status--alert"))
        return text
