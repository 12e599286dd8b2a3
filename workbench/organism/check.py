"""Measuring an organism checkpoint against the exact answers of its world.

Two measurements:

* **fidelity** on held-out dialogues drawn from the world, teacher-forced: at every assistant turn the
  model's option distribution (softmax of the three letter logits at the answer position) against the
  exact predictive given the prefix and the turn's opener, plus the same for the opener word at the
  ``<assistant>`` position. The two reference predictors (exact Bayes ignoring instructions, ignoring
  previous answers) are scored the same way, so the table shows what each kind of evidence is worth.
* **self-correction**: the model answers for itself, greedily, through the built-in organism protocols;
  per round the exact p(fair) of the prefix it built, its accuracy and its option entropy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError
from workbench.engine.uncertainty import distribution_entropy as entropy
from workbench.organism.posterior import dialogue_trace
from workbench.organism.tokenizer import ASSISTANT, render
from workbench.organism.world import (
    DEFAULT_PARAMS,
    LETTER_TOKENS,
    Dialogue,
    WorldParams,
    heldout_rng,
    sample_dialogue,
    swap_sides,
)

CHECK_SEED = 4321  # held-out dialogues of `organism check` and of the tests


def checkpoint_meta(path: Path | None = None) -> tuple[WorldParams, dict[str, Any]]:
    """``(world params, organism.json)`` of a checkpoint folder (default: the shipped one)."""
    from workbench.organism import organism_path

    path = Path(path) if path is not None else organism_path()
    meta_file = path / "organism.json"
    if not (path / "config.json").is_file() or not meta_file.is_file():
        raise WorkbenchError(f"not an organism checkpoint (no config.json or organism.json): {path}")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    return WorldParams.from_dict(meta["world"]), meta


def load_checkpoint(path: Path | None = None) -> tuple[Any, Any, WorldParams, dict[str, Any]]:
    """``(model, tokenizer, world params, organism.json)`` of a checkpoint folder (default: the shipped one)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from workbench.organism import organism_path

    path = Path(path) if path is not None else organism_path()
    params, meta = checkpoint_meta(path)
    model = LlamaForCausalLM.from_pretrained(path)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, params, meta


def heldout_dialogues(n: int, seed: int = CHECK_SEED, params: WorldParams = DEFAULT_PARAMS) -> list[Dialogue]:
    """``n`` dialogues drawn from the world on the held-out stream (disjoint from training)."""
    return [sample_dialogue(heldout_rng(seed, i), params) for i in range(n)]


@dataclass(frozen=True)
class Scored:
    """Per assistant turn of a set of dialogues (M turns in all)."""

    model_options: np.ndarray  # [M, 3] model option distribution at the answer position
    exact_options: np.ndarray  # [M, 3] exact predictive given prefix and opener
    no_instructions: np.ndarray  # [M, 3] exact Bayes ignoring the instructions
    no_answers: np.ndarray  # [M, 3] exact Bayes ignoring previous assistant turns
    model_openers: np.ndarray  # [M, n_openers] model distribution over openers (renormalised)
    exact_openers: np.ndarray  # [M, n_openers]
    exact_p_fair: np.ndarray  # [M] at the last prompt token
    round_index: np.ndarray  # [M] 0-based round of the turn


def _letter_and_opener_ids(tokenizer: Any, params: WorldParams) -> tuple[list[int], list[int]]:
    letters = tokenizer.convert_tokens_to_ids(list(LETTER_TOKENS))
    openers = tokenizer.convert_tokens_to_ids(list(params.openers_fair + params.openers_biased))
    return letters, openers


def add_answer_rows(cols: dict[str, list], logp: np.ndarray, chunk: list[Dialogue], ids: list[list[int]], assistant_id: int,
                    letters: list[int], openers: list[int], params: WorldParams) -> None:
    """Append to ``cols`` one row per assistant turn of each dialogue in ``chunk``: the model's answer
    and opener distributions read from ``logp`` ``[batch, pos, vocab]`` (the letter is predicted at the
    assistant token + 4: ``<assistant> opener the answer is (x)``) beside the exact ones, the two
    ablated references, the exact p(fair) and the round index."""
    for j, d in enumerate(chunk):
        exact = dialogue_trace(d, params)
        refs = (dialogue_trace(d, params, use_instructions=False), dialogue_trace(d, params, use_answers=False))
        starts = [i for i, t in enumerate(ids[j]) if t == assistant_id]
        for t, pos in enumerate(starts):
            cols["model_options"].append(_renorm(logp[j, pos + 4, letters]))
            cols["model_openers"].append(_renorm(logp[j, pos, openers]))
            cols["exact_options"].append(exact.option_probs[t])
            cols["no_instructions"].append(refs[0].option_probs[t])
            cols["no_answers"].append(refs[1].option_probs[t])
            cols["exact_openers"].append(exact.opener_probs[t])
            cols["exact_p_fair"].append(exact.p_fair[t])
            cols["round_index"].append(t)


