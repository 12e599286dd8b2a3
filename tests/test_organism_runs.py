"""The shipped organism through the real engine, and probes against its exact posterior.

One module-scoped run per protocol (the same held-out items), reused by every test here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cli_support import error_line, workbench  # noqa: E402
from workbench.engine.run import RunConfig, run_protocol  # noqa: E402

N_SAMPLES = 96
ROUNDS = 6


@pytest.fixture(scope="module")
def organism_runs(tmp_path_factory, organism):
    root = tmp_path_factory.mktemp("organism")
    runs = {}
    for protocol in ("organism", "organism-inject"):
        runs[protocol] = root / f"{protocol}.h5"
        run_protocol(RunConfig(out=runs[protocol], model="organism", task="organism", protocol=protocol,
                               rounds=ROUNDS, limit=N_SAMPLES, batch_size=32), model=organism).close()
    return runs


def per_round(path, name):
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        return run.array(name)


def fair_option_prob(path):
    """p̂ of the fair (gold) option per sample and round: [N, R]."""
    probs = per_round(path, "rounds/option_probs")
    gold = per_round(path, "samples/gold")
    return np.take_along_axis(probs, gold[:, None, None].astype(int).repeat(probs.shape[1], 1), -1)[..., 0]


def test_moral_rounds_raise_accuracy_lower_entropy_and_converge(organism_runs):
    path = organism_runs["organism"]
    acc = per_round(path, "rounds/correct").mean(0)
    ent = per_round(path, "rounds/option_entropy").mean(0)
    exact = per_round(path, "rounds/exact_p_fair").mean(0)
    assert acc[-1] > acc[0] + 0.1, acc
    assert ent[-1] < ent[0] - 0.1, ent
    assert exact[-1] > exact[0], exact
    # converged by round 6: |Δ| < 0.01 over the last two steps
    assert abs(acc[5] - acc[4]) < 0.01 and abs(acc[4] - acc[3]) < 0.01, acc
    assert abs(ent[5] - ent[4]) < 0.01 and abs(ent[4] - ent[3]) < 0.01, ent


def test_injected_immoral_rounds_drop_the_fair_answer(organism_runs):
    moral, inject = organism_runs["organism"], organism_runs["organism-inject"]
    p_moral, p_inject = fair_option_prob(moral).mean(0), fair_option_prob(inject).mean(0)
    e_moral = per_round(moral, "rounds/exact_p_fair").mean(0)
    e_inject = per_round(inject, "rounds/exact_p_fair").mean(0)
    for injected in (2, 5):  # 1-based rounds of the organism-inject protocol
        t = injected - 1
        assert p_inject[t] < p_moral[t] - 0.05, (injected, p_inject, p_moral)
        assert e_inject[t] < e_moral[t], (injected, e_inject, e_moral)
    np.testing.assert_allclose(p_inject[0], p_moral[0], atol=1e-6)  # identical before any injection


def test_model_option_distribution_tracks_the_exact_predictive(organism_runs):
    """In the engine's own runs (the model answering for itself), the option distribution stays
    close to the exact predictive given the dialogue it actually produced."""
    path = organism_runs["organism"]
    model = per_round(path, "rounds/option_probs").reshape(-1, 3).astype(np.float64)
    exact = per_round(path, "rounds/exact_option_probs").reshape(-1, 3)
    kl = np.sum(np.where(exact > 0, exact * (np.log(np.clip(exact, 1e-12, None)) - np.log(np.clip(model, 1e-12, None))), 0), -1)
    assert kl.mean() < 0.1, kl.mean()


@pytest.fixture(scope="module")
def organism_probe(tmp_path_factory, organism):
    from probes.contrast import organism_contrast
    from probes.fit import fit_probe, save_fitted
    from probes.probe_file import load_probe

    contrast = organism_contrast(organism.tokenizer, n=2000)
    layers = list(range(organism.n_layers))
    # logreg: diffmean's direction also picks up features that merely correlate with the concept in
    # the contrast set (its best layer reaches Spearman ≈ 0.8 against the exact log-odds, logreg ≈ 0.96)
    ev, arrays = fit_probe(organism, contrast, "logreg", "hook_resid_post", layers)
    path = tmp_path_factory.mktemp("probes") / "fair.h5"
    save_fitted(path, organism, contrast, "logreg", "hook_resid_post", "last", 0.25, 0, ev, arrays)
    return load_probe(path)


def test_probe_finds_the_concept(organism_probe):
    best_row = list(organism_probe.arrays["layers"]).index(organism_probe.best_layer)
    assert organism_probe.arrays["test_accuracy"][best_row] >= 0.95


def test_concept_score_tracks_exact_log_odds_and_rounds(organism_runs, organism_probe):
    from probes.evaluate import spearman
    from probes.track import track

    scores = track(organism_runs["organism"], organism_probe)
    row = list(organism_probe.arrays["layers"]).index(organism_probe.best_layer)
    proj = scores["projection"][:, :, row]
    p = per_round(organism_runs["organism"], "rounds/exact_p_fair")
    log_odds = np.log(p) - np.log1p(-p)
    rho = spearman(proj.ravel(), log_odds.ravel())
    r = np.corrcoef(proj.ravel(), log_odds.ravel())[0, 1]
    print(f"concept score vs exact log-odds: Spearman {rho:.3f}, Pearson {r:.3f}")
    assert rho >= 0.9
    means = np.nanmean(proj, 0)
    assert means[-1] > means[0] and np.all(np.diff(means[:4]) > 0), means

    inject = track(organism_runs["organism-inject"], organism_probe)["projection"][:, :, row]
    for injected in (2, 5):
        t = injected - 1
        assert np.nanmean(inject[:, t]) < np.nanmean(proj[:, t]), (injected, np.nanmean(inject, 0), means)
        assert np.nanmean(inject[:, t]) < np.nanmean(inject[:, t - 1]), np.nanmean(inject, 0)


def test_tracking_replaces_and_info_shows_the_concept(organism_runs, organism_probe):
    import h5py

    from probes.track import track
    from workbench.analysis.summary import round_table
    from workbench.store.reader import RunFile

    path = organism_runs["organism"]
    track(path, organism_probe, name="again")
    track(path, organism_probe, name="again")
    with h5py.File(path, "r") as f:
        assert sorted(f["probes/again"].keys()) == ["cosine", "projection"]
        assert f["probes/again/projection"].shape == (N_SAMPLES, ROUNDS, len(organism_probe.arrays["layers"]))
    with RunFile(path) as run:
        rows = round_table(run)
    assert "concept:again" in rows[0]


def test_track_refuses_a_probe_of_another_model(organism_runs, tmp_path, loaded):
    from probes.contrast import load_jsonl_contrast
    from probes.fit import fit_probe, save_fitted
    from probes.probe_file import load_probe
    from probes.track import track
    from workbench.errors import WorkbenchError

    tiny = loaded("llama")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"positive": "hello world {i}", "negative": "the answer is {i}"}}\n' for i in range(20)))
    contrast = load_jsonl_contrast(pairs, tiny.tokenizer)
    ev, arrays = fit_probe(tiny, contrast, "diffmean", "hook_resid_post", [0, 1])
    path = save_fitted(tmp_path / "tiny.h5", tiny, contrast, "diffmean", "hook_resid_post", "last", 0.25, 0, ev, arrays)
    with pytest.raises(WorkbenchError, match="was fitted on"):
        track(organism_runs["organism"], load_probe(path))


def test_world_seed_draws_other_items_and_follow_ups_and_resume_keeps_it(tmp_path, capsys, monkeypatch):
    """`--seed` seeds decoding only; `--world-seed` draws the organism's items and organism-world
    follow-ups, is recorded in the run file's `data`, and a resume with another one is refused."""
    base = ["run", "--protocol", "organism-world", "--limit", "4", "--rounds", "3", "--batch-size", "4", "--device", "cpu"]
    runs = {}
    for name, extra in (("default", []), ("seed", ["--seed", "5"]), ("world", ["--world-seed", "7"])):
        out = tmp_path / f"{name}.h5"
        code, _, err = workbench(capsys, monkeypatch, *base, *extra, "--out", str(out))
        assert code == 0, err
        with h5py.File(out, "r") as f:
            runs[name] = {"context": f["samples/context"].asstr()[...].tolist(),
                          "instruction": f["rounds/instruction"].asstr()[...].tolist(),
                          "world_seed": json.loads(f.attrs["data"])["world_seed"], "seed": int(f.attrs["seed"])}
    assert runs["default"]["world_seed"] == runs["seed"]["world_seed"] == 1234 and runs["world"]["world_seed"] == 7
    assert runs["seed"]["seed"] == 5
    # greedy decoding: --seed changes nothing here; --world-seed changes the items and the follow-ups
    assert runs["seed"]["context"] == runs["default"]["context"] and runs["seed"]["instruction"] == runs["default"]["instruction"]
    assert runs["world"]["context"] != runs["default"]["context"]
    assert [r[1:] for r in runs["world"]["instruction"]] != [r[1:] for r in runs["default"]["instruction"]]
    code, _, err = workbench(capsys, monkeypatch, *base, "--out", str(tmp_path / "world.h5"), "--resume")
    assert code == 2
    error_line(err, "--world-seed 7, not 1234")
    code, _, err = workbench(capsys, monkeypatch, *base, "--world-seed", "7", "--out", str(tmp_path / "world.h5"), "--resume")
    assert code == 0, err
    code, _, err = workbench(capsys, monkeypatch, "run", "--task", "bbq", "--world-seed", "3", "--out", str(tmp_path / "b.h5"))
    assert code == 2
    error_line(err, "--world-seed", "--task organism")
    code, _, err = workbench(capsys, monkeypatch, *base, "--world-seed", "-1", "--out", str(tmp_path / "neg.h5"))
    assert code == 2
    error_line(err, "--world-seed must be in")


def test_run_help_says_which_seed_does_what(capsys, monkeypatch):
    code, out, _ = workbench(capsys, monkeypatch, "run", "--help")
    text = " ".join(out.split())
    assert code == 0 and "--world-seed" in text and "does not change the organism's items" in text
