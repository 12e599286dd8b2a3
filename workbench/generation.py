"""One round of batched, KV-cached generation and option scoring on the plain Hugging Face model.

Generation uses ``hf.generate`` (left padding, attention mask, the KV cache); the logits of every
generated step come back with it, so token entropies cost nothing extra. Options are scored
after the prompt (and after the response's lead, see ``Task.lead_length``) by reusing the
prompt's KV cache: only the option tokens are run, never the prompt again. When every option is
a single token and the model already generated up to the answer, its logits at that step are
read directly and no pass is made at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench.protocol import Decoding
from workbench.uncertainty import token_entropy


@dataclass(frozen=True)
class RoundOutput:
    """What one generation round returns, per sample of the batch."""

    response_ids: list[list[int]]  # generated tokens, without the stop token
    token_entropies: list[list[float]]  # entropy of each generated step (stop token's step included)
    step_logits: torch.Tensor  # [batch, n_steps, vocab] raw logits of every step
    cache: Any  # the KV cache cropped to the prompt: [batch] × prompt_len
    prompt_mask: torch.Tensor  # [batch, prompt_len] left-padded attention mask


def pad(seqs: list[list[int]], pad_id: int, device: str, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists on the ``left`` (generation) or ``right`` (one causal pass, where pads after a
    sequence cannot touch it) → ids ``[batch, max_len]`` and attention mask ``[batch, max_len]``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, where] = torch.tensor(s, dtype=torch.long)
        mask[i, where] = 1
    return ids.to(device), mask.to(device)


def stop_ids(hf: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the generation config's EOS ids and the tokenizer's."""
    ids = hf.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_round(hf: Any, tokenizer: Any, prompts: list[list[int]], decoding: Decoding, device: str) -> RoundOutput:
    """Generate one assistant turn for every prompt of the batch (see the module docstring)."""
    ids, mask = pad(prompts, tokenizer.pad_token_id, device, "left")
    stops = stop_ids(hf, tokenizer)
    sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p} if decoding.do_sample else {}
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=decoding.do_sample,
        max_new_tokens=decoding.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
        top_k=None,
        **sampling,
    )
    prompt_len = ids.shape[1]
    generated = out.sequences[:, prompt_len:].tolist()
    step_logits = torch.stack(out.logits, dim=1)  # [batch, n_steps, vocab]
    entropies = token_entropy(step_logits).cpu()
    response_ids, token_entropies = [], []
    stop_set = set(stops)
    for i, seq in enumerate(generated):
        n = next((j for j, tok in enumerate(seq) if tok in stop_set), len(seq))
        response_ids.append(seq[:n])
        token_entropies.append(entropies[i, : min(n + 1, len(seq))].tolist())
    cache = out.past_key_values
    extra = cache.get_seq_length() - prompt_len
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative count removes that many trailing tokens
    return RoundOutput(response_ids, token_entropies, step_logits, cache, mask)


@torch.no_grad()
def score_options(
    hf: Any,
    rnd: RoundOutput,
    leads: list[int],
    options: list[list[list[int]]],
    pad_id: int,
) -> torch.Tensor:
    """Mean NLL of each option's tokens after the prompt and the response's first ``leads[i]`` tokens.

    options ``[batch][n_options][tokens]`` → ``[batch, n_options]`` float32 (NaN where a sample
    has fewer options than the widest one). Reuses ``rnd.cache``; consumes it.
    """
    batch = len(options)
    width = max(len(o) for o in options)
    nll = torch.full((batch, width), float("nan"))
    if width == 0:
        return nll
    single = all(len(tok) == 1 for opts in options for tok in opts)
    generated_to_answer = all(len(rnd.response_ids[i]) >= leads[i] and leads[i] < rnd.step_logits.shape[1] for i in range(batch))
    if single and generated_to_answer:
        for i in range(batch):
            logp = torch.log_softmax(rnd.step_logits[i, leads[i]].float(), -1)
            nll[i, : len(options[i])] = -logp[[o[0] for o in options[i]]].cpu()
        return nll
    conts, owners = [], []
    for i in range(batch):
        lead = rnd.response_ids[i][: leads[i]]
        for k, opt in enumerate(options[i]):
            conts.append(lead + opt)
            owners.append((i, k, len(lead), len(opt)))
    device = rnd.prompt_mask.device
    cont_ids, cont_mask = pad(conts, pad_id, device, "right")
    rows = torch.tensor([i for i, *_ in owners])
    cache = rnd.cache
    cache.batch_select_indices(rows.to(device))
    prompt_mask = rnd.prompt_mask[rows.to(device)]
    prompt_len = prompt_mask.sum(-1, keepdim=True)
    position_ids = prompt_len + torch.arange(cont_ids.shape[1], device=device)[None, :]
    logits = hf(
        input_ids=cont_ids,
        attention_mask=torch.cat([prompt_mask, cont_mask], dim=1),
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    ).logits.float()
    first = torch.log_softmax(rnd.step_logits[:, 0].float(), -1)  # predicts the first continuation token
    logp = torch.log_softmax(logits, -1)
    for r, (i, k, lead_len, opt_len) in enumerate(owners):
        total = 0.0
        for j in range(lead_len, lead_len + opt_len):
            dist = first[i] if j == 0 else logp[r, j - 1]
            total -= float(dist[conts[r][j]])
        nll[i, k] = total / max(1, opt_len)
    return nll
