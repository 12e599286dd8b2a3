"""Directions read from files for interventions (:mod:`workbench.engine.interventions`): probe files,
``.npy`` and ``.safetensors`` vectors, and the CLI's ``FILE@WHERE=VALUE`` specs.

- a probe file (``fair.h5``): its unit direction per fitted layer at the probe's own hook;
  ``--ablate a.h5,b.h5@all``: at each layer the subspace several files' directions span;
  ``fair.h5@3`` the layer-3 direction, ``fair.h5@all`` every fitted layer (one intervention per
  layer, each its own direction), ``fair.h5@blocks.2.hook_resid_mid`` another hook at layer 2;
  with no place, the probe's best layer;
- ``.npy``: ``[d_model]`` (one vector, any layer) or ``[n_layers, d_model]`` (row i at layer i);
- ``.safetensors``: one tensor as for ``.npy``, or one ``[d_model]`` tensor per layer named
  ``…{layer}`` (``"3"``, ``"direction.3"``, ``"layers.3"``): what a repeng ``ControlVector``'s
  ``directions`` dict or a steering-vectors ``SteeringVector.layer_activations`` dict gives when
  saved with ``safetensors``. repeng's ``.gguf`` export and ``torch.save`` pickles are refused with
  the line that says how to convert them (no pickle is ever loaded).

A clamp's ``pNN`` is the NN-th percentile of the probe's contrast-set projections at that layer,
read from a ``contrast_projections [L, n]`` dataset; probe files written by ``workbench probe fit``
today hold none, so ``pNN`` is refused there in one line (give the value as a number).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from workbench.engine.interventions import HOOKS, Ablate, Clamp, Intervention, Steer
from workbench.errors import WorkbenchError


@dataclass(frozen=True)
class Direction:
    """A direction read from a file: ``vectors[i]`` (``[d_model]``, unit norm for a probe) at
    ``layers[i]`` and ``hook`` (None: the file does not say), plus, for a probe with them, the
    contrast set's projections per layer (``{layer: [n]}``, for a percentile clamp)."""

    source: str
    vectors: np.ndarray  # [n, d_model]
    layers: tuple[int | None, ...]  # a layer per vector; None: any layer (one vector for all)
    hook: str | None
    d_model: int
    contrast_projections: dict[int, np.ndarray] = field(default_factory=dict)

    def at(self, layer: int) -> np.ndarray:
        """The vector for ``layer``: ``[d_model]``."""
        if self.layers == (None,):
            return self.vectors[0]
        if layer not in self.layers:
            raise WorkbenchError(f"{self.source} has no direction for layer {layer} (it has layers "
                                 f"{', '.join(str(x) for x in self.layers)})")
        return self.vectors[self.layers.index(layer)]


def read_direction(path: str | Path) -> Direction:
    """Read a direction file: a probe (``.h5``), ``.npy`` or ``.safetensors`` (see the module
    docstring). Raises :class:`WorkbenchError` in one line for anything else."""
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise WorkbenchError(f"direction file not found: {path}")
    if path.is_dir():
        raise WorkbenchError(f"{path} is a folder, not a direction file")
    if suffix in (".h5", ".hdf5"):
        from probes.probe_file import load_probe

        probe = load_probe(path)
        dirs = probe.arrays["directions"].astype(np.float64)
        dirs = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True).clip(min=1e-30)
        layers = tuple(int(x) for x in probe.arrays["layers"])
        projections = {}
        if "contrast_projections" in probe.arrays and probe.arrays["contrast_projections"].ndim == 2 \
                and probe.arrays["contrast_projections"].shape[0] == len(layers):
            projections = {layer: probe.arrays["contrast_projections"][i] for i, layer in enumerate(layers)}
        return Direction(str(path), dirs.astype(np.float32), layers, str(probe.meta["hook"]), int(probe.meta["d_model"]), projections)
    if suffix == ".npy":
        try:
            v = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise WorkbenchError(f"{path}: not a readable .npy array ({str(e).splitlines()[0]})") from None
        if v.dtype.kind not in "fiu" or v.ndim not in (1, 2) or v.size == 0:
            raise WorkbenchError(f"{path}: a direction is a [d_model] or [n_layers, d_model] array of numbers, "
                                 f"not {v.dtype} {list(v.shape)}")
        v = v.astype(np.float32)
        if v.ndim == 1:
            return Direction(str(path), v[None], (None,), None, int(v.shape[0]))
        return Direction(str(path), v, tuple(range(v.shape[0])), None, int(v.shape[1]))
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix == ".gguf":
        raise WorkbenchError(f"{path}: repeng's .gguf export is not read; save the ControlVector's directions "
                             "with safetensors (safetensors.numpy.save_file({str(layer): v}))")
    if suffix in (".pt", ".pth", ".bin", ".pkl"):
        raise WorkbenchError(f"{path}: pickled tensors are never loaded; save the vector as .npy or .safetensors")
    raise WorkbenchError(f"{path}: a direction is a probe file (.h5), .npy or .safetensors, not {suffix or 'a file without a suffix'}")


