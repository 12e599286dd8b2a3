"""A sample's picture (a vision-language run's thumbnail) drawn with half blocks: each cell is ``▀``
with the upper pixel as its colour and the lower one as its background, so a cell holds two
pixels and a 48-pixel thumbnail fits a few lines. The PNG bytes come from the run file
(``samples/extra`` → ``image.thumbnail_png``, docs/FORMAT.md "Images"); nothing else is read.
The widget hides itself when the sample has no picture."""

from __future__ import annotations

import io

import numpy as np
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip
from textual.widget import Widget

HALF_BLOCK = "▀"


def picture_pixels(png: bytes, width: int, height: int) -> np.ndarray | None:
    """The PNG scaled to fit ``width`` cells × ``height`` lines of half blocks (``width`` ×
    ``2·height`` pixels, the aspect kept) → ``[2·rows, cols, 3]`` uint8 RGB, or None for bytes that
    are not a picture or a box with no room."""
    if width < 1 or height < 1:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as img:
            img = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    scale = min(width / img.width, 2 * height / img.height)
    cols, rows = max(1, round(img.width * scale)), max(2, round(img.height * scale))
    rows += rows % 2  # whole cells
    return np.asarray(img.resize((cols, rows), Image.Resampling.BOX), dtype=np.uint8)


def half_block_line(pixels: np.ndarray, y: int) -> list[Segment]:
    """Line ``y`` of ``pixels`` ``[2·rows, cols, 3]``: one ``▀`` per column, upper pixel as the
    colour, lower as the background."""
    top, bottom = pixels[2 * y], pixels[2 * y + 1]
    return [Segment(HALF_BLOCK, Style.from_color(_rgb(t), _rgb(b))) for t, b in zip(top, bottom)]


def _rgb(p: np.ndarray) -> Color:
    return Color.from_rgb(int(p[0]), int(p[1]), int(p[2]))


class Picture(Widget):
    """The sample's thumbnail, as large as the widget's height allows (``show(png)``; None hides it)."""

    DEFAULT_CSS = """
    Picture { width: auto; height: 100%; display: none; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.png: bytes | None = None
        self._pixels: np.ndarray | None = None
        self._for: tuple[int, int] | None = None  # the content size the pixels were scaled to

    def show(self, png: bytes | None) -> None:
        """Draw ``png`` (PNG bytes), or hide the widget for None."""
        changed = png != self.png
        self.png = png
        self.display = png is not None
        self.border_title = "image"
        if changed:
            self._pixels, self._for = None, None
            self.refresh(layout=True)

    def get_content_width(self, container, viewport) -> int:
        if self.png is None:
            return 0
        lines = max(1, container.height)  # the content height it gets (100% of the row, its border already taken off)
        pixels = picture_pixels(self.png, 10 * lines, lines)
        return 0 if pixels is None else int(pixels.shape[1])

    def pixels(self) -> np.ndarray | None:
        """The picture scaled to the widget's content box (cached until the size or picture changes)."""
        size = (self.content_size.width, self.content_size.height)
        if self.png is not None and self._for != size:
            self._pixels, self._for = picture_pixels(self.png, *size), size
        return self._pixels

    def render_line(self, y: int) -> Strip:
        width = self.content_size.width
        pixels = self.pixels()
        if pixels is None or y >= pixels.shape[0] // 2:
            return Strip.blank(width)
        segments = half_block_line(pixels, y)
        pad = width - len(segments)
        return Strip(segments + ([Segment(" " * pad)] if pad > 0 else []), width)
