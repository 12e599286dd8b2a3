"""One response as its tokens, each coloured by the entropy of the step that produced it.

Moving the mouse onto a token, or the cursor (left/right when focused), posts TokenFocused so the
screen shows that token's text, id and entropy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.strip import Strip
from textual.widget import Widget

from tui.colors import cell_style
from workbench.printable import visible
from tui.messages import TokenFocused
from tui.widgets.lines import BaseStyleCache, fit_line

STOP_PIECE = "⏎"  # the stop token: not in the response's ids, but its step has an entropy


@dataclass(frozen=True)
class TokenCell:
    """A run of cells on one line that shows (part of) one token."""

    x: int
    text: str
    token: int


def _chop(text: str, room: int) -> tuple[str, str]:
    """The longest head of ``text`` at most ``room`` cells wide (at least one character), and the rest."""
    width = 0
    for k, ch in enumerate(text):
        width += cell_len(ch)
        if width > room:
            return (text[:k], text[k:]) if k else (text[:1], text[1:])
    return text, ""


def layout_tokens(pieces: list[str], width: int) -> list[list[TokenCell]]:
    """Lines of cells for ``pieces`` wrapped at ``width`` cells: a piece moves to the next line when
    it does not fit on a line that already holds something, is cut when it is wider than a line,
    and a newline inside a piece starts a new line. Wide (CJK) characters count two cells."""
    width = max(2, width)
    lines: list[list[TokenCell]] = [[]]
    x = 0
    for index, piece in enumerate(pieces):
        for k, part in enumerate(visible(piece).split("\n")):
            if k > 0:
                lines.append([])
                x = 0
            if not part:
                continue
            if x > 0 and x + cell_len(part) > width:
                lines.append([])
                x = 0
            while part:
                chunk, part = _chop(part, width - x)
                lines[-1].append(TokenCell(x, chunk, index))
                x += cell_len(chunk)
                if part:
                    lines.append([])
                    x = 0
    return lines


class TokenView(BaseStyleCache, Widget, can_focus=True):
    """A response's tokens; with colouring on, each token's background is its entropy on the
    scale ``[0, scale_max]`` nats (the sample's largest token entropy)."""

    COMPONENT_CLASSES = {"tokens--cursor", "tokens--stop"}
    BINDINGS = [
        Binding("right", "move(1)", "next token", show=False),
        Binding("left", "move(-1)", "prev token", show=False),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.pieces: list[str] = []
        self.ids: list[int] = []
        self.entropies = np.zeros(0, dtype=np.float32)
        self.coloured = True
        self.scale_max = 1.0
        self.cursor: int | None = None
        self._lines: list[list[TokenCell]] = []
        self._laid_out_width = -1

    def show(self, pieces: tuple[str, ...], ids: np.ndarray, entropies: np.ndarray, scale_max: float, coloured: bool) -> None:
        """Show one response: ``pieces``/``ids`` ``[T]``, ``entropies [T]`` or ``[T + 1]`` (the stop
        token's step, shown as ⏎)."""
        self.ids = [int(i) for i in ids]
        self.pieces = list(pieces) + ([STOP_PIECE] if len(entropies) == len(ids) + 1 else [])
        self.entropies = np.asarray(entropies, dtype=np.float32)
        self.scale_max, self.coloured = scale_max, coloured
        self.cursor = None
        self._laid_out_width = -1
        self.refresh(layout=True)

    def set_coloured(self, coloured: bool) -> None:
        self.coloured = coloured
        self.refresh()

    def token_info(self, index: int | None) -> str:
        """One line about token ``index``: its text, id and entropy (nats)."""
        if index is None or not 0 <= index < len(self.pieces):
            return ""
        entropy = float(self.entropies[index]) if index < len(self.entropies) else math.nan
        token_id = str(self.ids[index]) if index < len(self.ids) else "stop"
        return f"token {index + 1}/{len(self.pieces)}  {visible(self.pieces[index])!r}  id {token_id}  H = {entropy:.4f} nats"

    # ------------------------------------------------------------------ layout
    def _ensure_layout(self, width: int) -> None:
        if width != self._laid_out_width:
            self._lines = layout_tokens(self.pieces, width) if self.pieces else [[]]
            self._laid_out_width = width

    def get_content_height(self, container, viewport, width: int) -> int:
        self._ensure_layout(width)
        return max(1, len(self._lines))

    def token_at(self, x: int, y: int) -> int | None:
        """The token shown at cell (x, y) of the content, or None."""
        self._ensure_layout(self.content_region.width)
        if not 0 <= y < len(self._lines):
            return None
        for cell in self._lines[y]:
            if cell.x <= x < cell.x + cell_len(cell.text):
                return cell.token
        return None

    # ------------------------------------------------------------------ input
    def on_mouse_move(self, event: events.MouseMove) -> None:
        offset = event.get_content_offset(self)
        index = self.token_at(offset.x, offset.y) if offset is not None else None
        if index is not None and index != self.cursor:
            self.cursor = index
            self.refresh()
            self.post_message(TokenFocused(index))

    def action_move(self, delta: int) -> None:
        if not self.pieces:
            return
        start = -1 if self.cursor is None and delta > 0 else len(self.pieces) if self.cursor is None else self.cursor
        target = min(len(self.pieces) - 1, max(0, start + delta))
        if target != self.cursor:
            self.cursor = target
            self.refresh()
            self.post_message(TokenFocused(target))

    # ------------------------------------------------------------------ drawing
    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.base_style
        self._ensure_layout(width)
        if y >= len(self._lines):
            return Strip.blank(width, base)
        segments = []
        x = 0
        cursor_style = self.get_component_rich_style("tokens--cursor")
        stop_style = self.get_component_rich_style("tokens--stop")
        for cell in self._lines[y]:
            if cell.x > x:
                segments.append(Segment(" " * (cell.x - x)))
            style = Style()
            if self.coloured and cell.token < len(self.entropies):
                style = cell_style(float(self.entropies[cell.token]), 0.0, self.scale_max)
            if cell.token >= len(self.ids):
                style = stop_style + style
            if cell.token == self.cursor:
                style += cursor_style
            segments.append(Segment(cell.text, style))
            x = cell.x + cell_len(cell.text)
        return fit_line(segments, width, base)
