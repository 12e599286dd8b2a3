"""The round engine: one batch of samples through every round of a protocol.

For each round the batch's conversations (every earlier turn, the new instruction, the assistant
prefix) are generated with the KV cache; token entropies come with the generation and options
are scored on the prompt's cache. Activations are pooled from the passes generation makes anyway
(DESIGN §3): round t's prefill holds round t's last prompt token and every earlier response, so
it gives round t's ``last_prompt`` and round t−1's ``response_mean``; the last round's responses
come from its decode steps (see :func:`_last_responses`). The result is plain arrays, ready for
:mod:`workbench.store`.
"""

from __future__ import annotations

from dataclasses import dataclass

import einops
import numpy as np
import torch

from workbench.capture import HookSite, pool_weights, pooling, stack_sites
from workbench.chat import check_prefix_stable, encode, plan_conversation
from workbench.generation import RoundOutput, crop_cache, forward_after_prompt, generate_round, score_options
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
    instructions += [task.followup(sample, t, protocol.instruction(t)) for t in range(2, protocol.rounds + 1)]
    prefixes = [protocol.prefix(t) for t in range(1, protocol.rounds + 1)]
    return instructions, prefixes


def run_batch(
    model: LoadedModel,
    task: Task,
    protocol: Protocol,
    samples: list[Sample],
    sites: list[HookSite],
    seed: int,
) -> BatchResult:
    """Run ``samples`` through every round of ``protocol`` (see the module docstring), capturing
    ``sites`` (from :func:`workbench.capture.hook_sites`; none: answers and uncertainty only)."""
    tok, device = model.tokenizer, model.device
    rounds, batch = protocol.rounds, len(samples)
    if protocol.decoding.do_sample:
        torch.manual_seed(seed + samples[0].index)  # per batch, so a resumed run draws the same tokens
    plans = []
    for s in samples:
        instructions, prefixes = conversation_texts(protocol, task, s)
        plans.append(plan_conversation(tok, instructions, prefixes))
    check_prefix_stable(tok, plans[0])  # a property of the template, not of the sample's text
    continuations = [task.option_continuations(s) for s in samples]
    flat = iter(encode(tok, [text for texts in continuations for text in texts]))
    option_tokens = [[next(flat) for _ in texts] for texts in continuations]
    width = max((len(o) for o in option_tokens), default=0)

    transcripts: list[list[int]] = [[] for _ in samples]
    response_ids = [[[] for _ in range(rounds)] for _ in samples]
    token_ent = [[[] for _ in range(rounds)] for _ in samples]
    prompt_spans = np.zeros((batch, rounds, 2), dtype=np.int64)
    response_spans = np.zeros((batch, rounds, 2), dtype=np.int64)
    option_nll = np.full((batch, rounds, width), np.nan, dtype=np.float32)
    pools: list[dict[str, torch.Tensor]] = []  # per round: {hook: [batch, 2, L, d]}, (last prompt of t, response mean of t-1)
    pieces = iter(encode(tok, [text for plan in plans for text in (*plan.round_inputs, plan.closing)]))
    piece_ids = [[next(pieces) for _ in range(rounds + 1)] for _ in plans]  # [B][R + 1]: round inputs, closing
    for t in range(rounds):
        prompts = []
        for i, ids in enumerate(p[t] for p in piece_ids):
            start = len(transcripts[i])
            transcripts[i] = transcripts[i] + ids
            prompt_spans[i, t] = (start, len(transcripts[i]))
            prompts.append(transcripts[i])
        weights = _prefill_weights(prompt_spans[:, t], response_spans[:, t - 1] if t else None)
        steps: dict[HookSite, list[torch.Tensor]] | None = {} if t == rounds - 1 else None  # no later prefill holds them
        with pooling(model.hf, sites, weights, steps) as pooled:
            out = generate_round(model.hf, tok, prompts, protocol.decoding, device)
        pools.append(stack_sites(pooled, sites))
        if steps is not None and sites:
            pools.append(_last_responses(model.hf, out, sites, steps, tok.pad_token_id))
        if width:
            leads = [task.lead_length(ids, tok) for ids in out.response_ids]
            option_nll[:, t] = score_options(model.hf, out, leads, option_tokens, tok.pad_token_id).numpy()
        for i in range(batch):
            ids = out.response_ids[i]
            response_ids[i][t] = ids
            token_ent[i][t] = out.token_entropies[i]
            response_spans[i, t] = (len(transcripts[i]), len(transcripts[i]) + len(ids))
            transcripts[i] = transcripts[i] + ids
        del out  # its KV cache and logits would otherwise live on through the next round's generation
    for i, p in enumerate(piece_ids):
        transcripts[i] = transcripts[i] + p[rounds]

    responses = [[tok.decode(ids) for ids in per_sample] for per_sample in response_ids]
    probs = np.full_like(option_nll, np.nan)
    for i, opts in enumerate(option_tokens):
        if opts:
            probs[i, :, : len(opts)] = option_confidence(torch.from_numpy(option_nll[i, :, : len(opts)])).numpy()
    parsed = np.array([[task.parse_answer(s, r) for r in rs] for s, rs in zip(samples, responses)], dtype=np.int16)
    mean_ent = np.array([[np.mean(e) if e else np.nan for e in es] for es in token_ent], dtype=np.float32)

    acts = _round_activations(pools, response_spans) if sites else {}

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
        activations=acts,
        round_fields={k: np.stack(v) for k, v in fields.items()},
    )


