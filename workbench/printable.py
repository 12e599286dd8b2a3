"""Text from a file, made safe to print: a run's model name, a sample's text, an HDF5 object's name
come from whoever wrote the file, and a terminal obeys the control characters in them (``ESC [2J``
clears the screen, ``ESC ]`` sets the window title or a link, a right-to-left override reorders what
follows). Every field the workbench prints from a file goes through :func:`visible` (the command
line's ``info``, ``probe show``, ``analyze``, error lines) or :func:`tui.literal.literal` (the TUI)."""

from __future__ import annotations

import re

# C0 controls but newline, DEL, C1 controls, and the Unicode bidirectional overrides and isolates
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\x80-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: object, newlines: bool = True, pictures: bool = True) -> str:
    """``str(text)`` with every control character shown as a visible stand-in, never obeyed: C0 as
    its Unicode control picture (ESC → ␛, U+2400 + code), DEL as ␡, C1 and bidirectional controls as
    ⍰; tabs as four spaces. ``newlines`` False: a newline too becomes ␊ (a one-line field).
    ``pictures`` False: escapes as Python writes them instead (``\\x1b``, ``\\u202e``), for fonts
    without the control pictures (figures)."""
    def stand_in(m: re.Match[str]) -> str:
        code = ord(m.group())
        if not pictures:
            return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
        return chr(0x2400 + code) if code < 0x20 else "␡" if code == 0x7F else "⍰"

    text = str(text).replace("\t", "    ")
    return _CONTROL.sub(stand_in, text if newlines else text.replace("\n", "\u240a"))


def visible_tree(value: object) -> object:
    """``value`` (dicts, lists, tuples of strings and numbers, as a summary holds) with every string
    and every key made :func:`visible` on one line; other values unchanged."""
    if isinstance(value, str):
        return visible(value, newlines=False)
    if isinstance(value, dict):
        return {visible_tree(k): visible_tree(v) for k, v in value.items()}
    if isinstance(value, list) or type(value) is tuple:
        return type(value)(visible_tree(v) for v in value)
    return value
