"""Residual-stream activations of texts at one hook, every chosen layer, in one pass per batch."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from workbench.engine.capture import capture_pooled, hook_sites
from workbench.engine.generation import pad

TEXT_POSITIONS = ("last", "mean")


def text_activations(
    model: Any,
    token_ids: list[list[int]],
    hook: str,
    layers: list[int],
    position: str = "last",
    batch_size: int = 64,
    on_batch: Callable[[int], None] | None = None,
    images: list[str] | None = None,
) -> torch.Tensor:
    """Pooled activations of each text: ``[n_layers, n, d_model]`` float32.

    ``position`` is ``last`` (the last token) or ``mean`` (the mean over all tokens). Texts are
    sorted by length into batches, so little padding is computed; the output keeps input order.
    ``images``: one picture path per text (a vision-language model; the texts hold its image tokens).
    """
    if position not in TEXT_POSITIONS:
        raise ValueError(f"position must be one of {TEXT_POSITIONS}")
    which = TEXT_POSITIONS.index(position)
    sites = hook_sites(model, [hook], layers)
    order = np.argsort([len(t) for t in token_ids], kind="stable")
    out = torch.empty((len(layers), len(token_ids), model.d_model))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        seqs = [token_ids[i] for i in rows]
        ids, _ = pad(seqs, model.tokenizer.pad_token_id, model.device, "right")
        lengths = torch.tensor([len(s) for s in seqs])
        spans = torch.stack([torch.zeros_like(lengths), lengths, torch.zeros_like(lengths), lengths], -1)[:, None, :]
        pixels = {}
        if images is not None:
            from workbench.engine.images import image_inputs, load_image

            pixels = image_inputs(model, [load_image(images[i]) for i in rows], ids)
        acts = capture_pooled(model.hf, ids, spans.to(model.device), sites, **pixels)[hook]  # [b, 1, 2, L, d]
        out[:, torch.from_numpy(rows)] = acts[:, 0, which].permute(1, 0, 2)
        if on_batch is not None:
            on_batch(len(rows))
    return out