def _prefill_weights(prompt_span: np.ndarray, prev_response_span: np.ndarray | None) -> torch.Tensor:
    """Pooling rows over round t's left-padded prefill: ``[batch, 2, width]`` = (its last prompt
    token, the mean over round t−1's response; zero in round 1)."""
    width = int(prompt_span[:, 1].max())
    offset = width - prompt_span[:, 1:2]  # left padding shifts every position of a row
    previous = prev_response_span if prev_response_span is not None else np.zeros_like(prompt_span)
    spans = np.concatenate([prompt_span + offset, previous + offset], -1)
    return pool_weights(torch.from_numpy(spans)[:, None], width)


def _last_responses(
    hf: object, out: RoundOutput, sites: list[HookSite], steps: dict[HookSite, list[torch.Tensor]], pad_id: int
) -> dict[str, torch.Tensor]:
    """The last round's response means: ``{hook: [batch, 2, L, d]}`` with row 1 filled (row 0 unused).

    ``generate`` feeds response token j back at decode step j+1, so when every response ended with a
    stop token its decode steps (``steps``, from :func:`pooling`) hold all of them. A response cut
    off by ``max_new_tokens`` never had its last token fed back; then the responses get one pass on
    the round's prompt cache, which is cropped back after.
    """
    lengths = [len(ids) for ids in out.response_ids]
    if max(lengths) == 0:
        return {}
    spans = torch.tensor([[0, 1, 0, n] for n in lengths])[:, None]  # row 1 of the pools: the mean over each response
    fed = len(next(iter(steps.values()), []))
    if max(lengths) <= fed:
        weights = pool_weights(spans, fed)
        pooled = {site: einops.einsum(weights.to(acts[0].device), torch.stack(acts, 1), "b p t, b t d -> b p d")
                  for site, acts in steps.items()}
        return stack_sites(pooled, sites)
    prompt_len = out.prompt_mask.shape[1]
    with pooling(hf, sites, pool_weights(spans, max(lengths))) as pooled:
        with torch.no_grad():
            forward_after_prompt(hf, out, out.response_ids, pad_id, logits_to_keep=1)
    crop_cache(out.cache, prompt_len)
    return stack_sites(pooled, sites)


def _round_activations(pools: list[dict[str, torch.Tensor]], response_spans: np.ndarray) -> dict[str, np.ndarray]:
    """Per-round prefill pools (plus the last-response pool) → ``{hook: [B, R, 2, L, d]}`` float32,
    NaN for the mean of an empty response."""
    rounds = len(response_spans[0])
    empty = torch.from_numpy(response_spans[..., 1] <= response_spans[..., 0])  # [B, R]
    result = {}
    for hook in pools[0]:
        last_prompt = torch.stack([pools[t][hook][:, 0] for t in range(rounds)], 1)
        means = [pools[t + 1][hook][:, 1] if hook in pools[t + 1] else torch.zeros_like(last_prompt[:, 0]) for t in range(rounds)]
        acts = torch.stack([last_prompt, torch.stack(means, 1)], 2).cpu()  # [B, R, 2, L, d]
        acts[:, :, 1][empty] = float("nan")
        result[hook] = acts.numpy()
    return result


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
