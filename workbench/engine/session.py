"""A session: one batch of conversations, stepped one round at a time, the KV cache carried along.

    from workbench import load_model, Session
    s = Session(load_model("organism"), task="organism", protocol="organism", samples=3)
    r1 = s.step()                                   # round 1: the protocol's first message
    r2 = s.step()                                   # round 2: the protocol's follow-up
    r3 = s.step("answer with the stereotype about these groups .")   # an instruction typed now
    r3.responses, r3.token_entropies, r3.option_probs, r3.activations["hook_resid_post"]
    s.save("artifacts/runs/live.h5")                # a run file like any other

``workbench run`` is this loop over batches (:func:`workbench.engine.batch.run_batch`); the TUI's live
mode is this loop with a person typing the instructions.

**Instructions.** ``step(instruction)`` takes one text for every sample, a list with one text per
sample, or ``None``: then each sample's instruction comes from ``instruction_for(sample, round)``
(1-based round), by default :func:`protocol_instruction` (round 1: the protocol's ``first``
template filled with the sample; later rounds: its follow-up or injected text). A protocol whose
instructions differ per sample (drawn by the task, say) gives its own ``instruction_for``; it is the
only place a round's instructions come from.

**Each round** renders the chat template over the conversation so far plus the new user turn
(:func:`workbench.engine.chat.next_round_inputs`; the template must render earlier turns unchanged),
generates for the whole batch (:func:`workbench.engine.generation.generate_round`: the workbench's own
decode loop, ``hf.generate`` where it cannot serve), scores the options on the prompt's cache, and
pools the chosen hook sites (:mod:`workbench.engine.capture`) from the passes generation makes: the last
prompt token from the prefill, the mean over the response from the decode steps, which feed each
response token back (plus one one-token pass for the last token of an answer cut off by
``max_new_tokens``, which nothing fed back). A step runs under ``torch.inference_mode()`` (see
:mod:`workbench.engine.generation`): the arrays it returns are NumPy, the carried cache is the session's.

**KV reuse across rounds.** Round t's input is, token for token, round t−1's input, its answer and
the new template text and instruction. So the batch's cache is kept: round t runs only its new
tokens on the cache round t−1 left, and the prefill work of a batch is its transcript's length,
not the sum of every round's prompt. The layout: rows stay aligned at the right end of one cache
tensor and each round's new tokens are left-padded onto it; the positions that hold no transcript
token (round 1's left padding, later rounds' padding, the decode steps after a row stopped) stay in
the cache as holes that the attention mask hides, and position ids come from the mask, so every
token sits at its offset in its own conversation. Nothing is copied or re-aligned between rounds;
the price is attention over the holes, a few tokens per round per row (measured in
docs/PERFORMANCE.md). Numerically it is the same computation as re-running the whole conversation
(``reuse_cache=False``), which ``tests/test_session.py`` checks on every architecture family.

**Images.** A sample with an ``image`` (a vision-language model: LLaVA, LLaVA-NeXT, Gemma3) has the picture in
its first user turn (the processor's chat template; the processor expands its placeholder into the
image tokens). The pixel values (and Gemma3's ``token_type_ids``, 1 on the image tokens) enter
only a prefill that holds the image tokens: round 1, or a round that re-runs the whole
conversation; carried rounds run on the cache, which holds the image, so the vision tower runs
once per batch. Such a prefill starts a plain ``DynamicCache`` (full layers, which crop for option
scoring: Gemma3's own has sliding-window layers that cannot), and also pools the mean over the image
tokens, kept in every round's ``extras`` as ``image_{hook}`` ``[B, L, d]``.

**Memory.** A session holds one batch's cache. Before a round, if the carried cache would grow
beyond ``max_cache_bytes`` (default: half the device's free memory, a quarter of RAM on a CPU),
the round re-runs the whole conversation instead, with a :class:`CacheFallbackWarning`; its
cache, which has no holes, is carried on from there. A model whose cache is not a plain per-layer
key/value cache (sliding-window layers) re-runs every round.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from workbench.engine.capture import DEFAULT_HOOKS, HookSite, check_layers, hook_sites, pooling, round_pools, stack_sites
from workbench.engine.chat import check_generation_prompt, encode, next_round_inputs, styled_model
from workbench.errors import WorkbenchError
from workbench.engine.interventions import (Ablate, Clamp, Intervention, Plan, Steer, acts_in, describe, intervening, layers_of,
                                             make_plan, resolve_sites)
from workbench.engine.generation import CarriedCache, TokensCallback, carry, generate_round, plain_cache, score_options
from workbench.engine.lookup import Drafts
from workbench.engine.protocol import Protocol
from workbench.engine.task import Sample, Task
from workbench.engine.uncertainty import option_confidence

if TYPE_CHECKING:
    from workbench.engine.batch_result import BatchResult


PROJECTION_BEFORE = "intervention_projection_before"  # the round field (``[B, S, 2]``) of the projection before each intervention


class CacheFallbackWarning(UserWarning):
    """A round re-ran the whole conversation because the carried KV cache would not fit."""


@dataclass(frozen=True)
class RoundResult:
    """One round of a session. ``B`` samples, ``K`` options (the widest sample), ``L`` layers."""

    round: int  # 1-based
    instructions: list[str]  # [B] the user message
    responses: list[str]  # [B] generated text (after the assistant prefix)
    response_ids: list[list[int]]  # [B][tokens] without the stop token
    token_entropies: list[list[float]]  # [B][steps] nats, the stop token's step included
    prompt_spans: np.ndarray  # [B, 2] int64: the tokens this round's prompt adds, in the transcript
    response_spans: np.ndarray  # [B, 2] int64: the round's generated tokens, in the transcript
    mean_token_entropy: np.ndarray  # [B] float32
    option_probs: np.ndarray  # [B, K] float32 (NaN beyond a sample's options)
    parsed_answer: np.ndarray  # [B] int16, -1 = unparseable
    activations: dict[str, np.ndarray]  # hook → [B, 2, L, d_model] float32: last prompt token, response mean (NaN if empty)
    round_fields: dict[str, np.ndarray]  # task extras, each [B, ...]
    prefill_tokens: int  # tokens this round's prefill ran (padding excluded)
    reused_cache: bool  # whether the round ran on the cache the round before left
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # round_extras' arrays, each [B, ...]; with images image_{hook} [B, L, d]


def protocol_instruction(protocol: Protocol, task: Task, sample: Sample, round_: int) -> str:
    """The user message of ``round_`` (1-based): round 1 is the protocol's ``first`` template filled
    with the sample; later rounds are its follow-up (or the text injected at that round), which the
    task may draw per sample (``Task.followup``: the organism's ``{world}``)."""
    if round_ == 1:
        return protocol.first.format(
            context=sample.context, question=sample.question, choices=task.format_choices(sample.options)
        ).strip()
    return task.followup(sample, round_, protocol.instruction(round_))


def protocol_prefix(protocol: Protocol, task: Task, sample: Sample, round_: int) -> str:
    """The assistant prefix of ``round_`` (1-based) for ``sample``: the protocol's, its placeholders
    ({context}, {question}, {choices}) filled with the sample (the study's Llama-3 BBQ follow-up
    names the options)."""
    prefix = protocol.prefix(round_)
    if "{" not in prefix and "}" not in prefix:
        return prefix
    return prefix.format(context=sample.context, question=sample.question, choices=task.format_choices(sample.options))


class Session:
    """A batch of conversations stepped one round at a time (see the module docstring).

    ``model``: a :class:`~workbench.engine.models.LoadedModel` or a name for :func:`~workbench.engine.models.load_model`;
    ``task``/``protocol``: names or objects (no protocol: the task's own, e.g. ``vqa`` → ``vqa-moral``);
    a sample with an ``image`` (a picture file) needs an image-text-to-text model (:mod:`workbench.engine.images`); ``samples``: a list of :class:`~workbench.engine.task.Sample`,
    one ``Sample`` (e.g. a question typed in code), or a number of the organism's held-out items.
    Capture ``hooks`` at ``layers`` (default: every layer), or give checked ``sites``. ``strict``:
    a task that cannot compute its round fields (the organism's posterior, for an instruction from
    outside its world) is an error; otherwise a warning, and the session leaves them out.
    ``fields_every_round=False`` leaves each :class:`RoundResult`'s ``round_fields`` empty and
    computes them once, over the whole dialogue, in :meth:`result` (a task such as the organism
    recomputes its posterior over the dialogue so far, so per round that is O(R²) work).
    A protocol with a ``chat_template`` or a ``system`` message is rendered with them
    (:func:`workbench.engine.chat.styled_model`: ``session.model`` is then a copy whose tokenizer
    has them; the model given is left as it was).
    ``round_extras`` (:func:`workbench.engine.open_ended.round_extras`: a scorer, sampled answers) is called
    after each round's generation with (its output, the round prompts, the samples, the round) and
    returns more per-round arrays ``[B, ...]``, kept in ``RoundResult.extras`` and in :meth:`result`'s
    round fields. ``lookup`` (greedy decoding): each round drafts its answers' next tokens from the
    rows' earlier answers and verifies them in one pass (:mod:`workbench.engine.lookup`): the same
    tokens in fewer passes, the numbers those of one-token steps to float rounding; False: one pass
    per token, as ``generate``.
    """

    def __init__(
        self,
        model: Any,
        task: str | Task = "organism",
        protocol: str | Protocol | None = None,
        samples: int | Sample | Sequence[Sample] = 3,
        *,
        hooks: Sequence[str] = DEFAULT_HOOKS,
        layers: Sequence[int] | None = None,
        sites: list[HookSite] | None = None,
        seed: int = 0,
        reuse_cache: bool = True,
        max_cache_bytes: int | None = None,
        instruction_for: Callable[[Sample, int], str] | None = None,
        strict: bool = False,
        fields_every_round: bool = True,
        round_extras: Callable[[Any, list[list[int]], list[Sample], int], dict[str, np.ndarray]] | None = None,
        interventions: Sequence[Intervention] = (),
        lookup: bool = True,
    ) -> None:
        from workbench.engine.models import load_model
        from workbench.engine.protocol import load_protocol
        from workbench.engine.tasks import DEFAULT_PROTOCOLS, get_task

        self.task = get_task(task) if isinstance(task, str) else task
        if protocol is None:  # the task's own (vqa → vqa-moral …); the organism's for a task of one's own
            protocol = DEFAULT_PROTOCOLS.get(self.task.name, "organism")
        self.protocol = load_protocol(protocol) if isinstance(protocol, str) else protocol
        # the protocol's chat template and system message, if it sets them (the model object is left as it was)
        self.model = styled_model(load_model(model) if isinstance(model, str) else model, self.protocol)
        self.samples = _as_samples(self.task, samples)
        if any(s.image for s in self.samples):  # checked and recorded (path, sha256, thumbnail) as load_vqa does
            self.samples = [_with_image_record(s) for s in self.samples]
        if sites is None:
            sites = hook_sites(self.model, list(hooks), check_layers(None if layers is None else list(layers), self.model.n_layers))
        self.sites = sites
        self.seed = seed
        self.reuse_cache = reuse_cache
        self.lookup = lookup
        self._lookup_cap: int | None = None  # lookup decoding: the round before's report (RoundOutput.lookup_cap)
        self.max_cache_bytes = max_cache_bytes if max_cache_bytes is not None else _default_cache_budget(self.model.device)
        self.instruction_for = instruction_for or functools.partial(protocol_instruction, self.protocol, self.task)
        self.strict = strict
        self.fields_every_round = fields_every_round
        self.round_extras = round_extras
        self.interventions: list[Intervention] = list(interventions)
        self._intervention_sites: dict[tuple[str, int], HookSite] = {}
        self._schedule: list[tuple[Intervention, ...]] = []  # per round stepped: the interventions that acted
        self._overridden = False  # a step was given its own interventions (the record below then stops)
        self._check_interventions(self.interventions)
        if self.protocol.decoding.do_sample:
            torch.manual_seed(seed + self.samples[0].index)  # per batch, so a resumed run draws the same tokens
        tok = self.model.tokenizer
        continuations = [self.task.option_continuations(s) for s in self.samples]
        flat = iter(encode(tok, [text for texts in continuations for text in texts]))
        self._option_tokens = [[next(flat) for _ in texts] for texts in continuations]
        self.n_options = max((len(o) for o in self._option_tokens), default=0)
        self._rows_by_option_count: dict[int, list[int]] = {}
        for i, opts in enumerate(self._option_tokens):
            if opts:
                self._rows_by_option_count.setdefault(len(opts), []).append(i)
        batch = len(self.samples)
        self._instructions: list[list[str]] = [[] for _ in range(batch)]
        self._prefixes: list[list[str]] = [[] for _ in range(batch)]  # each row's assistant prefixes
        self._round_inputs: list[list[str]] = [[] for _ in range(batch)]
        self._history = [""] * batch  # each conversation as the template rendered it, answers as sentinels
        self._transcripts: list[list[int]] = [[] for _ in range(batch)]
        self._closing: list[list[int]] = [[] for _ in range(batch)]
        self._rounds: list[RoundResult] = []
        self._past: CarriedCache | None = None
        self._fields_error: str | None = None
        self._vision = _check_images(self.model, self.samples)
        self._pixels: dict[str, torch.Tensor] = {}  # the processor's image inputs, made in round 1
        self._image_pool: dict[str, np.ndarray] = {}  # hook → [B, L, d]: the mean over the image tokens

    # ------------------------------------------------------------------ state
    @property
    def rounds(self) -> list[RoundResult]:
        """Every round stepped so far."""
        return list(self._rounds)

    @property
    def transcripts(self) -> list[list[int]]:
        """``[B][tokens]``: each conversation so far, with the template's closing text after the last answer."""
        return [t + c for t, c in zip(self._transcripts, self._closing)]

    @property
    def prefill_tokens(self) -> int:
        """Tokens every round's prefill ran so far (padding excluded)."""
        return sum(r.prefill_tokens for r in self._rounds)

    # ------------------------------------------------------------------ one round
    @torch.inference_mode()
    def step(
        self, instruction: str | Sequence[str] | None = None, on_tokens: TokensCallback | None = None,
        interventions: Sequence[Intervention] | None = None,
    ) -> RoundResult:
        """Run the next round for every sample and return it (see the module docstring for where the
        instruction comes from when ``instruction`` is None). ``interventions``: this round's, in
        place of the session's (``[]``: none this round); each acts if its ``rounds`` include this
        one (:mod:`workbench.engine.interventions`). ``on_tokens(step, new_ids)``, when
        given, is called from the generation loop after each decoding step with each sample's new
        response tokens (``[token]``, or ``[]`` once it stopped; see
        :class:`workbench.engine.generation.ResponseStream`): the TUI shows a response growing with it."""
        model, tok = self.model, self.model.tokenizer
        batch, t = len(self.samples), len(self._rounds)
        texts = self._round_instructions(instruction)
        prefixes = [self._prefixes[i] + [protocol_prefix(self.protocol, self.task, s, t + 1)] for i, s in enumerate(self.samples)]
        rendered = next_round_inputs(tok, [self._instructions[i] + [texts[i]] for i in range(batch)], prefixes, self._history,
                                     image=self._vision)
        pieces, closings, histories = (list(x) for x in zip(*rendered))
        check_generation_prompt(tok, self._instructions[0] + [texts[0]], prefixes[0], self._round_inputs[0] + [pieces[0]],
                                image=self._vision)
        encoded = encode(tok, pieces + closings)
        piece_ids, closing_ids = encoded[:batch], encoded[batch:]
        if self._vision and t == 0:  # the image placeholder expanded into the image tokens, and the pixel values
            piece_ids = self._encode_images(pieces)

        prompt_spans = np.array([(len(tr), len(tr) + len(p)) for tr, p in zip(self._transcripts, piece_ids)], dtype=np.int64)
        past = self._carried_cache(piece_ids)
        new = piece_ids if past is not None else [tr + p for tr, p in zip(self._transcripts, piece_ids)]
        width = max(len(n) for n in new)
        with_image = self._vision and past is None  # this prefill holds the image tokens: pixel values go in
        weights = torch.zeros(batch, 2 if with_image else 1, width, device=model.device)
        weights[:, 0, -1] = 1.0  # left padding: every row's last prompt token is the last position
        if with_image:  # row 1: the mean over the image tokens
            weights[:, 1] = _image_rows(new, width, model.image_token_id).to(model.device)
        steps: dict[HookSite, list[torch.Tensor]] = {}
        applied = self._round_schedule(interventions, t + 1)
        self._overridden = self._overridden or interventions is not None
        plan = self._intervention_plan(applied, past is not None, new, prompt_spans, width) if applied else None
        with intervening(model.hf, plan, "inner"):  # module outputs: inside capture's wrappers, so it sees them
            with pooling(model.hf, self.sites, weights, steps) as pooled, intervening(model.hf, plan, "outer"):
                out = generate_round(model.hf, tok, new, self.protocol.decoding, model.device, past, on_tokens=on_tokens,
                                     model_kwargs=self._image_kwargs if with_image else None,
                                     drafts=self._drafts() if self.lookup else None)
                self._lookup_cap = out.lookup_cap
                carried = carry(model.hf, out, tok.pad_token_id)
            if plan is not None:
                plan.recording = False  # option scoring's tokens are not the response's
            if with_image and self.sites:
                self._image_pool = {h: a[:, 0].numpy() for h, a in _cpu(stack_sites({k: v[:, 1:] for k, v in pooled.items()}, self.sites)).items()}
                pooled = {k: v[:, :1] for k, v in pooled.items()}
            fed = carried.mask[:, out.prompt_mask.shape[1]:]  # [B, T]: 1 where a pass after the prompt fed a response token
            acts = self._round_activations(pooled, steps, fed)
            option_nll = torch.full((batch, self.n_options), float("nan"))
            if self.n_options:
                leads = [self.task.lead_length(ids, tok) for ids in out.response_ids]
                with intervening(model.hf, plan, "outer"):  # option tokens: the round's response tokens
                    option_nll = score_options(model.hf, out, leads, self._option_tokens, tok.pad_token_id)
        response_ids, token_entropies = out.response_ids, out.token_entropies
        steer = {"intervene": functools.partial(self._steering_samples, applied)} if applied else {}
        extras = {} if self.round_extras is None else self.round_extras(
            out, [tr + p for tr, p in zip(self._transcripts, piece_ids)], self.samples, t + 1, **steer)
        extras.update({f"image_{h}": a for h, a in self._image_pool.items()})  # the same every round (causal)
        if self.interventions:
            extras[PROJECTION_BEFORE] = self._projection_before(plan, fed)
        self._past = carried if self.reuse_cache and plain_cache(carried.cache) else None
        del out, carried  # the cache lives on only in self._past

        response_spans = np.zeros((batch, 2), dtype=np.int64)
        for i in range(batch):
            self._instructions[i].append(texts[i])
            self._round_inputs[i].append(pieces[i])
            self._history[i] = histories[i]
            self._closing[i] = closing_ids[i]
            start = len(self._transcripts[i]) + len(piece_ids[i])
            response_spans[i] = (start, start + len(response_ids[i]))
            self._transcripts[i] = self._transcripts[i] + piece_ids[i] + response_ids[i]
        self._prefixes = prefixes
        self._schedule.append(applied)

        responses = [tok.decode(ids) for ids in response_ids]
        if list(self._rows_by_option_count) == [self.n_options] and len(self._rows_by_option_count[self.n_options]) == batch:
            probs = option_confidence(option_nll).numpy()  # every row has every option: one softmax
        else:
            probs = np.full((batch, self.n_options), np.nan, dtype=np.float32)
            for k, rows in self._rows_by_option_count.items():  # one softmax per option count (NaN beyond it)
                probs[rows, :k] = option_confidence(option_nll[rows, :k]).numpy()
        result = RoundResult(
            round=t + 1,
            instructions=texts,
            responses=responses,
            response_ids=response_ids,
            token_entropies=token_entropies,
            prompt_spans=prompt_spans,
            response_spans=response_spans,
            mean_token_entropy=_row_means(token_entropies),
            option_probs=probs,
            parsed_answer=np.array([self.task.parse_answer(s, r) for s, r in zip(self.samples, responses)], dtype=np.int16),
            activations=acts,
            round_fields={},
            prefill_tokens=sum(len(n) for n in new),
            reused_cache=past is not None,
            extras=extras,
        )
        result = replace(result, round_fields=self._last_round_fields(responses))
        self._rounds.append(result)
        return result

    def _drafts(self) -> Drafts:
        """Each row's earlier answers, oldest first, each closed by the template's first closing token
        (what ends a turn): what lookup decoding drafts from (:mod:`workbench.engine.lookup`); the
        widest first draft as the round before left it, from the second round with an answer to
        draft from on (before it, nothing said how well drafts do)."""
        answers = [[list(r.response_ids[i]) + self._closing[i][:1] for r in self._rounds] for i in range(len(self.samples))]
        if len(self._rounds) >= 2 and self._lookup_cap is not None:
            return Drafts(answers, self._lookup_cap)
        return Drafts(answers)

    def _encode_images(self, pieces: list[str]) -> list[list[int]]:
        """Round 1 of a vision session: each row's first piece through the processor with its image
        → the row's token ids, the image placeholder expanded into the image tokens; the pixel values
        (and what the family needs beside them) are kept for every prefill that holds the image."""
        from workbench.engine.images import load_image

        images = [[load_image(s.image, f"sample {s.id}")] for s in self.samples]
        try:
            enc = self.model.processor(text=pieces, images=images, add_special_tokens=False, padding=True, return_tensors="pt")
        except (ValueError, TypeError, RuntimeError) as e:
            raise WorkbenchError(f"the model's processor refused the images ({str(e).splitlines()[0][:200]})") from None
        mask = enc["attention_mask"].bool()
        ids = [row[keep].tolist() for row, keep in zip(enc["input_ids"], mask)]
        self._pixels = {k: v for k, v in enc.items()  # kept on the CPU: only a prefill from scratch needs them again
                        if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids") and torch.is_tensor(v)}
        if "pixel_values" in self._pixels:
            self._pixels["pixel_values"] = self._pixels["pixel_values"].to(self.model.hf.dtype)
        return ids

    def _image_kwargs(self, ids: torch.Tensor) -> dict[str, Any]:
        """``generate``'s image keywords for a prefill over the left-padded ``ids`` ``[B, width]`` that
        holds the image tokens: the pixel values, ``token_type_ids`` (1 exactly on the image tokens,
        0 on all text: Gemma3 attends bidirectionally inside an image) where the processor makes
        them, and a plain cache (full layers, which crop, where a family's own cache would have
        sliding-window layers that cannot: option scoring crops)."""
        from transformers import DynamicCache

        kwargs: dict[str, Any] = {**{k: v.to(self.model.device) for k, v in self._pixels.items()}, "cache": DynamicCache()}
        if "token_type_ids" in getattr(self.model.processor, "model_input_names", ()):
            kwargs["token_type_ids"] = (ids == self.model.image_token_id).long()
        return kwargs

    def _check_interventions(self, interventions: Sequence[Intervention]) -> None:
        """Resolve where ``interventions`` act (width, layers, hooks, checked once per place);
        refuse them beside ``round_extras`` that run the model (sampled answers would run unsteered;
        a callback says it does not with ``runs_model = False``, as a scorer's does: it reads the texts)."""
        if not interventions:
            return
        if self.round_extras is not None and getattr(self.round_extras, "runs_model", True) \
                and not getattr(self.round_extras, "takes_interventions", False):
            raise WorkbenchError("interventions cannot be combined with a round_extras callback that runs the model "
                                 "unless it takes them (intervene=…, as the sampled answers' does)")
        bad = [iv for iv in interventions if not isinstance(iv, (Steer, Ablate, Clamp))]
        if bad:
            raise WorkbenchError(f"an intervention is a Steer, Ablate or Clamp, not {type(bad[0]).__name__}")
        new = [iv for iv in interventions if any((iv.hook, layer) not in self._intervention_sites
                                                   for layer in layers_of(iv, self.model.n_layers))]
        if new:
            self._intervention_sites.update(resolve_sites(self.model, new))

    def _round_schedule(self, interventions: Sequence[Intervention] | None, round_: int) -> tuple[Intervention, ...]:
        """The interventions that act in ``round_`` (1-based): the step's own, else the session's."""
        chosen = self.interventions if interventions is None else list(interventions)
        if interventions is not None:
            self._check_interventions(chosen)
        return tuple(iv for iv in chosen if acts_in(iv, round_))

    def _intervention_plan(
        self, applied: tuple[Intervention, ...], carried: bool, new: list[list[int]], prompt_spans: np.ndarray, width: int,
    ) -> Plan:
        """This round's interventions with their prefill weights ``[B, width]``: on a carried cache
        the prefill is this round's prompt tokens; on a full recompute it is the whole conversation,
        each earlier round's tokens weighted by the interventions that acted in that round (so the
        cache holds what a carried run holds)."""
        batch = len(new)
        offsets = [width - len(n) for n in new]  # left padding
        schedule = ([] if carried else list(self._schedule)) + [applied]
        first = len(self._rounds) + 1 - len(schedule)  # 0-based round of schedule[0]
        spans_of = [(r.prompt_spans, r.response_spans) for r in self._rounds[first:]] + [(prompt_spans, None)]
        if carried:
            spans_of = [(np.stack([prompt_spans[:, 0] - prompt_spans[:, 0], prompt_spans[:, 1] - prompt_spans[:, 0]], 1), None)]
        unique: list[Intervention] = []
        for ivs in schedule:
            unique += [iv for iv in ivs if not any(iv is u for u in unique)]
        active = []
        for iv in unique:
            w = np.zeros((batch, width), dtype=np.float32)
            for ivs, (p_spans, r_spans) in zip(schedule, spans_of):
                if not any(iv is x for x in ivs):
                    continue
                for i in range(batch):
                    if iv.positions in ("prompt", "all"):
                        w[i, offsets[i] + p_spans[i, 0]: offsets[i] + p_spans[i, 1]] = 1.0
                    if iv.positions in ("response", "all") and r_spans is not None:
                        w[i, offsets[i] + r_spans[i, 0]: offsets[i] + r_spans[i, 1]] = 1.0
            weight = torch.from_numpy(w).to(self.model.device) if w.any() else None
            active.append((iv, weight, any(iv is x for x in applied) and iv.positions in ("response", "all")))
        plan = make_plan(self.model, self._intervention_sites, active)
        plan.watch = {(id(iv), layer) for iv, layer in self._watched() if any(iv is x for x in applied)}
        return plan

    @contextmanager
    def _steering_samples(self, applied: tuple[Intervention, ...], rows: int) -> Iterator[None]:
        """This round's interventions installed for a pass of ``rows`` sampled answers that continue
        the round's prompt cache (``sampling.sample_round``: its prompt but the last token, each row
        repeated): the last prompt token is a prompt position, every sampled token a response one,
        as in the round's own pass; nothing is recorded (the projections are the round's)."""
        active = [(iv, torch.ones(rows, 1, device=self.model.device) if iv.positions in ("prompt", "all") else None,
                   iv.positions in ("response", "all")) for iv in applied]
        plan = make_plan(self.model, self._intervention_sites, active)
        plan.recording = False
        with intervening(self.model.hf, plan, "inner"), intervening(self.model.hf, plan, "outer"):
            yield

    def _watched(self) -> list[tuple[Intervention, int]]:
        """The session's interventions expanded per layer: the columns of ``PROJECTION_BEFORE``."""
        return [(iv, layer) for iv in self.interventions for layer in layers_of(iv, self.model.n_layers)]

    def _projection_before(self, plan: Plan | None, fed: torch.Tensor) -> np.ndarray:
        """``[B, S, 2]`` float32: per (intervention, layer) of the session's interventions, the
        projection on d̂ of the hooked activation *before* the intervention, at the round's last
        prompt token and averaged over its response tokens (as capture pools them: ``fed`` ``[B, T]``,
        the carried mask after the prompt, 1 where a later pass fed a response token); NaN where it
        did not act this round (or an empty response)."""
        watched = self._watched()
        out = np.full((len(self.samples), len(watched), 2), np.nan, dtype=np.float32)
        recorded = plan.recorded if plan is not None else {}
        take = fed.cpu().numpy().astype(bool)
        lengths = take.sum(1)
        for s, (iv, layer) in enumerate(watched):
            slot = recorded.get((id(iv), layer))
            if slot is None:
                continue
            if slot["last"] is not None:
                out[:, s, 0] = slot["measure"](slot["last"]).cpu().numpy()
            if slot["steps"]:
                steps = slot["measure"](torch.cat(slot["steps"], 1)).cpu().numpy()  # [B, T]: the later passes' positions
                with np.errstate(invalid="ignore"):
                    out[:, s, 1] = np.where(lengths > 0, (steps * take).sum(1) / np.maximum(lengths, 1), np.nan)
        return out

    def interventions_record(self) -> list[dict[str, Any]]:
        """Every intervention that acted so far, described as a run file records it
        (:func:`workbench.engine.interventions.describe`), with the rounds it actually acted in."""
        unique: list[Intervention] = []
        for ivs in self._schedule:
            unique += [iv for iv in ivs if not any(iv is u for u in unique)]
        return [describe(iv, [k + 1 for k, ivs in enumerate(self._schedule) if any(iv is x for x in ivs)]) for iv in unique]

    @property
    def schedule(self) -> list[tuple[Intervention, ...]]:
        """Per round stepped, the interventions that acted in it."""
        return list(self._schedule)

    def _carried_cache(self, piece_ids: list[list[int]]) -> CarriedCache | None:
        """The cache to run this round on, or None to re-run the whole conversation (no cache yet,
        reuse off, or it would grow beyond ``max_cache_bytes``)."""
        past = self._past
        self._past = None
        if past is None:
            return None
        grown = past.width + max(len(p) for p in piece_ids) + self.protocol.decoding.max_new_tokens + 1
        need = _cache_bytes(past.cache) // max(1, past.width) * grown
        if need > self.max_cache_bytes:
            warnings.warn(
                f"the carried KV cache would take {need / 2**20:.0f} MiB (over {self.max_cache_bytes / 2**20:.0f} MiB): "
                f"round {len(self._rounds) + 1} re-runs the whole conversation instead",
                CacheFallbackWarning, stacklevel=3,
            )
            return None
        return past

    def _round_activations(
        self, pooled: dict[HookSite, torch.Tensor], steps: dict[HookSite, list[torch.Tensor]], fed: torch.Tensor
    ) -> dict[str, np.ndarray]:
        """``{hook: [B, 2, L, d]}``: the prefill's last position and the mean over each response's
        tokens where the later passes fed them (``fed`` ``[B, T]``: the carried mask after the
        prompt; NaN for an empty response)."""
        if not self.sites:
            return {}
        return {h: a.numpy() for h, a in round_pools(pooled, steps, self.sites, fed).items()}

    def _last_round_fields(self, responses: list[str]) -> dict[str, np.ndarray]:
        """This round's task fields, each ``[B, ...]``, from the dialogue so far (this round's
        ``responses`` not yet in ``self._rounds``)."""
        if self._fields_error is not None or not self.fields_every_round:
            return {}
        fields = self._checked_fields(responses)
        return {k: v[:, -1] for k, v in fields.items()}

    def _checked_fields(self, responses_last: list[str] | None = None) -> dict[str, np.ndarray]:
        """:meth:`_fields`, a task's refusal handled as ``strict`` says."""
        try:
            return self._fields(responses_last)
        except WorkbenchError as e:
            if self.strict:
                raise
            self._fields_error = str(e)
            warnings.warn(f"the task's round fields are left out of this session: {e}", UserWarning, stacklevel=3)
            return {}

    def _fields(self, responses_last: list[str] | None = None) -> dict[str, np.ndarray]:
        """Every round's task fields over the dialogue so far, each ``[B, R, ...]``."""
        per_sample: dict[str, list[np.ndarray]] = {}
        for i, s in enumerate(self.samples):
            responses = [r.responses[i] for r in self._rounds] + ([responses_last[i]] if responses_last is not None else [])
            for key, value in self.task.round_fields(s, list(self._instructions[i]), responses).items():
                per_sample.setdefault(key, []).append(np.asarray(value))
        return {k: np.stack(v) for k, v in per_sample.items()}

    # ------------------------------------------------------------------ every round so far
    def result(self) -> "BatchResult":
        """Every round stepped so far as one :class:`~workbench.engine.batch_result.BatchResult` (``[B, R, ...]``)."""
        from workbench.engine.batch_result import BatchResult

        rounds = self._rounds
        if not rounds:
            raise WorkbenchError("the session has no rounds yet (call step() first)")
        per_sample = lambda f: [[f(r)[i] for r in rounds] for i in range(len(self.samples))]  # noqa: E731
        stack = lambda f: np.stack([f(r) for r in rounds], 1)  # noqa: E731
        fields = {} if self._fields_error is not None else self._checked_fields()
        fields.update({name: np.stack([r.extras[name] for r in rounds], 1) for name in rounds[0].extras
                       if not (name == PROJECTION_BEFORE and self._overridden)})
        return BatchResult(
            instructions=per_sample(lambda r: r.instructions),
            responses=per_sample(lambda r: r.responses),
            response_ids=per_sample(lambda r: r.response_ids),
            token_entropies=per_sample(lambda r: r.token_entropies),
            prompt_spans=stack(lambda r: r.prompt_spans),
            response_spans=stack(lambda r: r.response_spans),
            transcripts=self.transcripts,
            mean_token_entropy=stack(lambda r: r.mean_token_entropy),
            option_probs=stack(lambda r: r.option_probs),
            parsed_answer=stack(lambda r: r.parsed_answer),
            activations={h: np.stack([r.activations[h] for r in rounds], 1) for h in rounds[0].activations},
            round_fields=fields,
        )

    def save(self, path: str | Path, activation_dtype: str = "float32", command_line: str = "") -> Path:
        """Write every round so far to a new run file at ``path`` (refuses an existing one) through
        :class:`workbench.store.writer.RunWriter`, with the settings a ``workbench run`` file records
        (:func:`workbench.engine.settings.run_settings`), so ``workbench info``, the probes and the TUI read it
        like any run. The protocol stored is this session's with ``rounds`` = the rounds stepped;
        the instructions actually given are in ``rounds/instruction``. ``command_line``: what
        started the session, recorded as a run's is (``""``, as from the Python API, by default).
        Returns the path."""
        from workbench.engine.batch_result import batch_arrays
        from workbench.engine.settings import run_settings, sample_table
        from workbench.store.writer import RunWriter

        res = self.result()
        n_rounds = len(self._rounds)
        protocol = replace(self.protocol, rounds=n_rounds)
        layers = list(dict.fromkeys(s.layer for s in self.sites))
        hooks = list(dict.fromkeys(s.hook for s in self.sites))
        data = {"files": [], "condition": None, "category": None, "offset": 0, "limit": None, "session": True}
        settings = run_settings(self.model, self.task, protocol, self.samples, data, hooks, layers, len(self.samples),
                                activation_dtype, self.seed, command_line, lookup=self.lookup)
        settings.update(getattr(self.round_extras, "settings", {}))  # open_ended.round_extras: the scorer and sampling
        if any(self._schedule):
            settings["interventions"] = self.interventions_record()
        path = Path(path)
        hook_shapes = {h: (len(layers), self.model.d_model) for h in hooks}
        with RunWriter.create(path, settings, sample_table(self.samples), n_rounds, hook_shapes, activation_dtype) as writer:
            gold = np.asarray([s.gold for s in self.samples])
            writer.write_batch(0, batch_arrays(res, gold, self.n_options), res.activations, res.transcripts)
            writer.finish()
        return path

    def _round_instructions(self, instruction: str | Sequence[str] | None) -> list[str]:
        batch, t = len(self.samples), len(self._rounds)
        if instruction is None:
            return [self.instruction_for(s, t + 1) for s in self.samples]
        texts = [instruction] * batch if isinstance(instruction, str) else list(instruction)
        if len(texts) != batch or not all(isinstance(x, str) for x in texts):
            raise WorkbenchError(f"step() takes one instruction or a list of {batch} (one per sample)")
        if not all(x.strip() for x in texts):
            raise WorkbenchError("an instruction must not be empty")
        return texts


def _as_samples(task: Task, samples: int | Sample | Sequence[Sample]) -> list[Sample]:
    if isinstance(samples, Sample):
        return [samples]
    if isinstance(samples, int) and not isinstance(samples, bool):
        if task.name != "organism":
            raise WorkbenchError(f"samples={samples}: a number of samples is the organism's; give task {task.name!r} "
                                 "a list of workbench.engine.task.Sample (e.g. from workbench.engine.tasks.load_bbq)")
        from workbench.organism.task import load_organism_samples

        return load_organism_samples(limit=samples)
    samples = list(samples)
    if not samples or not all(isinstance(s, Sample) for s in samples):
        raise WorkbenchError("samples must be a number, a workbench.engine.task.Sample, or a non-empty list of them")
    return samples


def _check_images(model: Any, samples: list[Sample]) -> bool:
    """Whether the session's samples carry images (then every one must, and the model must take
    them: one line otherwise)."""
    with_image = [s for s in samples if s.image]
    if not with_image:
        return False
    if len(with_image) != len(samples):
        missing = next(s for s in samples if not s.image)
        raise WorkbenchError(f"sample {missing.id} has no image, but others of the batch have: give every sample an image")
    if not getattr(model, "vision", False):
        raise WorkbenchError(f"the samples carry images, but {model.name} is a text-only model "
                             "(give an image-text-to-text model: a LLaVA, LLaVA-NeXT or Gemma3 folder or hub name)")
    return True


def _with_image_record(sample: Sample) -> Sample:
    """``sample`` with its image's record (:func:`workbench.engine.images.image_record`) in ``extra``
    when it has an image and no record yet (a Sample made in code); one line for a bad picture."""
    if not sample.image or isinstance(sample.extra.get("image"), dict):
        return sample
    from workbench.engine.images import image_record

    path = Path(sample.image).expanduser()
    record = image_record(path, sample.image, f"sample {sample.id}")
    return replace(sample, image=str(path), extra={**sample.extra, "image": record})


def _image_rows(rows: list[list[int]], width: int, image_token_id: int) -> torch.Tensor:
    """``[B, width]`` pooling weights: 1/n on each left-padded row's n image tokens (0 elsewhere)."""
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
    hit = (ids == image_token_id).float()
    return hit / hit.sum(-1, keepdim=True).clamp(min=1)


def _cpu(acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {h: a.float().cpu() for h, a in acts.items()}


def _row_means(rows: list[list[float]]) -> np.ndarray:
    """``[B]`` float32: the mean of each row, NaN for an empty one."""
    return np.array([sum(r) / len(r) if r else np.nan for r in rows], dtype=np.float32)


def _cache_bytes(cache: Any) -> int:
    """Bytes of a cache's keys and values."""
    layers = getattr(cache, "layers", [])
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.keys, layer.values) if t is not None)


def _default_cache_budget(device: str) -> int:
    """Half the free memory of a CUDA device; a quarter of the machine's RAM otherwise."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0] * 0.5)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.25)
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30
