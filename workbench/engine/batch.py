"""The round engine: one batch of samples through every round of a protocol, as plain arrays.

:func:`run_batch` steps a :class:`workbench.engine.session.Session` through the protocol's rounds (one
code path for runs and for live sessions; the session's docstring says how a round runs, how its
KV cache is carried to the next round and where activations come from) and returns a
:class:`BatchResult`; :func:`batch_arrays` turns it into the arrays :mod:`workbench.store.writer` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from workbench.engine.capture import HookSite
from workbench.engine.models import LoadedModel
from workbench.engine.protocol import Protocol
from workbench.engine.session import RoundResult, Session, protocol_instruction
from workbench.engine.tasks import Sample, Task
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


def first_instruction(protocol: Protocol, task: Task, sample: Sample) -> str:
    """The round-1 user message: the protocol's ``first`` template filled with the sample."""
    return protocol_instruction(protocol, task, sample, 1)


def conversation_texts(protocol: Protocol, task: Task, sample: Sample) -> tuple[list[str], list[str]]:
    """The user message and assistant prefix of every round: ``([R] instructions, [R] prefixes)``."""
    instructions = [protocol_instruction(protocol, task, sample, t) for t in range(1, protocol.rounds + 1)]
    prefixes = [protocol.prefix(t) for t in range(1, protocol.rounds + 1)]
    return instructions, prefixes


def run_batch(
    model: LoadedModel,
    task: Task,
    protocol: Protocol,
    samples: list[Sample],
    sites: list[HookSite],
    seed: int,
    instruction_for: Callable[[Sample, int], str] | None = None,
    reuse_cache: bool = True,
    on_round: Callable[[RoundResult], None] | None = None,
    round_extras: Callable | None = None,
) -> BatchResult:
    """Run ``samples`` through every round of ``protocol``, capturing ``sites`` (from
    :func:`workbench.engine.capture.hook_sites`; none: answers and uncertainty only). ``instruction_for``
    (sample, 1-based round) → user message overrides the protocol's (see :class:`Session`);
    ``reuse_cache=False`` re-runs every round's whole conversation (the reference for the tests);
    ``on_round`` is called with each round's result as it finishes; ``round_extras`` adds per-round
    arrays (a scorer, sampled answers: :func:`workbench.engine.open_ended.round_extras`)."""
    session = Session(model, task, protocol, samples, sites=sites, seed=seed, instruction_for=instruction_for,
                      reuse_cache=reuse_cache, strict=True, fields_every_round=False,
                      round_extras=round_extras)
    for _ in range(protocol.rounds):
        result = session.step()
        if on_round is not None:
            on_round(result)
    return session.result()


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
