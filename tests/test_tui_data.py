"""The TUI's pure parts: reading a run, filters, word diff, token layout, colour scale, keymap files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tui.colors import format_cell, scale_color, scale_fraction
from tui.filters import SampleFilter, flips, select
from tui.keymap import BINDING_IDS, load_keymap
from tui.literal import visible
from tui.runsource import read_overview, read_sample, search_text
from tui.textdiff import word_diff
from tui.tokens import decoder_for, token_pieces
from tui.widgets.curve import braille_canvas
from tui.widgets.sample_list import common_prefix
from tui.widgets.tokens import layout_tokens
from tui_support import build_run
from workbench.errors import WorkbenchError
from workbench.store.reader import RunFile


@pytest.fixture(scope="module")
def run_path(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("tui") / "run.h5", n_samples=12, n_rounds=4, n_layers=3)


def test_overview_and_sample_match_the_file(run_path):
    overview = read_overview(run_path)
    with RunFile(run_path) as run:
        assert overview.correct.tolist() == run.array("rounds/correct").astype(bool).tolist()
        assert overview.ids == tuple(run.array("samples/id").tolist())
        sample = read_sample(run_path, 5, overview.probes)
        assert sample.responses == tuple(run.array("rounds/response")[5].tolist())
        np.testing.assert_array_equal(sample.option_probs, run.array("rounds/option_probs")[5])
        np.testing.assert_array_equal(sample.concept["fair"]["cosine"], run.array("probes/fair/cosine")[5])
        for t in range(4):
            np.testing.assert_array_equal(sample.token_ids[t], run.array("tokens/response_token_ids")[5, t])
    assert overview.probes[0].best_layer == 2 and set(overview.probes[0].ranges) == {"cosine", "projection"}
    lo, hi = overview.probes[0].ranges["cosine"]
    assert -1 <= lo < hi <= 1


def test_a_partial_run_shows_only_finished_samples(tmp_path):
    done = np.zeros(10, dtype=bool)
    done[[0, 1, 2, 7]] = True
    path = build_run(tmp_path / "partial.h5", n_samples=10, done=done, batch=4)
    overview = read_overview(path)
    assert overview.status == "running" and overview.n_done == 4 and overview.n_samples == 10
    assert overview.ids == ("syn-0", "syn-1", "syn-2", "syn-7")
    assert read_sample(path, 3).id == "syn-7"  # position 3 among finished samples is file row 7


def test_token_pieces_rebuild_the_response(run_path):
    overview = read_overview(run_path)
    sample = read_sample(run_path, 0)
    decoder = decoder_for(overview.meta)
    assert decoder is not None
    for t in range(sample.n_rounds):
        assert "".join(token_pieces(decoder, sample.token_ids[t])) == sample.responses[t]
    assert token_pieces(None, [5, 9]) == ["⟨5⟩", "⟨9⟩"]


def test_filters_select_the_right_samples():
    correct = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 0, 1]], dtype=bool)
    cats = ("a", "b", "a", "b", "a")
    r2w, w2r = flips(correct)
    assert r2w.tolist() == [False, True, False, False, True] and w2r.tolist() == [True, False, False, False, True]
    assert select(SampleFilter(), correct, cats).tolist() == [0, 1, 2, 3, 4]
    assert select(SampleFilter("right_to_wrong"), correct, cats).tolist() == [1, 4]
    assert select(SampleFilter("wrong_to_right"), correct, cats).tolist() == [0, 4]
    assert select(SampleFilter("never_right"), correct, cats).tolist() == [2]
    assert select(SampleFilter("category", "b"), correct, cats).tolist() == [1, 3]
    hits = np.array([0, 0, 1, 0, 1], dtype=bool)
    assert select(SampleFilter("text", "x"), correct, cats, hits).tolist() == [2, 4]


def test_text_search_looks_in_responses(run_path):
    hits = search_text(run_path, "(A)")
    with RunFile(run_path) as run:
        expected = ["(a)" in " ".join(row) for row in run.array("rounds/response").tolist()]
    assert hits.tolist() == expected and any(expected) and not all(expected)
    assert search_text(run_path, "syn-1").tolist() == [False, True] + [False] * 8 + [True, True]


def test_word_diff():
    ops = word_diff("clearly the answer is (a)", "carefully the answer is (c)")
    assert ops == [("removed", "clearly"), ("added", "carefully"), ("same", "the"), ("same", "answer"),
                   ("same", "is"), ("removed", "(a)"), ("added", "(c)")]
    assert [w for op, w in ops if op != "removed"] == "carefully the answer is (c)".split()
    assert all(op == "same" for op, _ in word_diff("a b", "a  b"))


def test_token_layout_wraps_and_breaks_lines():
    lines = layout_tokens(["abc", " de", "\nf", "ghijklmnop"], width=5)
    text = ["".join(c.text for c in line) for line in lines]
    assert text == ["abc", " de", "f", "ghijk", "lmnop"]
    assert [c.token for c in lines[2]] == [2] and [c.token for c in lines[4]] == [3]
    wide = layout_tokens(["日本語"], width=4)  # two cells per character
    assert ["".join(c.text for c in line) for line in wide] == ["日本", "語"]
    assert layout_tokens(["a\x1b[31m"], 20)[0][0].text == "a␛[31m"  # no escape reaches the terminal


def test_visible_text_shows_control_characters():
    assert visible("a\tb\x00c\x7f\x9b") == "a    b␀c␡⍰"
    assert visible("[bold]x[/]") == "[bold]x[/]"


def test_colour_scale():
    assert scale_fraction(5, 0, 10) == 0.5 and scale_fraction(-3, 0, 10) == 0 and scale_fraction(30, 0, 10) == 1
    assert math.isnan(scale_fraction(float("nan"), 0, 1))
    low, high = scale_color(0).get_truecolor(), scale_color(1).get_truecolor()
    assert sum(high) > sum(low) + 300  # viridis: dark purple → bright yellow
    assert [format_cell(v) for v in (0.12345, -15.26, 152.4)] == ["0.12", "-15.3", "152"]


def test_braille_curve_goes_from_bottom_left_to_top_right():
    grid = braille_canvas(np.array([0.0, 1.0]), cols=4, rows=2, lo=0.0, hi=1.0)
    assert grid[1][0] & 0x40 and grid[0][3] & 0x08  # lowest-left dot and highest-right dot
    assert not grid[0][0] and not grid[1][3]
    assert all(v == 0 for row in braille_canvas(np.array([np.nan, np.nan]), 4, 2, 0, 1) for v in row)


def test_common_prefix_keeps_whole_words():
    assert common_prefix(("organism-1234-0", "organism-1234-10")) == "organism-1234-"
    assert common_prefix(("Religion-12", "Religion-19")) == "Religion-"
    assert common_prefix(("abc", "abd")) == "" and common_prefix(("one",)) == ""


def test_keymap_file(tmp_path):
    good = tmp_path / "keys.toml"
    good.write_text('[keys]\n"round.next" = "space, n"\n"quit" = "ctrl+q"\n')
    assert load_keymap(good) == {"round.next": "space,n", "quit": "ctrl+q"}
    for text, message in (('[keys]\n"round.nxt" = "x"\n', "unknown binding id 'round.nxt'"),
                          ('[keys]\n"quit" = 3\n', "must be a string"),
                          ("[keys\n", "not valid TOML"),
                          ('[other]\n"quit" = "x"\n', "one [keys] table")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(WorkbenchError, match=message.replace("[", r"\[")):
            load_keymap(bad)
    with pytest.raises(WorkbenchError, match="not found"):
        load_keymap(tmp_path / "missing.toml")
    assert {"round.next", "sample.next", "layer.next", "tokens.toggle", "filter", "help", "quit", "live.step"} <= BINDING_IDS