def score_dialogues(model: Any, tokenizer: Any, dialogues: list[Dialogue], params: WorldParams = DEFAULT_PARAMS, batch_size: int = 64,
                    on_batch: Callable[[int], None] | None = None) -> Scored:
    """Teacher-forced forward passes over ``dialogues``; the distributions of every assistant turn.
    ``on_batch(k)`` is told after each batch of ``k`` dialogues (a progress display)."""
    import torch

    letters, openers = _letter_and_opener_ids(tokenizer, params)
    assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT)
    cols: dict[str, list] = {k: [] for k in Scored.__dataclass_fields__}
    for start in range(0, len(dialogues), batch_size):
        chunk = dialogues[start : start + batch_size]
        ids = tokenizer([render(d.messages()) for d in chunk], add_special_tokens=False).input_ids
        width = max(len(x) for x in ids)
        x = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, r in enumerate(ids):
            x[j, : len(r)] = torch.tensor(r)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1).numpy()
        add_answer_rows(cols, logp, chunk, ids, assistant_id, letters, openers, params)
        if on_batch is not None:
            on_batch(len(chunk))
    return Scored(**{k: np.asarray(v) for k, v in cols.items()})


def _renorm(logp: np.ndarray) -> np.ndarray:
    p = np.exp(logp - logp.max())
    return p / p.sum()


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p ‖ q) in nats, shape [M]."""
    p = np.clip(p, 1e-12, 1.0)
    q = np.clip(q, 1e-12, 1.0)
    return (p * (np.log(p) - np.log(q))).sum(-1)


def fidelity_rows(s: Scored) -> list[dict[str, float | str]]:
    """One row per predictor (model, the two references): mean KL from the exact predictive, Pearson r
    of entropies, agreement of the most likely option; plus the model's opener KL."""
    h_exact = entropy(s.exact_options)
    rows = []
    for name, pred in (("organism model", s.model_options), ("Bayes, no instructions", s.no_instructions), ("Bayes, no answers", s.no_answers)):
        rows.append(
            {
                "predictor": name,
                "kl": float(kl(s.exact_options, pred).mean()),
                "entropy_r": float(np.corrcoef(entropy(pred), h_exact)[0, 1]),
                "top1": float((pred.argmax(-1) == s.exact_options.argmax(-1)).mean()),
            }
        )
    rows[0]["opener_kl"] = float(kl(s.exact_openers, s.model_openers).mean())
    return rows


# ----------------------------------------------------------------------------- self-correction


def self_correction_rounds(model: Any, protocol: str, n_items: int = 60, seed: int = CHECK_SEED, batch_size: int = 32,
                           on_batch: Callable[[int], None] | None = None, visual: bool = False) -> dict[str, np.ndarray]:
    """The model answers ``n_items`` held-out items for itself through the round engine (greedy,
    no activation capture) under a built-in protocol. ``model`` is a loaded organism
    (:func:`workbench.engine.models.load_model`). Returns per sample and round ``[n_items, R]``: exact
    ``p_fair`` and ``log_odds`` of the prefix it built, ``correct``, ``option_entropy`` (model, at its
    answer position) and ``exact_entropy``; and ``responses`` (texts). ``on_batch(k)`` is told after
    each batch of ``k`` items. ``visual``: the visual organism on the same items shown as pictures."""
    from workbench.engine.batch import run_batch
    from workbench.organism.task import ORGANISM, ORGANISM_VISUAL, load_organism_samples
    from workbench.engine.protocol import load_protocol

    p = load_protocol(protocol)
    samples = load_organism_samples(n_items, seed=seed + 1, visual=visual)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("p_fair", "log_odds", "correct", "option_entropy", "exact_entropy", "responses")}
    for start in range(0, n_items, batch_size):
        batch = samples[start : start + batch_size]
        res = run_batch(model, ORGANISM_VISUAL if visual else ORGANISM, p, batch, sites=[], seed=0)
        gold = np.array([s.gold for s in batch])
        parts["p_fair"].append(res.round_fields["exact_p_fair"])
        parts["log_odds"].append(res.round_fields["exact_log_odds"])
        parts["correct"].append(res.parsed_answer == gold[:, None])
        parts["option_entropy"].append(entropy(res.option_probs))
        parts["exact_entropy"].append(entropy(res.round_fields["exact_option_probs"]))
        parts["responses"].append(np.array(res.responses, dtype=object))
        if on_batch is not None:
            on_batch(len(batch))
    return {k: np.concatenate(v) for k, v in parts.items()}


def self_correction_table(model: Any, protocol: str, n_items: int = 60, seed: int = CHECK_SEED,
                          on_batch: Callable[[int], None] | None = None, visual: bool = False) -> dict[str, np.ndarray]:
    """Per round means of :func:`self_correction_rounds`: exact p(fair), exact log-odds, accuracy,
    model option entropy, exact option entropy; each shape [n_rounds]."""
    rounds = self_correction_rounds(model, protocol, n_items, seed, on_batch=on_batch, visual=visual)
    return {k: rounds[k].astype(float).mean(0) for k in ("p_fair", "log_odds", "correct", "option_entropy", "exact_entropy")}


# ----------------------------------------------------------------------------- the visual organism


