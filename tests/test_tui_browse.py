"""Browse mode through Textual's Pilot: every binding, asserted on the app's state and messages."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tui.app import WorkbenchApp
from tui.filters import SampleFilter
from tui.messages import RunLoaded, SampleHighlighted, SampleLoaded, TokenFocused
from tui.screens.browse import SampleScreen
from tui.screens.dialogs import FilterScreen, HelpScreen, ProbeScreen
from tui.screens.run import RunScreen
from tui.widgets.sample_list import SampleList
from tui.widgets.tokens import TokenView
from tui_support import build_run, screen_text, wait_until

N, R, L = 12, 4, 3
MARKUP = "[bold]x[/bold] [/] [link=https://example.com]click[/link] [red]"


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    def response(i, t, answer):  # sample 4 answers with text that Rich would take for markup
        return MARKUP if i == 4 else f"{('clearly', 'carefully', 'fairly', 'honestly')[(i + t) % 4]} the answer is ({'abc'[answer]})"

    return build_run(tmp_path_factory.mktemp("browse") / "run.h5", n_samples=N, n_rounds=R, n_layers=L, response=response)


def drive(path, body, size=(100, 30), keymap=None):
    """Run ``body(app, pilot, messages)`` inside ``App.run_test`` once the first sample is shown."""
    messages: list = []

    def hook(message) -> None:  # called at every node a message bubbles through: keep each once
        if not any(m is message for m in messages[-20:]):
            messages.append(message)

    async def main():
        app = WorkbenchApp(run_path=path, keymap=keymap)
        async with app.run_test(size=size, message_hook=hook) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None, what="first sample")
            await body(app, pilot, messages)
            assert app.failures == []

    asyncio.run(main())
    return messages


async def press(app, pilot, *keys):
    """Press keys, then let the sample reads they cause finish."""
    for key in [*keys, None]:
        if key is not None:
            await pilot.press(key)
        await wait_until(pilot, lambda: not any(w.is_running for w in app.workers), what=f"workers after {key}")
        await pilot.pause()  # the message a worker posted as it ended


def test_opens_on_the_first_sample_at_round_one(run_path):
    async def body(app, pilot, messages):
        screen = app.screen
        assert screen.position == 0 and screen.round == 0 and screen.sample.id == "syn-0"
        assert screen.probe_name == "fair" and screen.score == "cosine" and screen.layer_index == L - 1  # best layer
        text = screen_text(app)
        assert "round 1/4" in text and "sample 1/12" in text and "clearly the answer is" in text
        assert any(isinstance(m, RunLoaded) for m in messages) and any(isinstance(m, SampleLoaded) for m in messages)

    drive(run_path, body)


def test_round_keys_step_and_stop_at_the_ends(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        await press(app, pilot, "p")
        assert s.round == 0  # no previous round: nothing happens
        await press(app, pilot, "n")
        assert s.round == 1 and "round 2/4" in screen_text(app)
        await press(app, pilot, "right_square_bracket")
        assert s.round == 2
        await press(app, pilot, "left_square_bracket")
        assert s.round == 1
        await press(app, pilot, "G")
        assert s.round == R - 1
        await press(app, pilot, "n")
        assert s.round == R - 1  # no next round
        text = screen_text(app)
        assert "vs round 3:" in text and s.sample.responses[R - 1].split()[0] in text
        await press(app, pilot, "g")
        assert s.round == 0

    drive(run_path, body)


def test_sample_keys_load_the_next_sample_and_keep_the_round(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        await press(app, pilot, "k")
        assert s.position == 0  # no previous sample
        await press(app, pilot, "n", "j")
        assert s.position == 1 and s.sample.id == "syn-1" and s.round == 1
        assert [m.position for m in messages if isinstance(m, SampleHighlighted)] == [1]
        await press(app, pilot, "j", "j", "k")
        assert s.sample.id == "syn-2"
        for _ in range(N + 2):
            await press(app, pilot, "j")
        assert s.sample.id == f"syn-{N - 1}" and "sample 12/12" in screen_text(app)

    drive(run_path, body)


def test_layer_probe_score_and_colour_keys(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        await press(app, pilot, "l")
        assert s.layer_index == L - 1  # best layer is the last: no next layer
        await press(app, pilot, "h", "h", "h")
        assert s.layer_index == 0 and "fair cos L0" in screen_text(app)
        await press(app, pilot, "v")
        assert s.score == "projection" and "fair pro L0" in screen_text(app)
        await press(app, pilot, "v")
        assert s.score == "cosine"
        await press(app, pilot, "c")
        assert isinstance(app.screen, ProbeScreen)
        await press(app, pilot, "enter")
        assert app.screen is s and s.probe_name == "fair" and s.layer_index == L - 1  # picking resets to the best layer
        tokens = s.query_one(TokenView)
        assert s.coloured and tokens.coloured
        await press(app, pilot, "t")
        assert not s.coloured and not tokens.coloured
        await press(app, pilot, "t")
        assert tokens.coloured

    drive(run_path, body)


def test_heatmap_and_curve_show_the_sample_scores(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        values = s.sample.concept["fair"]["cosine"]
        heatmap = s.query_one("#heatmap")
        np.testing.assert_array_equal(heatmap.values, values)
        await press(app, pilot, "n", "h")
        assert heatmap.current_round == 1 and heatmap.layer_index == L - 2
        assert heatmap.selected_value() == pytest.approx(float(values[1, L - 2]))
        curve = s.query_one("#concept-curve")
        assert curve.data.values == pytest.approx(values[:, L - 2].tolist()) and curve.data.current_round == 1

    drive(run_path, body)


def test_filter_keys(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        samples = s.query_one(SampleList)
        await press(app, pilot, "slash")
        assert isinstance(app.screen, FilterScreen)
        await press(app, pilot, "down", "enter")  # flipped right → wrong
        assert s.filter == SampleFilter("right_to_wrong")
        correct = s.overview.correct
        expected = [i for i in range(N) if (correct[i, :-1] & ~correct[i, 1:]).any()]
        assert samples.shown.tolist() == expected and 1 in expected and 0 not in expected
        assert s.sample.position == expected[0]  # the list moved off sample 0, so the first match is shown
        await press(app, pilot, "slash", "down", "down", "down", "enter")  # never right
        assert samples.shown.tolist() == [i for i in range(N) if not correct[i].any()]
        await press(app, pilot, "slash")
        filter_screen = app.screen
        filter_screen.query_one("#filter-text").focus()
        await pilot.press(*"syn-1")
        await press(app, pilot, "enter")
        await wait_until(pilot, lambda: s.text_hits is not None, what="text search")
        assert samples.shown.tolist() == [1, 10, 11] and s.sample.id == "syn-1"
        await press(app, pilot, "slash", "escape")
        assert s.filter == SampleFilter("text", "syn-1")  # escape leaves the filter alone
        await press(app, pilot, "slash", "enter")  # "all samples" is the first option
        assert samples.shown.tolist() == list(range(N)) and s.sample.id == "syn-1"

    drive(run_path, body)


def test_category_filter_and_an_empty_result(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        s.set_filter(SampleFilter("category", "beta"))
        await press(app, pilot)
        assert s.sample.id == "syn-1"
        assert s.query_one(SampleList).shown.tolist() == [1, 4, 7, 10]
        s.set_filter(SampleFilter("text", "no such text anywhere"))
        await wait_until(pilot, lambda: s.text_hits is not None)
        assert s.query_one(SampleList).shown.tolist() == [] and s.sample is None
        assert "no sample matches" in screen_text(app)
        await press(app, pilot, "n", "j", "l", "t")  # nothing to act on: nothing happens, nothing breaks

    drive(run_path, body)


def test_run_screen_key_and_its_bindings(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        await press(app, pilot, "n", "r")
        run = app.screen
        assert isinstance(run, RunScreen)
        await wait_until(pilot, lambda: run.summary is not None, timeout=60, what="summary")
        text = screen_text(app)
        assert "round 2/4" in text and "R→W" in text and "ECE min–max" in text and "concept" in text
        from workbench.analysis.summary import summary
        from workbench.store.reader import RunFile

        with RunFile(run_path) as f:
            expected = summary(f)
        assert run.query_one("#curve-accuracy").data.values == pytest.approx([r["accuracy"] for r in expected["rounds"]])
        assert run.query_one("#curve-accuracy").data.converged == expected["convergence"]["accuracy"]
        flips = [str(r["right_to_wrong"]) for r in expected["rounds"]]
        table = run.query_one("#table")
        assert [table.get_row_at(i)[7] for i in range(R)] == flips
        await press(app, pilot, "n")
        assert s.round == 2 and run.query_one("#curve-accuracy").data.current_round == 2 and table.cursor_row == 2
        await press(app, pilot, "p", "p", "p")
        assert s.round == 0
        await press(app, pilot, "c")
        assert isinstance(app.screen, ProbeScreen)
        await press(app, pilot, "escape", "r")
        assert app.screen is s and s.round == 0

    drive(run_path, body, size=(100, 40))


def test_help_lists_every_binding_with_its_id_and_remapped_keys(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        await press(app, pilot, "question_mark")
        assert isinstance(app.screen, HelpScreen)
        rows = {binding_id: keys for keys, _, binding_id in app.screen.rows}
        assert {"round.next", "round.previous", "round.first", "round.last", "sample.next", "sample.previous", "layer.next",
                "layer.previous", "probe.choose", "score.toggle", "tokens.toggle", "filter", "screen.run", "help", "quit"} <= set(rows)
        assert rows["round.next"] == "space"  # remapped below
        await press(app, pilot, "escape")
        assert app.screen is s
        await press(app, pilot, "n")
        assert s.round == 0  # n is no longer bound
        await press(app, pilot, "space")
        assert s.round == 1

    drive(run_path, body, keymap={"round.next": "space"})


def test_command_palette_lists_the_bindings(run_path):
    async def body(app, pilot, messages):
        commands = {c.title: c for c in app.get_system_commands(app.screen)}
        assert any(t.startswith("next round") for t in commands)
        next_round = next(c for t, c in commands.items() if t.startswith("next round"))
        await next_round.callback()
        await press(app, pilot)
        assert app.screen.round == 1

    drive(run_path, body)


def test_quit_key(run_path):
    async def body(app, pilot, messages):
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running or app._exit_renderables is not None or app.return_code is not None

    drive(run_path, body)


def test_model_text_is_shown_literally(run_path):
    async def body(app, pilot, messages):
        await press(app, pilot, "j", "j", "j", "j")
        s = app.screen
        assert s.sample.id == "syn-4" and s.sample.responses[0] == MARKUP
        await press(app, pilot, "n")
        text = screen_text(app)
        for literal in ("[bold]x[/bold]", "[/]", "[link=https://example.com]click[/link]", "[red]"):
            assert text.count(literal) >= 2, literal  # the earlier turn as text, the current one as tokens

    drive(run_path, body, size=(120, 40))


def test_tokens_report_their_entropy_and_id_on_hover_and_cursor(run_path):
    async def body(app, pilot, messages):
        s = app.screen
        tokens = s.query_one(TokenView)
        tokens.focus()
        await press(app, pilot, "right", "right")
        assert tokens.cursor == 1
        entropy = float(s.sample.token_entropies[0][1])
        info = str(s.query_one("#token-info").render())
        assert f"id {int(s.sample.token_ids[0][1])}" in info and f"{entropy:.4f}" in info and "' the'" in info
        assert [m.index for m in messages if isinstance(m, TokenFocused)][-2:] == [0, 1]  # (a hover by the idle pointer may come first)
        await pilot.hover(TokenView, offset=(tokens.content_region.x - tokens.region.x, 0))
        await press(app, pilot)
        assert tokens.cursor == 0
        n_tokens = len(s.sample.token_ids[0])
        for _ in range(n_tokens + 3):
            await press(app, pilot, "right")
        assert tokens.cursor == n_tokens  # the stop token's step (⏎) is the last one shown
        assert "id stop" in str(s.query_one("#token-info").render())

    drive(run_path, body)


def test_a_running_run_shows_new_batches_as_they_land(tmp_path, monkeypatch):
    import tui.screens.browse as browse

    monkeypatch.setattr(browse, "REFRESH_SECONDS", 0.2)
    done = np.zeros(8, dtype=bool)
    done[:4] = True
    path = build_run(tmp_path / "growing.h5", n_samples=8, done=done, batch=4, probe=False)

    async def body(app, pilot, messages):
        s = app.screen
        assert s.overview.status == "running" and s.overview.n_done == 4
        assert "running" in screen_text(app) and "done 4/8" in screen_text(app)
        await press(app, pilot, "j")
        # the writer finishes the second batch while the app is open (the app holds no handle on the file)
        full = build_run(tmp_path / "full.h5", n_samples=8, batch=4, probe=False)
        full.replace(path)
        await wait_until(pilot, lambda: s.overview.n_done == 8, timeout=10, what="the new batch")
        assert s.overview.status == "complete" and s.query_one(SampleList).shown.tolist() == list(range(8))
        assert s.position == 1 and "complete" in screen_text(app)

    drive(path, body)


def test_browse_mode_imports_no_torch(run_path):
    """The app, stepping, changing sample and opening the run screen, in a fresh process."""
    code = f"""
