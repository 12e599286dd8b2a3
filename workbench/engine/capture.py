"""Capturing TransformerLens hook points from the passes the model makes anyway.

A hook is named the TransformerLens way without its block, e.g. ``hook_resid_post``; it is
captured at every chosen layer (``blocks.{i}.hook_resid_post``). The TransformerBridge knows,
for each architecture, which Hugging Face module boundary a hook point observes:
``blocks.3.hook_resid_mid`` is the input of layer 3's ``post_attention_layernorm`` on Llama and
of ``ln_2`` on GPT-2. :func:`hook_sites` asks the bridge once; :func:`pooling` then observes those
boundaries of the untouched HF model (its modules' ``forward``, wrapped while a pass runs). So
capture rides along the prefill of ``generate`` (the model's own attention kernel, the KV cache)
instead of making an eager pass of its own through the bridge. ``tests/test_capture.py`` checks
every site against the bridge's own hook values, and :func:`hook_sites` checks each chosen site
against the bridge once when a run starts. Hook points computed *inside* a module
(``attn.hook_pattern``) or not ``d_model`` wide (``attn.hook_z``) are refused with the list of
those that can be captured.

Sites pool as they fire, so a pass keeps ``[batch, n_pools, d_model]`` per site instead of
``[batch, pos, d_model]``. Pools are rows of a weight matrix over positions: the last prompt token
of a round is a one-hot row, the mean over a round's response is a row of 1/len over its span.
"""

from __future__ import annotations

import functools
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from workbench.errors import WorkbenchError

POSITIONS = ("last_prompt", "response_mean")
DEFAULT_HOOKS = ("hook_resid_post",)
_BRIDGE_WRAPPER = "._original_component"  # the bridge inserts this between a component and the HF module it wraps


@dataclass(frozen=True)
class HookSite:
    """Where the hook point ``blocks.{layer}.{hook}`` is observed on the plain HF model."""

    hook: str
    layer: int
    module: str  # path in the HF model, e.g. "model.layers.3.post_attention_layernorm"
    side: str  # "input" or "output" of that module


def check_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """All layers when ``layers`` is None; otherwise the given ones, checked to be in range."""
    if layers is None:
        return list(range(n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise WorkbenchError(f"layer {bad[0]} is out of range (the model has layers 0..{n_layers - 1})")
    return sorted(set(layers))


def hook_sites(model: Any, hooks: list[str], layers: list[int]) -> list[HookSite]:
    """Each ``(hook, layer)`` of a :class:`~workbench.engine.models.LoadedModel` resolved to its HF module
    boundary, hooks outer and layers inner.

    Every site is checked once per loaded model on a short text: the HF boundary must give the
    bridge's own hook value, ``[batch, pos, d_model]`` (a check passed is remembered for that model
    object, so the batches of a run, its sessions and later runs in one process skip the pass).
    Raises :class:`WorkbenchError` for a hook the model does not have, or one that cannot be
    captured this way, naming the block-0 hooks that can.
    """
    key = (tuple(hooks), tuple(layers))
    checked = _CHECKED.get(model.hf)
    if checked is not None and key in checked:
        return list(checked[key])
    bridge = model.bridge
    boundaries = _boundaries(bridge, model.hf)
    sites = []
    for hook in hooks:
        for layer in layers:
            name = f"blocks.{layer}.{hook}"
            if name not in bridge.hook_dict:
                raise _not_capturable(model, hook, "the model has no such hook", unknown=True)
            if name not in boundaries:
                raise _not_capturable(model, hook, "it is computed inside a module")
            sites.append(HookSite(hook, layer, *boundaries[name]))
    problem = site_disagreement(model, sites)
    if problem:
        hook, why = problem
        raise _not_capturable(model, hook, why)
    _CHECKED.setdefault(model.hf, {})[key] = tuple(sites)
    return sites


# HF model object → {(hooks, layers): its checked sites}; dropped with the model
_CHECKED: "weakref.WeakKeyDictionary[Any, dict[tuple, tuple[HookSite, ...]]]" = weakref.WeakKeyDictionary()


def _boundaries(bridge: Any, hf: Any) -> dict[str, tuple[str, str]]:
    """Hook point name → (HF module path, "input"|"output") for every hook point that observes the
    input or output of a module the plain HF model has."""
    paths = {id(m): name for name, m in bridge.original_model.named_modules()}
    modules = dict(hf.named_modules())
    found = {}
    for name, point in bridge.hook_dict.items():
        module, _, leaf = paths.get(id(point), "").replace(_BRIDGE_WRAPPER, "").rpartition(".")
        if leaf in ("hook_in", "hook_out") and module in modules:
            found[name] = (module, "input" if leaf == "hook_in" else "output")
    return found


def site_disagreement(model: Any, sites: list[HookSite]) -> tuple[str, str] | None:
    """Run a short text through the bridge (its hook points) and the HF model (the sites); the first
    site whose value differs from its hook point's in shape or number, as ``(hook, why)``, else None.

    Relative tolerance 1e-3 in float32, 5e-2 in half precision (the bridge's eager attention and the
    model's own kernel round differently)."""
    problems = _site_problems(model, sites)
    first = next((s for s in sites if s in problems), None)
    return None if first is None else (first.hook, problems[first])


@torch.no_grad()
def _site_problems(model: Any, sites: list[HookSite]) -> dict[HookSite, str]:
    """Every site whose value disagrees with its bridge hook point, and why, from one pass of each."""
    if not sites:
        return {}
    tokens = torch.tensor([model.tokenizer("Hooks are checked once, on a short text.")["input_ids"]], device=model.device)
    seq = tokens.shape[1]
    want: dict[HookSite, torch.Tensor] = {}

    def keep(act: torch.Tensor, hook: Any, site: HookSite) -> torch.Tensor:
        want[site] = act.detach().float()
        return act

    fwd = [(f"blocks.{s.layer}.{s.hook}", functools.partial(keep, site=s)) for s in sites]
    with model.bridge.hooks(fwd_hooks=fwd):
        model.bridge(tokens, return_type=None, stop_at_layer=max(s.layer for s in sites) + 1)
    with pooling(model.hf, sites, torch.eye(seq, device=model.device)[None]) as got:  # identity pools: every position
        model.hf(input_ids=tokens, logits_to_keep=1)
    tolerance = 1e-3 if model.dtype == "float32" else 5e-2
    problems = {}
    for site in sites:
        a, b = got.get(site), want.get(site)
        if a is None or b is None or a.shape != b.shape or b.shape[-1] != model.d_model:
            shape = None if b is None else tuple(b.shape)
            problems[site] = f"its bridge value has shape {shape}, not [batch, pos, d_model]"
            continue
        error = float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))
        if not error <= tolerance:
            problems[site] = f"{site.module} ({site.side}) differs from the bridge's value by {error:.2g} relative at layer {site.layer}"
    return problems