def _read_safetensors(path: Path) -> Direction:
    """One tensor (``[d]`` or ``[n_layers, d]``), or one ``[d]`` tensor per layer named ``…{layer}``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise WorkbenchError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not tensors:
        raise WorkbenchError(f"{path}: holds no tensor")
    if len(tensors) == 1:
        (v,) = tensors.values()
        if v.dtype.kind not in "fiu" or v.ndim not in (1, 2) or v.size == 0:
            raise WorkbenchError(f"{path}: a direction is a [d_model] or [n_layers, d_model] tensor, not {list(v.shape)}")
        v = v.astype(np.float32)
        if v.ndim == 1:
            return Direction(str(path), v[None], (None,), None, int(v.shape[0]))
        return Direction(str(path), v, tuple(range(v.shape[0])), None, int(v.shape[1]))
    by_layer = {}
    for name, v in tensors.items():
        m = re.search(r"(\d+)$", name)
        if m is None or v.ndim != 1 or v.dtype.kind not in "fiu":
            raise WorkbenchError(f"{path}: several tensors must each be a [d_model] vector named by its layer "
                                 f"(e.g. 'direction.3' or '3'); {name!r} is {list(v.shape)}")
        by_layer[int(m.group(1))] = v.astype(np.float32)
    widths = {v.shape[0] for v in by_layer.values()}
    if len(widths) != 1:
        raise WorkbenchError(f"{path}: the per-layer vectors have different widths {sorted(widths)}")
    layers = tuple(sorted(by_layer))
    return Direction(str(path), np.stack([by_layer[i] for i in layers]), layers, None, widths.pop())


_SPEC = re.compile(r"^(?P<path>.+?)(?:@(?P<where>[^=@]+))?(?:=(?P<value>[^=@]*))?$")


@dataclass(frozen=True)
class Spec:
    """A parsed ``PATH@WHERE=VALUE`` (``WHERE``: a layer, ``all``, or ``blocks.L.HOOK``; ``VALUE``:
    a number, or ``pNN`` for a clamp)."""

    path: str
    where: str | None
    value: str | None


def parse_spec(text: str, option: str) -> Spec:
    """Split ``--steer``/``--ablate``/``--clamp``'s ``PATH@WHERE=VALUE``; ``option`` names the flag
    in errors."""
    m = _SPEC.match(text.strip())
    if not text.strip() or m is None or not m.group("path"):
        raise WorkbenchError(f"{option} takes FILE@LAYER=VALUE (e.g. fair.h5@3=4), not {text!r}")
    return Spec(m.group("path"), m.group("where"), m.group("value"))


def _where(spec: Spec, direction: Direction, option: str) -> tuple[str, Any]:
    """(hook, layers) named by ``spec.where``: the probe's hook (else resid_post) and its best layer
    when nothing is named."""
    hook = direction.hook or "hook_resid_post"
    where = spec.where
    if where is None:
        if direction.layers == (None,):
            raise WorkbenchError(f"{option} {spec.path}: name the layer (FILE@LAYER, FILE@all or FILE@blocks.L.HOOK)")
        if direction.hook is None:
            return hook, "all"
        from probes.probe_file import load_probe

        return hook, (load_probe(Path(spec.path)).best_layer,)
    if where == "all":
        return hook, "all"
    if where.isdigit():
        return hook, (int(where),)
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)", where)
    if m is None:
        raise WorkbenchError(f"{option} {spec.path}@{where}: the place is a layer number, 'all' or blocks.L.HOOK")
    if m.group(2) not in HOOKS:
        raise WorkbenchError(f"{option}: interventions act at {', '.join(HOOKS)}, not {m.group(2)!r}")
    return m.group(2), (int(m.group(1)),)


def _number(text: str | None, option: str, spec: Spec) -> float:
    if text is None or not text.strip():
        raise WorkbenchError(f"{option} {spec.path}: give the value after '=' (e.g. {spec.path}@{spec.where or 3}=4)")
    try:
        value = float(text)
    except ValueError:
        raise WorkbenchError(f"{option}: {text!r} is not a number") from None
    if not np.isfinite(value):
        raise WorkbenchError(f"{option}: {text!r} is not a finite number")
    return value


def from_spec(
    kind: str, text: str, n_layers: int | None = None, rounds: Sequence[int] | None = None, positions: str = "all",
    alpha: float | None = None,
) -> list[Intervention]:
    """The interventions a CLI flag names: ``kind`` ∈ steer | ablate | clamp, ``text`` =
    ``PATH@WHERE=VALUE``. A probe at ``all`` (or a per-layer vector file) gives one intervention per
    layer, each with its layer's direction; one vector at ``all`` acts at every layer
    (``n_layers`` needed then, to expand it when the file has per-layer vectors). ``alpha``
    replaces a steer's value (a sweep). Raises :class:`WorkbenchError` in one line."""
    option = f"--{kind}"
    spec = parse_spec(text, option)
    if kind == "ablate" and "," in spec.path and not Path(spec.path).exists():
        return _subspace(spec, text, n_layers, rounds, positions)
    direction = read_direction(Path(spec.path))
    hook, layers = _where(spec, direction, option)
    if kind == "steer":
        value = alpha if alpha is not None else _number(spec.value, option, spec)
    elif kind == "ablate":
        if spec.value not in (None, ""):
            raise WorkbenchError(f"{option} takes FILE@LAYER with no value, not {text!r}")
        value = 0.0
    elif kind == "clamp":
        value = None  # per layer below (a percentile differs by layer)
    else:
        raise AssertionError(kind)
    if layers == "all":
        layers = [x for x in direction.layers if x is not None] or "all"
    if layers != "all" and n_layers is not None and max(layers) >= n_layers:
        raise WorkbenchError(f"{option} {text}: layer {max(layers)} is out of range (the model has layers 0..{n_layers - 1})")
    made: list[Intervention] = []
    groups = [("all", direction.vectors[0])] if layers == "all" else [((layer,), direction.at(layer)) for layer in layers]
    for where, vector in groups:
        label = f"{Path(spec.path).name}@{'all' if where == 'all' else where[0]}"
        common = dict(layers=where, hook=hook, rounds=rounds, positions=positions, label=label)
        if kind == "steer":
            made.append(Steer(vector, alpha=value, **common))
        elif kind == "ablate":
            made.append(Ablate(vector, **common))
        else:
            made.append(Clamp(vector, value=_clamp_value(spec, direction, where, option), **common))
    return made


