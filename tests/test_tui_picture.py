"""The sample's picture in the TUI (a vision-language run's thumbnail, half blocks): the widget's
pixels and colours, the sample screen showing it beside the conversation (and hiding it for a
text run), and one SVG snapshot."""

from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from test_tui_snapshots import check, snapshot
from tiny_models import write_images
from tui_support import build_run, wait_until

from tui.app import WorkbenchApp
from tui.screens.browse import SampleScreen
from tui.widgets.picture import HALF_BLOCK, Picture, half_block_line, picture_pixels
from workbench.engine.images import image_record


def png_of(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_half_blocks_carry_two_pixels_per_cell():
    pixels = np.zeros((4, 2, 3), dtype=np.uint8)
    pixels[0, 0], pixels[1, 0] = (255, 0, 0), (0, 0, 255)  # column 0: red over blue
    pixels[2, 1], pixels[3, 1] = (0, 255, 0), (10, 20, 30)
    scaled = picture_pixels(png_of(pixels), width=2, height=2)
    assert scaled.shape == (4, 2, 3) and np.array_equal(scaled, pixels)
    cell = half_block_line(scaled, 0)[0]
    assert cell.text == HALF_BLOCK and cell.style.color.triplet == (255, 0, 0) and cell.style.bgcolor.triplet == (0, 0, 255)
    assert half_block_line(scaled, 1)[1].style.bgcolor.triplet == (10, 20, 30)
    assert picture_pixels(b"not a png", 4, 4) is None and picture_pixels(png_of(pixels), 0, 3) is None
    wide = picture_pixels(png_of(np.zeros((10, 40, 3))), width=20, height=20)  # the aspect is kept
    assert wide.shape[:2] == (6, 20)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("picture")
    paths = write_images(root / "imgs", 4)
    records = [image_record(p, p.name, "test") for p in paths]
    return build_run(root / "run.h5", n_samples=4, n_rounds=3, n_layers=3, images=records), records


def test_the_sample_screen_shows_the_thumbnail(vision_run, tmp_path):
    path, records = vision_run
    text_run = build_run(tmp_path / "text.h5", n_samples=2, n_rounds=2)

    async def main():
        app = WorkbenchApp(run_path=path)
        async with app.run_test(size=(120, 36)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None)
            picture = app.screen.query_one(Picture)
            assert picture.display and picture.png == base64.b64decode(records[0]["thumbnail_png"])
            assert picture.content_size.height >= 3 and 0 < picture.content_size.width <= 2 * picture.content_size.height + 1
            line = picture.render_line(picture.content_size.height // 2)
            colours = {s.style.color.triplet for s in line if s.text == HALF_BLOCK}
            assert (220, 30, 30) in colours  # the first picture's red square
            await pilot.press("j")  # the next sample: its own picture
            await wait_until(pilot, lambda: app.screen.sample.position == 1)
            assert picture.png == base64.b64decode(records[1]["thumbnail_png"])
            await pilot.press("n")  # stepping rounds keeps it
            assert app.screen.round == 1 and picture.display
        app = WorkbenchApp(run_path=text_run)
        async with app.run_test(size=(120, 36)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None)
            assert not app.screen.query_one(Picture).display

    asyncio.run(main())


def test_sample_screen_with_a_picture_100x30(vision_run):
    check("sample-picture-100x30", snapshot(vision_run[0], (100, 30), ["n"]))