def _not_capturable(model: Any, hook: str, why: str, unknown: bool = False) -> WorkbenchError:
    """The error for a hook that cannot be captured, listing the block-0 hooks that can, nearest
    names to ``hook`` first."""
    import difflib

    block0 = [HookSite(name.split(".", 2)[2], 0, *where) for name, where in _boundaries(model.bridge, model.hf).items()
              if name.startswith("blocks.0.")]
    problems = _site_problems(model, block0)
    good = sorted({s.hook for s in block0 if s not in problems},
                  key=lambda h: (-difflib.SequenceMatcher(None, hook, h).ratio(), h))
    if unknown:
        return WorkbenchError(f"unknown hook {hook!r}; capturable hooks, nearest first: {', '.join(good)}")
    return WorkbenchError(f"hook {hook!r} cannot be captured from the model's own passes: {why} (capturable: {', '.join(good)})")


def pool_weights(spans: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Pooling rows for every round's two positions.

    spans ``[batch, rounds, 4]`` = (prompt_start, prompt_end, response_start, response_end) token
    offsets in the sequence → weights ``[batch, rounds * 2, seq_len]``: row 2t is the last prompt
    token of round t, row 2t+1 the mean over round t's response (all zero when it is empty, which
    the caller turns into NaN).
    """
    batch, rounds, _ = spans.shape
    pos = torch.arange(seq_len, device=spans.device)
    last = (pos[None, None, :] == (spans[..., 1:2] - 1)).float()
    in_resp = ((pos[None, None, :] >= spans[..., 2:3]) & (pos[None, None, :] < spans[..., 3:4])).float()
    mean = in_resp / in_resp.sum(-1, keepdim=True).clamp(min=1)
    return torch.stack([last, mean], dim=2).reshape(batch, rounds * 2, seq_len)


@contextmanager
def pooling(
    hf: Any, sites: list[HookSite], weights: torch.Tensor, steps: dict[HookSite, list[torch.Tensor]] | None = None
) -> Iterator[dict[HookSite, torch.Tensor]]:
    """Pool every site over the *first* forward call of ``hf`` inside the block (the first call of
    the site's module: a model calls each of its modules once per forward).

    weights ``[batch, n_pools, seq]`` → yields a dict, filled as that call runs, of site →
    ``[batch, n_pools, d_model]`` float32. Raises WorkbenchError if the first call's input is not ``[batch, seq]``
    (e.g. a chunked prefill). Later calls (the decode passes, each fed the token the step before
    chose, or a lookup draft's chunk of them) pass untouched, unless ``steps`` is given: then each
    later call appends what it saw, ``[batch, positions, d_model]`` in the model's dtype (no work
    per step beyond keeping a reference: :func:`round_pools` joins them), to ``steps[site]``.

    The sites are observed by wrapping their modules' ``forward`` for the duration of the block,
    not with PyTorch hooks: a module with a hook takes PyTorch's slower call path on every call,
    a few times the cost of the wrapper's one extra Python call (measured in docs/PERFORMANCE.md,
    "Capture overhead with the cache carried").
    """
    pooled: dict[HookSite, torch.Tensor] = {}
    batch, seq = weights.shape[0], weights.shape[2]
    used = weights.abs().sum((0, 1)).nonzero()
    start = int(used[0]) if len(used) else seq  # positions before every pooled one are never read
    window = {weights.device: weights[..., start:]}  # per device: a model split over GPUs hands over there

    def first_call(site: HookSite, act: torch.Tensor) -> None:
        if act.shape[:2] != (batch, seq):
            raise WorkbenchError(
                f"capture expected the prompt in one forward pass, but {site.module} saw {tuple(act.shape[:2])} "
                f"tokens, not {(batch, seq)} (does the model's generation config chunk the prefill?)"
            )
        if act.device not in window:
            window[act.device] = weights[..., start:].to(act.device)
        pooled[site] = torch.bmm(window[act.device], act[:, start:].float())  # [b, p, t] @ [b, t, d] → [b, p, d]

    def observer(site: HookSite) -> Callable[[Any], None]:
        kept = steps.setdefault(site, []) if steps is not None else None

        first = True

        def observe(act: Any) -> None:
            nonlocal first
            act = act[0] if isinstance(act, tuple) else act
            if first:
                first = False
                first_call(site, act)
            elif kept is not None:
                kept.append(act)

        # the first position the next call reads (None: none), for a pass that computes only what is read
        observe.reads_from = lambda: start if first else (0 if kept is not None else None)  # type: ignore[attr-defined]
        return observe

    by_module: dict[tuple[str, str], list[Callable[[Any], None]]] = {}
    for site in sites:
        by_module.setdefault((site.module, site.side), []).append(observer(site))
    restore = []
    try:
        for (path, side), observers in by_module.items():
            restore.append(_observe_forward(hf.get_submodule(path), side, observers))
        yield pooled
    finally:
        for undo in reversed(restore):
            undo()


_NOT_SET = object()


def replace_forward(module: Any, side: str, change: Callable[[Any], Any]) -> Callable[[], None]:
    """Wrap ``module.forward`` so that its first input (``side == "input"``: the first positional
    argument or ``hidden_states``) or its output goes through ``change`` (which returns the value to
    use); returns the function that puts the module's own ``forward`` back (an instance attribute
    another library set, e.g. accelerate's device hooks, included). Capture's observers and the
    interventions (:mod:`workbench.engine.interventions`) are both wrappers made by it."""
    saved = module.__dict__.get("forward", _NOT_SET)
    inner = module.forward

    if side == "input":
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                args = (change(args[0]), *args[1:])
            else:
                kwargs["hidden_states"] = change(kwargs["hidden_states"])
            return inner(*args, **kwargs)
    else:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return change(inner(*args, **kwargs))

    wrapped = functools.wraps(inner)(forward)
    # read by wrapper_changes (the lean forward applies the change itself); the wrapper itself first, so
    # that a foreign wrapper that copied this attribute (functools.wraps of this one) is not taken for it
    wrapped.workbench_change = (wrapped, side, change, inner)
    module.forward = wrapped

    def undo() -> None:
        if saved is _NOT_SET:
            del module.forward
        else:
            module.forward = saved

    return undo


def wrapper_changes(module: Any) -> list[tuple[str, Callable[[Any], Any]]] | None:
    """The :func:`replace_forward` wrappers on ``module``, outermost first, as ``(side, change)``:
    ``[]`` when its ``forward`` is its class's own, None when something else sits in the chain (a
    ``forward`` another library set). A forward that does not call the module's (the lean forward,
    :mod:`workbench.engine.lean`) applies these changes at the same boundary, in the same order."""
    forward = module.__dict__.get("forward", _NOT_SET)
    if forward is _NOT_SET:
        return []
    changes = []
    while True:
        mark = getattr(forward, "workbench_change", None)
        if mark is None or mark[0] is not forward:
            break
        _, side, change, forward = mark
        changes.append((side, change))
    own = getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module
    return changes if own else None


def _observe_forward(module: Any, side: str, observers: list[Callable[[Any], None]]) -> Callable[[], None]:
    """Wrap ``module.forward`` (:func:`replace_forward`) so that each call hands its first input
    (``side == "input"``) or its output to every observer, unchanged; returns the undo."""
    def see(act: Any) -> Any:
        for observe in observers:
            observe(act)
        return act

    if all(hasattr(o, "reads_from") for o in observers):  # it only reads: where from, for lean.read_tail
        see.reads_from = lambda: min((r for r in (o.reads_from() for o in observers) if r is not None), default=None)  # type: ignore[attr-defined]
    return replace_forward(module, side, see)


def round_pools(
    pooled: dict[HookSite, torch.Tensor], steps: dict[HookSite, list[torch.Tensor]], sites: list[HookSite], fed: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A round's two positions per hook from what :func:`pooling` kept over generation: the
    prefill's pool (``pooled``, one row per sample: the last prompt token) and the mean over each
    response of the later passes' positions (``steps``, joined: the positions after the prompt, in
    the order the passes fed them) that hold a response token (``fed`` ``[batch, T]``, 1 there: the
    carried cache's mask after the prompt) → ``{hook: [batch, 2, n_layers, d_model]}`` float32 on
    the CPU, layers in the order of ``sites``, NaN in the mean of an empty response. Every site in
    one product."""
    device = pooled[sites[0]].device  # a model placed over several devices pools each layer where it runs
    last = torch.cat([pooled[s].to(device) for s in sites], 1)  # [B, S, d]
    count = fed.sum(1).cpu()
    if steps.get(sites[0]):
        joined = torch.cat([torch.cat(steps[s], 1).to(device) for s in sites], 2).float()  # [B, T, S·d]
        if joined.shape[1] != fed.shape[1]:
            raise RuntimeError(f"the passes after the prompt fed {joined.shape[1]} positions, the cache's mask has {fed.shape[1]}")
        w = (fed.float() / count.clamp(min=1)[:, None].float())[:, None, :].to(device)  # [B, 1, T]: 1/n over a response
        mean = torch.bmm(w, joined).view(last.shape)  # [B, 1, T] @ [B, T, S·d]
    else:
        mean = torch.zeros_like(last)
    acts = torch.stack([last, mean], 1).cpu()  # [B, 2, S, d]
    empty = [i for i, n in enumerate(count.tolist()) if n == 0]
    if empty:
        acts[empty, 1] = float("nan")
    hooks = list(dict.fromkeys(s.hook for s in sites))
    if len(hooks) == 1:
        return {hooks[0]: acts}
    return {h: acts[:, :, [i for i, s in enumerate(sites) if s.hook == h]] for h in hooks}


