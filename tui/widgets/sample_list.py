"""The sample list: id, category and a right/wrong mark per round, one line per sample.

A line-API widget: only the lines on screen are drawn, so 10,000 samples cost what 20 do.
"""

from __future__ import annotations

import numpy as np
from rich.segment import Segment
from textual import events
from textual.binding import Binding
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from workbench.printable import visible
from tui.messages import SampleHighlighted
from tui.widgets.lines import BaseStyleCache

RIGHT, WRONG = "✓", "✗"


def _fit(text: str, width: int) -> str:
    """``text`` (control characters made visible) cut or padded to exactly ``width`` cells (a cut ends with …)."""
    if width <= 0:
        return ""
    text = visible(text, newlines=False)
    return text.ljust(width) if len(text) <= width else text[: max(0, width - 1)] + "…"


def common_prefix(ids: tuple[str, ...]) -> str:
    """The longest prefix all ``ids`` share, cut back to just after a separator (``-_:/.``) so no
    id loses part of a word; "" for fewer than two ids."""
    if len(ids) < 2:
        return ""
    first, last = min(ids), max(ids)
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    prefix = first[:n]
    cut = max(prefix.rfind(c) for c in "-_:/.")
    return prefix[: cut + 1] if cut >= 0 else ""


class SampleList(BaseStyleCache, ScrollView, can_focus=True):
    """The finished samples that pass the filter; the cursor is the sample shown."""

    COMPONENT_CLASSES = {"sample-list--cursor", "sample-list--right", "sample-list--wrong", "sample-list--round"}
    BINDINGS = [
        Binding("down", "cursor(1)", show=False),
        Binding("up", "cursor(-1)", show=False),
        Binding("pagedown", "cursor(10)", show=False),
        Binding("pageup", "cursor(-10)", show=False),
    ]

    current_round: reactive[int] = reactive(0)

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.ids: tuple[str, ...] = ()  # without the common prefix
        self.prefix = ""
        self.id_width = 1
        self.categories: tuple[str, ...] = ()
        self.correct = np.zeros((0, 0), dtype=bool)
        self.marks = False  # right/wrong marks only for multiple-choice tasks
        self.shown = np.zeros(0, dtype=np.int64)  # positions (into finished samples) shown, in order
        self.cursor = 0  # index into visible

    # ------------------------------------------------------------------ data
    def set_samples(self, ids: tuple[str, ...], categories: tuple[str, ...], correct: np.ndarray, marks: bool) -> None:
        """Replace the samples (a run opened or grew); the filter's positions stay in ``shown``.
        The ids' common prefix (``organism-1234-``) goes into the title, the rest is listed."""
        self.prefix = common_prefix(ids)
        self.ids = tuple(i[len(self.prefix):] for i in ids)
        self.categories, self.correct, self.marks = categories, correct, marks
        self.id_width = max((len(i) for i in self.ids), default=1)
        self.border_title = visible(f"samples {self.prefix}…", newlines=False) if self.prefix else "samples"

    def set_visible(self, positions: np.ndarray, keep: int | None = None) -> None:
        """Show these positions; put the cursor on ``keep`` when it is among them, else on the first."""
        self.shown = np.asarray(positions, dtype=np.int64)
        hits = np.flatnonzero(self.shown == keep) if keep is not None else []
        self.cursor = int(hits[0]) if len(hits) else 0
        self.virtual_size = Size(0, len(self.shown))
        self._scroll_cursor_into_view()
        self.refresh()

    @property
    def position(self) -> int | None:
        """The sample under the cursor (position among finished samples), None when the list is empty."""
        return int(self.shown[self.cursor]) if len(self.shown) else None

    def move(self, delta: int) -> bool:
        """Move the cursor by ``delta`` rows (clipped); True when it moved (and SampleHighlighted was posted)."""
        if not len(self.shown):
            return False
        target = min(len(self.shown) - 1, max(0, self.cursor + delta))
        if target == self.cursor:
            return False
        before = self.cursor
        self.cursor = target
        if not self._scroll_cursor_into_view():  # only the two cursor lines change (a scroll repaints all)
            self.refresh_line(before)
            self.refresh_line(target)
        self.post_message(SampleHighlighted(int(self.shown[target])))
        return True

    def action_cursor(self, delta: int) -> None:
        self.move(delta)

    def _scroll_cursor_into_view(self) -> bool:
        """Scroll (now, in this pass) so the cursor's line shows; True when it scrolled."""
        height = max(1, self.scrollable_content_region.height)
        top = int(self.scroll_y)
        if self.cursor < top:
            self.scroll_to(y=self.cursor, animate=False, immediate=True)
        elif self.cursor >= top + height:
            self.scroll_to(y=self.cursor - height + 1, animate=False, immediate=True)
        else:
            return False
        self.refresh()
        return True

    def watch_current_round(self) -> None:
        self.refresh()

    def on_resize(self) -> None:
        self.virtual_size = Size(0, len(self.shown))

    _scrollbar_rows = -1  # the list length the scrollbar was last drawn for

    def _size_updated(self, size: Size, virtual_size: Size, container_size: Size, layout: bool = True) -> bool:
        # Textual's ScrollView compares the layout's virtual size with the list's own, which never
        # match, so it would redraw the scrollbar on every layout pass (every round step): pass the
        # list's own size unless the list's length changed since the scrollbar was drawn.
        rows = self.virtual_size.height
        if rows == self._scrollbar_rows:
            virtual_size = self.virtual_size
        self._scrollbar_rows = rows
        return super()._size_updated(size, virtual_size, container_size, layout)

    def on_click(self, event: events.Click) -> None:
        row = event.y + int(self.scroll_y)
        if 0 <= row < len(self.shown):
            self.move(row - self.cursor)

    # ------------------------------------------------------------------ drawing
    def _line_styles(self) -> dict:
        """Every style a line uses, on the base style: ``(cursor,)`` for the text and
        ``(cursor, right, current round)`` for a mark."""
        base, get = self.base_style, self.get_component_rich_style
        cursor, current = get("sample-list--cursor"), get("sample-list--round")
        marks = {True: get("sample-list--right"), False: get("sample-list--wrong")}
        table: dict = {}
        for on_cursor in (False, True):
            row = base + cursor if on_cursor else base
            table[(on_cursor,)] = row
            for ok in (False, True):
                for now in (False, True):
                    table[(on_cursor, ok, now)] = row + marks[ok] + current if now else row + marks[ok]
        return table

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        base = self.base_style
        row = y + int(self.scroll_y)
        if row >= len(self.shown):
            return Strip.blank(width, base)
        styles = self.styles_once(self._line_styles)
        position = int(self.shown[row])
        n_rounds = self.correct.shape[1] if self.marks else 0
        marks_width = n_rounds + 1 if n_rounds else 0
        text_width = max(2, width - marks_width)
        id_width = max(1, min(self.id_width, (text_width * 3) // 5))
        line = _fit(self.ids[position], id_width) + " " + _fit(self.categories[position], text_width - id_width - 1)
        on_cursor = row == self.cursor
        segments = [Segment(_fit(line, text_width) + (" " if n_rounds else ""), styles[(on_cursor,)])]
        if n_rounds:
            marks = self.correct[position].tolist()
            run, run_style = "", None
            for t, ok in enumerate(marks):  # one segment per run of marks drawn alike
                style = styles[(on_cursor, ok, t == self.current_round)]
                if style is not run_style and run:
                    segments.append(Segment(run, run_style))
                    run = ""
                run, run_style = run + (RIGHT if ok else WRONG), style
            segments.append(Segment(run, run_style))
        return Strip(segments).adjust_cell_length(width, base)
