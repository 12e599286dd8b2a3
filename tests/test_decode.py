"""The workbench's own decode loop against Hugging Face ``generate``: the same greedy tokens and
logits, the same sampled tokens from the same seed (the same per-step distribution), the same
cache; and what the loop cannot serve goes through ``generate`` with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ARCHS

from workbench.engine.generation import (
    DecodeFallbackWarning,
    carry,
    decode_loop_problem,
    decode_round,
    generate_round,
    hf_generate_round,
    logits_processors,
    new_cache,
    pad,
    stop_ids,
)
from workbench.engine.protocol import Decoding

GREEDY = Decoding(max_new_tokens=6)
SAMPLED = Decoding(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=6)


def _prompts(tok, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Ragged first-round prompts (left padding) and ragged second-round additions."""
    texts = ["The grandfather and the grandson were both at the doctor.", "Who was forgetful?", "hello world the answer is"]
    first = [tok(t)["input_ids"] for t in texts]
    second = [[7 % vocab, 8 % vocab], [9 % vocab], [10 % vocab, 11 % vocab, 12 % vocab]]
    return first, second


def two_rounds(model, round_fn, decoding: Decoding, seed: int = 0):
    """Round 1 from scratch, round 2 on the carried cache, by ``round_fn``."""
    hf, tok = model.hf, model.tokenizer
    first, second = _prompts(tok, hf.config.vocab_size)
    torch.manual_seed(seed)
    out1 = round_fn(hf, tok, first, decoding, "cpu")
    past = carry(hf, out1, tok.pad_token_id)
    out2 = round_fn(hf, tok, second, decoding, "cpu", past)
    return out1, out2


def _model(name, loaded, organism):
    return organism if name == "organism" else loaded(name)


@pytest.mark.parametrize("decoding", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("name", [*ARCHS, "organism"])
def test_the_decode_loop_equals_generate(name, decoding, loaded, organism):
    """Two rounds, ragged rows, the second on the carried cache: the loop gives generate's tokens,
    step logits (within 1e-5), entropies and cache; sampled from the same seed, the same draws."""
    model = _model(name, loaded, organism)
    assert decode_loop_problem(model.hf, new_cache(model.hf)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecodeFallbackWarning)  # the fast path serves every family here
        ours = two_rounds(model, generate_round, decoding)
    theirs = two_rounds(model, hf_generate_round, decoding)
    for a, b in zip(ours, theirs):
        assert a.response_ids == b.response_ids
        assert a.step_logits.shape == b.step_logits.shape
        torch.testing.assert_close(a.step_logits, b.step_logits, rtol=1e-5, atol=1e-5)
        for x, y in zip(a.token_entropies, b.token_entropies):
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.prompt_mask, b.prompt_mask, rtol=0, atol=0)
        assert a.cache.get_seq_length() == b.cache.get_seq_length()
        held = a.prompt_mask.bool()  # the conversation's positions (holes hold what nothing reads)
        for la, lb in zip(a.cache.layers, b.cache.layers):
            width = held.shape[1]
            torch.testing.assert_close(la.keys[:, :, :width].transpose(1, 2)[held], lb.keys[:, :, :width].transpose(1, 2)[held],
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(la.values[:, :, :width].transpose(1, 2)[held], lb.values[:, :, :width].transpose(1, 2)[held],
                                       rtol=1e-5, atol=1e-5)
    assert any(len(r) for r in ours[1].response_ids)


def test_each_sampled_step_is_drawn_from_generates_distribution(organism):
    """The loop's logits processors turn generate's raw logits of every step into exactly the
    scores generate sampled from (temperature, then top-p), for several settings."""
    hf, tok = organism.hf, organism.tokenizer
    ids, mask = pad(_prompts(tok, hf.config.vocab_size)[0], tok.pad_token_id, "cpu", "left")
    for temperature, top_p in [(0.7, 0.9), (1.0, 0.5), (2.5, 1.0), (1.0, 1.0)]:
        decoding = Decoding(do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=4)
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                              max_new_tokens=4, eos_token_id=stop_ids(hf, tok), pad_token_id=tok.pad_token_id,
                              output_scores=True, output_logits=True, return_dict_in_generate=True)
        processors = logits_processors(decoding)
        for raw, used in zip(out.logits, out.scores):
            mine = processors(None, raw)
            assert torch.equal(torch.isinf(mine), torch.isinf(used)), (temperature, top_p)
            torch.testing.assert_close(torch.softmax(mine, -1), torch.softmax(used, -1), rtol=0, atol=1e-7)
    assert len(logits_processors(GREEDY)) == 0


