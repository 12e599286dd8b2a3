"""``workbench tui`` through the real entry point: the command opens the app on a run file (run
headless here, driven by Textual's auto-pilot, which quits with the app's own key) and refuses bad
arguments in one line."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from cli_support import error_line, workbench  # noqa: E402
from tui_support import build_run, wait_until  # noqa: E402


def test_tui_command_opens_the_run_and_quits_on_q(tmp_path, capsys, monkeypatch):
    from tui.app import WorkbenchApp
    from tui.screens.browse import SampleScreen

    path = build_run(tmp_path / "run.h5", n_samples=4, n_rounds=3, n_layers=2)
    seen: dict = {}
    run = WorkbenchApp.run

    async def pilot_script(pilot) -> None:
        app = pilot.app
        await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None, what="first sample")
        seen["path"], seen["sample"] = app.run_path, app.screen.sample
        await pilot.press("q")

    def headless_run(self, **kwargs):  # the real app, headless, with a scripted user
        return run(self, headless=True, size=(100, 30), auto_pilot=pilot_script)

    monkeypatch.setattr(WorkbenchApp, "run", headless_run)
    code, _, err = workbench(capsys, monkeypatch, "tui", str(path))
    assert code == 0, err
    assert Path(seen["path"]) == path and seen["sample"] is not None


def test_tui_command_refuses_bad_arguments_in_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = workbench(capsys, monkeypatch, "tui")
    assert code == 2
    error_line(err, "RUN file", "--live")
    (tmp_path / "run.h5").write_bytes(b"not hdf5")
    code, _, err = workbench(capsys, monkeypatch, "tui", str(tmp_path / "run.h5"), "--live")
    assert code == 2
    error_line(err, "not both")
