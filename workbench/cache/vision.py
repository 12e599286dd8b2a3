"""Exporting a vision-language model's vision tower and projector hooks: one row per image patch
(role ``image``, round 0), computed through the bridge with the run's pictures (docs/CACHE.md)."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from workbench.cache.file import ROLES, TokenTable, is_attention_map
from workbench.engine.images import image_inputs
from workbench.errors import WorkbenchError
from workbench.cache.hooks import listing_pass, torch_dtype
from workbench.cache.plan import ExportPlan, RunTokens, plan_export


# --------------------------------------------------------------------------- hooks


def vision_patches(model: Any, hooks: list[str]) -> dict[str, int]:
    """Rows per image of each vision hook in ``hooks`` (the tower's patches, a CLS token included
    where the tower has one; the projector's image tokens), from one listing pass."""
    import torch

    tokens, pixels, _ = listing_pass(model)
    rows: dict[str, int] = {}
    fwd = [(h, functools.partial(lambda n, act, hook: rows.__setitem__(n, int(act.shape[2 if is_attention_map(n) else 1])), h))
           for h in hooks]
    with warnings.catch_warnings(), torch.no_grad(), model.bridge.hooks(fwd_hooks=fwd):
        warnings.simplefilter("ignore")
        model.bridge(tokens, return_type=None, **pixels)
    return rows


def vision_activations(model: Any, images: list[Any], hooks: list[str], dtype: str, n_rows: int) -> dict[str, np.ndarray]:
    """The vision hooks' values for a batch of pictures, through the bridge (one pass of the
    processor's image placeholder with each picture) → ``{hook: [B · n_rows, *per_patch]}`` in
    ``dtype``, the pictures in order, each picture's ``n_rows`` patches in order; attention maps
    ``[B · n_rows, n_heads, n_rows]``."""
    import torch

    processor = model.processor
    placeholder = getattr(processor, "boi_token", None) or processor.image_token
    enc = processor(text=[placeholder] * len(images), images=[[im] for im in images], add_special_tokens=False,
                    padding=True, return_tensors="pt")
    ids = enc["input_ids"].to(model.device)
    pixels = image_inputs(model, images, ids)
    got: dict[str, np.ndarray] = {}
    out_dtype = torch_dtype(dtype)

    def keep(name: str, act: torch.Tensor, hook: Any) -> None:
        rows = act.transpose(1, 2) if is_attention_map(name) else act  # [B, patch, ...]
        got[name] = rows.reshape(-1, *rows.shape[2:]).to(out_dtype).cpu().numpy()

    fwd = [(h, functools.partial(keep, h)) for h in hooks]
    with torch.no_grad(), model.bridge.hooks(fwd_hooks=fwd):
        model.bridge(ids, return_type=None, attention_mask=enc["attention_mask"].to(model.device), **pixels)
    for name, value in got.items():
        if len(value) != len(images) * n_rows:
            raise WorkbenchError(f"{name}: {len(value)} rows for {len(images)} pictures, expected {n_rows} each")
    return got


def plan_vision_export(run: RunTokens, run_path: Path, hooks: list[str], rows: list[int] | None, rounds: list[int] | None,
                       roles: list[str], dtype: str, batch_size: int, n_rows: int) -> tuple[ExportPlan, list[np.ndarray]]:
    """An export of vision hooks: its rows are each picture's ``n_rows`` patches (role ``image``,
    round 0, position = the patch's index), so the selection must keep round 1 and the role image."""
    if run.images is None:
        raise WorkbenchError(f"{hooks[0]} is a vision hook, but {run_path} is not a vision-language run")
    if "image" not in roles or (rounds is not None and 0 not in rounds):
        raise WorkbenchError("vision hooks are exported per image patch (role image, round 1): add image to --roles "
                             "and round 1 to --rounds")
    plan, _ = plan_export(run, run_path, hooks, rows, None, ["image"], dtype, batch_size)
    chosen = [np.arange(n_rows) for _ in plan.rows]
    batch_tokens = [n_rows * len(plan.batch_rows(k)) for k in range(plan.n_batches)]
    return dataclasses.replace(plan, rounds=[0], roles=["image"], key_length=n_rows, batch_tokens=batch_tokens), chosen


def patch_table(plan: ExportPlan, n_rows: int) -> TokenTable:
    """The token table of a vision export: ``n_rows`` patch rows per picture (no token ids)."""
    n = len(plan.rows)
    return TokenTable(
        offsets=(np.arange(n + 1) * n_rows).astype(np.int64), sample=np.repeat(np.asarray(plan.rows, dtype=np.int32), n_rows),
        round=np.zeros(n * n_rows, dtype=np.int16), role=np.full(n * n_rows, ROLES.index("image"), dtype=np.uint8),
        position=np.tile(np.arange(n_rows, dtype=np.int32), n), token_id=np.full(n * n_rows, -1, dtype=np.int32),
        token_str=[f"patch {j}" for j in range(n_rows)] * n,
    )
