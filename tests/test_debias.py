"""`workbench organism debias`: candidates whose z is known, scored by the model's answer entropy, paired
intervals, and the whole experiment through its CLI at toy size."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli_support import error_line, workbench

pytest.importorskip("peft")


def test_paired_difference_by_hand():
    from workbench.organism.debias import paired_difference

    a, b = np.array([1.0, 0.0, 1.0, 1.0, np.nan]), np.array([0.0, 0.0, 1.0, 0.0, 1.0])
    r = paired_difference(a, b, n_boot=4000, seed=0)
    assert r["n"] == 4 and r["diff"] == pytest.approx(0.5) and r["a"] == pytest.approx(0.75) and r["b"] == pytest.approx(0.25)
    assert 0.0 <= r["lo"] < 0.5 < r["hi"] <= 1.0  # differences are 1, 0, 0, 1: the bootstrap mean lies in [0, 1]
    same = paired_difference(np.ones(10), np.ones(10))
    assert same["diff"] == same["lo"] == same["hi"] == 0.0
    assert paired_difference(np.array([np.nan]), np.array([1.0]))["n"] == 0


def test_candidates_know_their_concept_and_the_entropy_is_the_models(organism):
    import torch

    from workbench.organism.debias import answer_entropy_and_state, draw_candidates
    from probes.probe_file import Probe

    cands = draw_candidates(12, seed=3, max_rounds=3)
    assert cands == draw_candidates(12, seed=3, max_rounds=3) and {c.n_rounds for c in cands} <= {1, 2, 3}
    assert 0 < np.mean([c.fair for c in cands]) < 1
    # the recorded exact posterior is evidence about the known z
    fair = np.array([x.fair for x in draw_candidates(200, seed=3, max_rounds=3)])
    post = np.array([x.p_fair for x in draw_candidates(200, seed=3, max_rounds=3)])
    assert post[fair].mean() > post[~fair].mean() + 0.1 and ((0 < post) & (post < 1)).all()
    c = cands[0]
    d = organism.d_model
    probe = Probe(path=__import__("pathlib").Path("p.h5"), meta={"hook": "hook_resid_post", "best_layer": 1, "method": "diffmean"},
                  arrays={"layers": np.array([1]), "directions": np.eye(d, dtype=np.float32)[:1]})
    entropy, probs, concept = answer_entropy_and_state(organism, cands, probe)
    assert entropy.shape == (12,) and np.allclose(probs.sum(1), 1)
    # one candidate by hand: the letter distribution at "is" of the last answer, from a plain forward pass
    tok = organism.tokenizer
    ids = tok(tok.apply_chat_template(c.messages, tokenize=False), add_special_tokens=False)["input_ids"]
    letters = tok.convert_tokens_to_ids(["(a)", "(b)", "(c)"])
    with torch.no_grad():
        p = torch.softmax(organism.hf(torch.tensor([ids])).logits[0, len(ids) - 3, letters], -1).numpy()
    assert probs[0] == pytest.approx(p, abs=1e-5)
    assert np.isfinite(concept).all()


@pytest.mark.slow
def test_debias_end_to_end_through_the_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "debias"
    args = ("organism", "debias", "--size", "6", "--candidates", "16", "--items", "6", "--rounds", "2", "--epochs", "1",
            "--batch-size", "6", "--out", str(out))
    code, stdout, err = workbench(capsys, monkeypatch, *args)
    assert code == 0, err
    result = json.loads((out / "debias.json").read_text())
    comp = result["composition"]
    assert comp["low"]["mean_uncertainty"] < comp["random"]["mean_uncertainty"] + 1e-9 < comp["high"]["mean_uncertainty"] + 2e-9
    assert {r["subset"] for r in result["table"]} == {"none", "low", "high", "random"} and len(result["table"]) == 8
    none = [r for r in result["table"] if r["subset"] == "none"]
    assert all(r["acc_ambig_rR"]["diff"] == 0.0 for r in none)
    assert (out / "debias.png").stat().st_size > 1000 and (out / "adapters" / "low" / "adapter_config.json").is_file()
    assert len(list((out / "runs").glob("*.h5"))) == 8 and "fair z" in stdout
    code, _, err = workbench(capsys, monkeypatch, *args)  # the folder holds files now
    error_line(err, "--out", "--overwrite")


def test_debias_bad_sizes_are_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = workbench(capsys, monkeypatch, "organism", "debias", "--size", "10", "--candidates", "15", "--out", str(tmp_path / "d"))
    assert code != 0 and not (tmp_path / "d").exists()
    error_line(err, "--size 10", "15")
    code, _, err = workbench(capsys, monkeypatch, "organism", "debias", "--items", "0", "--out", str(tmp_path / "d"))
    error_line(err, "--items")
