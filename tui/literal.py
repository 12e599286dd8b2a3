"""Model and user text, shown literally: no markup is interpreted, and control characters (which a
terminal would obey) are shown as their Unicode control pictures (ESC → ␛)."""

from __future__ import annotations

import re

from rich.style import Style
from rich.text import Text

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\x80-\x9f]")


def visible(text: str) -> str:
    """``text`` with tabs as four spaces and every other control character except newline replaced
    by a visible stand-in (U+2400 + code for C0, ␡ for DEL, ⍰ for C1)."""
    def stand_in(m: re.Match[str]) -> str:
        code = ord(m.group())
        return chr(0x2400 + code) if code < 0x20 else "␡" if code == 0x7F else "⍰"

    return _CONTROL.sub(stand_in, text.replace("\t", "    "))


def literal(text: str, style: Style | str = "") -> Text:
    """A Rich ``Text`` holding exactly ``text`` (made :func:`visible`), never parsed as markup."""
    return Text(visible(text), style=style, end="")
