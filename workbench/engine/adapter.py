"""``--adapter DIR``: a LoRA adapter (peft's own format) applied to a model after it loads.

One function loads an adapter for every command that loads a model (``run``, ``probe fit``/``track``,
``export``, ``tui --live``): :func:`apply_adapter`. The adapter's low-rank update is **merged into the
loaded weights** (``W ← W + B·A·scale``, peft's ``merge_and_unload``), so the model that runs is a
plain Hugging Face model again: generation keeps its KV cache, capture keeps its module boundaries,
and the TransformerLens bridge, which shares ``hf``'s parameter tensors (:mod:`workbench.engine.models`),
sees the merged weights under the base model's own hook names (``blocks.{i}.hook_resid_post`` …).
A run with ``--adapter`` therefore computes what a run of the merged model folder
(``workbench finetune --merge``) computes, to float rounding.

What an adapter is checked for, in one line each (:class:`WorkbenchError`): before the model loads
(:func:`check_adapter`, no torch): a folder with peft's ``adapter_config.json`` and weights, a LoRA
adapter, and — when ``workbench finetune`` made it — the base model's shape (model type, width,
layers, vocabulary) equal to the model's; after it loads (:func:`apply_adapter`): every adapted module
exists in the model with the adapter's input and output widths.

The run file records ``adapter`` = ``{"path", "sha256", "config_sha256", "base_model"}`` (``{}``
without one); ``--resume`` refuses a run made with another adapter (:func:`check_resume_adapter`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
RECORD = "finetune.json"  # what `workbench finetune` writes beside the adapter (workbench.analysis.finetune)
SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")  # a base model's shape, as config.json names it


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def model_shape(config: dict[str, Any]) -> dict[str, Any]:
    """``{model_type, hidden_size, num_hidden_layers, vocab_size}`` of a ``config.json`` dict (the keys
    it has; a multimodal config's ``text_config`` fills the ones it lacks)."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    return {k: config.get(k, text.get(k)) for k in SHAPE_KEYS if config.get(k, text.get(k)) is not None}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"{what}: {path.name} is not readable JSON ({e})") from None
    if not isinstance(value, dict):
        raise WorkbenchError(f"{what}: {path.name} is not a JSON object")
    return value


def weights_file(folder: Path) -> Path | None:
    """The adapter's weight file in ``folder`` (safetensors first), or None."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return folder / name
    return None


def check_adapter(path: str | Path, model_path: str | None = None, option: str = "--adapter") -> dict[str, Any]:
    """Check an adapter folder without importing torch and return what a run records about it:
    ``{"path": resolved folder, "sha256": of the weights, "config_sha256": of adapter_config.json,
    "base_model": peft's base_model_name_or_path}``. With ``model_path`` (a local model folder), an
    adapter made by ``workbench finetune`` must have been made for a model of the same shape."""
    folder = Path(path).expanduser()
    what = f"{option} {path}"
    if not folder.exists():
        raise WorkbenchError(f"{what}: no such folder")
    if not folder.is_dir():
        raise WorkbenchError(f"{what}: not a folder (an adapter is a folder with {ADAPTER_CONFIG})")
    if not (folder / ADAPTER_CONFIG).is_file():
        if (folder / "config.json").is_file():
            raise WorkbenchError(f"{what}: a model folder, not an adapter (a merged model runs with --model {path})")
        raise WorkbenchError(f"{what}: no {ADAPTER_CONFIG} (not a peft adapter, or a fine-tune that did not finish)")
    config = _read_json(folder / ADAPTER_CONFIG, what)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise WorkbenchError(f"{what}: a {config.get('peft_type') or 'unknown'} adapter; the workbench applies LoRA adapters")
    weights = weights_file(folder)
    if weights is None:
        raise WorkbenchError(f"{what}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights.suffix == ".safetensors":
        adapter_shapes(weights, what)  # a damaged header fails here, before the model loads
    if model_path is not None and (folder / RECORD).is_file() and (Path(model_path) / "config.json").is_file():
        made_for = _read_json(folder / RECORD, what).get("base_shape") or {}
        ours = model_shape(_read_json(Path(model_path) / "config.json", f"--model {model_path}"))
        differ = [k for k in SHAPE_KEYS if k in made_for and k in ours and made_for[k] != ours[k]]
        if differ:
            k = differ[0]
            raise WorkbenchError(f"{what} was made for another model: its base has {k} {made_for[k]}, "
                                 f"the model {model_path} has {ours[k]}")
    return {"path": str(folder.resolve()), "sha256": sha256_file(weights), "config_sha256": sha256_file(folder / ADAPTER_CONFIG),
            "base_model": str(config.get("base_model_name_or_path") or "")}


def adapter_shapes(weights: Path, what: str = "--adapter") -> dict[str, list[int]]:
    """``{tensor name: shape}`` from a safetensors file's header (no tensor is read)."""
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise WorkbenchError(f"{what}: {weights.name} is damaged (not a safetensors file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WorkbenchError(f"{what}: {weights.name} is damaged (its header is not JSON)") from None
    return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def check_fits(hf: Any, folder: Path, what: str = "--adapter") -> None:
    """Refuse, in one line, an adapter whose modules are not in ``hf`` or whose LoRA matrices have
    other widths than those modules (``lora_A``: ``[r, in_features]``, ``lora_B``: ``[out_features, r]``)."""
    weights = weights_file(folder)
    if weights is None or weights.suffix != ".safetensors":
        return
    shapes = adapter_shapes(weights, what)
    found: list[tuple[str, Any, int, list[int]]] = []
    for key, shape in sorted(shapes.items()):  # every module first, then every width
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part in key:
                module = key.split(part)[0].removeprefix("base_model.model.")
                try:
                    found.append((module, hf.get_submodule(module), dim, shape))
                except AttributeError:
                    raise WorkbenchError(f"{what} was made for another model: it adapts {module}, which this model "
                                         f"({type(hf).__name__}) does not have") from None
    for module, layer, dim, shape in found:
        want = getattr(layer, "in_features" if dim == 1 else "out_features", None)
        if want is not None and len(shape) == 2 and shape[dim] != want:
            side, part = ("input", "lora_A") if dim == 1 else ("output", "lora_B")
            raise WorkbenchError(f"{what} was made for another width: {module} has {side} width {want} here, "
                                 f"the adapter's {part} expects {shape[dim]}")


def quiet_peft() -> None:
    """Silence the FutureWarning peft 0.21 triggers in transformers 5 (``is_gradient_checkpointing``)
    at every wrap: it is about peft's code, not the user's."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def apply_adapter(model: Any, adapter: str | Path | None) -> Any:
    """The :class:`~workbench.engine.models.LoadedModel` ``model`` with the LoRA adapter in folder
    ``adapter`` merged into its weights (see the module docstring), ``adapter`` recorded in its
    metadata; ``model`` itself when ``adapter`` is None. The merge is in place: the returned model
    shares (and ``model`` now holds) the adapted weights."""
    if adapter is None:
        return model
    info = check_adapter(adapter, model.path if Path(model.path).is_dir() else None)
    folder = Path(info["path"])
    placed = (model.placement or {}).get("placed") or {}
    if "disk" in placed.values():
        raise WorkbenchError("--adapter with modules offloaded to disk by --device-map: their weights cannot be merged in place; "
                             "write a merged model with `workbench finetune --merge` (or peft's merge_and_unload) and run it with --model")
    check_fits(model.hf, folder)
    try:
        from peft import PeftModel
    except ImportError:
        raise WorkbenchError("--adapter needs the peft package (pip install peft)") from None
    import torch

    quiet_peft()
    with torch.no_grad():
        wrapped = PeftModel.from_pretrained(model.hf, str(folder), is_trainable=False)
        hf = wrapped.merge_and_unload()  # the base modules again, W + BA·scale written into their (shared) tensors
    return replace(model, hf=hf.eval(), adapter=info)


def check_resume_adapter(path: Path, settings: dict[str, Any]) -> None:
    """Refuse ``--resume`` of a run made with another adapter (or with one when none is given now, or
    the reverse): the adapters are compared by the sha256 of their weights, so a moved folder is fine."""
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        raw = run.f.attrs.get("adapter")
    raw = raw.decode() if isinstance(raw, bytes) else raw
    have = json.loads(raw) if isinstance(raw, str) and raw else {}
    want = settings.get("adapter") or {}
    if have.get("sha256") != want.get("sha256"):
        def name(a: dict[str, Any]) -> str:
            return f"{a['path']} (sha256 {a['sha256'][:12]})" if a else "no adapter"

        raise WorkbenchError(f"--resume: {path} was made with {name(have)}, not {name(want)}")
