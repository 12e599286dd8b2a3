"""The round engine: one batch of samples through every round of a protocol.

For each round the batch's conversations (every earlier turn, the new instruction, the assistant
prefix) are generated with the KV cache; token entropies come with the generation and options
are scored on the prompt's cache. After the last round one hooked pass over the final transcripts
captures every round's residual stream at once (DESIGN §3). The result is plain arrays, ready
for :mod:`workbench.store`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workbench.capture import capture_pooled
from workbench.chat import encode, plan_conversation
from workbench.generation import generate_round, pad, score_options
from workbench.models import LoadedModel
from workbench.protocol import Protocol
from workbench.tasks import Sample, Task
from workbench.uncertainty import distribution_entropy, option_confidence


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
    return protocol.first.format(
        context=sample.context, question=sample.question, choices=task.format_choices(sample.options)
    ).strip()


def conversation_texts(protocol: Protocol, task: Task, sample: Sample) -> tuple[list[str], list[str]]:
    """The user message and assistant prefix of every round: ``([R] instructions, [R] prefixes)``."""
    instructions = [first_instruction(protocol, task, sample)]
    instructions += [protocol.instruction(t) for t in range(2, protocol.rounds + 1)]
    prefixes = [protocol.prefix(t) for t in range(1, protocol.rounds + 1)]
    return instructions, prefixes


def run_batch(
    model: LoadedModel,
    task: Task,
    protocol: Protocol,
    samples: list[Sample],
    hooks: list[str],
    layers: list[int],
    seed: int,
) -> BatchResult:
    """Run ``samples`` through every round of ``protocol`` (see the module docstring)."""
    tok, device = model.tokenizer, model.device
    rounds, batch = protocol.rounds, len(samples)
    if protocol.decoding.do_sample:
        torch.manual_seed(seed + samples[0].index)  # per batch, so a resumed run draws the same tokens
    plans = []
    for s in samples:
        instructions, prefixes = conversation_texts(protocol, task, s)
        plans.append(plan_conversation(tok, instructions, prefixes))
    option_tokens = [[encode(tok, text) for text in task.option_continuations(s)] for s in samples]
    width = max((len(o) for o in option_tokens), default=0)

    transcripts: list[list[int]] = [[] for _ in samples]
    response_ids = [[[] for _ in range(rounds)] for _ in samples]
    token_ent = [[[] for _ in range(rounds)] for _ in samples]
    prompt_spans = np.zeros((batch, rounds, 2), dtype=np.int64)
    response_spans = np.zeros((batch, rounds, 2), dtype=np.int64)
    option_nll = np.full((batch, rounds, width), np.nan, dtype=np.float32)
    for t in range(rounds):
        prompts = []
        for i, plan in enumerate(plans):
            start = len(transcripts[i])
            transcripts[i] = transcripts[i] + encode(tok, plan.round_inputs[t])
            prompt_spans[i, t] = (start, len(transcripts[i]))
            prompts.append(transcripts[i])
        out = generate_round(model.hf, tok, prompts, protocol.decoding, device)
        if width:
            leads = [task.lead_length(ids, tok) for ids in out.response_ids]
            option_nll[:, t] = score_options(model.hf, out, leads, option_tokens, tok.pad_token_id).numpy()
        for i in range(batch):
            ids = out.response_ids[i]
            response_ids[i][t] = ids
            token_ent[i][t] = out.token_entropies[i]
            response_spans[i, t] = (len(transcripts[i]), len(transcripts[i]) + len(ids))
            transcripts[i] = transcripts[i] + ids
    for i, plan in enumerate(plans):
        transcripts[i] = transcripts[i] + encode(tok, plan.closing)

    responses = [[tok.decode(ids) for ids in per_sample] for per_sample in response_ids]
    probs = np.full_like(option_nll, np.nan)
    for i, opts in enumerate(option_tokens):
        if opts:
            probs[i, :, : len(opts)] = option_confidence(torch.from_numpy(option_nll[i, :, : len(opts)])).numpy()
    parsed = np.array([[task.parse_answer(s, r) for r in rs] for s, rs in zip(samples, responses)], dtype=np.int16)
    mean_ent = np.array([[np.mean(e) if e else np.nan for e in es] for es in token_ent], dtype=np.float32)

    acts = {}
    if hooks:  # no hooks: answers and uncertainty only, no capture pass
        ids, _ = pad(transcripts, tok.pad_token_id, device, "right")
        spans = torch.from_numpy(np.concatenate([prompt_spans, response_spans], axis=-1)).to(device)
        acts = capture_pooled(model.bridge, ids, spans, hooks, layers)

    fields: dict[str, list[np.ndarray]] = {}
    for s, plan, rs in zip(samples, plans, responses):
        for key, value in task.round_fields(s, list(plan.instructions), rs).items():
            fields.setdefault(key, []).append(np.asarray(value))
    return BatchResult(
        instructions=[list(p.instructions) for p in plans],
        responses=responses,
        response_ids=response_ids,
        token_entropies=token_ent,
        prompt_spans=prompt_spans,
        response_spans=response_spans,
        transcripts=transcripts,
        mean_token_entropy=mean_ent,
        option_probs=probs,
        parsed_answer=parsed,
        activations={h: a.numpy() for h, a in acts.items()},
        round_fields={k: np.stack(v) for k, v in fields.items()},
    )


def option_summary(option_probs: np.ndarray, parsed: np.ndarray, gold: np.ndarray) -> dict[str, np.ndarray]:
    """Derived per-round answer metrics from option probabilities and parsed answers.

    option_probs ``[N, R, K]``, parsed ``[N, R]``, gold ``[N]`` → dict of ``[N, R]`` arrays:
    ``option_entropy``, ``option_answer`` (argmax of p̂, -1 when no options), ``answer`` (the parsed
    answer, else the option argmax), ``chosen_confidence`` (p̂ of ``answer``), ``correct``.
    """
    has = np.isfinite(option_probs).any(-1) if option_probs.shape[-1] else np.zeros(parsed.shape, bool)
    filled = np.where(np.isfinite(option_probs), option_probs, -1.0)
    option_answer = np.where(has, filled.argmax(-1) if option_probs.shape[-1] else -1, -1)
    answer = np.where(parsed >= 0, parsed, option_answer)
    safe = np.clip(answer, 0, None)
    conf = np.take_along_axis(filled, safe[..., None], -1)[..., 0] if option_probs.shape[-1] else np.full(parsed.shape, np.nan)
    conf = np.where((answer >= 0) & has, conf, np.nan)
    ent = np.where(has, distribution_entropy(np.where(np.isfinite(option_probs), option_probs, 0.0)), np.nan)
    correct = (answer == gold[:, None]) & (gold[:, None] >= 0)
    return {
        "option_entropy": ent.astype(np.float32),
        "option_answer": option_answer.astype(np.int16),
        "answer": answer.astype(np.int16),
        "chosen_confidence": conf.astype(np.float32),
        "correct": correct,
    }
