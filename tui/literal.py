"""Model and user text, shown literally: no markup is interpreted, and control characters (which a
terminal would obey) are shown as stand-ins (ESC → ␛, :func:`workbench.printable.visible`)."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

from workbench.printable import visible


def literal(text: str, style: Style | str = "") -> Text:
    """A Rich ``Text`` holding exactly ``text`` (made :func:`~workbench.printable.visible`), never parsed as markup."""
    return Text(visible(text), style=style, end="")
