"""Training the organism: a small ``LlamaForCausalLM`` on dialogues drawn from the world.

Every training sequence is a whole dialogue rendered with the chat template and tokenized by the
organism's tokenizer, exactly what the model sees at run time. The loss is next-token cross-entropy on
every token, except that openers and answer letters are trained on the exact predictive distribution
at their position (soft targets), weighted up. Half of the dialogues are drawn from the world, half
have protocol-like instruction kinds with assistant turns drawn from the exact predictive (see
:func:`draw_dialogue`); both keep the world's conditional distribution of every assistant token.
Dialogues come from a seeded stream and are batched by length in a fixed order, and training runs
single-process on the CPU with a fixed thread count, so one seed gives identical weights.

The visual organism (``cfg.visual``) trains a LLaVA whose language model starts as the text organism,
on the same dialogues drawn as pictures, with the text organism as a frozen teacher reading each
dialogue's text twin (:func:`text_twin`, :func:`aligned_suffix`, :func:`teacher_loss`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.organism.posterior import sample_given_kinds
from workbench.organism.tokenizer import ASSISTANT, EOT, USER, build_tokenizer, render
from workbench.organism.world import (
    DEFAULT_PARAMS,
    KINDS,
    LETTER_TOKENS,
    SIDES,
    Dialogue,
    WorldParams,
    as_text,
    first_message,
    sample_dialogue,
    sample_item,
    training_rng,
)


@dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings. The defaults reproduce the shipped checkpoint."""

    seed: int = 0
    steps: int = 4000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    threads: int = 1  # torch CPU threads; a different count can change the last bits of the weights
    bucket: int = 8  # dialogues are drawn bucket*batch_size at a time and batched by length
    answer_weight: float = 5.0  # loss weight of the positions that predict an opener or an answer letter
    tilted_fraction: float = 0.5  # share of dialogues with protocol-like instruction kinds (see batches)
    soft_targets: bool = True  # train openers and answer letters on the exact predictive, not the drawn token
    visual: bool = False  # the visual organism: a LLaVA on pictures, its language model the text organism's
    lm_lr_scale: float = 1.0  # visual: the language model's learning rate is lr * lm_lr_scale (vision tower, projector: lr)
    vision_width: int = 32  # visual: the CLIP tower's width
    vision_layers: int = 2  # visual: the CLIP tower's layers
    align_weight: float = 0.0  # visual: weight of the alignment loss (see :func:`alignment_targets`)
    side_weight: float = 0.0  # visual: weight of the side loss (a linear read-out of the residual after layer
    side_layer: int = 2  # side_layer at each option word left/right must name the group shown on that side)
    distill_weight: float = 0.0  # visual: weight of the teacher loss (the text organism reading the same item as text:
    # its residual stream after every layer but the last and its next-token distribution, at the aligned positions)


VISUAL_DEFAULTS = dict(visual=True, steps=2000, lr=3e-3, warmup_steps=100, lm_lr_scale=1.0, align_weight=1.0, answer_weight=20.0,
                       side_weight=1.0, distill_weight=1.0)
"""The visual organism's settings (``TrainConfig(**VISUAL_DEFAULTS)``, what ``organism train --visual`` runs,
and what made the shipped ``artifacts/organism-visual``): fewer steps than the text organism's, since its
language model starts as the text organism, which already knows the world; the teacher loss
(:func:`teacher_loss`) is what makes it read the picture (docs/ORGANISM.md, "The visual organism")."""


@dataclass(frozen=True)
class TrainRecord:
    """What a training run did (stored in the checkpoint's ``organism.json``)."""

    seed: int
    steps: int
    final_loss: float  # mean loss per token over the last 100 steps
    wall_time_s: float
    dialogues_seen: int
    tokens_seen: int
    config: dict[str, Any]


