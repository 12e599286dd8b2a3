"""Live mode through Pilot on the shipped organism: every binding, the model in a worker, failures
shown in the app, and a saved session that browse mode opens."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("workbench.engine.session", reason="live mode needs workbench.engine.session (the Session issue)")

from tui.app import WorkbenchApp  # noqa: E402
from tui.live import LiveConfig, ORGANISM_IMMORAL  # noqa: E402
from tui.messages import LiveRoundDone, WorkFailed  # noqa: E402
from tui.screens.dialogs import InstructionScreen  # noqa: E402
from tui.screens.live import LiveScreen  # noqa: E402
from tui.widgets.heatmap import ConceptHeatmap  # noqa: E402
from tui.widgets.tokens import TokenView  # noqa: E402
from tui_support import screen_text, wait_until  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402


@pytest.fixture(scope="module")
def probe_path(tmp_path_factory):
    from probes.contrast import organism_contrast
    from probes.fit import fit_probe, save_fitted
    from workbench.engine.models import load_model

    organism = load_model("organism", device="cpu")
    contrast = organism_contrast(organism.tokenizer, n=300)
    layers = list(range(organism.n_layers))
    ev, arrays = fit_probe(organism, contrast, "logreg", "hook_resid_post", layers)
    path = tmp_path_factory.mktemp("live") / "fair.h5"
    save_fitted(path, organism, contrast, "logreg", "hook_resid_post", "last", 0.25, 0, ev, arrays)
    return path


def live_app(config: LiveConfig, body, size=(100, 30)):
    messages: list = []
    seen: set[int] = set()  # a bubbling message reaches the hook once per node; the list keeps ids unique

    def hook(message) -> None:
        if id(message) not in seen:
            seen.add(id(message))
            messages.append(message)

    async def main():
        app = WorkbenchApp(live=config)
        async with app.run_test(size=size, message_hook=hook) as pilot:
            screen = app.screen
            assert isinstance(screen, LiveScreen)
            await wait_until(pilot, lambda: screen.busy is None and (screen.live is not None or app.failures), timeout=120,
                             what="the model to load")
            await body(app, pilot, screen, messages)

    asyncio.run(main())
    return messages


async def settle(pilot, screen, timeout: float = 60) -> None:
    await wait_until(pilot, lambda: screen.busy is None, timeout=timeout, what="the model")


def test_live_rounds_with_every_binding(probe_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `s` saves under artifacts/runs/ of the working directory

    async def body(app, pilot, s, messages):
        assert s.live.session is not None and s.sample is None and "live" in screen_text(app)
        await pilot.press("p", "left_square_bracket", "right_square_bracket", "l", "h", "t", "t")  # nothing to act on yet
        await pilot.press("n")
        await settle(pilot, s)
        assert s.worked == ["loading organism", "generating round 1"]
        assert s.sample.n_rounds == 1 and s.round == 0 and "round 1/1" in screen_text(app)
        first = s.live.session.rounds[0]
        assert s.sample.responses[0] == first.responses[0] and s.sample.instructions[0] == first.instructions[0]
        np.testing.assert_allclose(s.sample.option_probs[0], first.option_probs[0, :3])
        assert s.query_one(TokenView).pieces[: len(first.response_ids[0])] and s.sample.responses[0].split()[0] in screen_text(app)
        await pilot.press("x")
        await settle(pilot, s)
        assert s.sample.n_rounds == 2 and s.sample.instructions[1] == ORGANISM_IMMORAL
        await pilot.press("i")
        await wait_until(pilot, lambda: isinstance(app.screen, InstructionScreen), timeout=30, what="the instruction dialog")
        await pilot.press(*"review your previous answer .", "enter")
        await settle(pilot, s)
        assert s.sample.n_rounds == 3 and s.sample.instructions[2] == "review your previous answer ."
        assert s.live.session.rounds[2].instructions == ["review your previous answer ."]
        # the concept score is the probe's, on the session's own activations
        heatmap = s.query_one(ConceptHeatmap)
        assert heatmap.values.shape == (3, 4) and np.isfinite(heatmap.values).all()
        from probes.evaluate import cosine_scores

        acts = np.stack([r.activations["hook_resid_post"][0, 0] for r in s.live.session.rounds])
        np.testing.assert_allclose(heatmap.values, cosine_scores(acts, s.live.probe.arrays["directions"]).numpy(), rtol=1e-5)
        layer = s.layer_index
        await pilot.press("h")
        assert s.layer_index == max(0, layer - 1)
        await pilot.press("l", "l", "l", "l")
        assert s.layer_index == 3
        await pilot.press("left_square_bracket", "left_square_bracket", "left_square_bracket")
        assert s.round == 0
        await pilot.press("right_square_bracket")
        assert s.round == 1 and "round 2/3" in screen_text(app)
        await pilot.press("t")
        assert not s.coloured
        await pilot.press("s")
        await settle(pilot, s)
        assert len(s.saved) == 1 and Path(s.saved[0]).is_file()
        await pilot.press("o")  # the next organism item: a fresh conversation
        await wait_until(pilot, lambda: isinstance(app.screen, InstructionScreen), timeout=30, what="the item dialog")
        await pilot.press("enter")
        await settle(pilot, s)
        assert s.live.item_index == 1 and s.sample is None and s.live.session.rounds == []
        await pilot.press("o")  # typed before the dialog is up, the text's letters would be keys (n: a round)
        await wait_until(pilot, lambda: isinstance(app.screen, InstructionScreen), timeout=30, what="the item dialog")
        await pilot.press(*"who broke it ? | morrit | yendri | unknown", "enter")
        await settle(pilot, s)
        assert s.live.session.samples[0].question == "who broke it ?"
        await pilot.press("n")
        await settle(pilot, s)
        assert s.sample.n_rounds == 1 and s.sample.options == ("morrit", "yendri", "unknown")
        s.busy = "pretending to work"  # a key pressed while the model works is refused, not queued
        assert s.work("another round", lambda: None) is False and s.worked[-1] != "another round"
        s.show_status()
        await pilot.pause()
        assert "working: pretending to work" in screen_text(app)
        s.busy = None
        assert app.failures == []

    messages = live_app(LiveConfig.from_options("organism", None, None, None, probe_path), body)
    assert sum(isinstance(m, LiveRoundDone) for m in messages) == 4
    saved = next(Path(p) for p in (tmp_path / "artifacts" / "runs").glob("live-*.h5"))
    from tui.runsource import read_overview, read_sample

    overview = read_overview(saved)  # browse mode opens what live mode saved
    sample = read_sample(saved, 0)
    assert overview.n_rounds == 3 and sample.instructions[1] == ORGANISM_IMMORAL


def test_a_round_streams_its_text_while_it_is_generated(monkeypatch):
    """The model is held after its third decoding step: the screen shows the first tokens of the
    round before the round exists, then the finished round, whose tokens begin with them."""
    import threading

    import tui.live
    from workbench.engine.session import Session

    monkeypatch.setattr(tui.live, "STREAM_INTERVAL", 0.0)  # show every step (the app waits 50 ms between showings)
    held, release = threading.Event(), threading.Event()
    real_step = Session.step

    def holding_step(self, instruction=None, on_tokens=None):
        def tokens(step, new_ids):
            on_tokens(step, new_ids)
            if step == 2:
                held.set()
                release.wait(60)

        return real_step(self, instruction, on_tokens=tokens)

    monkeypatch.setattr(Session, "step", holding_step)

    async def body(app, pilot, s, messages):
        await pilot.press("n")
        await wait_until(pilot, held.is_set, timeout=60, what="the model's third step")
        await wait_until(pilot, lambda: s.streamed is not None and len(s.streamed.ids) == 3, what="the streamed tokens")
        await pilot.pause()
        text = screen_text(app)
        assert s.sample is None and s.busy and s.live.session.rounds == []  # the round has not finished
        assert "round 1  (generating …)" in text and "3 tokens so far" in text and "3 tokens" in text
        assert s.query_one(TokenView).pieces == list(s.streamed.pieces) and s.streamed.pieces[0].strip() in text
        streamed = s.streamed.ids
        release.set()
        await settle(pilot, s)
        assert s.sample.n_rounds == 1 and s.streamed is None and "generating" not in screen_text(app)
        assert tuple(s.live.session.rounds[0].response_ids[0][:3]) == streamed
        assert app.failures == []

    try:
        messages = live_app(LiveConfig.from_options("organism", None, None, None, None), body)
    finally:
        release.set()
    from tui.messages import LiveTokens

    assert [len(m.ids) for m in messages if isinstance(m, LiveTokens)][:3] == [1, 2, 3]


def test_a_failure_is_shown_in_the_app(tmp_path):
    async def body(app, pilot, s, messages):
        assert s.live is None and len(app.failures) == 1 and "loading" in app.failures[0].what
        assert any(isinstance(m, WorkFailed) for m in messages)
        await pilot.press("n", "i", "x", "o", "s")  # no model: keys do nothing, nothing breaks
        assert app.is_running and app.screen is s

    live_app(LiveConfig(model=str(tmp_path / "no-such-model")), body)


def test_the_token_stream_shows_at_most_once_per_interval():
    from tui.live import TokenStream

    shown = []
    stream = TokenStream(None, lambda ids, pieces: shown.append((ids, pieces)), interval=3600)
    stream(0, [[5], [9]])
    stream(1, [[6], []])
    stream(2, [[], []])  # the conversation's row stopped
    assert shown == [((5,), ("⟨5⟩",))] and stream.ids == [5, 6]  # row 0 is the live conversation
    every = TokenStream(None, lambda ids, pieces: shown.append(ids), interval=0)
    every(0, [[5]])
    every(1, [[]])
    every(2, [[7]])
    assert shown[1:] == [(5,), (5, 7)]


def test_live_options_are_checked_before_loading(tmp_path):
    with pytest.raises(WorkbenchError, match="needs --data"):
        LiveConfig.from_options("some/model", None, None, None, None)
    with pytest.raises(WorkbenchError, match="file not found"):
        LiveConfig.from_options("organism", None, None, None, tmp_path / "missing.h5")
    config = LiveConfig.from_options("organism", None, None, None, None)
    assert (config.task, config.protocol) == ("organism", "organism")


def test_live_steering_along_the_probe(probe_path):
    """``a`` toggles steering along the loaded probe at the layer shown, ``+``/``-`` move α; the
    round header shows what acted in the round shown; the session's schedule holds it."""
    async def body(app, pilot, s, messages):
        assert "next unsteered" in screen_text(app)
        await pilot.press("a", "plus", "plus", "minus", "plus")
        assert s.steer_on and s.alpha == 6.0 and "next α=+6 @L" in screen_text(app)
        layer = s.steer_layer()
        await pilot.press("n")
        await settle(pilot, s)
        header = screen_text(app)
        assert f"steered α=+6 @L{layer}" in header, header
        (steer,) = s.live.session.schedule[0]
        assert steer.alpha == 6.0 and steer.layers == (layer,) and steer.hook == "hook_resid_post"
        await pilot.press("a", "n")  # off: the next round is not steered
        await settle(pilot, s)
        assert "steered no" in screen_text(app) and s.live.session.schedule[1] == ()
        await pilot.press("left_square_bracket")  # back to round 1: its header says what acted then
        assert f"steered α=+6 @L{layer}" in screen_text(app)

    live_app(LiveConfig(probe=probe_path), body, size=(140, 30))
