"""Which hooks a model has (the bridge's names, their per-token shapes, legacy aliases), how a pattern picks
them, and which Hugging Face module each one observes. A vision-language model's tower and projector hooks
are told apart by name (:func:`is_vision_hook`)."""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from typing import Any


from workbench.cache.file import is_attention_map
from workbench.engine.images import image_inputs
from workbench.errors import WorkbenchError


VISION_PREFIXES = ("vision_encoder.", "vision_projector.")  # the bridge's names of a VLM's tower and projector


def is_vision_hook(name: str) -> bool:
    """Whether a hook belongs to a VLM's vision tower or projector: its rows are an image's patches
    (or the projector's image tokens), not the transcript's positions."""
    return name.startswith(VISION_PREFIXES)


def listing_pass(model: Any) -> tuple[Any, dict[str, Any], int]:
    """``(ids [batch, seq], forward keywords, seq)`` of the short pass that lists the hooks: a short
    text twice (batch 2, so a value the batch shares is told from a per-token one), and for a VLM the
    processor's image placeholder with a grey picture before it (batch 1)."""
    import torch

    if not getattr(model, "vision", False):
        seq = 5
        tokens = torch.tensor([model.tokenizer("hooks are listed from one short pass")["input_ids"][:seq]] * 2, device=model.device)
        return tokens, {}, int(tokens.shape[1])
    from PIL import Image

    processor = model.processor
    placeholder = getattr(processor, "boi_token", None) or processor.image_token
    size = getattr(processor.image_processor, "crop_size", None) or getattr(processor.image_processor, "size", None) or {}
    side = int(size.get("height") or size.get("shortest_edge") or 224) if isinstance(size, dict) else 224
    grey = Image.new("RGB", (side, side), (128, 128, 128))
    enc = processor(text=[placeholder + " hooks are listed"], images=[[grey]], add_special_tokens=False, return_tensors="pt")
    ids = enc["input_ids"].to(model.device)
    return ids, image_inputs(model, [grey], ids), int(ids.shape[1])


def available_hooks(model: Any) -> dict[str, tuple[int, ...]]:
    """Every bridge hook that fires in a forward pass with one float value per position →
    its per-token shape (``(d_model,)``, ``(n_heads, d_head)``; attention maps ``(n_heads, 0)``,
    the key axis filled in later). From one bridge pass on a short text (a VLM's: with a picture).
    A VLM's vision hooks (:func:`is_vision_hook`) are listed per image patch: the shape of one
    patch's value, the patches per image in :func:`vision_patches`."""
    import torch

    tokens, pixels, seq = listing_pass(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: True, return_type=None, **pixels)
    found = {}
    for name, value in cache.items():
        if not value.is_floating_point() or value.ndim < 2:
            continue
        if is_vision_hook(name):
            if is_attention_map(name) and value.ndim == 4 and value.shape[2] == value.shape[3]:
                found[name] = (int(value.shape[1]), 0)
            elif value.ndim >= 3 and value.shape[0] == 1 and not is_attention_map(name):
                found[name] = tuple(int(x) for x in value.shape[2:])
            continue
        if value.shape[0] != tokens.shape[0]:  # shared by the batch (rotary tables [1, pos, d]): not per token
            continue
        if is_attention_map(name):
            if value.ndim == 4 and value.shape[2] == value.shape[3] == seq:
                found[name] = (int(value.shape[1]), 0)
        elif value.shape[1] == seq:
            found[name] = tuple(int(x) for x in value.shape[2:])
    return found


def resolve_hooks(patterns: list[str], available: dict[str, tuple[int, ...]]) -> list[str]:
    """The hook names matched by glob ``patterns``, in the bridge's order. A pattern matching
    nothing raises one line naming the nearest valid names first."""
    if not patterns:
        raise WorkbenchError("--hooks is required, e.g. --hooks 'blocks.*.hook_resid_post' (workbench export RUN --list-hooks lists them)")
    names = list(available)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            nearest = difflib.get_close_matches(pattern, names, n=len(names), cutoff=0.0)
            shown = ", ".join(nearest[:12]) + (f", … ({len(names)} in all; --list-hooks lists them)" if len(nearest) > 12 else "")
            raise WorkbenchError(f"unknown hook {pattern!r}: it matches none of the model's hooks (nearest: {shown})")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def hook_aliases(model: Any) -> dict[str, str]:
    """alias → canonical name of every bridge hook name that is another name of a hook point:
    TransformerLens 4 keeps the legacy names (``blocks.0.hook_resid_post``, ``blocks.0.attn.hook_z``)
    as aliases of its own (``blocks.0.hook_out``, ``blocks.0.attn.o.hook_in``); both fire with one tensor."""
    out = {}
    for name, point in model.bridge.hook_dict.items():
        canonical = getattr(point, "name", None)
        if isinstance(canonical, str) and canonical and canonical != name:
            out[name] = canonical
    return out


def drop_aliases(names: list[str], aliases: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``names`` without each alias whose canonical hook is chosen too (the same values twice) →
    (kept names, {dropped alias: its canonical name})."""
    chosen = set(names)
    dropped = {n: aliases[n] for n in names if aliases.get(n) in chosen}
    return [n for n in names if n not in dropped], dropped


BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hf_sites(model: Any, hooks: list[str]) -> dict[str, Any] | None:
    """hook name → :class:`workbench.engine.capture.HookSite` on the plain HF model, when every hook is
    at a module boundary whose value equals the bridge's; None when one is not (the bridge pass)."""
    from workbench.engine.capture import hook_sites

    by_hook: dict[str, list[int]] = {}
    for name in hooks:
        m = BLOCK_HOOK.match(name)
        if m is None or is_attention_map(name):
            return None
        by_hook.setdefault(m.group(2), []).append(int(m.group(1)))
    sites = {}
    for hook, layers in by_hook.items():
        try:
            for site in hook_sites(model, [hook], sorted(layers)):
                sites[f"blocks.{site.layer}.{hook}"] = site
        except WorkbenchError:
            return None
    return sites


# --------------------------------------------------------------------------- one batch


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)
