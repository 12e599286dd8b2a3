"""Analysis metrics against hand-computed examples, and `workbench analyze` on a constructed run file.

No model runs here: the run file is written with known answers through the real writer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.analysis.summary import answer_correctness, convergence, metric_scale, round_table, summary
from workbench.analysis.analyze import (
    analyze,
    bootstrap_interval,
    ece_interval,
    flip_matrices,
    mean_interval,
    read_analysis,
    simulation_task,
    spearman,
    write_analysis,
)
from workbench.errors import WorkbenchError
from workbench.store.header import SampleTable
from workbench.store.reader import RunFile
from workbench.store.writer import RunWriter
from workbench.engine.uncertainty import expected_calibration_error


# ----------------------------------------------------------------------------- convergence


@pytest.mark.parametrize(
    "values, eps, k, status, round_",
    [
        ([0.2, 0.6, 0.9, 0.9, 0.9, 0.9], 0.01, 2, "converged", 3),
        ([0.2, 0.6, 0.9, 0.905, 0.9, 0.902], 0.01, 2, "converged", 3),
        ([0.2, 0.8, 0.2, 0.8, 0.2, 0.8], 0.01, 2, "not converged", None),  # never settles
        ([0.5, 0.5, 0.5, 0.5, 0.5, 0.9], 0.01, 2, "not converged", None),  # flat, then moves in the last step
        ([0.5, 0.5, 0.5, 0.5, 0.9, 0.9], 0.01, 1, "converged", 5),  # late mover settles with k = 1
        ([0.5, 0.5, 0.5, 0.5, 0.9, 0.9], 0.01, 2, "not converged", None),  # … but not with k = 2
        ([0.3, 0.9, 0.9], 0.01, 2, "converged", 1 + 1),  # 3 rounds: only round 1 has 2 steps after it → round 2 has 1
        ([0.3, 0.9], 0.01, 2, "too few rounds", None),
        ([0.3, 0.3, 0.3, 0.3], 0.01, 2, "flat", 1),
        ([0.3, 0.305, 0.3, 0.302], 0.01, 2, "flat", 1),  # the whole range is below ε: converged from round 1
        ([0.0, 0.008, 0.016, 0.024, 0.032, 0.040], 0.01, 2, "not converged", None),  # steps < ε but drifts away
        ([0.1, float("nan"), 0.3, 0.3], 0.01, 2, "no values", None),
    ],
)
def test_convergence_on_constructed_sequences(values, eps, k, status, round_):
    if round_ == 2 and len(values) == 3:
        status, round_ = "not converged", None  # round 1 moves by 0.6; round 2 has only one later step
    c = convergence(values, eps=eps, k=k)
    assert (c.status, c.round) == (status, round_), c


def test_convergence_three_rounds_can_report_round_one_only():
    assert convergence([0.9, 0.9, 0.93], eps=0.01, k=2).status == "not converged"
    assert convergence([0.9, 0.92, 0.925], eps=0.01, k=1).round == 2
    assert (convergence([0.9, 0.9, 0.905], eps=0.01, k=2).status, convergence([0.9, 0.9, 0.905], eps=0.01, k=2).round) == ("flat", 1)


def test_a_metric_that_barely_moves_is_flat_not_unconverged():
    """The issue's case: token entropy 7.58185 → 7.58165 over 5 rounds. ε = 0.05 × its own range
    (1e-5) called it "not converged"; the floor (1 % of its scale, 0.076 nats) calls it flat."""
    entropy = [7.58185, 7.58170, 7.58180, 7.58165, 7.58175]
    c = convergence(entropy)
    assert (c.status, c.round) == ("flat", 1) and c.relative
    assert c.eps == pytest.approx(0.01 * 7.58185) and c.floor == c.eps
    assert convergence(entropy, rel_eps=0.05, floor=0.0).status == "not converged"  # the old rule, for contrast
    # a rate is scaled by 1, not by its own size: 0.020 → 0.024 moves less than 1 percentage point
    assert convergence([0.020, 0.024, 0.021, 0.022], scale=metric_scale("accuracy_parsed", [0.020, 0.024])).status == "flat"
    assert convergence([0.020, 0.024, 0.021, 0.022]).status != "flat"  # scaled by its own size (0.024) it moves
    # a metric that moves a lot is judged by its range as before, the floor below it
    moving = [1.0, 0.6, 0.42, 0.41, 0.41, 0.41]
    c = convergence(moving)
    assert (c.status, c.round, c.eps) == ("converged", 3, pytest.approx(0.05 * 0.59)) and c.floor == pytest.approx(0.01)
    # all zeros: flat, with a zero floor
    assert convergence([0.0, 0.0, 0.0, 0.0]).status == "flat"


def test_metric_scale():
    assert metric_scale("accuracy", [0.1]) == metric_scale("ece_range", [0.01]) == metric_scale("stereotype_cos_L2", [0.3]) == 1.0
    assert metric_scale("mean_token_entropy", [7.5, float("nan"), -8.0]) == 8.0
    assert metric_scale("concept:fair", [float("nan")]) == 0.0


def test_convergence_epsilon_is_relative_to_the_range_unless_given():
    # the same shape at two scales converges at the same round with the relative ε
    shape = np.array([0.0, 1.0, 1.02, 1.03, 1.03, 1.03])
    small, large = convergence(shape * 0.01), convergence(shape * 100)
    assert small.round == large.round == 2 and small.relative
    assert small.eps == pytest.approx(0.05 * 0.0103) and large.eps == pytest.approx(0.05 * 103)
    # an absolute ε does not scale: the ×100 sequence's steps of 2 and 1 are not < 0.5, so it converges later
    assert convergence(shape * 100, eps=0.5).round == 4
    assert not convergence(shape, eps=0.5).relative
    with pytest.raises(WorkbenchError):
        convergence(shape, eps=0)


# ----------------------------------------------------------------------------- calibration, bootstrap, flips


def test_ece_by_hand_both_binnings():
    conf = np.array([0.15, 0.25, 0.55, 0.65, 0.95])
    correct = np.array([0, 1, 1, 0, 1])
    # [0, 1]: bins 1, 2, 5, 6, 9 — one sample each: mean |conf − correct|
    unit = (0.15 + 0.75 + 0.45 + 0.65 + 0.05) / 5
    assert expected_calibration_error(conf, correct) == pytest.approx(unit)
    # [min, max] = [0.15, 0.95], width 0.08: positions 0, 1.25, 5, 6.25, 10 → bins 0, 1, 5, 6, 9 (the max in the last)
    assert expected_calibration_error(conf, correct, span="range") == pytest.approx(unit)
    # two samples that share a bin over [min, max] but not over [0, 1]
    conf2, correct2 = np.array([0.50, 0.52, 0.58, 0.90]), np.array([1, 0, 0, 1])
    # over [0, 1]: 0.50, 0.52, 0.58 share bin 5 (mean conf 0.5333, accuracy 1/3), 0.90 is bin 9
    unit2 = 3 / 4 * abs((0.50 + 0.52 + 0.58) / 3 - 1 / 3) + 1 / 4 * abs(0.90 - 1)
    assert expected_calibration_error(conf2, correct2) == pytest.approx(unit2)
    # over [0.50, 0.90], width 0.04: 0.50 → 0, 0.52 → 0, 0.58 → 2, 0.90 → 9
    range2 = (2 * abs(0.51 - 0.5) + abs(0.58 - 0) + abs(0.90 - 1)) / 4
    assert expected_calibration_error(conf2, correct2, span="range") == pytest.approx(range2)


def test_ece_agrees_with_scikit_learn_calibration_curve():
    from sklearn.calibration import calibration_curve

    rng = np.random.default_rng(3)
    conf = rng.uniform(0.05, 0.999, 500)
    conf = conf[np.abs(conf * 10 - np.round(conf * 10)) > 1e-6]  # bin edges are assigned differently
    correct = rng.random(conf.size) < conf ** 2
    true, pred = calibration_curve(correct, conf, n_bins=10, strategy="uniform")
    counts = np.histogram(conf, bins=np.linspace(0, 1, 11))[0]
    counts = counts[counts > 0]
    assert expected_calibration_error(conf, correct) == pytest.approx(float(np.sum(counts / conf.size * np.abs(true - pred))))
    # the [min, max] variant: calibration_curve's bins on confidences rescaled to [0, 1) give the
    # same bin members; the gap is then taken on the original confidences of each bin
    lo, hi = conf.min(), conf.max()
    scaled = (conf - lo) / (hi - lo) * (1 - 1e-9)
    true, _ = calibration_curve(correct, scaled, n_bins=10, strategy="uniform")
    members = np.minimum((scaled * 10).astype(int), 9)
    used = [b for b in range(10) if (members == b).any()]
    np.testing.assert_allclose(true, [correct[members == b].mean() for b in used])
    want = sum((members == b).mean() * abs(conf[members == b].mean() - true[i]) for i, b in enumerate(used))
    assert expected_calibration_error(conf, correct, span="range") == pytest.approx(want)


def test_bootstrap_interval_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    trials, covered = 200, 0
    for i in range(trials):
        x = rng.exponential(2.0, 80)  # skewed, true mean 2
        _, low, high = mean_interval(x, seed=i, n_resamples=1000)
        covered += low <= 2.0 <= high
    assert 0.88 <= covered / trials <= 0.99, covered / trials


def test_bootstrap_is_seeded_and_handles_degenerate_data():
    x = np.random.default_rng(1).normal(size=40)
    assert mean_interval(x, seed=5) == mean_interval(x, seed=5)
    assert mean_interval(np.ones(10), seed=0) == (1.0, 1.0, 1.0)
    est, low, high = mean_interval(np.array([3.0]), seed=0)
    assert est == 3.0 and np.isnan(low) and np.isnan(high)
    assert np.isnan(mean_interval(np.array([np.nan, np.nan]), seed=0)[0])
    est, low, high = ece_interval(np.array([0.9, 0.8, 0.7, 0.6] * 10), np.array([1, 1, 0, 0] * 10), "unit", seed=0)
    assert low <= est <= high and high - low > 0


def test_flip_matrices_by_hand():
    # 4 samples, 3 rounds; parsed state: right / wrong / unparsed
    parsed_correct = np.array([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]], bool)
    unparsed = np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0]], bool)
    option_correct = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 1], [0, 0, 0]], bool)
    m = flip_matrices(parsed_correct, unparsed, option_correct)
    assert [(f["from"], f["to"]) for f in m] == [(1, 2), (2, 3)]
    # 1→2: right→wrong (s0), wrong→right (s1), right→right (s2), unparsed→wrong (s3)
    assert m[0]["parsed"] == [[1, 1, 0], [1, 0, 0], [0, 1, 0]]
    # 2→3: wrong→unparsed (s0), right→right (s1), right→wrong (s2), wrong→wrong (s3)
    assert m[1]["parsed"] == [[1, 1, 0], [0, 1, 1], [0, 0, 0]]
    assert m[0]["option"] == [[1, 1], [1, 1]] and m[1]["option"] == [[2, 0], [1, 1]]


def test_spearman_names_what_it_cannot_compute():
    assert spearman([1, 2, 3, 4], [2, 4, 6, 9])["rho"] == pytest.approx(1.0)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3])["rho"])
    assert spearman([1, 2, np.nan, 4], [1, 2, 3, 4])["n"] == 3


def test_simulation_task_beats_the_baseline_only_when_the_feature_carries_the_label():
    rng = np.random.default_rng(0)
    m = 400
    feature = rng.normal(size=(m, 1))
    falls = feature[:, 0] + 0.3 * rng.normal(size=m) < 0.3  # informative, imbalanced
    groups = np.repeat(np.arange(m // 4), 4)
    good = simulation_task(feature, falls, groups, seed=0)
    assert good["accuracy_mean"] > good["baseline_mean"] + 0.2 and len(good["fold_accuracy"]) == 5
    noise = simulation_task(rng.normal(size=(m, 1)), falls, groups, seed=0)
    assert abs(noise["accuracy_mean"] - noise["baseline_mean"]) < 0.06
    assert "skipped" in simulation_task(feature[:8], np.array([1, 0, 0, 0, 0, 0, 0, 0], bool), groups[:8], seed=0)


# ----------------------------------------------------------------------------- a constructed run file


def _write_run(path, parsed, option, gold, concept=None, rounds_fields=None):
    n, rounds = parsed.shape
    samples = SampleTable(index=list(range(n)), id=[f"s{i}" for i in range(n)], context=["c"] * n, question=["q"] * n,
                          options=[("x", "y", "z")] * n, gold=list(gold), category=[""] * n, condition=[""] * n, extra=["{}"] * n)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=(n, rounds)).astype(np.float32)
    answer = np.where(parsed >= 0, parsed, option)
    arrays = {
        "instruction": [["i"] * rounds] * n, "response": [["r"] * rounds] * n,
        # ragged rows of different lengths (equal lengths trip an h5py broadcast in the writer today)
        "response_token_ids": [[[1] * (t + 1) for t in range(rounds)]] * n, "token_entropy": [[[0.5] * (t + 1) for t in range(rounds)]] * n,
        "prompt_span": np.zeros((n, rounds, 2), np.int64), "response_span": np.zeros((n, rounds, 2), np.int64),
        "mean_token_entropy": rng.random((n, rounds)).astype(np.float32),
        "option_entropy": rng.random((n, rounds)).astype(np.float32),
        "chosen_confidence": rng.uniform(0.34, 1, (n, rounds)).astype(np.float32),
        "option_probs": probs, "parsed_answer": parsed.astype(np.int16), "option_answer": option.astype(np.int16),
        "answer": answer.astype(np.int16), "correct": answer == gold[:, None], **(rounds_fields or {}),
    }
    with RunWriter.create(path, {"model_name": "constructed", "task": "constructed"}, samples, rounds, {}) as w:
        w.write_batch(0, arrays, {}, [[1] * (i + 1) for i in range(n)])
        w.finish()
    if concept is not None:
        from workbench.store.groups import replace_group

        replace_group(path, "probes/c", {"projection": concept[:, :, None].astype(np.float32), "cosine": concept[:, :, None].astype(np.float32)},
                      {"kind": "probe", "layers": [0], "best_layer": 0, "hook": "hook_resid_post", "run_position": "last_prompt"})
    return path


def test_the_two_accuracies_are_computed_from_answers_and_gold(tmp_path):
    # 4 samples, 3 rounds; gold = 0, 1, 2, 0
    gold = np.array([0, 1, 2, 0])
    parsed = np.array([[0, -1, 0], [1, 1, -1], [-1, 2, 2], [2, 2, 0]])
    option = np.array([[0, 0, 0], [0, 1, 1], [2, 2, 2], [2, 0, 0]])
    path = _write_run(tmp_path / "r.h5", parsed, option, gold)
    with RunFile(path) as run:
        named = answer_correctness(run)
        rows = round_table(run)
    np.testing.assert_array_equal(named["parsed_correct"], [[1, 0, 1], [1, 1, 0], [0, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(named["option_correct"], [[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert [r["accuracy_parsed"] for r in rows] == [0.5, 0.5, 0.75]
    assert [r["accuracy_option"] for r in rows] == [0.5, 1.0, 1.0]
    assert [r["unparseable"] for r in rows] == [0.25, 0.25, 0.25]
    # the answer that falls back on the option argmax when unparsed: s0 r2 → option 0 (right), s2 r1 → 2 (right)
    assert [r["accuracy"] for r in rows] == [0.75, 0.75, 1.0]
    assert rows[1]["parsed_right_to_wrong"] == 1 and rows[1]["parsed_wrong_to_right"] == 1  # s0 R→W, s2 W→R
    assert rows[1]["option_wrong_to_right"] == 2 and rows[1]["option_right_to_wrong"] == 0
    assert rows[2]["parsed_right_to_wrong"] == 1 and rows[2]["parsed_wrong_to_right"] == 2


def test_stored_correctness_flags_are_used_when_present(tmp_path):
    gold = np.array([0, 1])
    parsed = np.array([[0, 0], [1, 1]])
    stored = np.array([[0, 0], [0, 0]], bool)  # a writer that knows better (e.g. a gold label it re-read)
    path = _write_run(tmp_path / "r.h5", parsed, parsed, gold, rounds_fields={"parsed_correct": stored, "option_correct": ~stored})
    with RunFile(path) as run:
        rows = round_table(run)
    assert [r["accuracy_parsed"] for r in rows] == [0.0, 0.0] and [r["accuracy_option"] for r in rows] == [1.0, 1.0]
    assert "mean_parsed_correct" not in rows[0]


def test_analyze_writes_into_the_run_file_and_reads_back(tmp_path):
    rng = np.random.default_rng(2)
    n, rounds = 40, 4
    gold = rng.integers(0, 3, n)
    parsed = np.where(rng.random((n, rounds)) < 0.1, -1, rng.integers(0, 3, (n, rounds)))
    option = rng.integers(0, 3, (n, rounds))
    concept = rng.normal(size=(n, rounds)).cumsum(1)
    path = _write_run(tmp_path / "r.h5", parsed, option, gold, concept=concept)
    with RunFile(path) as run:
        result = analyze(run, seed=0)
        s = summary(run)
    m = result["metrics"]
    assert m["accuracy_parsed"]["value"] == pytest.approx(list(((parsed == gold[:, None]) & (parsed >= 0)).mean(0)))
    for name in ("accuracy_parsed", "accuracy_option", "ece", "ece_range", "concept:c"):
        assert all(lo <= v <= hi for v, lo, hi in zip(m[name]["value"], m[name]["low"], m[name]["high"])), name
    assert set(result["convergence"]) == set(m)
    assert len(result["flips"]["transitions"]) == rounds - 1
    cu = result["concept_uncertainty"]["c"]["option_entropy"]
    assert len(cu["within_round"]) == rounds and len(cu["changes"]) == rounds - 1
    assert "features" in result["simulation_task"]
    assert s["convergence_detail"]["accuracy_parsed"]["status"] in ("converged", "not converged")
    write_analysis(path, result)
    write_analysis(path, result)  # re-running replaces
    with RunFile(path) as run:
        stored = read_analysis(run)
        table = run.f["analysis/metrics/accuracy_parsed"][...]
    assert stored["metrics"]["accuracy_parsed"]["value"] == pytest.approx(m["accuracy_parsed"]["value"])
    np.testing.assert_allclose(table[:, 0], m["accuracy_parsed"]["value"])
    json.dumps(stored, allow_nan=False)


def test_analyze_cli_json_and_errors(tmp_path, capsys):
    from typer.testing import CliRunner

    from workbench.cli import _mount_subcommands, app

    _mount_subcommands()
    gold = np.array([0, 1, 2, 0, 1, 2])
    parsed = np.tile(np.array([[0, 1, 1]]), (6, 1))
    path = _write_run(tmp_path / "r.h5", parsed, parsed, gold)
    result = CliRunner().invoke(app, ["analyze", str(path), "--json", "--no-write"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["metrics"]["accuracy_parsed"]["value"] == pytest.approx([2 / 6, 2 / 6, 2 / 6])
    assert data["convergence"]["accuracy_parsed"]["status"] == "flat"
    with RunFile(path) as run:
        assert "analysis" not in run.f
    result = CliRunner().invoke(app, ["analyze", str(path), "--probe", "nope"])
    assert isinstance(result.exception, WorkbenchError) and "no tracked probe" in str(result.exception)
    result = CliRunner().invoke(app, ["analyze", str(path)])
    assert result.exit_code == 0 and "convergence" in result.output
    with RunFile(path) as run:
        assert "analysis/result" in run.f


def test_batched_ece_matches_the_reference_both_ways():
    from workbench.analysis.analyze import ece_batched

    rng = np.random.default_rng(9)
    conf = rng.uniform(0.3, 1.0, (7, 50))
    correct = rng.random((7, 50)) < conf
    for span in ("unit", "range"):
        want = [expected_calibration_error(c, y, span=span) for c, y in zip(conf, correct)]
        np.testing.assert_allclose(ece_batched(conf, correct, span), want)
        np.testing.assert_allclose(ece_batched(conf.T, correct.T, span, axis=0), want)


def test_ridge_gcv_agrees_with_scikit_learn_ridgecv():
    from sklearn.linear_model import RidgeCV

    from workbench.analysis.analyze import ridge_gcv

    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 12)) + 3.0
    y = x @ rng.normal(size=12) + rng.normal(size=200) + 5.0
    x_new = rng.normal(size=(20, 12))
    alphas = np.logspace(-3, 3, 13)
    want = RidgeCV(alphas=alphas).fit(x, y).predict(x_new)
    np.testing.assert_allclose(ridge_gcv(x, y, x_new, alphas), want, rtol=1e-6, atol=1e-6)


def test_info_and_analyze_print_flat_and_what_epsilon_is(tmp_path, capsys, monkeypatch):
    """A token entropy that moves by 2e-4 nats over 5 rounds is "flat" in `info` and `analyze`, and
    both say how ε was chosen."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from cli_support import workbench

    gold = np.array([0, 1, 2, 0, 1, 2])
    parsed = np.tile(np.array([[0, 1, 1, 2, 2]]), (6, 1))
    flat = (7.58185 - 5e-5 * np.arange(5))[None, :].repeat(6, 0).astype(np.float32)
    path = _write_run(tmp_path / "r.h5", parsed, parsed, gold, rounds_fields={"mean_token_entropy": flat})
    code, out, err = workbench(capsys, monkeypatch, "info", str(path))
    assert code == 0, err
    text = " ".join(out.split())
    assert "tok H flat (ε 0.076)" in text and "ε = max(0.05 × the metric's range over the rounds, 0.01 × its scale" in text
    code, out, err = workbench(capsys, monkeypatch, "analyze", str(path), "--no-write")
    assert code == 0, err
    row = next(line for line in out.splitlines() if "tok H" in line and "flat" in line)
    assert "0.0758 (floor)" in row
    assert "ε = max(" in out
    code, out, err = workbench(capsys, monkeypatch, "analyze", str(path), "--no-write", "--eps", "1e-6")
    assert code == 0, err
    row = next(line for line in out.splitlines() if "tok H" in line and "1e-06" in line)
    assert "not converged" in row and "ε = 1e-06 (--eps)" in out


