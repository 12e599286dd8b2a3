"""What a batch of samples produced over every round (:class:`BatchResult`), and the per-round arrays the
run file stores, derived from it (:func:`batch_arrays`, :func:`option_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workbench.engine.uncertainty import distribution_entropy


@dataclass(frozen=True)
class BatchResult:
    """Everything a batch produced. ``B`` samples, ``R`` rounds, ``K`` options (widest sample)."""

    instructions: list[list[str]]  # [B][R] the user message of each round
    responses: list[list[str]]  # [B][R] generated text (after the assistant prefix)
    response_ids: list[list[list[int]]]  # [B][R][tokens]
    token_entropies: list[list[list[float]]]  # [B][R][steps]
    prompt_spans: np.ndarray  # [B, R, 2] int64: the tokens round t's prompt adds, in the transcript
    response_spans: np.ndarray  # [B, R, 2] int64: round t's generated tokens, in the transcript
    transcripts: list[list[int]]  # [B][tokens] the final conversation, closing template text included
    mean_token_entropy: np.ndarray  # [B, R] float32
    option_probs: np.ndarray  # [B, R, K] float32 (NaN beyond a sample's options)
    parsed_answer: np.ndarray  # [B, R] int16, -1 = unparseable
    activations: dict[str, np.ndarray]  # hook → [B, R, 2, L, d_model]
    round_fields: dict[str, np.ndarray]  # task extras, each [B, R, ...]


def batch_arrays(res: BatchResult, gold: np.ndarray, n_options: int) -> dict[str, object]:
    """The per-round arrays of a batch as :meth:`workbench.store.writer.RunWriter.write_batch` takes them:
    name → ``[B, R, ...]`` (nested lists for the ragged ones), options padded to the file's
    ``n_options``, with :func:`option_summary`'s derived answers and the task's round fields."""
    probs = res.option_probs
    if probs.shape[-1] != n_options:
        padded = np.full((*probs.shape[:-1], n_options), np.nan, dtype=np.float32)
        padded[..., : probs.shape[-1]] = probs
        probs = padded
    return {
        "instruction": res.instructions,
        "response": res.responses,
        "response_token_ids": res.response_ids,
        "token_entropy": res.token_entropies,
        "prompt_span": res.prompt_spans,
        "response_span": res.response_spans,
        "mean_token_entropy": res.mean_token_entropy,
        "option_probs": probs,
        "parsed_answer": res.parsed_answer,
        **option_summary(res.option_probs, res.parsed_answer, gold),
        **res.round_fields,
    }


def option_summary(option_probs: np.ndarray, parsed: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Derived per-round answer metrics from option probabilities and parsed answers.

    option_probs ``[N, R, K]``, parsed ``[N, R]``, gold ``[N]`` → dict of ``[N, R]`` arrays:
    ``option_entropy``, ``option_answer`` (argmax of p̂, -1 when no options), ``answer`` (the parsed
    answer, else the option argmax), ``chosen_confidence`` (p̂ of ``answer``), ``correct`` (``answer``
    is gold), and the two accuracies named apart: ``parsed_correct`` (the parsed answer is gold; an
    unparseable one counts wrong) and ``option_correct`` (the option argmax is gold), both uint8.
    """
    has = np.isfinite(option_probs).any(-1) if option_probs.shape[-1] else np.zeros(parsed.shape, bool)
    filled = np.where(np.isfinite(option_probs), option_probs, -1.0)
    option_answer = np.where(has, filled.argmax(-1) if option_probs.shape[-1] else -1, -1)
    answer = np.where(parsed >= 0, parsed, option_answer)
    safe = np.clip(answer, 0, None)
    conf = np.take_along_axis(filled, safe[..., None], -1)[..., 0] if option_probs.shape[-1] else np.full(parsed.shape, np.nan)
    conf = np.where((answer >= 0) & has, conf, np.nan)
    ent = np.where(has, distribution_entropy(np.where(np.isfinite(option_probs), option_probs, 0.0)), np.nan)
    has_gold = gold[:, None] >= 0
    correct = (answer == gold[:, None]) & has_gold
    return {
        "parsed_correct": ((parsed == gold[:, None]) & (parsed >= 0) & has_gold).astype(np.uint8),
        "option_correct": ((option_answer == gold[:, None]) & (option_answer >= 0) & has_gold).astype(np.uint8),
        "option_entropy": ent.astype(np.float32),
        "option_answer": option_answer.astype(np.int16),
        "answer": answer.astype(np.int16),
        "chosen_confidence": conf.astype(np.float32),
        "correct": correct,
    }