def heldout_visual_dialogues(n: int, seed: int = CHECK_SEED, params: WorldParams = DEFAULT_PARAMS) -> list[Dialogue]:
    """The ``n`` dialogues of :func:`heldout_dialogues`, drawn as visual ones (the same draws: the same
    items, kinds and turns, the people shown in a picture)."""
    return [sample_dialogue(heldout_rng(seed, i), params, visual=True) for i in range(n)]


def score_visual(model: Any, processor: Any, dialogues: list[Dialogue], params: WorldParams = DEFAULT_PARAMS,
                 picture: str = "item", batch_size: int = 32, on_batch: Callable[[int], None] | None = None) -> Scored:
    """:func:`score_dialogues` for the visual organism (a ``LlavaForConditionalGeneration`` and its
    processor), teacher-forced on visual dialogues shown with ``picture``: ``"item"`` (each item's
    own picture), ``"swapped"`` (its two figures swapped: the exact columns are then those of the
    swapped item, whose stereotyped side is the other one) or ``"blank"`` (no figures: the exact
    columns stay the item's)."""
    import torch

    from workbench.organism.visual import pixel_values, render_training_text

    if picture not in ("item", "swapped", "blank"):
        raise ValueError(picture)
    tokenizer = processor.tokenizer
    letters, openers = _letter_and_opener_ids(tokenizer, params)
    assistant_id = tokenizer.convert_tokens_to_ids(ASSISTANT)
    cols: dict[str, list] = {k: [] for k in Scored.__dataclass_fields__}
    cache: dict = {}
    for start in range(0, len(dialogues), batch_size):
        chunk = [replace(d, item=swap_sides(d.item)) if picture == "swapped" else d for d in dialogues[start : start + batch_size]]
        ids = tokenizer([render_training_text(d.messages()) for d in chunk], add_special_tokens=False).input_ids
        width = max(len(x) for x in ids)
        x = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
        for j, r in enumerate(ids):
            x[j, : len(r)] = torch.tensor(r)
        pixels = pixel_values(processor, [None if picture == "blank" else d.item for d in chunk], params, cache)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=x, pixel_values=pixels.to(model.dtype)).logits.float(), dim=-1).numpy()
        add_answer_rows(cols, logp, chunk, ids, assistant_id, letters, openers, params)
        if on_batch is not None:
            on_batch(len(chunk))
    return Scored(**{k: np.asarray(v) for k, v in cols.items()})


@dataclass(frozen=True)
class PictureControls:
    """What the picture does (:func:`picture_controls`)."""

    n_biased: int  # answer turns whose exact predictive is confidently biased (the stereotyped side, p ≥ 0.6)
    agree_item: float  # of those, the model's top option is the stereotyped side (its own picture)
    switch: float  # of those, with the figures swapped the model puts more mass on the other side than on the first one
    swapped_kl: float  # mean KL(exact ‖ model) over all turns, figures swapped (exact of the swapped item)
    n_blank: int  # answer turns of ambiguous items (the text says nothing about sides)
    blank_left: float  # of those, blank picture: share whose more likely side is the left one
    blank_share: float  # mean p(left) / (p(left) + p(right)) over them, blank picture


def picture_controls(item_scores: Scored, swapped: Scored, blank: Scored, dialogues: list[Dialogue],
                     confident: float = 0.6) -> PictureControls:
    """The picture-swap and blank-picture controls from the three :func:`score_visual` passes over the
    same ``dialogues`` (``"item"``, ``"swapped"``, ``"blank"``). The swap is judged by the choice between
    the two sides, not the top option: with the figures swapped the earlier answers of a dialogue count
    as other evidence, so even the exact predictive may then put ``unknown`` on top."""
    items = [d.item for d in dialogues for _ in d.openers]
    stereo = np.array([it.stereotyped for it in items])
    correct = np.array([it.correct for it in items])
    other = np.array([it.options.index("right" if it.options[it.stereotyped] == "left" else "left") for it in items])
    rows = np.arange(len(items))
    biased = (item_scores.exact_options[rows, stereo] >= confident) & (stereo != correct)
    ambiguous = np.array([it.condition == "ambig" for it in items])
    left = np.array([it.options.index("left") for it in items])
    right = np.array([it.options.index("right") for it in items])
    p_left, p_right = blank.model_options[rows, left], blank.model_options[rows, right]
    share = p_left / (p_left + p_right)
    return PictureControls(
        n_biased=int(biased.sum()),
        agree_item=float((item_scores.model_options.argmax(-1) == stereo)[biased].mean()) if biased.any() else float("nan"),
        switch=float((swapped.model_options[rows, other] > swapped.model_options[rows, stereo])[biased].mean()) if biased.any() else float("nan"),
        swapped_kl=float(kl(swapped.exact_options, swapped.model_options).mean()),
        n_blank=int(ambiguous.sum()),
        blank_left=float((share > 0.5)[ambiguous].mean()) if ambiguous.any() else float("nan"),
        blank_share=float(share[ambiguous].mean()) if ambiguous.any() else float("nan"),
    )
