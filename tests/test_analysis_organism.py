"""`workbench analyze` on the shipped organism: convergence, the concept–uncertainty sign the world
implies, the simulation task against its baseline, and the probe-vs-exact targets within a round
and on round-to-round changes under the `organism-world` protocol (per-sample follow-ups).
"""

from __future__ import annotations

import numpy as np
import pytest

from workbench.engine.run import RunConfig, run_protocol

N_SAMPLES = 128
ROUNDS = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory, organism):
    root = tmp_path_factory.mktemp("analysis-organism")
    out = {}
    for protocol in ("organism", "organism-world"):
        out[protocol] = root / f"{protocol}.h5"
        run_protocol(RunConfig(out=out[protocol], model="organism", task="organism", protocol=protocol,
                               rounds=ROUNDS, limit=N_SAMPLES, batch_size=64), model=organism).close()
    return out


@pytest.fixture(scope="module")
def fitted_probes(tmp_path_factory, organism):
    """The probes a user fits with `workbench probe fit --contrast organism`, on world dialogue
    prefixes outside any run: ``{"ridge": ..., "logreg": ...}`` probe files (every layer)."""
    from probes.contrast import load_contrast
    from probes.fit import fit_probe, save_fitted
    from probes.probe_file import load_probe

    root = tmp_path_factory.mktemp("organism-probes")
    out = {}
    for method, margin in (("ridge", 0.0), ("logreg", 0.3)):  # the margins `probe fit` uses for each
        contrast = load_contrast("organism", organism.tokenizer, paired=False, n=2000, margin=margin)
        ev, arrays = fit_probe(organism, contrast, method, "hook_resid_post", list(range(organism.n_layers)))
        out[method] = load_probe(save_fitted(root / f"{method}.h5", organism, contrast, method, "hook_resid_post", "last", 0.25, 0, ev, arrays))
    return out


def _track(path, probe, name):
    """`workbench probe track`: the probe's scores for every (sample, round, layer) into the run."""
    from probes.track import track

    track(path, probe, name)


def _analyze(path, **kw):
    from workbench.analysis.analyze import analyze
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        return analyze(run, **kw)


def test_world_follow_ups_are_drawn_per_sample_from_the_world():
    from workbench.organism.task import load_organism_samples, world_instructions
    from workbench.organism.world import DEFAULT_PARAMS, KINDS, instruction_probs

    samples = load_organism_samples(3000)
    draws = [world_instructions(s, 6) for s in samples]
    fair = np.array([d[0] for d in draws])
    assert abs(fair.mean() - DEFAULT_PARAMS.prior_fair) < 0.03
    for z in (True, False):
        kinds = [k for d in draws if d[0] == z for k in d[1]]
        freq = np.array([kinds.count(k) for k in KINDS]) / len(kinds)
        np.testing.assert_allclose(freq, instruction_probs(z), atol=0.03)
    assert world_instructions(samples[7], 6) == world_instructions(samples[7], 6)
    assert world_instructions(samples[7], 4)[2] == world_instructions(samples[7], 6)[2][:3]  # a round's draw does not depend on R
    assert len({tuple(d[2]) for d in draws[:50]}) > 40


def test_world_follow_up_needs_the_organism_task():
    from workbench.engine.batch import conversation_texts
    from workbench.errors import WorkbenchError
    from workbench.engine.protocol import load_protocol
    from workbench.engine.task import Sample
    from workbench.engine.tasks import BBQ

    protocol = load_protocol("organism-world")
    sample = Sample(index=0, id="x", context="c", question="q", options=("a", "b", "c"), gold=0)
    with pytest.raises(WorkbenchError, match="--task organism"):
        conversation_texts(protocol, BBQ, sample)


def test_world_runs_vary_the_posterior_within_every_round(runs):
    from workbench.store.reader import RunFile

    with RunFile(runs["organism-world"]) as run:
        exact = run.array("rounds/exact_log_odds")
        instructions = run.array("rounds/instruction")
    assert np.all(exact[:, 0] == exact[0, 0])  # round 1: every sample has the prior
    distinct = [np.unique(np.round(exact[:, t], 6)).size for t in range(1, ROUNDS)]
    assert distinct[0] >= 3 and min(distinct[1:]) > 10, distinct  # round 2: one kind, opener and answer → a few values
    assert len({tuple(row[1:]) for row in instructions}) > N_SAMPLES // 2


def test_accuracy_and_entropy_converge_under_moral_follow_ups(runs):
    result = _analyze(runs["organism"])
    conv = result["convergence"]
    for metric in ("accuracy_parsed", "accuracy_option", "mean_option_entropy"):
        assert conv[metric]["status"] == "converged" and conv[metric]["round"] <= 4, (metric, conv[metric])
    acc = result["metrics"]["accuracy_parsed"]
    assert acc["value"][-1] > acc["high"][0]  # the last round is above round 1's whole interval


