"""SVG snapshots of the TUI at fixed terminal sizes, compared with committed references.

Our own small comparison (``App.run_test`` + ``export_screenshot``) rather than
pytest-textual-snapshot: its 1.1.0 pins syrupy 4.8.0, which holds pytest below 9 while the project
runs pytest 9. A mismatch writes the new SVG beside the reference as ``NAME.actual.svg`` and shows
the lines that differ; after checking it by eye, accept it with ``TUI_UPDATE_SNAPSHOTS=1``.
"""

from __future__ import annotations

import asyncio
import difflib
import os
from pathlib import Path

import pytest

from tui.app import WorkbenchApp
from tui.screens.browse import SampleScreen
from tui_support import build_run, svg_lines, wait_until

REFERENCES = Path(__file__).parent / "tui_snapshots"


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("snap") / "run.h5", n_samples=30, n_rounds=6, n_layers=6)


def snapshot(run_path: Path, size: tuple[int, int], keys: list[str], wait_for_run_screen: bool = False) -> str:
    async def main() -> str:
        app = WorkbenchApp(run_path=run_path)
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None)
            for key in keys:
                await pilot.press(key)
                await wait_until(pilot, lambda: not any(w.is_running for w in app.workers))
            if wait_for_run_screen:
                await wait_until(pilot, lambda: getattr(app.screen, "summary", None) is not None, timeout=60)
            await pilot.pause(0.1)
            return app.export_screenshot(title="workbench")

    return asyncio.run(main())


def check(name: str, svg: str) -> None:
    reference = REFERENCES / f"{name}.svg"
    actual = REFERENCES / f"{name}.actual.svg"
    if os.environ.get("TUI_UPDATE_SNAPSHOTS"):
        REFERENCES.mkdir(exist_ok=True)
        reference.write_text(svg, encoding="utf-8")
        actual.unlink(missing_ok=True)
        return
    assert reference.is_file(), f"no reference {reference}: run with TUI_UPDATE_SNAPSHOTS=1 and look at it"
    expected = reference.read_text(encoding="utf-8")
    if svg == expected:
        actual.unlink(missing_ok=True)
        return
    actual.write_text(svg, encoding="utf-8")
    diff = "\n".join(difflib.unified_diff(svg_lines(expected), svg_lines(svg), "reference", "now", lineterm="", n=1))
    pytest.fail(f"{name} differs from {reference} (new one: {actual}); text lines that changed:\n"
                f"{diff or '(same text, different colours or styles)'}")


def test_sample_screen_80x24(run_path):
    check("sample-80x24", snapshot(run_path, (80, 24), ["n", "j"]))


def test_sample_screen_200x50(run_path):
    check("sample-200x50", snapshot(run_path, (200, 50), ["G", "p", "h", "h", "j", "j"]))


def test_run_screen_100x30(run_path):
    check("run-100x30", snapshot(run_path, (100, 30), ["n", "r"], wait_for_run_screen=True))
