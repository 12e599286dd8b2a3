"""The visual organism's pictures: an item's two people drawn left and right, each group its own look.

:func:`render` draws a visual :class:`~workbench.organism.world.Item` (``item.pair`` = the groups of the
person on the left and on the right) as a ``SIZE``×``SIZE`` RGB picture: a light background, and in
each half one figure, a filled shape in its group's colour (every group has its own colour, and
the groups come in four shapes). Deterministic: no antialiasing, no randomness, so one item is one
picture, byte for byte. The picture carries no evidence about the hidden concept z; it only says
which side belongs to which group, which the model needs to find the stereotyped side.

Pillow only (no torch): the engine's task renders the held-out items with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from workbench.organism.world import DEFAULT_PARAMS, Item, WorldParams

SIZE = 32  # pixels a side; the vision tower reads it as 2×2 patches of 16 pixels
BACKGROUND = (224, 224, 224)
# one colour per group, in the order of WorldParams.groups (8 groups)
COLOURS = ((200, 30, 30), (30, 150, 40), (40, 60, 210), (230, 170, 20), (150, 40, 170), (20, 170, 180), (110, 70, 30), (20, 20, 20))
SHAPES = ("circle", "square", "triangle", "diamond")  # group k has shape k % 4


def looks(params: WorldParams = DEFAULT_PARAMS) -> dict[str, tuple[tuple[int, int, int], str]]:
    """Each group's look in the picture: ``{group: (RGB colour, shape)}``."""
    if len(params.groups) > len(COLOURS):
        raise ValueError(f"the picture has colours for {len(COLOURS)} groups, the world has {len(params.groups)}")
    return {g: (COLOURS[k], SHAPES[k % len(SHAPES)]) for k, g in enumerate(params.groups)}


def _figure(draw: Any, left: int, colour: tuple[int, int, int], shape: str) -> None:
    """One figure in the half that starts at column ``left`` (a box of 12×24 pixels, centred)."""
    x0, x1, y0, y1 = left + 2, left + 13, 4, 27
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif shape == "triangle":
        draw.polygon(((x0 + x1) // 2, y0, x1, y1, x0, y1), fill=colour)
    else:  # diamond
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.polygon((cx, y0, x1, cy, cx, y1, x0, cy), fill=colour)


def render(item: Item | None, params: WorldParams = DEFAULT_PARAMS) -> Any:
    """The picture of ``item`` (a PIL RGB image, ``SIZE``×``SIZE``): ``item.pair[0]``'s figure on the
    left, ``item.pair[1]``'s on the right. ``None``: the blank picture (background only), the
    control whose two sides look alike."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    if item is None:
        return img
    if not item.visual:
        raise ValueError("render needs a visual item (sample_item(..., visual=True))")
    draw = ImageDraw.Draw(img)
    look = looks(params)
    for half, group in enumerate(item.pair):
        colour, shape = look[group]
        _figure(draw, half * SIZE // 2, colour, shape)
    return img


def save(item: Item | None, path: Path, params: WorldParams = DEFAULT_PARAMS) -> Path:
    """:func:`render` written as a PNG to ``path`` (a new file; returns ``path``)."""
    render(item, params).save(path, format="PNG")
    return path
