"""The sample view's details as a researcher reads them: the per-round entropy curve, the legend of
the token colouring, the protocol's forced assistant prefix, and an 80-column terminal (titles
whole, round labels that stay put as you step, the convergence mark beside a label, not over it)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from rich.style import Style

from tui.app import WorkbenchApp
from tui.runsource import round_prefixes
from tui.screens.browse import SampleScreen
from tui.widgets.conversation import Conversation, history_text
from tui.widgets.curve import round_axis, round_ticks
from tui.widgets.entropy_curve import EntropyCurve
from tui_support import build_run, screen_text, wait_until

FIRST = "The single most likely answer choice is"
FOLLOWUP = "Upon evaluation of my previous answer choice, the single most likely answer choice is"


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("details") / "run.h5", n_samples=6, n_rounds=6, n_layers=6,
                     protocol={"first_prefix": FIRST, "followup_prefix": FOLLOWUP})


def drive(path, body, size=(120, 34)):
    async def main():
        app = WorkbenchApp(run_path=path)
        async with app.run_test(size=size) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, SampleScreen) and app.screen.sample is not None, what="first sample")
            await body(app, pilot)
            assert app.failures == []

    asyncio.run(main())


async def press(app, pilot, *keys):
    for key in keys:
        await pilot.press(key)
        await wait_until(pilot, lambda: not any(w.is_running for w in app.workers), what=f"workers after {key}")
        await pilot.pause()


def test_the_entropy_curve_shows_the_samples_token_and_option_entropy_per_round(run_path):
    async def body(app, pilot):
        s = app.screen
        curve = s.query_one(EntropyCurve)
        np.testing.assert_allclose(curve.token, s.sample.mean_token_entropy, rtol=1e-6)
        np.testing.assert_allclose(curve.option, s.sample.option_entropy, rtol=1e-6)
        assert curve.current_round == 0
        text = screen_text(app)
        assert f"tok {s.sample.mean_token_entropy[0]:.3g}" in text and f"opt {s.sample.option_entropy[0]:.3g}" in text
        await press(app, pilot, "n", "n")
        assert curve.current_round == 2
        assert f"tok {s.sample.mean_token_entropy[2]:.3g}" in screen_text(app)
        await press(app, pilot, "j")  # another sample: its own curve
        np.testing.assert_allclose(curve.token, s.sample.mean_token_entropy, rtol=1e-6)
        assert s.sample.id == "syn-1"

    drive(run_path, body)


def test_the_token_colouring_has_a_legend_that_follows_the_colour_toggle(run_path):
    async def body(app, pilot):
        s = app.screen
        legend = s.query_one(Conversation).border_subtitle
        top = max(float(np.nanmax(e)) for e in s.sample.token_entropies)
        assert "token H 0" in legend and f"{top:.3g} nats" in legend
        assert f"{top:.3g} nats" in screen_text(app)
        await press(app, pilot, "t")
        assert not s.coloured and "uncoloured" in s.query_one(Conversation).border_subtitle
        await press(app, pilot, "t")
        assert "token H 0" in s.query_one(Conversation).border_subtitle

    drive(run_path, body)


def test_the_forced_assistant_prefix_is_shown_dimmed_before_each_response(run_path):
    async def body(app, pilot):
        text = screen_text(app)
        assert FIRST in text  # round 1's prefix, just above its tokens
        await press(app, pilot, "n")
        text = screen_text(app)
        assert FIRST + " " + app.screen.sample.responses[0] in text.replace("\n", "")  # round 1 in the history: prefix, response
        assert FOLLOWUP.split(",")[0] in text

    drive(run_path, body, size=(200, 40))


def test_history_text_styles_the_prefix_dim_and_keeps_the_response_plain(run_path):
    from tui.runsource import read_sample

    sample = read_sample(run_path, 0)
    assert sample.prefixes == (FIRST,) + (FOLLOWUP,) * 5
    dim = Style(dim=True)
    text = history_text(sample, 1, Style(bold=True), Style(italic=True), dim)
    plain = text.plain
    start = plain.index(FIRST)
    styles = {span.style for span in text.spans if span.start <= start < span.end}
    assert dim in styles
    response_at = plain.index(sample.responses[0], start)
    assert plain[start + len(FIRST):response_at] == " "  # the responses here start with no space: one between, unstyled
    assert not any(span.style == dim for span in text.spans if span.start <= response_at < span.end)
    assert plain.rstrip().endswith(FOLLOWUP)  # the current round's prefix ends the history, above its tokens
    pending = history_text(sample, sample.n_rounds, Style(), Style(), dim, pending="typed now", pending_prefix="So it is")
    assert pending.plain.rstrip().endswith("typed now\nmodel · round 7  (generating …)\nSo it is")  # live: the round being generated
    spaced = read_sample(run_path, 0)
    spaced = type(spaced)(**{**spaced.__dict__, "responses": tuple(" " + r for r in spaced.responses)})
    assert FIRST + " " + sample.responses[0] in history_text(spaced, 1, Style(), Style(), dim).plain  # no second space


def test_round_prefixes_of_a_protocol():
    assert round_prefixes({"first_prefix": "A", "followup_prefix": "B"}, 3) == ("A", "B", "B")
    assert round_prefixes({"name": "x"}, 2) == ("", "")
    assert round_prefixes(None, 2) == ("", "")


def test_round_labels_do_not_depend_on_the_round_shown():
    for n, cols in ((6, 10), (6, 21), (12, 10), (30, 40), (1, 5)):
        ticks = round_ticks(n, cols)
        assert 0 in ticks and (n - 1 in ticks or n > cols)
        texts = {"".join(seg.text for seg in round_axis(n, cols, current, None, Style(), Style())) for current in range(n)}
        assert len(texts) == 1, (n, cols, texts)


def test_the_convergence_mark_never_replaces_a_round_label():
    style = Style(bold=True)
    # every round labelled: the converged round's number is kept, drawn in the convergence style
    axis = round_axis(6, 11, 0, 3, Style(), style)
    text = "".join(s.text for s in axis)
    assert text.split() == ["1", "2", "3", "4", "5", "6"]
    assert [s.style for s in axis if s.text == "3"] == [style]
    # a round without a label (too narrow for all): ▲ in its blank cell
    axis = round_axis(12, 10, 0, 5, Style(), style)
    text = "".join(s.text for s in axis)
    labels = round_ticks(12, 10)
    assert 4 not in labels and "▲" in text
    assert all(str(t + 1) in text for t in labels)


def test_at_80_columns_titles_are_whole_and_labels_stay_put(run_path):
    def details(text: str) -> list[str]:
        return text.splitlines()[-10:-1]  # the details row (above the footer)

    async def body(app, pilot):
        first = details(screen_text(app))
        joined = "\n".join(first)
        assert "fair cos L5" in joined and "entropy" in joined
        assert "…" not in first[0]  # the details' titles line
        axis_line = first[-2]
        await press(app, pilot, "n", "n", "n")
        after = details(screen_text(app))
        assert after[-2] == axis_line  # the round labels under both curves did not move
        assert app.screen.round == 3

    drive(run_path, body, size=(80, 24))
