"""Interventions inside the rounds: steer, ablate or clamp a direction while the model self-corrects.

    from workbench.engine.interventions import Steer, Ablate, Clamp
    from probes.directions import read_direction
    d = read_direction("fair.h5")                           # a probe: unit directions per fitted layer, its hook
    s = Session(model, interventions=[Steer(d.at(3), layer=3, alpha=4.0, rounds=range(2, 7), positions="response")])
    s.step()                                                # round 1: not steered
    s.step(interventions=[Ablate(d.at(3), layers="all")])   # this round only: ablate instead
    # or from a CLI-style spec: probes.directions.from_spec("steer", "fair.h5@3=4")

**What each does** to the activation ``x`` (one token, ``[d_model]``) at a TransformerLens hook
point ``blocks.{layer}.{hook}``, ``d̂`` the unit direction:

- :class:`Steer` adds ``α·d̂``;
- :class:`Ablate` removes the component along ``d̂``, or along a subspace (several directions,
  orthonormalised: ``x − Q Qᵀ x``);
- :class:`Clamp` sets the projection to a value: ``x + (v − x·d̂) d̂``.

Hooks: ``hook_resid_pre``, ``hook_resid_mid``, ``hook_resid_post``, ``hook_attn_out``,
``hook_mlp_out`` (:data:`HOOKS`). The value changed is the hook point's in TransformerLens's sense:
what flows on from it changes, and nothing computed before it. ``hook_resid_mid`` is the sum of the
block's input and its attention output, which the Hugging Face block adds inside its ``forward``;
it is changed by editing the attention output so that the sum becomes the intervened value (checked
once per model: a block whose resid_mid is not resid_pre + attn_out, a parallel-attention block, is
refused).

**Which tokens, which passes.** An intervention acts on the tokens of chosen rounds (``rounds``:
1-based, None = every round) and, within them, on the round's new prompt tokens, its response tokens,
or both (``positions``: ``prompt`` | ``response`` | ``all``), in *every* forward pass that processes
those tokens: the prefill, each decode step, the one-token pass for an answer cut off by
``max_new_tokens`` (:func:`workbench.engine.generation.carry`) and option scoring (whose option
tokens count as the round's response tokens). A token's keys and values in the carried KV cache are
then computed under its own round's schedule, so a session that carries its cache gives what a full
recompute of the conversation (``reuse_cache=False``) under the same per-token schedule gives:
there the prefill holds every earlier round's tokens, and each is intervened on by its round's
schedule (``tests/test_interventions.py`` checks the two agree on every architecture family).

**How.** Like capture (:mod:`workbench.engine.capture`), by wrapping the hooked Hugging Face
modules' ``forward`` for the duration of a round, never PyTorch hooks. Within a round the first call
of a module is the prefill (``[batch, seq]``: the intervention uses a ``[batch, seq]`` weight the
Session computes from the round's spans, 0 on padding); every later call processes response tokens
of that round. Capture must see the values after the intervention: an intervention on a module's
output wraps inside capture's wrapper (:func:`intervening` with ``part="inner"``, entered before
:func:`~workbench.engine.capture.pooling`), one on a module's input (``hook_resid_pre``) outside it
(``part="outer"``, entered after). The arithmetic runs in float32 and is cast back to the model's
dtype; ``Steer(alpha=0)`` leaves every activation bit for bit as it was.

**Directions** from files (:mod:`probes.directions`: the file readers live above the engine): a probe file (``fair.h5@3``: the probe's
hook and its direction at layer 3; ``fair.h5@all``: every fitted layer, each its own direction), a
``.npy`` file (``[d_model]``, or ``[n_layers, d_model]`` one per layer) or a ``.safetensors`` file (one
tensor; or per-layer tensors named ``…{layer}``, as a repeng ``ControlVector``'s ``directions`` dict
saved with safetensors, or a steering-vectors ``SteeringVector.layer_activations`` saved the same
way). repeng's ``.gguf`` export and ``torch.save`` pickles are refused (no pickle is ever read).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

from workbench.errors import WorkbenchError

HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out")
POSITIONS = ("all", "prompt", "response")


def _rounds(rounds: Any) -> tuple[int, ...] | None:
    if rounds is None:
        return None
    try:
        values = tuple(sorted({int(r) for r in rounds}))
    except (TypeError, ValueError):
        raise WorkbenchError(f"rounds must be round numbers (from 1), not {rounds!r}") from None
    if not values or values[0] < 1 or any(isinstance(r, bool) for r in rounds):
        raise WorkbenchError(f"rounds must be a non-empty set of round numbers counted from 1, not {list(rounds)!r}")
    return values


def _layers(layer: Any, layers: Any) -> tuple[int, ...] | str:
    if (layer is None) == (layers is None):
        raise WorkbenchError("an intervention takes one of layer=N or layers=[…]|'all'")
    if layer is not None:
        layers = (layer,)
    if isinstance(layers, str):
        if layers != "all":
            raise WorkbenchError(f"layers must be layer numbers or 'all', not {layers!r}")
        return "all"
    try:
        values = tuple(sorted({int(x) for x in layers}))
    except (TypeError, ValueError):
        raise WorkbenchError(f"layers must be layer numbers or 'all', not {layers!r}") from None
    if not values or values[0] < 0 or any(isinstance(x, bool) for x in layers):
        raise WorkbenchError(f"layers must be a non-empty set of layer numbers from 0, not {layers!r}")
    return values


def _vector(direction: Any, matrix: bool) -> np.ndarray:
    """The direction as float32: ``[d]`` (or ``[k, d]`` when ``matrix``), finite and non-zero."""
    try:
        v = np.asarray(direction.detach().cpu().numpy() if hasattr(direction, "detach") else direction, dtype=np.float64)
    except (TypeError, ValueError):
        raise WorkbenchError("a direction must be a vector of numbers") from None
    if matrix and v.ndim == 1:
        v = v[None]
    if v.ndim != (2 if matrix else 1) or v.shape[-1] == 0 or v.shape[0] == 0:
        raise WorkbenchError(f"a direction must be {'[k, d_model] or ' if matrix else ''}[d_model], not shape {list(v.shape)}")
    if not np.isfinite(v).all():
        raise WorkbenchError("a direction holds NaN or infinity")
    if (np.linalg.norm(v, axis=-1) == 0).any():
        raise WorkbenchError("a direction of norm 0 has no direction")
    return v.astype(np.float32)


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not np.isfinite(value):
        raise WorkbenchError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _common(obj: Any) -> None:
    """Check and normalise the fields every intervention has (frozen: set through object.__setattr__)."""
    set_ = functools.partial(object.__setattr__, obj)
    set_("layers", _layers(obj.layer, obj.layers))
    set_("layer", None)
    set_("rounds", _rounds(obj.rounds))
    if obj.hook not in HOOKS:
        raise WorkbenchError(f"interventions act at {', '.join(HOOKS)}, not {obj.hook!r}")
    if obj.positions not in POSITIONS:
        raise WorkbenchError(f"positions must be one of {', '.join(POSITIONS)}, not {obj.positions!r}")


@dataclass(frozen=True, eq=False)
class Steer:
    """Add ``alpha`` × the unit ``direction`` ``[d_model]`` at ``hook`` of ``layer`` (or ``layers``:
    numbers or ``"all"``), on ``rounds`` (1-based; None: all) and ``positions``. ``label``: where the
    direction came from (recorded)."""

    direction: Any
    layer: int | None = None
    alpha: float = 0.0
    layers: Sequence[int] | str | None = None
    hook: str = "hook_resid_post"
    rounds: Sequence[int] | None = None
    positions: str = "all"
    label: str = ""
    control_seed: int | None = None  # set on a random control (:func:`random_control`)

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", _vector(self.direction, matrix=False))
        object.__setattr__(self, "alpha", _finite("alpha", self.alpha))
        _common(self)


@dataclass(frozen=True, eq=False)
class Ablate:
    """Remove the component along ``direction`` (``[d_model]``, or ``[k, d_model]``: the subspace they
    span, orthonormalised) at ``hook`` of ``layer``/``layers``, on ``rounds`` and ``positions``."""

    direction: Any
    layer: int | None = None
    layers: Sequence[int] | str | None = None
    hook: str = "hook_resid_post"
    rounds: Sequence[int] | None = None
    positions: str = "all"
    label: str = ""
    control_seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", _vector(self.direction, matrix=True))
        if self.direction.shape[0] > self.direction.shape[1]:
            raise WorkbenchError(f"{self.direction.shape[0]} directions cannot be independent in {self.direction.shape[1]} dimensions")
        if np.linalg.matrix_rank(self.direction.astype(np.float64)) < self.direction.shape[0]:
            raise WorkbenchError("the ablated directions are linearly dependent: give independent ones")
        _common(self)


@dataclass(frozen=True, eq=False)
class Clamp:
    """Set the projection on the unit ``direction`` to ``value`` at ``hook`` of ``layer``/``layers``,
    on ``rounds`` and ``positions``."""

    direction: Any
    layer: int | None = None
    value: float = 0.0
    layers: Sequence[int] | str | None = None
    hook: str = "hook_resid_post"
    rounds: Sequence[int] | None = None
    positions: str = "all"
    label: str = ""
    control_seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "direction", _vector(self.direction, matrix=False))
        object.__setattr__(self, "value", _finite("value", self.value))
        _common(self)


Intervention = Union[Steer, Ablate, Clamp]


def acts_in(iv: Intervention, round_: int) -> bool:
    """Whether ``iv`` acts in ``round_`` (1-based)."""
    return iv.rounds is None or round_ in iv.rounds


def layers_of(iv: Intervention, n_layers: int) -> list[int]:
    """The model layers ``iv`` acts at (``"all"`` resolved)."""
    return list(range(n_layers)) if iv.layers == "all" else list(iv.layers)


def describe(iv: Intervention, rounds: Sequence[int] | None = None) -> dict[str, Any]:
    """What a run file records about one intervention (JSON-ready): kind, the sha256 of its
    direction as given (float32, little-endian, C order) and its norm, hook, layers, alpha or value,
    rounds (``rounds`` overrides its own: the rounds it actually acted in), positions, label and
    control seed."""
    v = np.ascontiguousarray(iv.direction, dtype="<f4")
    out: dict[str, Any] = {
        "kind": type(iv).__name__.lower(),
        "sha256": hashlib.sha256(v.tobytes()).hexdigest(),
        "norm": [float(x) for x in np.linalg.norm(v.reshape(-1, v.shape[-1]).astype(np.float64), axis=-1)],
        "d_model": int(v.shape[-1]),
        "hook": iv.hook,
        "layers": iv.layers if iv.layers == "all" else list(iv.layers),
        "rounds": None if (rounds if rounds is not None else iv.rounds) is None else list(rounds if rounds is not None else iv.rounds),
        "positions": iv.positions,
        "label": iv.label,
        "control_seed": iv.control_seed,
    }
    if isinstance(iv, Steer):
        out["alpha"] = iv.alpha
    if isinstance(iv, Clamp):
        out["value"] = iv.value
    if isinstance(iv, Ablate):
        out["n_directions"] = int(v.shape[0])
    return out


def settings_json(interventions: Sequence[Intervention]) -> list[dict[str, Any]]:
    """Every intervention described (:func:`describe`), the form the ``interventions`` setting takes."""
    return json.loads(json.dumps([describe(iv) for iv in interventions]))


def summarize(record: dict[str, Any]) -> str:
    """One line for a recorded intervention (:func:`describe`'s dict), e.g.
    ``steer fair.h5@3 α=+4 at blocks.3.hook_resid_post, rounds 2-6, response tokens``; a record
    that is not one (a file is a stranger's input) says so rather than failing."""
    try:
        return _summary(record)
    except (AttributeError, TypeError, ValueError, IndexError, KeyError):
        return "an unreadable intervention record"


def _summary(record: dict[str, Any]) -> str:
    kind = record.get("kind", "?")
    amount = {"steer": f" α={record.get('alpha', 0):+g}", "clamp": f" to {record.get('value', 0):g}"}.get(kind, "")
    layers = record.get("layers")
    where = f"blocks.{layers[0]}.{record.get('hook')}" if isinstance(layers, list) and len(layers) == 1 else \
        f"{record.get('hook')} of layers {'all' if layers == 'all' else ','.join(map(str, layers or []))}"
    rounds = record.get("rounds")
    if not rounds:
        said = "every round"
    elif rounds == list(range(rounds[0], rounds[-1] + 1)):
        said = f"round {rounds[0]}" if len(rounds) == 1 else f"rounds {rounds[0]}-{rounds[-1]}"
    else:
        said = "rounds " + ",".join(map(str, rounds))
    control = f" (random control, seed {record['control_seed']})" if record.get("control_seed") is not None else ""
    label = f" {record['label']}" if record.get("label") else ""
    line = f"{kind}{label}{amount} at {where}, {said}, {record.get('positions', 'all')} tokens{control}"
    return re.sub(r"[\x00-\x1f\x7f-\x9f]", "?", line)  # a file's text: no control character reaches a terminal


def random_control(iv: Intervention, seed: int) -> Intervention:
    """The same intervention along a seeded random direction (standard normal, then scaled to the
    original's norm; a subspace: as many random directions), recorded with ``control_seed``."""
    from dataclasses import replace

    v = np.atleast_2d(iv.direction)
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(v.shape)
    r *= (np.linalg.norm(v, axis=-1) / np.linalg.norm(r, axis=-1))[:, None]
    direction = r[0] if np.ndim(iv.direction) == 1 else r
    return replace(iv, direction=direction.astype(np.float32), label=f"random({iv.label})" if iv.label else "random",
                   control_seed=seed, layers=iv.layers, layer=None)


def check_against(interventions: Sequence[Intervention], d_model: int, n_layers: int) -> None:
    """Refuse an intervention whose width is not ``d_model`` or whose layers are out of range."""
    for iv in interventions:
        width = iv.direction.shape[-1]
        if width != d_model:
            where = f" ({iv.label})" if iv.label else ""
            raise WorkbenchError(f"the direction{where} has width {width}, but the model's d_model is {d_model}")
        if iv.layers != "all" and max(iv.layers) >= n_layers:
            raise WorkbenchError(f"layer {max(iv.layers)} is out of range (the model has layers 0..{n_layers - 1})")


def parse_rounds(text: str | None) -> tuple[int, ...] | None:
    """``--steer-rounds``: ``2-6``, ``3``, ``1,3,5`` (1-based, inclusive) → the rounds; None: all."""
    if text is None:
        return None
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None:
            raise WorkbenchError(f"--steer-rounds takes rounds like 2-6 or 1,3, not {text!r}")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if a < 1 or b < a:
            raise WorkbenchError(f"--steer-rounds {text!r}: rounds count from 1 and a range runs upward (2-6)")
        out.update(range(a, b + 1))
    return tuple(sorted(out))


# ---------------------------------------------------------------------------------------------- installing
@dataclass
class Plan:
    """The interventions of one round on a model, ready to install: per intervention its
    ``prefill`` weight ``[batch, seq]`` (None: it does not act on the prefill) and whether it acts on
    the round's later calls (``later``). Which modules already ran their prefill is kept here, so a
    plan installed again (option scoring, after capture is done) treats every call as a later one."""

    active: list[tuple[Intervention, Any, bool]]  # (intervention, prefill weight [batch, seq] | None, later)
    sites: dict[tuple[str, int], Any]  # (hook, layer) → HookSite
    n_layers: int
    prefilled: set[str] = field(default_factory=set)
    # the value before the intervention at the last position of each call, for the (id(intervention),
    # layer) in ``watch`` while ``recording``: {"measure": its projection, "last": [batch, d] (prefill), "steps": [[batch, d], …]}
    watch: set[tuple[int, int]] = field(default_factory=set)
    recording: bool = True
    recorded: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.active)


def resolve_sites(model: Any, interventions: Sequence[Intervention]) -> dict[tuple[str, int], Any]:
    """``(hook, layer) → HookSite`` for every place the interventions act, plus the attention output
    and block input of every ``hook_resid_mid`` layer (what it is changed through). Checks the
    width and layers, the sites (:func:`workbench.engine.capture.hook_sites`), and that resid_mid is
    resid_pre + attn_out on this model. Raises :class:`WorkbenchError`."""
    from workbench.engine.capture import hook_sites

    check_against(interventions, model.d_model, model.n_layers)
    wanted: dict[str, set[int]] = {}
    for iv in interventions:
        for layer in layers_of(iv, model.n_layers):
            wanted.setdefault(iv.hook, set()).add(layer)
            if iv.hook == "hook_resid_mid":
                wanted.setdefault("hook_attn_out", set()).add(layer)
                wanted.setdefault("hook_resid_pre", set()).add(layer)
    sites = {}
    for hook, layers in wanted.items():
        for site in hook_sites(model, [hook], sorted(layers)):
            sites[(hook, site.layer)] = site
    mids = sorted(layer for hook, layer in sites if hook == "hook_resid_mid")
    if mids:
        _check_resid_mid(model, [sites[(h, mids[0])] for h in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid")])
    return sites


def _check_resid_mid(model: Any, three: list[Any]) -> None:
    """Refuse resid_mid interventions on a block where resid_mid ≠ resid_pre + attn_out."""
    import torch

    from workbench.engine.capture import pooling

    tokens = torch.tensor([model.tokenizer("Interventions are checked once.")["input_ids"]], device=model.device)
    seq = tokens.shape[1]
    with torch.inference_mode(), pooling(model.hf, three, torch.eye(seq, device=model.device)[None]) as got:
        model.hf(input_ids=tokens, logits_to_keep=1)
    pre, attn, mid = (got[s] for s in three)
    error = float((pre + attn - mid).abs().max() / mid.abs().max().clamp(min=1e-6))
    if not error <= (1e-4 if model.dtype == "float32" else 5e-2):
        raise WorkbenchError("hook_resid_mid cannot be intervened on for this model: its blocks do not add the "
                             "attention output to the block input (parallel attention?); use hook_resid_pre or hook_resid_post")


def make_plan(model: Any, sites: dict[tuple[str, int], Any], active: list[tuple[Intervention, Any, bool]]) -> Plan:
    """A :class:`Plan` from ``(intervention, prefill weight | None, later)`` triples (those that do
    nothing this round left out)."""
    return Plan([a for a in active if a[1] is not None or a[2]], sites, model.n_layers)


def _edit(iv: Intervention, cache: dict[Any, Any]) -> tuple[Callable[..., Any], Callable[[Any], Any]]:
    """``(edit, measure)``: ``edit(x, w)``: x ``[batch, seq, d]`` → the intervened x in x's dtype,
    ``w`` ``[batch, seq]`` weights or None (every position). ``measure(x)``: x ``[..., d]`` →
    ``[...]`` float32, its projection on d̂ (a subspace of k > 1 directions: the norm of its
    component in it)."""
    import torch

    def tensors(device: Any) -> Any:
        key = (id(iv), device)
        got = cache.get(key)
        if got is not None:
            return got
        v = torch.as_tensor(iv.direction, dtype=torch.float64)
        if isinstance(iv, Ablate):
            q, _ = torch.linalg.qr(v.T)  # [d, k], orthonormal columns spanning the directions
            cache[key] = q.T.contiguous().float().to(device)  # [k, d]
        else:
            unit = (v / v.norm()).float().to(device)
            cache[key] = unit * iv.alpha if isinstance(iv, Steer) else unit
        return cache[key]

    def measure(x: Any) -> Any:
        if isinstance(iv, Ablate):
            t = tensors(x.device)
            coef = x.float() @ t.T  # [..., k]
            return coef[..., 0] if t.shape[0] == 1 else coef.norm(dim=-1)
        return x.float() @ _unit(iv, x.device, cache)

    if isinstance(iv, Steer):
        def edit(x: Any, w: Any) -> Any:
            step = tensors(x.device)
            if w is None and x.dtype == torch.float32:
                return x + step  # a decode step: one add (float32 already)
            delta = step if w is None else w[..., None] * step
            return (x.float() + delta).to(x.dtype)
    elif isinstance(iv, Ablate):
        def edit(x: Any, w: Any) -> Any:
            q = tensors(x.device)
            xf = x.float()
            coef = xf @ q.T  # [b, s, k]
            if w is not None:
                coef = coef * w[..., None]
            return (xf - coef @ q).to(x.dtype)
    else:
        value = float(iv.value)

        def edit(x: Any, w: Any) -> Any:
            unit = tensors(x.device)
            xf = x.float()
            coef = value - xf @ unit  # [b, s]
            if w is not None:
                coef = coef * w
            return (xf + coef[..., None] * unit).to(x.dtype)

    return edit, measure


def _unit(iv: Intervention, device: Any, cache: dict[Any, Any]) -> Any:
    """The unit direction of ``iv`` on ``device`` (float32, ``[d]``), cached."""
    import torch

    key = ("unit", id(iv), device)
    if key not in cache:
        v = torch.as_tensor(np.atleast_2d(iv.direction)[0], dtype=torch.float64)
        cache[key] = (v / v.norm()).float().to(device)
    return cache[key]


@contextmanager
def intervening(hf: Any, plan: Plan | None, part: str) -> Iterator[None]:
    """Install ``plan`` on the plain HF model ``hf`` for the block: ``part="inner"`` the edits of
    module outputs (and what resid_mid needs), entered *before* capture's
    :func:`~workbench.engine.capture.pooling`; ``part="outer"`` the edits of module inputs
    (``hook_resid_pre``), entered *after* it — so capture sees every value after the intervention.
    Nothing is installed for an empty plan. The first call of each module is its prefill (the
    plan's ``[batch, seq]`` weights); later calls are the round's response tokens."""
    if not plan:
        yield
        return
    from workbench.engine.capture import replace_forward  # torch: not at import (info reads interventions)

    cache: dict[Any, Any] = {}
    # per (module path, side): the edits in order, each (edit, prefill weight, later); resid_mid: per layer
    edits: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    mid: dict[int, list[tuple[Any, ...]]] = {}
    for iv, weight, later in plan.active:
        for layer in layers_of(iv, plan.n_layers):
            key = (id(iv), layer)
            entry = (*_edit(iv, cache), weight, later, key if key in plan.watch else None)
            if iv.hook == "hook_resid_mid":
                mid.setdefault(layer, []).append(entry)
                continue
            site = plan.sites[(iv.hook, layer)]
            if (site.side == "input") == (part == "outer"):
                edits.setdefault((site.module, site.side), []).append(entry)
    restore = []
    try:
        if part == "inner":
            for layer, entries in mid.items():
                restore.extend(_install_mid(hf, plan, layer, entries))
        for (path, side), entries in edits.items():
            restore.append(replace_forward(hf.get_submodule(path), side, _editor(plan, path, side, entries)))
        yield
    finally:
        for undo in reversed(restore):
            undo()


def _apply(plan: Plan, path: str, act: Any, entries: list[tuple[Any, ...]]) -> Any:
    """``act`` ``[batch, seq, d]`` after every entry: the prefill's weights on the module's first
    call of the round, every position on a later call (a decode step's token, or a lookup draft's
    chunk of them: :mod:`workbench.engine.lookup`)."""
    if path in plan.prefilled:  # a later call: the round's response tokens
        for edit, measure, _, later, record in entries:
            if record is not None and plan.recording:  # a reference to the value before the edit: measured after the round
                plan.recorded.setdefault(record, {"measure": measure, "last": None, "steps": []})["steps"].append(act)
            if later:
                act = edit(act, None)
        return act
    plan.prefilled.add(path)
    first = True
    for edit, measure, weight, later, record in entries:
        if record is not None and plan.recording:
            plan.recorded.setdefault(record, {"measure": measure, "last": None, "steps": []})["last"] = act[:, -1]
        if first and weight is not None:
            if act.shape[:2] != tuple(weight.shape):
                raise WorkbenchError(f"an intervention expected the prompt in one forward pass, but {path} saw "
                                     f"{tuple(act.shape[:2])} tokens, not {tuple(weight.shape)}")
            act = edit(act, weight.to(act.device))
        elif not first and later:
            act = edit(act, None)
    return act


def _editor(plan: Plan, path: str, side: str, entries: list[tuple[Any, ...]]) -> Callable[[Any], Any]:
    key = f"{path}:{side}"

    def change(act: Any) -> Any:
        if isinstance(act, tuple):
            return (_apply(plan, key, act[0], entries), *act[1:])
        return _apply(plan, key, act, entries)
    return change


def _install_mid(hf: Any, plan: Plan, layer: int, entries: list[tuple[Any, ...]]) -> list[Callable[[], None]]:
    """resid_mid = block input + attention output: keep the block's input as it enters (inside any
    resid_pre edit), and replace the attention output ``a`` by ``f(pre + a) − pre``."""
    from workbench.engine.capture import replace_forward

    pre_site, attn_site = plan.sites[("hook_resid_pre", layer)], plan.sites[("hook_attn_out", layer)]
    kept: list[Any] = [None]

    def keep(act: Any) -> Any:
        kept[0] = act[0] if isinstance(act, tuple) else act
        return act

    def change(out: Any) -> Any:
        attn = out[0] if isinstance(out, tuple) else out
        pre = kept[0]
        new = _apply(plan, f"mid:{layer}", pre.float() + attn.float(), entries) - pre.float()
        new = new.to(attn.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    return [replace_forward(hf.get_submodule(pre_site.module), "input", keep),
            replace_forward(hf.get_submodule(attn_site.module), "output", change)]