def build_model(tokenizer: Any, cfg: TrainConfig) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` (seeded by ``cfg.seed``) for ``tokenizer``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.do_sample = False
    return model


def tilted_kinds(rng: np.random.Generator, n_rounds: int) -> list[str | None]:
    """Instruction kinds shaped like the built-in protocols, whatever z would say: one kind throughout,
    moral follow-ups with one or two immoral ones injected, or kinds drawn uniformly."""
    pattern = rng.integers(3)
    if pattern == 0:
        follow = [KINDS[rng.integers(3)]] * (n_rounds - 1)
    elif pattern == 1:
        follow = ["moral"] * (n_rounds - 1)
        for r in rng.choice(max(1, n_rounds - 1), size=min(n_rounds - 1, 1 + rng.integers(2)), replace=False):
            follow[r] = "immoral"
    else:
        follow = [KINDS[k] for k in rng.integers(3, size=n_rounds - 1)]
    return [None, *follow]


def draw_dialogue(rng: np.random.Generator, cfg: TrainConfig, params: WorldParams = DEFAULT_PARAMS) -> tuple[Dialogue, bool]:
    """One training dialogue and whether it is tilted: with probability ``cfg.tilted_fraction`` its
    instruction kinds come from :func:`tilted_kinds` and its turns from the exact predictive
    (:func:`~workbench.organism.posterior.sample_given_kinds`), else it is drawn from the world.
    ``cfg.visual``: its item is a visual one (the same draws, the people shown in a picture)."""
    if rng.random() >= cfg.tilted_fraction:
        return sample_dialogue(rng, params, visual=cfg.visual), False
    n_rounds = int(rng.integers(params.min_rounds, params.max_rounds + 1))
    return sample_given_kinds(rng, sample_item(rng, params, visual=cfg.visual), tilted_kinds(rng, n_rounds), params), True


def text_twin(dialogue: Dialogue) -> Dialogue:
    """A visual dialogue as the text organism's: the same turns, the first message written by
    :func:`~workbench.organism.world.as_text` (groups named, options that are group names)."""
    item = as_text(dialogue.item)
    return replace(dialogue, item=item, instructions=(first_message(item), *dialogue.instructions[1:]))


def aligned_suffix(seen: list[int], text: list[int], side_ids: tuple[int, int], pair_ids: tuple[int, int]) -> int:
    """How many last tokens of a visual dialogue's ids ``seen`` and its text twin's ids ``text`` are the
    same tokens once each side word (``side_ids``: left, right) is read as the group shown there
    (``pair_ids``): from the first token after the people are named (``were`` or the disambiguating
    sentence's verb) to the end. At those positions both have been told the same things, one by the
    picture and one by the words."""
    mapped = [pair_ids[side_ids.index(t)] if t in side_ids else t for t in seen]
    n = 0
    while n < min(len(mapped), len(text)) and mapped[-1 - n] == text[-1 - n]:
        n += 1
    return n


def batches(seed: int, tokenizer: Any, cfg: TrainConfig, params: WorldParams = DEFAULT_PARAMS):
    """Endless training batches ``(input_ids [B, T], labels [B, T], soft, items, twin)``, right-padded, ``bucket``
    batches at a time sorted by length then shuffled. Labels are -100 on padding and, in tilted
    dialogues, on the follow-up instructions' words (their kinds were not drawn from the world).
    ``items``: each row's item (``cfg.visual``: the picture to show; its image tokens, written
    out as the processor expands them, are labelled -100).

    With ``cfg.soft_targets`` the tokens of every opener and answer letter are taken out of the labels
    and ``soft = (rows [N], cols [N], token_ids [N, 6], probs [N, 6])`` gives, for the input position
    that predicts each of them, the exact predictive distribution there instead: the expected gradient
    of the drawn token, without its sampling noise. Else ``soft`` is None.

    ``twin`` (``cfg.visual`` with ``cfg.distill_weight``, else None): the text twins of the batch's
    dialogues (:func:`text_twin`) for the teacher, ``(input_ids [B, T'], rows [N], cols [N], text_cols
    [N], same_next [N])``: the positions of :func:`aligned_suffix` in both, and whether the next token
    is the same token in both (not an option word, which is a side in one and a group in the other)."""
    import torch

    from workbench.organism.posterior import dialogue_trace

    rng = training_rng(seed)
    pad = tokenizer.pad_token_id
    user_id, eot_id, assistant_id = tokenizer.convert_tokens_to_ids([USER, EOT, ASSISTANT])
    opener_ids = tokenizer.convert_tokens_to_ids(list(params.openers_fair + params.openers_biased))
    letter_ids = tokenizer.convert_tokens_to_ids(list(LETTER_TOKENS)) + [pad] * (len(opener_ids) - len(LETTER_TOKENS))
    if cfg.visual:
        from workbench.organism.visual import IMAGE, render_training_text

        image_id = tokenizer.convert_tokens_to_ids(IMAGE)
        side_ids = tuple(tokenizer.convert_tokens_to_ids(list(SIDES)))
    show = render_training_text if cfg.visual else render
    while True:
        drawn = [draw_dialogue(rng, cfg, params) for _ in range(cfg.bucket * cfg.batch_size)]
        ids = tokenizer([show(d.messages()) for d, _ in drawn], add_special_tokens=False).input_ids
        twin_ids = None
        if cfg.visual and cfg.distill_weight:
            twin_ids = tokenizer([render(text_twin(d).messages()) for d, _ in drawn], add_special_tokens=False).input_ids
        order = np.argsort([len(x) for x in ids], kind="stable")
        groups = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
        for g in rng.permutation(len(groups)):
            rows = [ids[i] for i in groups[g]]
            width = max(len(r) for r in rows)
            x = torch.full((len(rows), width), pad, dtype=torch.long)
            y = torch.full((len(rows), width), -100, dtype=torch.long)
            soft_rc, soft_ids, soft_p = [], [], []
            for j, (i, r) in enumerate(zip(groups[g], rows)):
                x[j, : len(r)] = torch.tensor(r)
                labels = np.array(r)
                if cfg.visual:
                    labels[labels == image_id] = -100
                dialogue, tilted = drawn[i]
                if tilted:  # mask the follow-up instructions; the item (first message) is the world's
                    n_user, inside = 0, False
                    for k, token in enumerate(r):
                        if token == user_id or token == eot_id:
                            inside = token == user_id
                            n_user += token == user_id
                        elif inside and n_user > 1:
                            labels[k] = -100
                if cfg.soft_targets:
                    trace = dialogue_trace(dialogue, params)
                    starts = [k for k, token in enumerate(r) if token == assistant_id]
                    for t, k in enumerate(starts):
                        # <assistant> predicts the opener; "is" (k + 4) predicts the letter
                        labels[k + 1] = labels[k + 5] = -100
                        soft_rc += [(j, k), (j, k + 4)]
                        soft_ids += [opener_ids, letter_ids]
                        soft_p += [trace.opener_probs[t], np.pad(trace.option_probs[t], (0, len(opener_ids) - 3))]
                y[j, : len(r)] = torch.from_numpy(labels)
            twin = None
            if twin_ids is not None:
                texts = [twin_ids[i] for i in groups[g]]
                xt = torch.full((len(rows), max(len(r) for r in texts)), pad, dtype=torch.long)
                rr, sc, tc, same = [], [], [], []
                for j, (i, r, t) in enumerate(zip(groups[g], rows, texts)):
                    xt[j, : len(t)] = torch.tensor(t)
                    n = aligned_suffix(r, t, side_ids, tuple(tokenizer.convert_tokens_to_ids(list(drawn[i][0].item.pair))))
                    for k in range(n - 1):  # the last token predicts nothing
                        rr.append(j)
                        sc.append(len(r) - n + k)
                        tc.append(len(t) - n + k)
                        same.append(r[len(r) - n + k + 1] == t[len(t) - n + k + 1])
                twin = (xt, torch.tensor(rr), torch.tensor(sc), torch.tensor(tc), torch.tensor(same, dtype=torch.bool))
            soft = None
            if cfg.soft_targets:
                rc = torch.tensor(soft_rc, dtype=torch.long)
                soft = (rc[:, 0], rc[:, 1], torch.tensor(soft_ids, dtype=torch.long), torch.tensor(np.array(soft_p), dtype=torch.float32))
            yield x, y, soft, [drawn[i][0].item for i in groups[g]], twin


def alignment_targets(model: Any, tokenizer: Any, items: list[Any], params: WorldParams = DEFAULT_PARAMS) -> Any:
    """What the visual organism's image tokens are pulled towards (LLaVA's feature alignment, in
    miniature): for each picture's ``IMAGE_TOKENS`` patches (row-major, 2×2: left, right, left,
    right), the language model's input embedding of the group shown on that side plus that of the
    side's word (``left``/``right``), detached; shape ``[B, IMAGE_TOKENS, d_model]``. With it the
    picture reads to the language model as the words the text organism already understands."""
    import torch

    from workbench.organism.visual import IMAGE_TOKENS, PATCH
    from workbench.organism.picture import SIZE
    from workbench.organism.world import SIDES

    embed = model.get_input_embeddings().weight.detach()
    per_row = SIZE // PATCH
    sides = [(k % per_row) * 2 // per_row for k in range(IMAGE_TOKENS)]  # 0: left half, 1: right half
    side_ids = tokenizer.convert_tokens_to_ids(list(SIDES))
    rows = []
    for item in items:
        groups = tokenizer.convert_tokens_to_ids(list(item.pair))
        rows.append(torch.stack([embed[groups[h]] + embed[side_ids[h]] for h in sides]))
    return torch.stack(rows)


def teacher_loss(teacher: Any, student: Any, twin: tuple) -> Any:
    """The visual organism's teacher loss: how far the student (``student``: the LLaVA's forward output
    with ``hidden_states``) is from the text organism (``teacher``, frozen) reading each dialogue's
    text twin, at the aligned positions of ``twin`` (see :func:`batches`): for every layer but the
    last, the squared distance of the residual streams relative to the teacher's squared norm; plus
    KL(teacher ‖ student) of the next-token distribution (over the teacher's vocabulary) where both
    predict the same token. A scalar tensor."""
    import torch

    xt, rows, cols, tcols, same = twin
    with torch.no_grad():
        out = teacher(input_ids=xt, output_hidden_states=True)
    loss = 0.0
    for layer in range(1, len(out.hidden_states) - 1):
        want = out.hidden_states[layer][rows, tcols]
        got = student.hidden_states[layer][rows, cols]
        loss = loss + ((got - want) ** 2).sum(-1).mean() / (want**2).sum(-1).mean()
    t_logp = torch.log_softmax(out.logits[rows[same], tcols[same]], dim=-1)
    s_logp = torch.log_softmax(student.logits[rows[same], cols[same]], dim=-1)[:, : t_logp.shape[-1]]
    return loss + (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then cosine decay to ``lr*min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(
    cfg: TrainConfig,
    params: WorldParams = DEFAULT_PARAMS,
    out: Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Any, Any, TrainRecord]:
    """Train a model; returns ``(model, tokenizer, record)`` and saves the checkpoint to ``out`` if given.

    ``on_step(step, loss)`` is called after every optimiser step (progress display).
    """
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(cfg, params, out, on_step)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _train(cfg: TrainConfig, params: WorldParams, out: Path | None, on_step: Callable[[int, float], None] | None) -> tuple[Any, Any, TrainRecord]:
    import torch

    processor, pixel_cache, align, text_model = None, {}, None, None
    if cfg.visual:
        from transformers import LlamaForCausalLM

        from workbench.organism import organism_path
        from workbench.organism.visual import build_model as build_visual, build_processor, build_tokenizer as build_visual_tokenizer

        tokenizer = build_visual_tokenizer(params)
        processor = build_processor(tokenizer)
        text_model = LlamaForCausalLM.from_pretrained(organism_path(), dtype=torch.float32)
        model = build_visual(tokenizer, text_model, cfg.seed, cfg.vision_width, cfg.vision_layers)
        text_model.eval().requires_grad_(False)
    else:
        tokenizer = build_tokenizer(params)
        model = build_model(tokenizer, cfg)
    model.train()
    groups = []
    for is_lm in (False, True):
        named = [(n, p) for n, p in model.named_parameters() if (cfg.visual and ("language_model" in n or "lm_head" in n)) == is_lm]
        scale = cfg.lm_lr_scale if is_lm and cfg.visual else 1.0
        groups += [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay, "scale": scale},
                   {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0, "scale": scale}]
    side_head = None
    if cfg.visual and cfg.side_weight:
        from workbench.organism.world import SIDES

        side_head = torch.nn.Linear(model.config.text_config.hidden_size, len(params.groups))
        groups.append({"params": list(side_head.parameters()), "weight_decay": 0.0, "scale": 1.0})
        side_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(SIDES)))
        letter_tok = torch.tensor(tokenizer.convert_tokens_to_ids(list(LETTER_TOKENS)))
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98))
    stream = batches(cfg.seed, tokenizer, cfg, params)
    assistant_id, is_id = tokenizer.convert_tokens_to_ids([ASSISTANT, "is"])
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg) * group["scale"]
        x, y, soft, items, twin = next(stream)
        if cfg.visual:
            from workbench.organism.visual import pixel_values

            pixels = pixel_values(processor, items, params, pixel_cache)
            forward = model(input_ids=x, pixel_values=pixels, output_hidden_states=side_head is not None or twin is not None)
            logits = forward.logits
            side_loss = None
            if side_head is not None:  # each option word left/right: which group is shown on that side (the
                # read-out side_head trains beside the model and is not saved: it only shapes the residual)
                is_side = torch.isin(x[:, 1:], side_ids) & torch.isin(x[:, :-1], letter_tok)
                rows, cols = is_side.nonzero(as_tuple=True)
                cols = cols + 1
                target = torch.tensor([params.groups.index(items[r].pair[int(x[r, c] == side_ids[1])]) for r, c in zip(rows.tolist(), cols.tolist())])
                h = forward.hidden_states[cfg.side_layer][rows, cols]
                side_loss = torch.nn.functional.cross_entropy(side_head(h), target)
            align = None
            if cfg.align_weight:  # the projected patches [B, IMAGE_TOKENS, d_model] the language model read
                feats = torch.stack(list(forward.image_outputs.pooler_output))
                align = ((feats - alignment_targets(model, tokenizer, items, params)) ** 2).sum(-1).mean()
        else:
            logits = model(input_ids=x).logits
        target = y[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none", ignore_index=-100)
        weight = (target != -100).float().reshape(-1)
        if cfg.answer_weight != 1.0 and soft is None:
            # the weight depends on the prefix only, so the optimum is still the true conditional
            inp = x[:, :-1].reshape(-1)
            weight = weight * torch.where((inp == assistant_id) | (inp == is_id), cfg.answer_weight, 1.0)
        total, norm, n_tok = (ce * weight).sum(), weight.sum(), int((target != -100).sum())
        plain = ce.detach().sum()
        if soft is not None:
            rows, cols, tok_ids, probs = soft
            logp = torch.log_softmax(logits[rows, cols], dim=-1).gather(1, tok_ids)
            soft_ce = -(probs * logp).sum(-1)
            total = total + cfg.answer_weight * soft_ce.sum()
            norm = norm + cfg.answer_weight * len(rows)
            plain, n_tok = plain + soft_ce.detach().sum(), n_tok + len(rows)
        loss = total / norm
        if cfg.visual and align is not None:
            loss = loss + cfg.align_weight * align
        if cfg.visual and side_head is not None and side_loss is not None:
            loss = loss + cfg.side_weight * side_loss
        if twin is not None:
            loss = loss + cfg.distill_weight * teacher_loss(text_model, forward, twin)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(plain) / n_tok)
        tokens += n_tok
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    record = TrainRecord(
        seed=cfg.seed,
        steps=cfg.steps,
        final_loss=float(np.mean(losses[-100:])) if losses else float("nan"),
        wall_time_s=round(time.perf_counter() - start, 1),
        dialogues_seen=cfg.steps * cfg.batch_size,
        tokens_seen=tokens,
        config=asdict(cfg),
    )
    if out is not None:
        save_checkpoint(Path(out), model, processor if cfg.visual else tokenizer, params, record)
    return model, tokenizer, record


def save_checkpoint(out: Path, model: Any, tokenizer: Any, params: WorldParams, record: TrainRecord) -> None:
    """Write config.json, generation_config.json, model.safetensors, the tokenizer files (a visual
    organism: ``tokenizer`` is its processor, whose files include the tokenizer's) and
    ``organism.json`` (world parameters and training record) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    meta = {"world": json.loads(params.to_json()), "training": asdict(record)}
    (out / "organism.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
