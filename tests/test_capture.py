"""Capture at HF module boundaries against the TransformerBridge's own hook points, on Llama, GPT-2 and Qwen2."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
from conftest import ARCHS, BBQ_FIXTURE

from workbench.engine.capture import capture_pooled, hook_sites, pooling, site_disagreement
from workbench.engine.batch import run_batch
from workbench.errors import WorkbenchError
from workbench.engine.generation import pad
from workbench.engine.protocol import load_protocol
from workbench.engine.tasks import BBQ, load_bbq

RESIDUAL_HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"]


def bridge_values(model, token_ids: list[int], names: list[str]) -> dict[str, torch.Tensor]:
    """hook point name → its value ``[pos, d_model]`` in a bridge forward over one unpadded sequence."""
    got = {}

    def keep(act, hook, name):
        got[name] = act[0].detach().float()
        return act

    with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(n, functools.partial(keep, name=n)) for n in names]):
        model.bridge(torch.tensor([token_ids]), return_type=None)
    return got


@pytest.mark.parametrize("arch", ARCHS)
def test_pooled_sites_equal_the_bridges_hook_points(arch, loaded):
    """Right-padded texts of different lengths, pooled at the last token and the mean of a span,
    equal the bridge's hook values over each text alone, for every residual hook at every layer."""
    model = loaded(arch)
    layers = list(range(model.n_layers))
    sites = hook_sites(model, RESIDUAL_HOOKS, layers)
    tok = model.tokenizer
    texts = [tok("Who was forgetful? The answer is")["input_ids"], tok("hello world")["input_ids"]]
    ids, _ = pad(texts, tok.pad_token_id, "cpu", "right")
    spans = torch.tensor([[[0, len(t), 1, len(t) - 1]] for t in texts])  # last token; mean over the middle
    acts = capture_pooled(model.hf, ids, spans, sites)
    for i, t in enumerate(texts):
        want = bridge_values(model, t, [f"blocks.{l}.{h}" for h in RESIDUAL_HOOKS for l in layers])
        for h in RESIDUAL_HOOKS:
            assert acts[h].shape == (2, 1, 2, model.n_layers, model.d_model)
            for l in layers:
                ref = want[f"blocks.{l}.{h}"]
                torch.testing.assert_close(acts[h][i, 0, 0, l], ref[len(t) - 1], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(acts[h][i, 0, 1, l], ref[1 : len(t) - 1].mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["cut-off", "stopped"])
def test_the_engine_captures_every_round_at_several_hooks(case, loaded, organism):
    """Prefill capture (every last prompt token, rounds 1..R−1's responses) and the last round's
    responses give the bridge's values over the transcript, for hooks other than hook_resid_post.
    ``cut-off``: a random tiny Qwen2 whose last answers hit max_new_tokens (one extra pass);
    ``stopped``: the organism, whose answers end with a stop token (read from the decode steps)."""
    from workbench.organism.task import ORGANISM, load_organism_samples

    if case == "cut-off":
        model, task, samples, protocol = loaded("qwen2"), BBQ, load_bbq([BBQ_FIXTURE], limit=3), load_protocol("bbq-paper", rounds=3)
        protocol = dataclasses.replace(protocol, decoding=dataclasses.replace(protocol.decoding, max_new_tokens=5))
    else:
        model, task, samples, protocol = organism, ORGANISM, load_organism_samples(4), load_protocol("organism", rounds=3)
    hooks = ["hook_resid_mid", "hook_attn_out"]
    res = run_batch(model, task, protocol, samples, hook_sites(model, hooks, [0, 1]), seed=0)
    cut_off = any(len(r[-1]) == protocol.decoding.max_new_tokens for r in res.response_ids)
    assert cut_off == (case == "cut-off")
    for i, transcript in enumerate(res.transcripts):
        want = bridge_values(model, transcript, [f"blocks.{l}.{h}" for h in hooks for l in (0, 1)])
        for h in hooks:
            for t in range(3):
                end = res.prompt_spans[i, t, 1]
                r0, r1 = res.response_spans[i, t]
                for j, l in enumerate((0, 1)):
                    ref = want[f"blocks.{l}.{h}"]
                    np.testing.assert_allclose(res.activations[h][i, t, 0, j], ref[end - 1].numpy(), rtol=1e-4, atol=1e-4)
                    if r1 > r0:
                        np.testing.assert_allclose(res.activations[h][i, t, 1, j], ref[r0:r1].mean(0).numpy(), rtol=1e-4, atol=1e-4)
                    else:
                        assert np.isnan(res.activations[h][i, t, 1, j]).all()


def test_pooling_reads_only_the_first_forward_call(loaded):
    model = loaded("llama")
    sites = hook_sites(model, ["hook_resid_post"], [1])
    first, second = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11, 12]])
    weights = torch.eye(4)[None]
    with torch.no_grad(), pooling(model.hf, sites, weights) as pooled:
        model.hf(input_ids=first)
        model.hf(input_ids=second)
    want = bridge_values(model, first[0].tolist(), ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    torch.testing.assert_close(pooled[sites[0]][0], want, rtol=1e-4, atol=1e-4)


def test_a_first_call_of_another_length_is_an_error_not_a_wrong_pool(loaded):
    """A generation config that chunks the prefill would hand capture part of the prompt."""
    model = loaded("llama")
    sites = hook_sites(model, ["hook_resid_post"], [0])
    with pytest.raises(WorkbenchError, match="one forward pass"), torch.no_grad():
        with pooling(model.hf, sites, torch.eye(4)[None]):
            model.hf(input_ids=torch.tensor([[5, 6, 7]]))


def test_hooks_that_cannot_be_captured_are_refused(loaded):
    model = loaded("gpt2")
    with pytest.raises(WorkbenchError, match=r"'attn.hook_pattern' .*inside a module.*hook_resid_post"):
        hook_sites(model, ["attn.hook_pattern"], [0])
    with pytest.raises(WorkbenchError, match=r"'mlp.hook_post' .*not \[batch, pos, d_model\]"):
        hook_sites(model, ["mlp.hook_post"], [0])
    with pytest.raises(WorkbenchError, match="unknown hook 'hook_resid_sideways'"):
        hook_sites(model, ["hook_resid_sideways"], [0])


def test_a_site_at_the_wrong_boundary_is_caught(loaded):
    """The start-of-run check is what stands between a wrong mapping and silently wrong numbers."""
    model = loaded("llama")
    [site] = hook_sites(model, ["hook_resid_post"], [0])
    assert site_disagreement(model, [site]) is None
    wrong = dataclasses.replace(site, module="model.layers.0.mlp")
    problem = site_disagreement(model, [wrong])
    assert problem is not None and problem[0] == "hook_resid_post" and "differs from the bridge" in problem[1]


def test_the_site_check_runs_once_per_loaded_model(loaded, monkeypatch):
    """A run's batches, its sessions and later runs on the same loaded model skip the check pass
    once it passed; another choice of hooks and layers is checked."""
    import workbench.engine.capture as capture

    model = loaded("gpt2")
    first = hook_sites(model, ["hook_resid_post"], [1, 2])
    calls = []
    monkeypatch.setattr(capture, "site_disagreement", lambda *args: calls.append(args))
    assert hook_sites(model, ["hook_resid_post"], [1, 2]) == first and calls == []
    hook_sites(model, ["hook_resid_pre", "hook_resid_post"], [2, 0])
    assert len(calls) == 1
