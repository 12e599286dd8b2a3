"""The lean forward (workbench/engine/lean.py) against the model's own ``hf.forward``: the same
logits and the same residual stream at every layer, on every pass kind the round engine makes; the
workbench's wrappers (capture, interventions) see and change the same values at every boundary;
what it cannot serve goes through ``hf(...)``."""

from __future__ import annotations

import warnings

import pytest
import torch

from workbench.engine.capture import replace_forward
from workbench.engine.generation import new_cache, pad
from workbench.engine.lean import NOT_CHECKED, LeanForwardFallbackWarning, lean_logits, lean_problem, pass_plan, plan


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, attn_implementation="sdpa")
    return MistralForCausalLM(cfg).eval()


def _hf(name, loaded, organism):
    if name == "organism":
        return organism.hf
    if name == "mistral":
        return _mistral()
    if name == "organism-bf16":  # half precision: the norms' float32 round trip and the mask's dtype
        import copy

        return copy.deepcopy(organism.hf).to(torch.bfloat16)
    return loaded(name).hf


def _passes(hf, forward, vocab=None):
    """The round engine's pass kinds, each by ``forward(ids, mask, positions, cache, keep)``, on
    one cache: a left-padded prefill (2-D mask), a chunk of new tokens after it (2-D mask with
    holes), one-token steps (4-D boolean mask; no mask), and option rows with a 4-D block mask.
    Token ids below ``vocab`` (default: the model's vocabulary). → every pass's logits."""
    g = torch.Generator().manual_seed(1)
    vocab = vocab or hf.config.vocab_size
    rows = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (9, 5, 7)]
    ids, mask = pad(rows, 0, "cpu", "left")
    cache = new_cache(hf)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out = [forward(ids, mask, positions, cache, 0)]
    more = [torch.randint(4, vocab, (n,), generator=g).tolist() for n in (3, 1, 2)]
    new, new_mask = pad(more, 0, "cpu", "left")
    mask = torch.cat([mask, new_mask], 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    out.append(forward(new, mask, positions[:, -new.shape[1]:], cache, 1))
    token = torch.randint(4, vocab, (3, 1), generator=g)
    mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
    position = mask.sum(-1, keepdim=True) - 1
    out.append(forward(token, mask.bool()[:, None, None, :], position, cache, 1))
    full = torch.ones_like(mask)  # every row holds every position: a pass without a mask
    full_cache = new_cache(hf)
    forward(ids[:, :4], full[:, :4], torch.arange(4).expand(3, 4), full_cache, 1)
    out.append(forward(token, None, torch.full((3, 1), 4), full_cache, 1))
    # two option rows of two tokens after the cache, each seeing the cache and itself
    opts = torch.randint(4, vocab, (3, 4), generator=g)
    held = mask.shape[1]
    block = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    allowed = torch.cat([mask.bool()[:, None, :].expand(-1, 4, -1), block.expand(3, 4, 4)], -1)
    base = mask.sum(-1, keepdim=True)
    out.append(forward(opts, allowed[:, None], base + torch.tensor([0, 1, 0, 1]), cache, 0))
    from workbench.engine.generation import crop_cache

    crop_cache(cache, held)
    return out


def _hf_forward(hf):
    def forward(ids, mask, positions, cache, keep):
        kwargs = {} if mask is None else {"attention_mask": mask}
        return hf(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=keep, **kwargs).logits
    return forward


def _lean_forward(hf):
    def forward(ids, mask, positions, cache, keep):
        lean = pass_plan(hf)
        assert lean is not None
        return lean_logits(hf, ids, mask, positions, cache, keep, lean)
    return forward


def _observed(hf, run):
    """``run()`` with every layer's output (the residual stream) observed → (its result, per layer
    the list of values seen)."""
    layers = hf.transformer.h if hf.config.model_type == "gpt2" else hf.model.layers
    seen = [[] for _ in layers]
    undo = [replace_forward(layer, "output", lambda act, box=box: (box.append(act.clone()), act)[1])
            for layer, box in zip(layers, seen)]
    try:
        return run(), seen
    finally:
        for u in reversed(undo):
            u()


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gpt2", "organism", "organism-bf16"])
def test_the_lean_forward_equals_the_models_forward(name, loaded, organism):
    """Logits of every pass kind, and every layer's residual stream on every pass, within 1e-5 of
    ``hf.forward``'s (a capture wrapper on each layer sees the same values either way)."""
    hf = _hf(name, loaded, organism)
    assert lean_problem(hf) is None
    with torch.inference_mode():
        want, want_resid = _observed(hf, lambda: _passes(hf, _hf_forward(hf)))
        got, got_resid = _observed(hf, lambda: _passes(hf, _lean_forward(hf)))
    assert len(got) == len(want) == 5
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a_layer, b_layer in zip(got_resid, want_resid):
        assert len(a_layer) == len(b_layer) == 6  # every pass, the extra cache's prefill included
        for a, b in zip(a_layer, b_layer):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _boundaries(hf):
    """Module boundaries to wrap, inside and outside a layer (GPT-2: a block's own, one inside
    block 1, the embeddings and the final norm)."""
    if hf.config.model_type == "gpt2":
        base = hf.transformer
        return [(base.h[0], "output"), (base.h[0], "input"), (base.h[1].ln_2, "input"), (base.h[1].attn, "output"),
                (base.wte, "output"), (base.wpe, "output"), (base.ln_f, "output")]
    layer = hf.model.layers[1]
    return [(layer.self_attn, "output"), (layer.mlp, "input"), (layer.post_attention_layernorm, "input"),
            (layer.self_attn.v_proj, "output"), (layer.mlp.down_proj, "output"), (layer.mlp.act_fn, "output"), (layer, "input"),
            (hf.model.embed_tokens, "output"), (hf.model.norm, "output")]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_wrappers_inside_a_layer_see_and_change_the_same_values(name, loaded):
    """Input and output wrappers on parts inside a layer (attention's tuple output, the MLP's
    input, a norm's input, a projection), on a layer's own boundary and outside the layers, stacked
    two deep, editing what they see: the lean pass calls each change with the values
    ``hf.forward`` gives it, in the same order."""
    hf = loaded(name).hf
    parts = _boundaries(hf)

    def run(forward):
        log = []
        undo = []
        for k, (module, side) in enumerate(parts):
            for depth in range(2):  # two wrappers on one boundary: the order they apply in matters
                def change(act, k=k, depth=depth):
                    value = act[0] if isinstance(act, tuple) else act
                    log.append((k, depth, value.clone()))
                    value = value * (1.0 + 0.01 * (depth + 1)) + 0.001 * k
                    return (value, *act[1:]) if isinstance(act, tuple) else value
                undo.append(replace_forward(module, side, change))
        try:
            with torch.inference_mode():
                return _passes(hf, forward), log
        finally:
            for u in reversed(undo):
                u()

    lean = plan(hf)[0]
    assert lean is not None and lean.layers[1] is not None  # nothing foreign: the layer runs lean (GPT-2: for real once wrapped inside)
    got, got_log = run(_lean_forward(hf))
    want, want_log = run(_hf_forward(hf))
    assert [(k, d) for k, d, _ in got_log] == [(k, d) for k, d, _ in want_log]
    for (_, _, a), (_, _, b) in zip(got_log, want_log):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        plain = _passes(hf, _hf_forward(hf))
    assert not torch.allclose(plain[0], want[0])  # the edits did change the model's output


def test_a_foreign_wrapper_inside_a_layer_runs_the_real_layer(loaded):
    """A ``forward`` another library set on a part of a layer: that layer is called as
    transformers calls it (the foreign wrapper sees every pass), the others run lean, and the
    logits are the model's."""
    hf = loaded("llama").hf
    mlp = hf.model.layers[2].mlp
    seen = []
    real = mlp.forward
    mlp.forward = lambda *a, **k: (seen.append(tuple(a[0].shape[:2])), real(*a, **k))[1]
    try:
        lean = plan(hf)[0]
        assert lean.layers[2] is None and lean.layers[0] is not None
        with torch.inference_mode():
            got = _passes(hf, _lean_forward(hf))
    finally:
        del mlp.forward
    assert len(seen) == 6
    with torch.inference_mode():
        want = _passes(hf, _hf_forward(hf))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_what_the_lean_forward_cannot_serve_goes_through_the_model_with_a_warning(loaded):
    """A family without a lean forward (GPT-NeoX), a wrapped ``hf.forward`` and eager attention:
    the pass is ``hf(...)``'s, warned once per model and reason."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # fresh model objects: the warning comes once per model, and other tests ran these models
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, attn_implementation="sdpa")).eval()
    assert "gpt_neox" in lean_problem(neox)
    with pytest.warns(LeanForwardFallbackWarning, match="gpt_neox"):
        assert pass_plan(neox) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeanForwardFallbackWarning)
        assert pass_plan(neox) is None  # once per model and reason
    with torch.inference_mode():
        got = _passes(neox, lambda ids, mask, pos, cache, keep: lean_logits(neox, ids, mask, pos, cache, keep, None))
        want = _passes(neox, _hf_forward(neox))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    hf = LlamaForCausalLM(loaded("llama").hf.config).eval()
    first = LlamaForCausalLM(loaded("llama").hf.config).eval()
    first.forward = lambda *a, **k: LlamaForCausalLM.forward(first, *a, **k)
    with pytest.warns(LeanForwardFallbackWarning, match="not yet checked"):  # first used while wrapped: not checked yet
        assert pass_plan(first) is None
    del first.forward
    assert pass_plan(first) is not None  # checked at the next pass nothing wraps
    assert lean_problem(hf) is None  # checked before anything wraps it, as load_model does
    real = hf.forward
    hf.forward = lambda *a, **k: real(*a, **k)  # e.g. a test counting passes, or another library's wrapper
    try:
        with pytest.warns(LeanForwardFallbackWarning, match="model's forward is wrapped"):
            assert pass_plan(hf) is None
    finally:
        del hf.forward
    assert pass_plan(hf) is not None

    eager = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, attn_implementation="eager")).eval()
    assert "attention 'eager'" in plan(eager)[1] and lean_problem(eager) == NOT_CHECKED  # checked once it is sdpa


def test_a_replaced_projection_runs_the_real_layer(loaded):
    """A module swapped in after loading (a LoRA layer, a quantized linear: here an ``nn.Linear``
    subclass that doubles its output) is not read as a plain projection: its layer runs for real,
    and the logits are the model's own."""
    import copy

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    hf = copy.deepcopy(loaded("llama").hf)
    old = hf.model.layers[1].self_attn.q_proj
    new = Doubled(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    hf.model.layers[1].self_attn.q_proj = new
    lean = plan(hf)[0]
    assert lean.layers[1] is None and lean.layers[0] is not None
    with torch.inference_mode():
        got = _passes(hf, _lean_forward(hf))
        want = _passes(hf, _hf_forward(hf))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_a_lean_forward_that_disagrees_with_the_model_is_not_used(loaded, monkeypatch):
    """The check every model gets before its first lean pass (``load_model`` runs it): were the lean
    forward to compute something else than the installed ``transformers`` (its modeling code changed),
    the model keeps ``hf(...)`` with a warning that says by how much, and the numbers are the model's."""
    from transformers import LlamaForCausalLM

    import workbench.engine.lean as lean

    plain = lean._plain_layer
    monkeypatch.setattr(lean, "_plain_layer", lambda *a: plain(*a) * 1.01)
    hf = LlamaForCausalLM(loaded("llama").hf.config).eval()
    assert "disagrees with the model's own" in lean_problem(hf)
    with pytest.warns(LeanForwardFallbackWarning, match="disagrees"):
        assert pass_plan(hf) is None
    monkeypatch.setattr(lean, "_plain_layer", lambda *a: (_ for _ in ()).throw(RuntimeError("shapes differ")))
    assert "check against the model's own forward failed (RuntimeError: shapes differ)" in lean_problem(
        LlamaForCausalLM(loaded("llama").hf.config).eval())  # a failing check: hf(...), never a failed load
    monkeypatch.setattr(lean, "_plain_layer", plain)
    assert lean_problem(LlamaForCausalLM(loaded("llama").hf.config).eval()) is None


def test_transformers_own_output_capturing_hooks_leave_the_lean_forward_on(loaded):
    """A forward that asks for ``output_hidden_states`` makes ``transformers`` install hooks on the
    model's layers for good; they record only inside such a forward, so the lean pass (and its check)
    still serve the model, with the same numbers; any other hook still sends the layer to its real forward."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(loaded("llama").hf.config).eval()
    with torch.inference_mode():
        hf(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert hf.model.layers[0]._forward_hooks  # installed by transformers, and left on
    assert lean_problem(hf) is None
    lean = pass_plan(hf)
    assert lean is not None and all(how is not None for how in lean.layers)
    with torch.inference_mode():
        got = _passes(hf, lambda ids, mask, pos, cache, keep: lean_logits(hf, ids, mask, pos, cache, keep, lean))
        want = _passes(hf, _hf_forward(hf))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    handle = hf.model.layers[1].register_forward_hook(lambda *a: None)
    try:
        assert pass_plan(hf).layers[1] is None
    finally:
        handle.remove()


def test_a_llava_text_pass_is_its_language_models_lean_pass():
    """A LLaVA's passes without pixel values (every round after the picture's, the cut-off pass,
    option scoring) are its language model's plus ``lm_head``: the lean forward serves them, checked
    at load like any model, bit-identical to the LLaVA's own forward (the visual organism: a Llama
    inside); wrappers on its language model's layers are applied as on a plain Llama."""
    from workbench.engine.models import load_model

    model = load_model("organism-visual", device="cpu")
    hf = model.hf
    assert lean_problem(hf) is None and pass_plan(hf) is not None
    text_vocab = model.image_token_id  # the image token is the vocabulary's last id: text passes stay below it
    with torch.inference_mode():
        got = _passes(hf, _lean_forward(hf), vocab=text_vocab)
        want = _passes(hf, _hf_forward(hf), vocab=text_vocab)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
