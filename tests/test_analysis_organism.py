"""`workbench analyze` on the shipped organism: convergence, the concept–uncertainty sign the world
implies, the simulation task against its baseline, and the probe-vs-exact targets within a round
and on round-to-round changes under the `organism-world` protocol (per-sample follow-ups).
"""

from __future__ import annotations

import numpy as np
import pytest

from workbench.run import RunConfig, run_protocol

N_SAMPLES = 128
ROUNDS = 6


@pytest.fixture(scope="module")
def organism():
    from workbench.models import load_model

    return load_model("organism", device="cpu")


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
def ridge_direction(organism):
    """A linear read-out of the exact log-odds fitted on world dialogue prefixes outside any run
    (the organism contrast set without its margin, continuous target): ``[L, d_model]``."""
    from sklearn.linear_model import RidgeCV

    from probes.activations import text_activations
    from probes.contrast import organism_contrast

    contrast = organism_contrast(organism.tokenizer, n=2000, margin=0.0)
    acts = text_activations(organism, contrast.token_ids, "hook_resid_post", list(range(organism.n_layers))).numpy()
    return np.stack([RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(a, contrast.target).coef_ for a in acts])


def _track(path, direction, name="ridge"):
    """Write the projection of every (sample, round, layer) on ``direction`` as a tracked probe."""
    from workbench.store import RunFile, replace_group

    with RunFile(path) as run:
        acts = run.array("activations/hook_resid_post")[:, :, 0]  # [n, R, L, d] at the last prompt token
    unit = direction / np.linalg.norm(direction, axis=-1, keepdims=True)
    projection = np.einsum("nrld,ld->nrl", acts, unit).astype(np.float32)
    replace_group(path, f"probes/{name}", {"projection": projection, "cosine": projection},
                  {"kind": "probe", "layers": list(range(direction.shape[0])), "best_layer": 1, "hook": "hook_resid_post",
                   "run_position": "last_prompt"})


def _analyze(path, **kw):
    from workbench.analyze import analyze
    from workbench.store import RunFile

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
    from workbench.engine import conversation_texts
    from workbench.errors import WorkbenchError
    from workbench.protocol import load_protocol
    from workbench.tasks import BBQ, Sample

    protocol = load_protocol("organism-world")
    sample = Sample(index=0, id="x", context="c", question="q", options=("a", "b", "c"), gold=0)
    with pytest.raises(WorkbenchError, match="--task organism"):
        conversation_texts(protocol, BBQ, sample)


def test_world_runs_vary_the_posterior_within_every_round(runs):
    from workbench.store import RunFile

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


def test_within_round_and_change_targets_on_the_shipped_model(runs, ridge_direction):
    """DESIGN/issue targets, measured on the shipped model under `organism-world`: the best layer's
    score against the exact log-odds, Spearman ≥ 0.8 within every round and ≥ 0.7 on the change of
    every transition — for a read-out fitted outside the run and for one cross-fitted inside it."""
    path = runs["organism-world"]
    _track(path, ridge_direction)
    result = _analyze(path, probe="ridge")
    held_out = result["probe_vs_exact"]["probes"]["ridge"]["layers"]
    cross_fitted = result["readout_vs_exact"]["hooks"]["hook_resid_post"]
    for layers in (held_out, cross_fitted):
        best = max(layers, key=lambda l: layers[l]["min_within_round"])
        v = layers[best]
        assert np.isnan(v["within_round"][0]["rho"])  # round 1: undefined, said so rather than hidden
        assert v["min_within_round"] >= 0.8, [x["rho"] for x in v["within_round"]]
        assert v["min_changes"] >= 0.7, [x["rho"] for x in v["changes"]]
    # pooled over rounds the round number alone says little here, unlike under fixed follow-ups
    assert abs(result["probe_vs_exact"]["round_number_pooled"]["rho"]) < 0.6


def test_concept_uncertainty_sign_matches_the_world_and_simulation_beats_baseline(runs, ridge_direction):
    path = runs["organism"]
    _track(path, ridge_direction)
    result = _analyze(path, probe="ridge")
    world = result["world_sign"]
    model = result["concept_uncertainty"]["ridge"]["option_entropy"]
    for view in ("pooled", "changes_pooled"):
        assert world[view]["rho"] < -0.1, world[view]
        assert np.sign(model[view]["rho"]) == np.sign(world[view]["rho"]), (view, model[view], world[view])
    sim = result["simulation_task"]["features"]
    residual = next(v for k, v in sim.items() if k.startswith("residual change"))
    assert residual["accuracy_mean"] > residual["baseline_mean"] + 0.03, residual