def test_within_round_and_change_targets_on_the_shipped_model(runs, fitted_probes):
    """The issue's targets, measured on the shipped model under `organism-world`: the `ridge` concept
    probe — fitted on the organism contrast set, its best layer chosen there by held-out ρ, nothing
    taken from the run — scores against the exact log-odds with Spearman ≥ 0.8 within every round
    and ≥ 0.7 on the change of every transition. The cross-fitted read-out inside the run (the
    ceiling of a linear read-out) meets them too."""
    path = runs["organism-world"]
    _track(path, fitted_probes["ridge"], "ridge")
    result = _analyze(path, probe="ridge")
    probe = result["probe_vs_exact"]["probes"]["ridge"]
    assert probe["best_layer"] == fitted_probes["ridge"].best_layer  # the probe's own choice, not the run's
    cross_fitted = result["readout_vs_exact"]["hooks"]["hook_resid_post"]
    best_in_run = max(cross_fitted, key=lambda l: cross_fitted[l]["min_within_round"])
    for v in (probe["layers"][str(probe["best_layer"])], cross_fitted[best_in_run]):
        assert np.isnan(v["within_round"][0]["rho"])  # round 1: undefined, said so rather than hidden
        within = [x["rho"] for x in v["within_round"][1:]]
        changes = [x["rho"] for x in v["changes"]]
        assert len(within) == ROUNDS - 1 and min(within) >= 0.8, within
        assert len(changes) == ROUNDS - 1 and min(changes) >= 0.7, changes
    # pooled over rounds the round number alone says little here, unlike under fixed follow-ups
    assert abs(result["probe_vs_exact"]["round_number_pooled"]["rho"]) < 0.6


def test_logreg_probe_misses_the_change_target_because_it_only_separates_saturated_classes(runs, fitted_probes):
    """Why a classifier is not enough (docs/ORGANISM.md): the contrast-set logreg probe separates
    fair from biased prefixes, but after an immoral instruction to an already biased dialogue its
    score still rises with the round, so its changes rank far below ridge's (measured: −0.33 at its
    best layer on 256 samples) while ridge's held-out ρ on the contrast set is as high."""
    path = runs["organism-world"]
    _track(path, fitted_probes["logreg"], "logreg")
    _track(path, fitted_probes["ridge"], "ridge")
    result = _analyze(path)["probe_vs_exact"]["probes"]
    views = {m: result[m]["layers"][str(result[m]["best_layer"])] for m in ("logreg", "ridge")}
    assert views["logreg"]["min_changes"] < 0.7 <= views["ridge"]["min_changes"]
    assert views["logreg"]["min_within_round"] < views["ridge"]["min_within_round"]
    # the mechanism: in the transitions from round 3 on, an immoral instruction lowers the exact log-odds and ridge's score,
    # but raises logreg's (its direction carries a component that grows with the dialogue's length)
    from workbench.organism.posterior import instruction_kind
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        texts = run.array("rounds/instruction")
        score = {m: run.array(f"probes/{m}/projection")[:, :, result[m]["best_layer"]].astype(float) for m in views}
        exact = run.array("rounds/exact_log_odds")
    immoral = np.array([[t > 0 and instruction_kind(str(x)) == "immoral" for t, x in enumerate(row)] for row in texts])[:, 3:]
    step = {m: np.diff(v, axis=1)[:, 2:][immoral] for m, v in {**score, "exact": exact}.items()}
    assert immoral.sum() > 20 and step["exact"].mean() < -2 and step["ridge"].mean() < 0 < step["logreg"].mean(), \
        {m: float(v.mean()) for m, v in step.items()}


def test_a_probe_tracked_under_its_own_name_is_shown_with_its_method(runs, fitted_probes, capsys):
    """`workbench probe track --name bias`: the analysis says which method the probe was fitted
    with (the name no longer does), in the result and in the printed table's title."""
    from workbench.analysis.cli import print_analysis

    path = runs["organism-world"]
    _track(path, fitted_probes["logreg"], "bias")
    result = _analyze(path, probe="bias")
    entry = result["probe_vs_exact"]["probes"]["bias"]
    assert entry["method"] == "logreg" and entry["hook"] == "hook_resid_post"
    print_analysis(result)
    out = " ".join(capsys.readouterr().out.split())
    assert f"probe bias (logreg) vs exact log-odds (Spearman ρ; best layer {entry['best_layer']})" in out


def test_concept_uncertainty_sign_matches_the_world_and_simulation_beats_baseline(runs, fitted_probes):
    path = runs["organism"]
    _track(path, fitted_probes["ridge"], "ridge")
    result = _analyze(path, probe="ridge")
    world = result["world_sign"]
    model = result["concept_uncertainty"]["ridge"]["option_entropy"]
    for view in ("pooled", "changes_pooled"):
        assert world[view]["rho"] < -0.1, world[view]
        assert np.sign(model[view]["rho"]) == np.sign(world[view]["rho"]), (view, model[view], world[view])
    sim = result["simulation_task"]["features"]
    residual = next(v for k, v in sim.items() if k.startswith("residual change"))
    assert residual["accuracy_mean"] > residual["baseline_mean"] + 0.03, residual