def _subspace(spec: Spec, text: str, n_layers: int | None, rounds: Sequence[int] | None, positions: str) -> list[Intervention]:
    """``--ablate A.h5,B.h5,…@WHERE``: at each layer, one :class:`Ablate` of the subspace the files'
    directions at that layer span (orthonormalised); the files must name the same hook, and ``all``
    means the layers every file has."""
    paths = [p.strip() for p in spec.path.split(",") if p.strip()]
    if spec.value not in (None, ""):
        raise WorkbenchError(f"--ablate takes FILES@LAYER with no value, not {text!r}")
    directions = [read_direction(Path(p)) for p in paths]
    places = [_where(Spec(p, spec.where, None), d, "--ablate") for p, d in zip(paths, directions)]
    hooks = {hook for hook, _ in places}
    if len(hooks) > 1:
        raise WorkbenchError(f"--ablate {text}: the files' directions are at different hooks ({', '.join(sorted(hooks))}); "
                             "name one with @blocks.L.HOOK")
    layer_sets = [set(d.layers) - {None} if where == "all" else set(where) for d, (_, where) in zip(directions, places)]
    if any(not s for s in layer_sets):  # a single vector at `all`
        raise WorkbenchError(f"--ablate {text}: a subspace needs per-layer directions or a named layer")
    layers = sorted(set.intersection(*layer_sets))
    if not layers:
        raise WorkbenchError(f"--ablate {text}: the files share no layer")
    if n_layers is not None and layers[-1] >= n_layers:
        raise WorkbenchError(f"--ablate {text}: layer {layers[-1]} is out of range (the model has layers 0..{n_layers - 1})")
    label, hook = "+".join(Path(p).name for p in paths), hooks.pop()
    return [Ablate(np.stack([d.at(layer) for d in directions]), layers=(layer,), hook=hook, rounds=rounds, positions=positions,
                   label=f"{label}@{layer}") for layer in layers]


