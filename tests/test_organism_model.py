"""The shipped organism checkpoint against the exact answers of its world, and the training code."""

from __future__ import annotations

import json

import numpy as np
import pytest

from workbench.organism import organism_path
from workbench.organism.check import (
    fidelity_rows,
    heldout_dialogues,
    load_checkpoint,
    score_dialogues,
    self_correction_rounds,
)
from workbench.organism.tokenizer import build_tokenizer
from workbench.organism.train import TrainConfig, train
from workbench.organism.world import DEFAULT_PARAMS, WorldParams, heldout_rng, sample_item


@pytest.fixture(scope="module")
def shipped():
    model, tok, params, meta = load_checkpoint()
    return model, tok, params, meta


@pytest.fixture(scope="module")
def scored(shipped):
    model, tok, params, _ = shipped
    return score_dialogues(model, tok, heldout_dialogues(300, seed=2024), params)


def test_organism_path_is_the_shipped_folder():
    path = organism_path()
    # the repo's artifacts/organism, or the same files installed as workbench.organism_checkpoint
    assert (path.parent.name, path.name) in (("artifacts", "organism"), ("workbench", "organism_checkpoint"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "organism.json"):
        assert (path / name).is_file(), name
    assert (path / "model.safetensors").stat().st_size < 5_000_000


def test_checkpoint_records_world_and_training(shipped):
    _, tok, params, meta = shipped
    assert params == DEFAULT_PARAMS
    rec = meta["training"]
    # the fields TrainConfig gained for the visual organism (issue 29) after this checkpoint was trained leave the text one unchanged
    later = {"visual": False, "lm_lr_scale": 1.0, "vision_width": 32, "vision_layers": 2, "align_weight": 0.0,
             "side_weight": 0.0, "side_layer": 2, "distill_weight": 0.0}
    assert rec["seed"] == 0 and rec["steps"] == TrainConfig().steps and {**rec["config"], **later} == json.loads(json.dumps(TrainConfig().__dict__))
    assert 0 < rec["final_loss"] < 1 and rec["wall_time_s"] > 0
    fresh = build_tokenizer(params)
    assert tok.get_vocab() == fresh.get_vocab() and tok.chat_template == fresh.chat_template
    assert tok.eos_token == "<eot>" and tok.pad_token == "<pad>"


def test_model_matches_exact_predictive_on_heldout_dialogues(scored):
    model_row = fidelity_rows(scored)[0]
    assert len(scored.round_index) > 1000
    assert model_row["kl"] <= 0.05
    assert model_row["entropy_r"] >= 0.8
    assert model_row["opener_kl"] <= 0.02


def test_model_beats_the_reference_predictors_that_drop_evidence(scored):
    rows = {r["predictor"]: r for r in fidelity_rows(scored)}
    assert rows["organism model"]["kl"] < rows["Bayes, no instructions"]["kl"]


def test_greedy_self_correction_story(shipped):
    from workbench.engine.models import load_model

    params = shipped[2]
    model = load_model("organism", device="cpu")
    moral = self_correction_rounds(model, "organism", n_items=24, seed=76)  # items heldout_rng(77, i)
    inject = self_correction_rounds(model, "organism-inject", n_items=24, seed=76)
    assert all(text.split()[1:4] == ["the", "answer", "is"] for text in moral["responses"].ravel())
    p = moral["p_fair"].mean(0)
    acc = moral["correct"].mean(0)
    h = moral["option_entropy"].mean(0)
    assert p[0] == pytest.approx(params.prior_fair) and p[3] > 0.95
    assert acc[-1] > acc[0] + 0.2 and acc[-1] > 0.9
    assert h[-1] < h[0]
    p_inj = inject["p_fair"].mean(0)
    assert p_inj[1] < p[1] / 5 and p_inj[4] < p_inj[3]


def test_hf_generate_stops_at_eot(shipped):
    import torch

    model, tok, params, _ = shipped
    item = sample_item(heldout_rng(5, 0), params)
    from workbench.organism.world import first_message

    ids = tok.apply_chat_template([{"role": "user", "content": first_message(item)}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
    new = out[0, len(ids) :].tolist()
    assert new[-1] == tok.eos_token_id and len(new) == 6
    text = tok.decode(new, skip_special_tokens=True)
    assert text.split()[0] in params.openers_fair + params.openers_biased


def _micro(seed: int):
    cfg = TrainConfig(seed=seed, steps=40, batch_size=8, d_model=32, n_layers=1, n_heads=2, d_ff=64, warmup_steps=5, bucket=2)
    losses = []
    model, _, record = train(cfg, on_step=lambda step, loss: losses.append(loss))
    return model, losses, record


def test_micro_training_lowers_loss_and_is_deterministic():
    model_a, losses_a, rec = _micro(3)
    model_b, losses_b, _ = _micro(3)
    assert rec.steps == 40 and len(losses_a) == 40
    assert np.mean(losses_a[-5:]) < np.mean(losses_a[:5]) - 1.0
    assert losses_a == losses_b
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    model_c, losses_c, _ = _micro(4)
    assert losses_c != losses_a


def test_world_params_json_in_checkpoint_loads():
    meta = json.loads((organism_path() / "organism.json").read_text())
    assert WorldParams.from_dict(meta["world"]) == DEFAULT_PARAMS