def test_sampling_is_reproducible_run_to_run_and_follows_the_seed(organism):
    hot = Decoding(do_sample=True, temperature=2.5, max_new_tokens=8)
    a = two_rounds(organism, decode_round, hot, seed=11)
    b = two_rounds(organism, decode_round, hot, seed=11)
    c = two_rounds(organism, decode_round, hot, seed=12)
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    assert [r.response_ids for r in a] != [r.response_ids for r in c]


def test_a_sliding_window_model_falls_back_to_generate_with_a_warning(loaded):
    """A cache of sliding-window layers is not the loop's: the round goes through generate, once
    warned, with generate's tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    base = loaded("qwen2")
    settings = {k: v for k, v in base.hf.config.to_dict().items() if k != "layer_types"}
    cfg = Qwen2Config(**{**settings, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0})
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    hf.generation_config.eos_token_id = base.hf.generation_config.eos_token_id
    assert "not a plain key/value cache (DynamicSlidingWindowLayer)" in decode_loop_problem(hf, new_cache(hf))
    first, _ = _prompts(base.tokenizer, cfg.vocab_size)
    with pytest.warns(DecodeFallbackWarning, match="sliding|DynamicSlidingWindowLayer"):
        ours = generate_round(hf, base.tokenizer, first, GREEDY, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DecodeFallbackWarning)  # warned once per model and reason
        generate_round(hf, base.tokenizer, first, GREEDY, "cpu")
    assert ours.response_ids == hf_generate_round(hf, base.tokenizer, first, GREEDY, "cpu").response_ids


def test_a_generation_config_the_loop_does_not_apply_falls_back(loaded):
    model = loaded("llama")
    hf = model.hf
    hf.generation_config.repetition_penalty = 1.3
    try:
        assert "repetition_penalty=1.3" in decode_loop_problem(hf, new_cache(hf))
        with pytest.warns(DecodeFallbackWarning, match="repetition_penalty"):
            got = generate_round(hf, model.tokenizer, _prompts(model.tokenizer, hf.config.vocab_size)[0], GREEDY, "cpu")
        want = hf_generate_round(hf, model.tokenizer, _prompts(model.tokenizer, hf.config.vocab_size)[0], GREEDY, "cpu")
        assert got.response_ids == want.response_ids
    finally:
        hf.generation_config.repetition_penalty = None
    assert decode_loop_problem(hf, new_cache(hf)) is None


def test_every_forward_of_a_round_goes_through_the_models_own_modules(organism):
    """The seam with capture and interventions: one prefill ``[batch, seq]`` over every new token,
    then one-token passes, all through the model's layers (a wrapper of a layer's forward sees them)."""
    hf, tok = organism.hf, organism.tokenizer
    first, _ = _prompts(tok, hf.config.vocab_size)
    layer = hf.model.layers[0]
    seen = []
    real = layer.forward
    layer.forward = lambda *a, **k: (seen.append(tuple((a[0] if a else k["hidden_states"]).shape[:2])), real(*a, **k))[1]
    try:
        out = decode_round(hf, tok, first, Decoding(max_new_tokens=5), "cpu")
    finally:
        del layer.forward
    width = max(map(len, first))
    assert seen[0] == (3, width) and all(s == (3, 1) for s in seen[1:])
    assert len(seen) == out.step_logits.shape[1]


def test_a_growing_cache_layer_holds_what_a_dynamic_layer_holds():
    """Updates, crops, regrowth past the reserved room, and a batch selection that replaces the
    tensors: the growing layer's keys and values equal a plain ``DynamicLayer``'s every time."""
    from transformers.cache_utils import DynamicLayer

    from workbench.engine.generation import growing_layer_class

    torch.manual_seed(0)
    ours, plain = growing_layer_class()(), DynamicLayer()
    ours.reserve = 6

    def step(n):
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 5)
        got, want = ours.update(k, v), plain.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)

    with torch.inference_mode():
        step(4)
        step(1)
        room = ours._buffers[0].data_ptr()
        ours.crop(-2), plain.crop(-2)
        step(2)  # over the cropped positions, in the same buffer
        assert ours._buffers[0].data_ptr() == room
        step(9)  # beyond the room: one new buffer
        assert ours._buffers[0].data_ptr() != room
        for layer in (ours, plain):
            layer.batch_select_indices(torch.tensor([1]))
        step_one = (torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 5))
        for a, b in zip(ours.update(*step_one), plain.update(*step_one)):
            assert torch.equal(a, b)
        assert ours.get_seq_length() == plain.get_seq_length() == 15