def _clamp_value(spec: Spec, direction: Direction, where: Any, option: str) -> float:
    """A clamp's number, or ``pNN``: the NN-th percentile of the probe's contrast-set projections at
    the layer (refused when the probe file has none)."""
    text = (spec.value or "").strip()
    if not text.lower().startswith("p"):
        return _number(text, option, spec)
    try:
        q = float(text[1:])
    except ValueError:
        raise WorkbenchError(f"{option}: {text!r} is neither a number nor a percentile pNN") from None
    if not 0 <= q <= 100:
        raise WorkbenchError(f"{option}: percentile {text!r} must lie in p0..p100")
    layer = None if where == "all" else where[0]
    if layer is None or layer not in direction.contrast_projections:
        raise WorkbenchError(f"{option} {spec.path}: {text} needs the probe's contrast-set projections, which this "
                             "file does not hold; give the value as a number")
    return float(np.percentile(direction.contrast_projections[layer], q))




def interventions_from_options(
    steer: Sequence[str] = (), ablate: Sequence[str] = (), clamp: Sequence[str] = (), rounds: str | None = None,
    positions: str = "all", control: str | None = None, control_seed: int = 0, alpha: float | None = None,
) -> tuple[Intervention, ...]:
    """The interventions ``workbench run``'s flags name, in the order steer, ablate, clamp
    (``rounds``: ``--steer-rounds``; ``alpha`` replaces every steer's value, for a sweep).
    ``control="random"``: each replaced by :func:`~workbench.engine.interventions.random_control`
    with seed ``control_seed + i`` (i: its place in the list). Raises :class:`WorkbenchError`."""
    from workbench.engine.interventions import parse_rounds, random_control

    if positions not in ("all", "prompt", "response"):
        raise WorkbenchError(f"--steer-positions must be prompt, response or all, not {positions!r}")
    if control not in (None, "random"):
        raise WorkbenchError(f"--control takes 'random', not {control!r}")
    picked = parse_rounds(rounds)
    made: list[Intervention] = []
    for kind, specs in (("steer", steer), ("ablate", ablate), ("clamp", clamp)):
        for text in specs:
            made += from_spec(kind, text, rounds=picked, positions=positions, alpha=alpha if kind == "steer" else None)
    if control == "random":
        if not made:
            raise WorkbenchError("--control random needs an intervention to control (--steer, --ablate or --clamp)")
        made = [random_control(iv, control_seed + i) for i, iv in enumerate(made)]
    elif rounds is not None and not made:
        raise WorkbenchError("--steer-rounds needs --steer, --ablate or --clamp")
    return tuple(made)
