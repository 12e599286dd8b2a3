"""Capturing the residual stream through TransformerLens hook points.

A hook is named the TransformerLens way without its block, e.g. ``hook_resid_post``; it is
captured at every chosen layer (``blocks.{i}.hook_resid_post``). Hooks pool as they fire, so a
pass keeps ``[batch, n_pools, d_model]`` per layer instead of ``[batch, pos, d_model]``.

Pools are rows of a weight matrix over positions: the last prompt token of a round is a one-hot
row, the mean over a round's response is a row of 1/len over its span. One einsum per hook and
layer turns the activation into every pool at once.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import einops
import torch

from workbench.errors import WorkbenchError

POSITIONS = ("last_prompt", "response_mean")
DEFAULT_HOOKS = ("hook_resid_post",)


def hook_point_names(bridge: Any, hook: str, layers: list[int]) -> list[str]:
    """``blocks.{i}.{hook}`` for each layer, checked against the bridge's hook points."""
    names = [f"blocks.{i}.{hook}" for i in layers]
    missing = [n for n in names if n not in bridge.hook_dict]
    if missing:
        known = sorted({k.split(".", 2)[2] for k in bridge.hook_dict if k.startswith("blocks.0.")})
        raise WorkbenchError(f"unknown hook {hook!r} (hooks of block 0: {', '.join(known)})")
    return names


def check_layers(layers: list[int] | None, n_layers: int) -> list[int]:
    """All layers when ``layers`` is None; otherwise the given ones, checked to be in range."""
    if layers is None:
        return list(range(n_layers))
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise WorkbenchError(f"layer {bad[0]} is out of range (the model has layers 0..{n_layers - 1})")
    return sorted(set(layers))


@contextmanager
def hooked(bridge: Any, fwd_hooks: list[tuple[str, Callable]]) -> Iterator[None]:
    """Attach forward hooks to bridge hook points for the duration of the block; removes only them."""
    with bridge.hooks(fwd_hooks=fwd_hooks):
        yield


def pool_weights(spans: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Pooling rows for every round's two positions.

    spans ``[batch, rounds, 4]`` = (prompt_start, prompt_end, response_start, response_end) token
    offsets in the transcript → weights ``[batch, rounds * 2, seq_len]``: row 2t is the last prompt
    token of round t, row 2t+1 the mean over round t's response (all zero when it is empty, which
    the caller turns into NaN).
    """
    batch, rounds, _ = spans.shape
    pos = torch.arange(seq_len, device=spans.device)
    last = (pos[None, None, :] == (spans[..., 1:2] - 1)).float()
    in_resp = ((pos[None, None, :] >= spans[..., 2:3]) & (pos[None, None, :] < spans[..., 3:4])).float()
    mean = in_resp / in_resp.sum(-1, keepdim=True).clamp(min=1)
    return torch.stack([last, mean], dim=2).reshape(batch, rounds * 2, seq_len)


@torch.no_grad()
def capture_pooled(
    bridge: Any,
    tokens: torch.Tensor,
    spans: torch.Tensor,
    hooks: list[str],
    layers: list[int],
) -> dict[str, torch.Tensor]:
    """One hooked forward over right-padded transcripts, pooled per round.

    tokens ``[batch, seq]`` (right-padded; causal attention keeps pads out of real positions),
    spans ``[batch, rounds, 4]`` → ``{hook: [batch, rounds, 2, n_layers, d_model]}`` in float32,
    the 2 positions being ``POSITIONS``. A round with an empty response gets NaN in its mean.
    The pass stops after the last chosen layer: no unembedding is computed.
    """
    batch, seq = tokens.shape
    rounds = spans.shape[1]
    weights = pool_weights(spans, seq)
    pooled: dict[tuple[str, int], torch.Tensor] = {}

    def pool(act: torch.Tensor, hook: Any, key: tuple[str, int]) -> torch.Tensor:
        pooled[key] = einops.einsum(weights.to(act.device), act.float(), "b p t, b t d -> b p d")
        return act

    fwd = [
        (name, functools.partial(pool, key=(h, j)))
        for h in hooks
        for j, name in enumerate(hook_point_names(bridge, h, layers))
    ]
    with hooked(bridge, fwd):
        bridge(tokens, return_type=None, stop_at_layer=max(layers) + 1)
    empty = spans[..., 3] <= spans[..., 2]  # [batch, rounds]
    result = {}
    for h in hooks:
        stacked = torch.stack([pooled[(h, j)] for j in range(len(layers))], dim=2)  # [batch, rounds*2, L, d]
        stacked = stacked.reshape(batch, rounds, 2, len(layers), -1)
        stacked[:, :, 1][empty] = float("nan")
        result[h] = stacked.cpu()
    return result