def stack_sites(pooled: dict[HookSite, torch.Tensor], sites: list[HookSite]) -> dict[str, torch.Tensor]:
    """Per-site pools ``[batch, n_pools, d_model]`` → ``{hook: [batch, n_pools, n_layers, d_model]}``,
    layers in the order of ``sites``, on the device of the first site's pool (a model placed over
    several devices pools each layer where it runs)."""
    hooks = list(dict.fromkeys(s.hook for s in sites))
    device = pooled[sites[0]].device if sites else None
    return {h: torch.stack([pooled[s].to(device) for s in sites if s.hook == h], dim=2) for h in hooks}


@torch.no_grad()
def capture_pooled(hf: Any, tokens: torch.Tensor, spans: torch.Tensor, sites: list[HookSite],
                   **model_kwargs: Any) -> dict[str, torch.Tensor]:
    """One forward over right-padded sequences, pooled per round (``model_kwargs``: more keywords
    for the forward, e.g. a vision-language model's pixel values).

    tokens ``[batch, seq]`` (right-padded; causal attention keeps pads out of real positions),
    spans ``[batch, rounds, 4]`` (see :func:`pool_weights`) → ``{hook: [batch, rounds, 2, n_layers,
    d_model]}`` float32 on the CPU, the 2 positions being ``POSITIONS``. A round with an empty
    response gets NaN in its mean.
    """
    batch, seq = tokens.shape
    rounds = spans.shape[1]
    with pooling(hf, sites, pool_weights(spans, seq)) as pooled:
        hf(input_ids=tokens, logits_to_keep=1, **model_kwargs)
    empty = (spans[..., 3] <= spans[..., 2]).cpu()
    result = {}
    for hook, acts in stack_sites(pooled, sites).items():
        acts = acts.reshape(batch, rounds, 2, acts.shape[-2], acts.shape[-1]).cpu()
        acts[:, :, 1][empty] = float("nan")
        result[hook] = acts
    return result