import asyncio, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from tui.app import WorkbenchApp
from tui_support import wait_until
async def main():
    app = WorkbenchApp(run_path={str(run_path)!r})
    async with app.run_test() as pilot:
        await wait_until(pilot, lambda: getattr(app.screen, "sample", None) is not None)
        await pilot.press("n", "j", "l")
        await pilot.pause(0.3)
        assert "torch" not in sys.modules, "sample screen"
        await pilot.press("r")
        await wait_until(pilot, lambda: getattr(app.screen, "summary", None) is not None, timeout=60)
        assert app.failures == []
asyncio.run(main())
print("torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False", "the run screen imported torch (workbench.analysis.summary → workbench.engine.uncertainty)"


def test_the_status_line_says_what_acted_in_the_round_shown(tmp_path):
    import json

    import h5py

    path = build_run(tmp_path / "steered.h5", n_samples=3, n_rounds=R, n_layers=L)
    record = [{"kind": "steer", "label": "fair.h5@2", "alpha": 4.0, "rounds": [2, 3], "hook": "hook_resid_post", "layers": [2],
               "positions": "all"}]
    with h5py.File(path, "a") as f:
        f.attrs["interventions"] = json.dumps(record)

    async def body(app, pilot, messages):
        assert "steered –" in screen_text(app)  # round 1: nothing acted
        await press(app, pilot, "n")
        assert "steered steer fair.h5@2 α=+4" in screen_text(app)

    drive(path, body, size=(140, 30))
    drive(build_run(tmp_path / "plain.h5", n_samples=3, n_rounds=R, n_layers=L), _no_steered_part)  # no interventions: no part

    # 80 columns and a long probe file: the model and protocol give way, what acted stays whole
    record[0]["label"] = "organism-fair-probe-v2.h5@2"
    with h5py.File(path, "a") as f:
        f.attrs["interventions"] = json.dumps(record)

    async def narrow(app, pilot, messages):
        header = screen_text(app).splitlines()[0]
        assert "synthetic · synthetic" in header and "steered –" in header  # it fits: everything shown
        await press(app, pilot, "n")
        header = screen_text(app).splitlines()[0]
        assert "steered steer organism-fair-probe-v2.h5@2 α=+4" in header and "round 2/" in header, header
        assert "synthetic" not in header and "complete" not in header

    drive(path, narrow, size=(80, 24))


async def _no_steered_part(app, pilot, messages):
    assert "steered" not in screen_text(app)
