"""A lean forward for Llama-like decoder models (llama, qwen2, mistral: the organism is a llama) and
GPT-2: the model's own arithmetic without ``transformers``' per-call Python.

On a small model (the organism: 4 layers, d = 64) most of a decode step's time is not arithmetic
but Python around it: ``nn.Module.__call__`` of ~60 modules, ``deprecate_kwarg``/output-capturing
decorators, the mask utilities, keyword plumbing. :func:`lean_logits` computes what
``hf(input_ids=…, attention_mask=…, position_ids=…, cache=…, logits_to_keep=…).logits`` computes,
op for op in the same order (the same numbers, bit for bit on the families tested:
``tests/test_lean.py``), with the same parameters and the same KV cache:

- embeddings; the rotary module's cos/sin once per pass (its own operations); the mask given (or
  HF's ``create_causal_mask`` for a 2-D one), a boolean one made additive once per pass as PyTorch's
  CPU sdpa would in every layer; each decoder layer's norms, projections, rotary, ``cache.update``,
  HF's own ``sdpa_attention_forward``, MLP; the final norm; ``lm_head`` only at the positions kept.
- GPT-2 the same way: token and learned position embeddings, per block LayerNorm, the fused
  ``c_attn`` (``Conv1D``'s ``addmm``), sdpa, ``c_proj``, the MLP, ``ln_f``, ``lm_head``.

**The seam with capture and interventions holds.** They are wrappers of modules' ``forward`` made
by :func:`workbench.engine.capture.replace_forward`, which records on each wrapper which side it
changes and how. The lean pass applies those changes at the same module boundaries, to the same
values, in the same nesting order (input changes outermost first, output changes innermost first),
so a capture or an intervention sees and edits exactly what it would on ``hf.forward``. Anything
else on a module (a ``forward`` another library set, a PyTorch hook) is not understood: a decoder
layer with such a module anywhere in it is run by calling the real layer (``layer(...)``, as
``transformers`` calls it; a GPT-2 block also when a wrapper of the workbench sits inside it), and
such a thing on the model, its base model, its embeddings, final norm, rotary module or ``lm_head``
(or a global module hook) sends the whole pass through ``hf(...)``.

What has no lean forward (:func:`lean_problem`, :func:`plan`: another family, e.g. GPT-NeoX, a VLM;
attention other than sdpa; a RoPE type other than the default; sliding windows; q/k norms; GPT-2
with cross-attention; remote code; a model split over devices or in training mode) goes through
``hf(...)``, with a :class:`LeanForwardFallbackWarning` once per model and reason.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import Any

import torch
import torch.nn.functional as F

from workbench.engine.capture import wrapper_changes

# Llama-like families whose decoder layer is exactly: x + o(attn(rope(q, k), v)) of an RMS-normed x,
# then x + down(act(gate(h)) * up(h)) of an RMS-normed x (biases allowed on q/k/v: Qwen2)
LLAMA_LIKE = ("llama", "qwen2", "mistral")
FAMILIES = (*LLAMA_LIKE, "gpt2")  # GPT-2: learned positions, LayerNorm, fused qkv (Conv1D)


class LeanForwardFallbackWarning(UserWarning):
    """A pass goes through ``hf(...)`` instead of the lean forward (the message says why: no lean
    forward for the model's family or configuration, or a module carries a hook or ``forward``
    another library set). The numbers are the same; only the speed differs."""


_PROBLEMS: "weakref.WeakKeyDictionary[Any, tuple[str | None]]" = weakref.WeakKeyDictionary()  # hf → (lean_problem's answer,)
_WARNED: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()  # hf → fallback reasons warned about


def lean_problem(hf: Any) -> str | None:
    """Why :func:`lean_logits` cannot serve ``hf`` (its family or configuration, or a disagreement
    with the model's own forward: :func:`disagreement`), or None; looked up once per model object
    (``load_model`` asks right after loading, before anything wraps the model's modules)."""
    got = _PROBLEMS.get(hf)
    if got is None:
        why = _problem(hf)
        why = why if why is not None else disagreement(hf)
        if why == NOT_CHECKED:  # asked again at the next pass: once nothing wraps it, it is checked
            return why
        got = _PROBLEMS[hf] = (why,)
    return got[0]


NOT_CHECKED = ("not yet checked against the model's own forward (its modules are wrapped or hooked now, it is in training "
               "mode, or its attention is not sdpa)")


def disagreement(hf: Any) -> str | None:
    """The lean forward checked against the model's own, on the model as it is (so a ``transformers``
    release whose modeling code differs from the one followed here is caught where it runs, not only
    in the tests): two rows of six random tokens (one left-padded) prefilled into a fresh cache, then one
    decode step, by both. None when every logit agrees within 1e-4 of the logits' largest magnitude
    (2e-2 in half precision), else why not. Not checkable while a module is wrapped or hooked (the
    extra passes would reach the wrappers): then :data:`NOT_CHECKED`, and that pass goes through
    ``hf(...)``."""
    if _global_hooks() or hf.training or getattr(hf.config, "_attn_implementation", None) != "sdpa" \
            or any(_touched(m) for m in hf.modules()):
        return NOT_CHECKED
    from transformers import DynamicCache

    device = next(hf.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = text_stack(hf)[1].vocab_size
    image = getattr(hf.config, "image_token_id", None)  # a text pass never holds the image token: it is drawn as another
    ids = torch.randint(0, vocab, (2, 7), generator=generator)
    if image is not None:
        ids = torch.where(ids == image, (ids + 1) % vocab, ids)
    ids, step = ids[:, :6].to(device), ids[:, 6:].to(device)
    mask = torch.ones(2, 6, dtype=torch.long, device=device)
    mask[0, 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
    lean, why = _build(hf)
    if lean is None:
        return why
    worst, scale = 0.0, 0.0
    try:
        with torch.inference_mode():
            caches = [DynamicCache(config=hf.config), DynamicCache(config=hf.config)]
            for ids_, mask_, pos_ in ((ids, mask, positions), (step, step_mask, positions[:, -1:] + 1)):
                want = hf(input_ids=ids_, attention_mask=mask_, position_ids=pos_, cache=caches[0], use_cache=True).logits.float()
                got = lean_logits(hf, ids_, mask_, pos_, caches[1], 0, lean).float()
                worst, scale = max(worst, float((got - want).abs().max())), max(scale, float(want.abs().max()))
    except Exception as e:  # noqa: BLE001 — whatever a model's own forward objects to, the lean one is then not used
        return f"the check against the model's own forward failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    tolerance = (2e-2 if next(hf.parameters()).dtype in (torch.float16, torch.bfloat16) else 1e-4) * max(scale, 1.0)
    if not worst <= tolerance:
        import transformers

        return (f"the lean forward disagrees with the model's own by {worst:.3g} (logits up to {scale:.3g}) under "
                f"transformers {transformers.__version__}")
    return None


VISION_WRAPPERS = ("llava", "llava_next")  # image-text-to-text families whose text passes are their language model's plus lm_head


def text_stack(hf: Any) -> tuple[Any, Any]:
    """``(decoder model, its config)`` of ``hf``: ``hf.model`` for a causal LM; for a LLaVA (or
    LLaVA-NeXT), its language model (``hf.model.language_model``, ``text_config``): a pass without pixel values is
    that model's forward and ``hf.lm_head``, so the lean forward serves every round but the image's."""
    if getattr(hf.config, "model_type", None) in VISION_WRAPPERS:
        return hf.model.language_model, hf.config.text_config
    return getattr(hf, "model", None), hf.config


def _problem(hf: Any) -> str | None:
    wrapper = getattr(hf.config, "model_type", None) if getattr(hf.config, "model_type", None) in VISION_WRAPPERS else None
    if wrapper and not hasattr(getattr(hf, "model", None), "language_model"):
        return f"{type(hf).__name__} is not laid out as model.language_model + lm_head"
    base, config = text_stack(hf)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES or (wrapper and kind not in LLAMA_LIKE):
        return f"no lean forward for the {(wrapper + ' with a ' if wrapper else '')}{kind!r} family (only {', '.join(FAMILIES)}" \
               f"{', and llava or llava_next around a llama-like one' if wrapper else ''})"
    import transformers

    if transformers.__version__.split(".")[0] != "5":  # the modeling code it follows op for op is transformers 5's
        return f"transformers {transformers.__version__} (the lean forward follows transformers 5's modeling code)"
    module = f"transformers.models.{kind}.modeling_{kind}"
    outer = f"transformers.models.{wrapper}.modeling_{wrapper}" if wrapper else module
    if type(hf).__module__ != outer or any(type(layer).__module__ != module for layer in getattr(base, "layers", [])):
        return f"{type(hf).__name__} is not transformers' own {wrapper or kind} implementation (remote code?)"
    devices = {p.device for p in hf.parameters()}
    if len(devices) > 1:
        return "the model is split over devices"
    if kind == "gpt2":
        return _gpt2_problem(hf)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"RoPE type {rope.get('rope_type')!r}"
    if sliding_window_layers(config):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")) \
            or not hasattr(hf, "lm_head"):
        return f"{type(hf).__name__} is not laid out as model.embed_tokens/layers/norm/rotary_emb + lm_head"
    if len(base.layers) != config.num_hidden_layers:
        return "the model runs a different number of layers than it has"
    for layer in base.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = {n for n, _ in layer.named_children()}
        if names != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"} or attn is None or mlp is None:
            return f"a decoder layer of {type(layer).__name__} has parts {sorted(names)}"
        if {n for n, _ in attn.named_children()} != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return "its attention has parts other than q/k/v/o projections (q/k norms?)"
        if {n for n, _ in mlp.named_children()} != {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            return "its MLP is not gate/up/down"
        if getattr(attn, "sliding_window", None):
            return "sliding-window attention"
    return None


def _gpt2_problem(hf: Any) -> str | None:
    """Why the GPT-2 lean forward cannot serve ``hf``, or None."""
    config = hf.config
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention"
    if getattr(config, "reorder_and_upcast_attn", False):
        return "GPT-2 with reorder_and_upcast_attn"
    base = getattr(hf, "transformer", None)
    if base is None or not all(hasattr(base, n) for n in ("wte", "wpe", "h", "ln_f", "drop")) or not hasattr(hf, "lm_head"):
        return f"{type(hf).__name__} is not laid out as transformer.wte/wpe/h/ln_f + lm_head"
    if len(base.h) != config.num_hidden_layers:
        return "the model runs a different number of layers than it has"
    for block in base.h:
        if {n for n, _ in block.named_children()} != {"ln_1", "attn", "ln_2", "mlp"} \
                or {n for n, _ in block.attn.named_children()} != {"c_attn", "c_proj", "attn_dropout", "resid_dropout"} \
                or {n for n, _ in block.mlp.named_children()} != {"c_fc", "c_proj", "act", "dropout"}:
            return f"a block of {type(hf).__name__} has other parts than GPT-2's"
    return None


def sliding_window_layers(config: Any) -> bool:
    """Whether any attention layer of the model (its text model's, for an image-text-to-text one) sees
    only a sliding window: ``layer_types`` naming a sliding layer, or, without ``layer_types``, a
    ``sliding_window`` that ``use_sliding_window`` does not turn off."""
    text = getattr(config, "text_config", None) or config
    types = getattr(text, "layer_types", None)
    if types:
        return any("sliding" in str(t) for t in types)
    return bool(getattr(text, "sliding_window", None)) and getattr(text, "use_sliding_window", True) is not False


def warn_lean_fallback(hf: Any, why: str) -> None:
    """A :class:`LeanForwardFallbackWarning` for ``why``, once per model and reason."""
    seen = _WARNED.setdefault(hf, set())
    if why not in seen:
        seen.add(why)
        warnings.warn(f"the forward goes through transformers' (slower, same numbers): {why}", LeanForwardFallbackWarning, stacklevel=3)


def _module_changes(module: Any) -> list[tuple[str, Any]] | None:
    """The workbench's wrappers of ``module.forward``, outermost first, as ``(side, change)``
    (:func:`~workbench.engine.capture.wrapper_changes`); None when the module carries anything
    else (a ``forward`` another library set, a PyTorch hook)."""
    if _hooked(module):
        return None
    return wrapper_changes(module) if "forward" in module.__dict__ else []


def _hooked(module: Any) -> bool:
    """Whether ``module`` carries a PyTorch hook other than ``transformers``' output-capturing ones:
    it installs those on a model's layers the first time a forward asks for ``output_hidden_states``
    or attentions, leaves them on, and they record only inside such a forward (none runs in a lean
    pass)."""
    state = module.__dict__  # nn.Module keeps its hook dicts there: no __getattr__ per look
    return bool(state["_forward_pre_hooks"]) or not all(
        getattr(h, "__module__", None) == "transformers.utils.output_capturing" for h in state["_forward_hooks"].values())


def _touched(module: Any) -> bool:
    """Whether ``module`` carries an instance ``forward`` or a hook :func:`_hooked` counts."""
    return "forward" in module.__dict__ or _hooked(module)


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_forward_hooks_always_called)


class Plan:
    """Per pass: the changes to apply at each module boundary, and how each layer runs."""

    __slots__ = ("top", "layers", "rotary")

    def __init__(self, top: dict[str, list[tuple[str, Any]]], layers: list[tuple[Any, ...] | None], rotary: tuple[Any, ...]) -> None:
        self.top = top  # "embed_tokens"/"norm"/"lm_head" → changes (only those with some)
        # per layer: (its changes of its own boundary, of its parts or None, its weights: _weights) or None: call the real layer
        self.layers = layers
        self.rotary = rotary  # (inv_freq, attention_scaling)


_LINEAR_PARTS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"}


def _plain_modules(parts: list[tuple[str, Any]]) -> bool:
    """Whether the layer's projections are plain ``nn.Linear`` and its norms the family's RMSNorm:
    not replaced since the model loaded (a LoRA layer, a quantized linear would compute
    something else from what the lean layer reads)."""
    for part, module in parts:
        if part in _LINEAR_PARTS and type(module) is not torch.nn.Linear:
            return False
        if part.endswith("layernorm") and not type(module).__name__.endswith("RMSNorm"):
            return False
    return True


def _parts(layer: Any) -> list[tuple[str, Any]]:
    """``(part, module)`` for the layer (part ``""``) and each module inside it the lean layer
    computes (through the modules' own child dicts: a fraction of ``get_submodule``'s cost)."""
    children = layer._modules
    attn, mlp = children["self_attn"]._modules, children["mlp"]._modules
    return [("", layer), ("input_layernorm", children["input_layernorm"]), ("self_attn", children["self_attn"]),
            ("self_attn.q_proj", attn["q_proj"]), ("self_attn.k_proj", attn["k_proj"]), ("self_attn.v_proj", attn["v_proj"]),
            ("self_attn.o_proj", attn["o_proj"]), ("post_attention_layernorm", children["post_attention_layernorm"]),
            ("mlp", children["mlp"]), ("mlp.gate_proj", mlp["gate_proj"]), ("mlp.up_proj", mlp["up_proj"]),
            ("mlp.down_proj", mlp["down_proj"]), ("mlp.act_fn", mlp["act_fn"])]


def _weights(layer: Any) -> tuple[Any, ...]:
    """What the lean layer reads of a decoder layer, looked up once per pass plan."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # not at import: --help stays light

    children = layer._modules  # the modules' own dicts: no nn.Module.__getattr__ per look
    attn, mlp = children["self_attn"], children["mlp"]
    a, m = attn._modules, mlp._modules
    n1, n2 = children["input_layernorm"], children["post_attention_layernorm"]

    def wb(linear: Any) -> tuple[Any, Any]:
        params = linear._parameters
        return params["weight"], params.get("bias")

    return (n1._parameters["weight"], n1.variance_epsilon, *wb(a["q_proj"]), *wb(a["k_proj"]), *wb(a["v_proj"]), *wb(a["o_proj"]),
            n2._parameters["weight"], n2.variance_epsilon, *wb(m["gate_proj"]), *wb(m["up_proj"]), *wb(m["down_proj"]),
            functools.partial(type(m["act_fn"]).forward, m["act_fn"]), attn.head_dim, attn, attn.layer_idx, sdpa_attention_forward)


def plan(hf: Any) -> tuple[Plan | None, str | None]:
    """The :class:`Plan` of a lean pass of ``hf`` as its modules are wrapped now, or ``(None, why)``
    when the pass must go through ``hf(...)``."""
    attention = getattr(hf.config, "_attn_implementation", None)  # asked every time: it can be switched on a loaded model
    if attention != "sdpa":
        return None, f"attention {attention!r} (the lean forward runs sdpa)"
    if hf.training:
        return None, "the model is in training mode (dropout)"
    if _global_hooks():
        return None, "a global module hook is registered"
    why = lean_problem(hf)
    if why is not None:
        return None, why
    return _build(hf)


def _build(hf: Any) -> tuple[Plan | None, str | None]:
    """:func:`plan` once the model may have a lean pass: ``(Plan, None)``, or ``(None, why)`` when a
    module is wrapped or hooked by another library."""
    if hf.config.model_type == "gpt2":
        return _gpt2_plan(hf)
    base = text_stack(hf)[0]
    if base is not hf.model and _touched(hf.model):  # a LLaVA's own model around its language model
        return None, "the model's forward is wrapped or hooked by another library"
    if _touched(hf) or _touched(base):
        return None, "the model's forward is wrapped or hooked by another library"
    rotary = base.rotary_emb
    if _touched(rotary):
        return None, "the rotary embedding module is wrapped or hooked"
    if type(base.embed_tokens) is not torch.nn.Embedding or type(hf.lm_head) is not torch.nn.Linear \
            or not type(base.norm).__name__.endswith("RMSNorm"):
        return None, "its embeddings, final norm or lm_head were replaced by other modules"
    top = {}
    for name in ("embed_tokens", "norm"):
        got = _module_changes(getattr(base, name))
        if got is None:
            return None, f"model.{name} carries a hook or forward of another library"
        if got:
            top[name] = got
    got = _module_changes(hf.lm_head)
    if got is None:
        return None, "lm_head carries a hook or forward of another library"
    if got:
        top["lm_head"] = got
    layers: list[tuple[Any, ...] | None] = []
    for layer in base.layers:  # looked up anew every pass plan: a module may have been replaced (an adapter merged)
        named = _parts(layer)
        parts: dict[str, list[tuple[str, Any]]] | None = {} if _plain_modules(named) else None  # None: the real layer
        for part, module in named if parts is not None else ():
            got = _module_changes(module)
            if got is None:
                parts = None
                break
            if got:
                parts[part] = got
        if parts is None:
            layers.append(None)
        else:
            outer = parts.pop("", [])
            layers.append((outer, parts or None, _weights(layer)))
    return Plan(top, layers, (rotary.inv_freq, rotary.attention_scaling)), None


def _gpt2_plan(hf: Any) -> tuple[Plan | None, str | None]:
    """:func:`plan` for GPT-2: changes on ``wte``/``wpe``/``ln_f``/``lm_head`` and on each block's
    own boundary are applied; a block with anything wrapped inside it (or foreign) runs for real."""
    base = hf.transformer
    for module in (hf, base, base.drop):
        if _touched(module):
            return None, "the model's forward is wrapped or hooked by another library"
    if type(base.wte) is not torch.nn.Embedding or type(base.wpe) is not torch.nn.Embedding \
            or type(base.ln_f) is not torch.nn.LayerNorm or type(hf.lm_head) is not torch.nn.Linear:
        return None, "its embeddings, final norm or lm_head were replaced by other modules"
    top = {}
    for name, module in (("wte", base.wte), ("wpe", base.wpe), ("ln_f", base.ln_f), ("lm_head", hf.lm_head)):
        got = _module_changes(module)
        if got is None:
            return None, f"{name} carries a hook or forward of another library"
        if got:
            top[name] = got
    layers: list[tuple[Any, ...] | None] = []
    for block in base.h:
        outer = _module_changes(block)
        inside = outer is not None and all(_module_changes(m) == [] for m in block.modules() if m is not block) \
            and all(type(m).__name__ == "Conv1D" for m in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)) \
            and type(block.ln_1) is torch.nn.LayerNorm and type(block.ln_2) is torch.nn.LayerNorm
        layers.append((outer, None, _gpt2_weights(block)) if inside else None)
    return Plan(top, layers, ()), None


def _gpt2_weights(block: Any) -> tuple[Any, ...]:
    """What the lean GPT-2 block reads, looked up once per pass plan."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    children = block._modules
    attn, mlp = children["attn"], children["mlp"]
    a, m = attn._modules, mlp._modules
    ln_1, ln_2 = children["ln_1"], children["ln_2"]
    return (ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps, a["c_attn"].weight, a["c_attn"].bias, a["c_attn"].nf,
            a["c_proj"].weight, a["c_proj"].bias, a["c_proj"].nf, ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps,
            m["c_fc"].weight, m["c_fc"].bias, m["c_fc"].nf, m["c_proj"].weight, m["c_proj"].bias, m["c_proj"].nf,
            functools.partial(type(m["act"]).forward, m["act"]), attn, attn.split_size, attn.head_dim, attn.layer_idx, sdpa_attention_forward)


def _conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, nf: int) -> torch.Tensor:
    """``transformers.pytorch_utils.Conv1D.forward``, op for op."""
    size = x.size()[:-1] + (nf,)
    return torch.addmm(bias, x.view(-1, x.size(-1)), weight).view(size)


def _gpt2_block(w: tuple[Any, ...], x: torch.Tensor, mask: Any, cache: Any, tail: int = 0) -> torch.Tensor:
    """One GPT-2 block ``[batch, q, d_model]`` → ``[batch, q, d_model]`` as ``GPT2Block.forward``
    computes it in eval mode (dropout is the identity), with nothing wrapped inside it; ``tail`` as
    for :func:`_plain_layer` (→ ``[batch, tail, d_model]``)."""
    (s1, w1, b1, e1, aw, ab, anf, pw, pb, pnf, s2, w2, b2, e2, fw, fb, fnf, cw, cb, cnf, act, attn, split, head_dim, index,
     sdpa_attention_forward) = w
    residual = x
    h = F.layer_norm(x, s1, w1, b1, e1)
    q, k, v = _conv1d(h, aw, ab, anf).split(split, dim=2)
    shape = (*k.shape[:-1], -1, head_dim)
    k, v = k.view(shape).transpose(1, 2), v.view(shape).transpose(1, 2)
    if tail:
        q, residual = q[:, -tail:], residual[:, -tail:]
    q = q.view((*q.shape[:-1], -1, head_dim)).transpose(1, 2)
    if cache is not None:
        k, v = cache.update(k, v, index)
    if tail:
        mask = _tail_mask(mask, tail, k.shape[2], x.dtype)
    o, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
    o = o.reshape(*o.shape[:-2], -1).contiguous()
    x = _conv1d(o, pw, pb, pnf) + residual
    residual = x
    h = F.layer_norm(x, s2, w2, b2, e2)
    return residual + _conv1d(act(_conv1d(h, fw, fb, fnf)), cw, cb, cnf)


def _gpt2_logits(hf: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, cache: Any,
                 logits_to_keep: int, lean: Plan, tail: bool = False) -> torch.Tensor:
    """:func:`lean_logits` for GPT-2: ``GPT2LMHeadModel.forward``'s operations (eval mode)."""
    base, top = hf.transformer, lean.top
    if top:
        x = _out(top, "wte", _own(base.wte, _inp(top, "wte", input_ids)))
        pos = _out(top, "wpe", _own(base.wpe, _inp(top, "wpe", position_ids)))
    else:
        x, pos = _own(base.wte, input_ids), _own(base.wpe, position_ids)
    h = x + pos.to(x.device)
    mask = _mask(hf, x, attention_mask, position_ids, cache, input_ids.shape[1])
    last = len(lean.layers) - 1
    for i, (block, how) in enumerate(zip(base.h, lean.layers)):
        if how is None:  # something wraps a part of it: the real block, as transformers calls it
            h = block(h, cache=cache, attention_mask=mask, use_cache=True, position_ids=position_ids)
            continue
        outer, _, weights = how
        for side, change in outer:
            if side == "input":
                h = change(h)
        cut = read_tail(outer, h.shape[1], logits_to_keep) if tail and i == last and not top else 0
        h = _output_changes(outer, _gpt2_block(weights, h, mask, cache, cut), input_ids.shape[1], cut)
    ln_f = base.ln_f
    if top:
        h = _out(top, "ln_f", _own(ln_f, _inp(top, "ln_f", h)))
    else:
        h = F.layer_norm(h, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)
    if logits_to_keep:
        h = h[:, -logits_to_keep:, :]
    if top:
        return _out(top, "lm_head", _linear(hf.lm_head, _inp(top, "lm_head", h)))
    return _linear(hf.lm_head, h)


def _mask(hf: Any, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, cache: Any, q: int) -> Any:
    """The mask the attention gets: a 4-D one as given, none for a one-token pass without holes,
    else HF's ``create_causal_mask`` of the 2-D one; boolean made additive (:func:`attention_bias`)."""
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask
    elif attention_mask is None and q == 1:
        mask = None
    else:
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(config=text_stack(hf)[1], inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
    if mask is not None and mask.dtype == torch.bool:
        mask = attention_bias(mask, x.dtype)
    return mask


def _inp(changes: dict[str, list[tuple[str, Any]]], part: str, x: Any) -> Any:
    for side, change in changes.get(part, ()):  # outermost first: each wrapper changes the input then calls inside
        if side == "input":
            x = change(x)
    return x


def _out(changes: dict[str, list[tuple[str, Any]]], part: str, y: Any) -> Any:
    for side, change in reversed(changes.get(part, ())):  # innermost first: each wrapper changes what inside returned
        if side == "output":
            y = change(y)
    return y


def _own(module: Any, x: Any) -> Any:
    """``module``'s class ``forward`` on ``x``: never an instance ``forward`` (a wrapper, whose
    change the lean pass applies itself)."""
    return type(module).forward(module, x)


def _rms(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` (Qwen2's and Mistral's are the same), op for op."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _linear(module: Any, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, module.weight, module.bias)


def _plain_layer(w: tuple[Any, ...], x: torch.Tensor, mask: Any, cos: torch.Tensor, sin: torch.Tensor, cache: Any,
                 tail: int = 0) -> torch.Tensor:
    """One Llama-like decoder layer ``[batch, q, d_model]`` → ``[batch, q, d_model]`` with nothing
    wrapped inside it: ``LlamaDecoderLayer.forward``'s operations, in its order, on the weights
    ``w`` (:func:`_weights`). ``tail`` > 0: keys and values at every position (for the cache), but
    queries, attention, MLP and residual only at the last ``tail`` positions → ``[batch, tail,
    d_model]`` (float rounding from the full layer's, another matrix shape: :func:`lean_logits`)."""
    (n1, e1, qw, qb, kw, kb, vw, vb, ow, ob, n2, e2, gw, gb, uw, ub, dw, db, act, head_dim, attn, index, sdpa_attention_forward) = w
    residual = x
    dtype = x.dtype
    h = x.to(torch.float32)
    h = n1 * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + e1)).to(dtype)
    heads = (*h.shape[:-1], -1, head_dim)
    k = F.linear(h, kw, kb).view(heads).transpose(1, 2)
    v = F.linear(h, vw, vb).view(heads).transpose(1, 2)
    k = (k * cos) + (_rotate_half(k) * sin)
    if tail:
        h, residual, cos, sin = h[:, -tail:], residual[:, -tail:], cos[..., -tail:, :], sin[..., -tail:, :]
    shape = h.shape[:-1]
    q = F.linear(h, qw, qb).view(*shape, -1, head_dim).transpose(1, 2)
    q = (q * cos) + (_rotate_half(q) * sin)
    if cache is not None:
        k, v = cache.update(k, v, index)
    if tail:
        mask = _tail_mask(mask, tail, k.shape[2], dtype)
    o = _attend(attn, q, k, v, mask, sdpa_attention_forward)
    x = residual + F.linear(o.reshape(*shape, -1).contiguous(), ow, ob)
    h = x.to(torch.float32)
    h = n2 * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + e2)).to(dtype)
    return x + F.linear(act(F.linear(h, gw, gb)) * F.linear(h, uw, ub), dw, db)


def _tail_mask(mask: Any, tail: int, keys: int, dtype: torch.dtype) -> Any:
    """The attention mask of a pass's last ``tail`` queries over ``keys`` keys: the 4-D mask's last
    rows; with no mask (a causal pass over a cache without holes) None for one query (it sees
    every key) or the causal rows as an additive mask (sdpa's ``is_causal`` would align them top-left)."""
    if mask is not None:
        return mask[:, :, -tail:]
    if tail == 1:
        return None
    return attention_bias(torch.ones(tail, keys, dtype=torch.bool).tril(keys - tail)[None, None], dtype)


def _attend(attn: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, sdpa_attention_forward: Any) -> torch.Tensor:
    """HF's ``sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)[0]`` ``[batch, q, heads, head_dim]``,
    except where it would repeat grouped keys and values for a masked pass of several queries (a copy
    of the whole cache per layer and pass): on the CPU, PyTorch's sdpa takes them grouped
    (``enable_gqa``), with the same numbers bit for bit (``tests/test_lean.py``)."""
    groups = getattr(attn, "num_key_value_groups", 1)
    if groups > 1 and mask is not None and q.shape[2] > 1 and q.device.type == "cpu":
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, enable_gqa=True)
        return o.transpose(1, 2).contiguous()
    return sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)[0]


def _layer(layer: Any, ch: dict[str, list[tuple[str, Any]]], x: torch.Tensor, mask: Any, cos: torch.Tensor, sin: torch.Tensor,
           cache: Any) -> torch.Tensor:
    """:func:`_plain_layer` for a layer with the workbench's wrappers on parts inside it (``ch``:
    part → changes): each part's computation between its input and output changes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    attn, mlp = layer.self_attn, layer.mlp
    residual = x
    h = _out(ch, "input_layernorm", _rms(layer.input_layernorm, _inp(ch, "input_layernorm", x)))
    h = _inp(ch, "self_attn", h)
    shape = h.shape[:-1]
    heads = (*shape, -1, attn.head_dim)
    q = _out(ch, "self_attn.q_proj", _linear(attn.q_proj, _inp(ch, "self_attn.q_proj", h)))
    k = _out(ch, "self_attn.k_proj", _linear(attn.k_proj, _inp(ch, "self_attn.k_proj", h)))
    v = _out(ch, "self_attn.v_proj", _linear(attn.v_proj, _inp(ch, "self_attn.v_proj", h)))
    q, k, v = q.view(heads).transpose(1, 2), k.view(heads).transpose(1, 2), v.view(heads).transpose(1, 2)
    q = (q * cos) + (_rotate_half(q) * sin)
    k = (k * cos) + (_rotate_half(k) * sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    o = _attend(attn, q, k, v, mask, sdpa_attention_forward).reshape(*shape, -1).contiguous()
    o = _out(ch, "self_attn.o_proj", _linear(attn.o_proj, _inp(ch, "self_attn.o_proj", o)))
    if "self_attn" in ch:
        o = _out(ch, "self_attn", (o, None))[0]  # attention returns (output, weights); sdpa has no weights
    x = residual + o
    residual = x
    h = _out(ch, "post_attention_layernorm", _rms(layer.post_attention_layernorm, _inp(ch, "post_attention_layernorm", x)))
    h = _inp(ch, "mlp", h)
    gate = _out(ch, "mlp.gate_proj", _linear(mlp.gate_proj, _inp(ch, "mlp.gate_proj", h)))
    up = _out(ch, "mlp.up_proj", _linear(mlp.up_proj, _inp(ch, "mlp.up_proj", h)))
    act = _out(ch, "mlp.act_fn", _own(mlp.act_fn, _inp(ch, "mlp.act_fn", gate)))
    down = _out(ch, "mlp.down_proj", _linear(mlp.down_proj, _inp(ch, "mlp.down_proj", act * up)))
    return residual + _out(ch, "mlp", down)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask ``[batch, 1, q, kv]`` as the additive one PyTorch's CPU sdpa turns it
    into before attending (``where(mask, 0, -inf)``, ``convert_boolean_attn_mask``): made once per
    pass instead of once per layer, the same numbers. Only on the CPU (elsewhere sdpa may pick a
    kernel that treats a fully masked row of an additive mask differently): there the mask is
    returned as it is."""
    if mask.device.type != "cpu":
        return mask
    return torch.where(mask, 0.0, torch.tensor(float("-inf"), dtype=dtype))


def _output_changes(outer: list[tuple[str, Any]], x: torch.Tensor, q: int, cut: int) -> torch.Tensor:
    """A layer's output ``x`` through the changes of its own boundary, innermost first. A layer
    computed only at its last ``cut`` positions (``[batch, cut, d_model]``) is handed to them at its
    ``q`` positions, zeros where nothing was computed (observers read only the computed ones:
    :func:`read_tail`), and cut again after."""
    changes = [change for side, change in reversed(outer) if side == "output"]
    if not changes:
        return x
    if cut:
        x = torch.cat([x.new_zeros(x.shape[0], q - cut, x.shape[2]), x], 1)
    for change in changes:
        x = change(x)
    return x[:, -cut:] if cut else x


def read_tail(outer: list[tuple[str, Any]], q: int, logits_to_keep: int) -> int:
    """How many last positions of a pass's last layer output are read: the ``logits_to_keep`` last
    and every position an observer on the output (a change with ``reads_from()``, the first
    position it reads this call, None for none: :func:`workbench.engine.capture.pooling`) reads;
    0 when that is every position, when all logits are kept, or when a change on the output may
    do anything else (an intervention)."""
    if logits_to_keep < 1 or q <= logits_to_keep:
        return 0
    first = q - logits_to_keep
    for side, change in outer:
        if side != "output":
            continue
        reads_from = getattr(change, "reads_from", None)
        if reads_from is None:
            return 0
        start = reads_from()
        if start is not None:
            first = min(first, start)
    return q - first if first > 0 else 0


def pass_plan(hf: Any) -> Plan | None:
    """:func:`plan` for a pass of ``hf`` now, or None (after a :class:`LeanForwardFallbackWarning`,
    once per model and reason) when it must go through ``hf(...)``."""
    lean, why = plan(hf)
    if lean is None:
        warn_lean_fallback(hf, why or "")
    return lean


def lean_logits(hf: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, cache: Any,
                logits_to_keep: int, lean: Plan | None, tail: bool = False) -> torch.Tensor:
    """``hf(input_ids=…, attention_mask=…, position_ids=…, cache=…, use_cache=True,
    logits_to_keep=…).logits`` ``[batch, kept, vocab]``: by the lean forward following ``lean`` (a
    :func:`pass_plan` made while the modules were wrapped as they are now), or by ``hf(...)`` when
    ``lean`` is None.

    ``input_ids`` ``[batch, q]``; ``position_ids`` ``[batch, q]``; ``attention_mask``: 2-D
    ``[batch, cache + q]`` (1 where a position is attended), a 4-D mask as the attention takes it, or
    None for no holes (a one-token pass then attends every cached position).

    ``tail`` (a prefill of the lookup-decoding rounds, whose numbers are one-token steps' to float
    rounding anyway): the last layer computes its queries, attention, MLP and residual only at the
    positions read after it, the last ``logits_to_keep`` and those the workbench's capture observes
    on its output (:func:`read_tail`); its keys and values, and every earlier layer, at every
    position. The logits and the observed activations then differ from the full layer's by float
    rounding (another matrix shape), the cache not at all. Only where nothing else reads the last
    layer: no wrapper inside it or on the final norm or ``lm_head``, and only observers on its output."""
    if lean is None:
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        return hf(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=logits_to_keep,
                  **kwargs).logits
    if not lean.rotary:
        return _gpt2_logits(hf, input_ids, attention_mask, position_ids, cache, logits_to_keep, lean, tail)
    base = text_stack(hf)[0]
    top = lean.top
    if top:
        x = _out(top, "embed_tokens", _own(base.embed_tokens, _inp(top, "embed_tokens", input_ids)))
    else:
        x = _own(base.embed_tokens, input_ids)
    mask = _mask(hf, x, attention_mask, position_ids, cache, input_ids.shape[1])
    inv_freq, scaling = lean.rotary  # the rotary module's forward (default RoPE), op for op
    freqs = position_ids[..., None].float() * inv_freq.to(device=x.device, dtype=torch.float)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if scaling != 1.0:  # × 1.0 changes nothing
        cos, sin = cos * scaling, sin * scaling
    cos, sin = cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)  # [batch, q, head_dim]
    cos4, sin4 = cos.unsqueeze(1), sin.unsqueeze(1)  # as apply_rotary_pos_emb unsqueezes them
    last = len(lean.layers) - 1
    for i, (layer, how) in enumerate(zip(base.layers, lean.layers)):
        if how is None:  # something we do not know wraps part of it: the real layer, as transformers calls it
            x = layer(x, attention_mask=mask, position_embeddings=(cos, sin), position_ids=position_ids, cache=cache, use_cache=True)
            continue
        outer, inner, weights = how
        for side, change in outer:  # outermost first
            if side == "input":
                x = change(x)
        cut = read_tail(outer, x.shape[1], logits_to_keep) if tail and i == last and inner is None and not top else 0
        if inner is None:
            x = _plain_layer(weights, x, mask, cos4, sin4, cache, cut)
        else:
            x = _layer(layer, inner, x, mask, cos4, sin4, cache)
        x = _output_changes(outer, x, input_ids.shape[1], cut)
    if top:
        x = _out(top, "norm", _rms(base.norm, _inp(top, "norm", x)))
    else:
        x = _rms(base.norm, x)
    if logits_to_keep:
        x = x[:, -logits_to_keep:, :]
    if top:
        return _out(top, "lm_head", _linear(hf.lm_head, _inp(top, "lm_head", x)))
    return _linear(hf.lm_head, x)