def test_exact_levels_flags_rounds_where_the_posterior_hardly_varies():
    """Under the `organism` protocol every sample gets the same follow-ups: the exact log-odds take
    two values per round, and a within-round ρ there ranks ties. Such rounds leave the minima."""
    from workbench.analysis.analyze import MIN_LEVELS, exact_levels

    rng = np.random.default_rng(0)
    two = np.where(rng.random((40, 1)) < 0.5, 0.5, 1.9) + np.arange(4) * 5.0  # two groups, every round
    two[:, 0] = -0.85  # round 1: the prior
    levels = exact_levels(two)
    assert levels["within_round"] == [1, 2, 2, 2] and not any(levels["within_ok"])
    assert "round(s) 2, 3, 4" in levels["note"] and "organism-world" in levels["note"]
    varied = np.c_[np.full(40, -0.85), rng.normal(size=(40, 3)).cumsum(1)]
    levels = exact_levels(varied)
    assert levels["within_ok"] == [False, True, True, True] and all(levels["changes_ok"]) and levels["note"] == ""
    assert MIN_LEVELS == 5


def test_bootstrap_interval_contains_the_estimate_without_widening():
    """ECE on a small sample: its bootstrap distribution sits above the plug-in estimate, so the plain
    percentile interval misses the estimate. The interval keeps the percentile interval's distances
    from the bootstrap median, around the estimate, and so contains it by construction."""
    from scipy import stats

    from workbench.analysis.analyze import ece_batched

    rng = np.random.default_rng(3)
    conf = rng.uniform(0.4, 1.0, 30)
    correct = (rng.random(30) < conf).astype(float)
    statistic = lambda c, y, axis=-1: ece_batched(c, y, "unit", axis=axis)  # noqa: E731
    est, low, high = bootstrap_interval((conf, correct), statistic, seed=0, vectorized=True, bounds=(0.0, 1.0))
    plain = stats.bootstrap((conf, correct), statistic, n_resamples=2000, method="percentile", paired=True, vectorized=True,
                            rng=np.random.default_rng(0))
    boot = plain.bootstrap_distribution
    assert plain.confidence_interval.low > est  # the percentile interval misses the estimate here
    median, q_low, q_high = np.median(boot), *np.quantile(boot, [0.025, 0.975])
    assert low <= est <= high
    assert (low, high) == (pytest.approx(max(0.0, est - (median - q_low))), pytest.approx(est + (q_high - median)))
    assert low >= 0.0  # kept within the values the statistic can take
    _, low, high = ece_interval(conf, correct, "unit", seed=0)
    assert low <= est <= high
