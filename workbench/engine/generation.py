"""One round of batched, KV-cached generation and option scoring on the plain Hugging Face model.

Generation runs the workbench's own decode loop (:func:`decode_round`): the model's forward called
directly (for Llama-like models and GPT-2, its lean forward, :mod:`workbench.engine.lean`: the same numbers
without ``transformers``' per-call Python; the cut-off pass and option scoring use it too), one
prefill forward over the round's new tokens ``[batch, seq]`` (left padding, attention
mask, the KV cache), then one forward of one token per step, with ``generate``'s arithmetic step for
step (same greedy tokens; sampling through ``generate``'s own logits processors and
``torch.multinomial``, so the same draws from the same seed) and none of its per-call set-up. A greedy
round given each row's earlier answers (:class:`~workbench.engine.lookup.Drafts`, what a
:class:`~workbench.engine.session.Session` gives unless ``lookup=False``) verifies drafts instead of
stepping one token at a time (:func:`_lookup_steps`): the same tokens in fewer passes, the numbers
those of one-token steps to float rounding. The
cache it fills keeps its keys and values in a buffer grown once per round (:func:`growing_layer_class`),
not by a ``torch.cat`` of the whole cache per step, and decode steps over a cache with holes take a
4-D boolean mask sliced from one built per round. What the loop cannot serve (a sliding-window or
other non-plain cache, a forward without ``cache=``/``position_ids``, a generation config with logits
processors of its own: :func:`decode_loop_problem`) goes through ``hf.generate``
(:func:`hf_generate_round`) with a :class:`DecodeFallbackWarning`. The logits of every generated
step are kept, so token entropies cost nothing extra. A round may start from
the cache an earlier round left (:class:`CarriedCache`): then only the round's new tokens are run,
and the attention mask says which cached positions hold the conversation (the rest are holes:
padding and the steps after a row stopped). Position ids come from that mask, so a token's
position is its offset in the conversation whatever the cache's layout.

Options are scored after the prompt (and after the response's lead, see ``Task.lead_length``) by
reusing the prompt's KV cache: only the option tokens are run, never the prompt again, all options
of a sample in one row (an attention mask keeps them apart). When every option is a single token
and the model already generated up to the answer, its logits at that step are read directly and no
pass is made at all.

Every pass runs under ``torch.inference_mode()`` (no autograd bookkeeping, not even version
counters): on a small model, where each of ``generate``'s many small operations costs mostly its
dispatch, that alone makes a round about a tenth faster than under ``no_grad`` (docs/PERFORMANCE.md).
The tensors it returns, the cache included, are inference tensors: read them anywhere, but change
them in place only inside inference mode (a :class:`~workbench.engine.session.Session` step is).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch

from workbench.engine.lean import attention_bias, lean_logits, pass_plan, sliding_window_layers
from workbench.engine.lookup import MAX_DRAFT, Drafts, draft
from workbench.engine.protocol import Decoding
from workbench.engine.uncertainty import token_entropy


@dataclass(frozen=True)
class RoundOutput:
    """What one generation round returns, per sample of the batch."""

    response_ids: list[list[int]]  # generated tokens, without the stop token
    token_entropies: list[list[float]]  # entropy of each generated step (stop token's step included)
    step_logits: torch.Tensor  # [batch, n_steps, vocab] raw logits of every step
    cache: Any  # the KV cache: prompt_len positions of the prompt, then the positions the decode passes fed
    prompt_mask: torch.Tensor  # [batch, prompt_len]: 1 where the cache holds a prompt token
    # [batch, cached − prompt_len] long: 1 where the cache after the prompt holds a response token fed back
    # (token j of a row at its j-th such position); None: one decode step per position, step j feeding
    # token j (``generate``'s layout: :meth:`fed_mask`)
    response_mask: torch.Tensor | None = None
    lookup_cap: int | None = None  # lookup decoding: the widest draft the next round's first pass should run

    def fed_mask(self) -> torch.Tensor:
        """``[batch, cached − prompt_len]`` long, on the CPU: 1 where the cache after the prompt holds
        a response token (every generated token but the last of an answer cut off by ``max_new_tokens``)."""
        if self.response_mask is not None:
            return self.response_mask.cpu()
        steps = self.step_logits.shape[1] - 1  # decode steps in the cache after the prompt
        lengths = torch.tensor([len(ids) for ids in self.response_ids])
        return (torch.arange(steps)[None, :] < lengths[:, None]).long()


@dataclass(frozen=True)
class CarriedCache:
    """A batch's KV cache between rounds: every transcript token so far, at ``width`` positions."""

    cache: Any
    mask: torch.Tensor  # [batch, width] long: 1 where a position holds a transcript token, 0 at holes

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])


def pad(seqs: list[list[int]], pad_id: int, device: str, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists on the ``left`` (generation) or ``right`` (one causal pass, where pads after a
    sequence cannot touch it) → ids ``[batch, max_len]`` and attention mask ``[batch, max_len]``."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):  # row by row through NumPy: 7× faster than torch.tensor of nested lists
        where = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, where] = s
        mask[i, where] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def stop_ids(hf: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: the generation config's EOS ids and the tokenizer's."""
    ids = hf.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


TokensCallback = Callable[[int, list[list[int]]], None]


class ResponseStream:
    """A ``generate`` streamer that hands each decoding step's new response tokens to
    ``on_tokens(step, new_ids)``: ``step`` counts from 0, ``new_ids[i]`` is ``[token]`` for a row
    still answering and ``[]`` from the row's stop token on, so each row's tokens joined over the
    steps are exactly its ``RoundOutput.response_ids``. Called from the generating thread."""

    def __init__(self, on_tokens: TokensCallback, stops: list[int]) -> None:
        self.on_tokens, self.stops = on_tokens, set(stops)
        self.step = -1  # the first put is the prompt
        self.stopped: list[bool] = []

    def put(self, value: torch.Tensor) -> None:
        if self.step < 0:
            self.stopped = [False] * int(value.shape[0])
            self.step = 0
            return
        new = []
        for i, token in enumerate(value.reshape(len(self.stopped), -1)[:, -1].tolist()):
            self.stopped[i] = self.stopped[i] or token in self.stops
            new.append([] if self.stopped[i] else [token])
        self.on_tokens(self.step, new)
        self.step += 1

    def put_many(self, chosen: list[list[int]]) -> None:
        """A pass that chose several tokens per row (lookup decoding): ``on_tokens`` gets each row's
        new tokens up to its stop token, as one step."""
        new = []
        for i, tokens in enumerate(chosen):
            kept = []
            for token in tokens:
                if self.stopped[i] or token in self.stops:
                    self.stopped[i] = True
                    break
                kept.append(token)
            new.append(kept)
        self.on_tokens(self.step, new)
        self.step += 1

    def end(self) -> None:
        pass


class DecodeFallbackWarning(UserWarning):
    """A round is generated by ``hf.generate`` instead of the workbench's own decode loop (the
    message says why: a cache that is not a plain key/value one, such as sliding-window layers; a
    forward without ``cache=``/``position_ids``; a generation config whose logits processors the
    loop does not apply). The tokens are the same; only the speed differs."""


# generation-config fields that add a logits processor or change the search; the loop applies
# only temperature and top-p (the protocol's), so any of these set sends a round to hf.generate
_NEUTRAL = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
    "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0), "min_p": (None,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "num_beams": (None, 1), "num_beam_groups": (None, 1),
    "penalty_alpha": (None,), "assistant_model": (None,), "prompt_lookup_num_tokens": (None,), "low_memory": (None, False),
    "token_healing": (None, False), "dola_layers": (None,), "stop_strings": (None,), "max_time": (None,),
}
_FORWARD_TAKES: dict[type, tuple[bool, bool]] = {}  # model class → (takes cache= and position_ids=, takes logits_to_keep=)
_WARNED: dict[int, set[str]] = {}  # id(hf) → fallback reasons already warned about


def _forward_takes(hf: Any) -> tuple[bool, bool]:
    """Whether the model's forward takes ``cache=`` and ``position_ids=`` (the loop needs both),
    and ``logits_to_keep=``; looked up once per model class."""
    cls = type(hf)
    if cls not in _FORWARD_TAKES:
        import inspect

        params = inspect.signature(cls.forward).parameters
        _FORWARD_TAKES[cls] = ("cache" in params and "position_ids" in params, "logits_to_keep" in params)
    return _FORWARD_TAKES[cls]


def decode_loop_problem(hf: Any, cache: Any) -> str | None:
    """Why the workbench's own decode loop cannot serve a round of ``hf`` on ``cache`` (the one a
    round continues, or a fresh ``DynamicCache`` of the model), or None when it can."""
    if not _forward_takes(hf)[0]:
        return f"{type(hf).__name__}.forward takes no cache=/position_ids"
    if getattr(hf.config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    if not plain_cache(cache):
        kinds = sorted({type(layer).__name__ for layer in getattr(cache, "layers", [])}) or [type(cache).__name__]
        return f"its KV cache is not a plain key/value cache ({', '.join(kinds)})"
    if sliding_window_layers(hf.config):  # a plain cache can still serve them (a VLM's round 1), but the loop's masks have no window
        return "some of its attention layers see a sliding window"
    config = hf.generation_config
    for name, neutral in _NEUTRAL.items():
        if getattr(config, name, None) not in neutral:
            return f"its generation config sets {name}={getattr(config, name)!r}"
    return None


def _warn_fallback(hf: Any, why: str) -> None:
    seen = _WARNED.setdefault(id(hf), set())
    if why not in seen:
        seen.add(why)
        import warnings

        warnings.warn(f"generation goes through hf.generate (slower, same tokens): {why}", DecodeFallbackWarning, stacklevel=4)


def new_cache(hf: Any) -> Any:
    """An empty KV cache for ``hf``: the ``DynamicCache(config=...)`` ``generate`` would make, its
    plain layers made :func:`growing_layer_class` ones (views of a buffer grown once per round, not
    a ``torch.cat`` of the whole cache per step). Other layer kinds (sliding windows) are left as
    they are (:func:`decode_loop_problem` sends them to ``generate``)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=hf.config)
    growing = growing_layer_class()
    cache.layers = [growing() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


_GROWING: list[type] = []


def growing_layer_class() -> type:
    """The ``DynamicLayer`` whose keys and values are views ``[batch, heads, :length, head_dim]`` of
    a preallocated buffer: ``update`` writes the new positions in place and returns longer views;
    the buffer is reallocated (one copy) only when a round needs more room than it has, sized by
    the layer's ``reserve`` (positions the round will reach, set by :func:`decode_round`). Crops
    shorten the views (the next update writes over what was cropped); anything else that replaces
    ``keys``/``values`` (``batch_select_indices``, …) is noticed and copied into a new buffer.
    Numerically a plain ``DynamicLayer``: the same keys and values at the same positions."""
    if _GROWING:
        return _GROWING[0]
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        reserve = 0
        _buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # [batch, heads, room, head_dim] each
        _views: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys and values this layer last set

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keys, values = self.keys, self.values
            held = keys.shape[-2] if keys.dim() == 4 else 0
            add = key_states.shape[-2]
            buffers, views = self._buffers, self._views
            if (held and (views is None or keys is not views[0] or values is not views[1])) or buffers is None \
                    or held + add > buffers[0].shape[-2] or buffers[0].shape[0] != key_states.shape[0]:
                room = max(held + add, self.reserve)
                b, h, _, d = key_states.shape
                bk = key_states.new_empty(b, h, room, d)
                bv = value_states.new_empty(b, value_states.shape[1], room, value_states.shape[-1])
                if held:
                    bk[:, :, :held] = keys
                    bv[:, :, :held] = values
                buffers = self._buffers = (bk, bv)
            bk, bv = buffers
            bk.narrow(2, held, add).copy_(key_states)  # narrow: the views slicing makes, at half its cost per step
            bv.narrow(2, held, add).copy_(value_states)
            self.keys, self.values = bk.narrow(2, 0, held + add), bv.narrow(2, 0, held + add)
            self._views = (self.keys, self.values)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            if self._views is not None:
                self._views = (self.keys, self.values)  # shorter views of the same buffers

    _GROWING.append(GrowingLayer)
    return GrowingLayer


def logits_processors(decoding: Decoding) -> Any:
    """The logits processors ``hf.generate`` applies when sampling with the protocol's temperature
    and top-p (``top_k=None``, nothing else set): temperature unless it is 1, then top-p unless it is
    1, as :meth:`transformers.GenerationMixin._get_logits_processor` orders them. → a
    ``LogitsProcessorList`` (empty for greedy decoding)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    processors = LogitsProcessorList()
    if not decoding.do_sample:
        return processors
    if decoding.temperature is not None and decoding.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_p is not None and decoding.top_p < 1.0:
        processors.append(TopPLogitsWarper(decoding.top_p, min_tokens_to_keep=1))
    return processors


@torch.inference_mode()
def generate_round(
    hf: Any, tokenizer: Any, prompts: list[list[int]], decoding: Decoding, device: str, past: CarriedCache | None = None,
    on_tokens: TokensCallback | None = None, model_kwargs: Callable[[torch.Tensor], dict[str, Any]] | None = None,
    drafts: Drafts | None = None,
) -> RoundOutput:
    """Generate one assistant turn for every prompt of the batch (see the module docstring).

    Without ``past``, ``prompts[i]`` is row i's whole conversation so far; with it, only the tokens
    that follow what ``past`` holds (the cache grows in place: the caller gives it up).
    ``on_tokens``: called after each decoding step with the new tokens (:class:`ResponseStream`).
    ``model_kwargs(ids)``: more keywords for the prefill, made from the left-padded input ids
    ``[batch, width]`` (a vision-language model's pixel values and token types for the prefill that
    holds the image tokens: :meth:`workbench.engine.session.Session` gives them to a round run from
    scratch only; a carried cache already holds the image).
    The workbench's own loop (:func:`decode_round`) runs the round; what it cannot serve
    (:func:`decode_loop_problem`) goes through ``hf.generate`` with a :class:`DecodeFallbackWarning`; so does a prefill
    with ``model_kwargs`` (the image round: ``generate`` prepares a VLM's image inputs), with no warning.
    ``drafts``: each row's earlier answers, for lookup decoding in the workbench's loop (:func:`decode_round`).
    """
    if model_kwargs is not None:
        return hf_generate_round(hf, tokenizer, prompts, decoding, device, past, on_tokens, model_kwargs)
    cache = past.cache if past is not None else new_cache(hf)
    why = decode_loop_problem(hf, cache)
    if why is None:
        return decode_round(hf, tokenizer, prompts, decoding, device, past, on_tokens, cache, drafts)
    _warn_fallback(hf, why)
    return hf_generate_round(hf, tokenizer, prompts, decoding, device, past, on_tokens)


@torch.inference_mode()
def decode_round(
    hf: Any, tokenizer: Any, prompts: list[list[int]], decoding: Decoding, device: str, past: CarriedCache | None = None,
    on_tokens: TokensCallback | None = None, cache: Any = None, drafts: Drafts | None = None,
) -> RoundOutput:
    """:func:`generate_round` by the workbench's own loop: the model's forward called directly (its
    lean forward where :mod:`workbench.engine.lean` has one), no ``generate`` set-up per call. One
    prefill forward over every new token ``[batch, seq]``, then one forward of one token per
    decoding step, each with the model's own modules and parameters (so wrappers of their
    ``forward``, capture and interventions, see every pass; the lean forward applies the
    workbench's wrappers itself and calls the real module for any other). It computes what ``generate``
    computes, in the same order: position ids from the attention mask, float32 logits of the last
    position, greedy ``argmax`` or, sampling, :func:`logits_processors` then ``softmax`` and
    ``torch.multinomial`` (the same draws from the same seed), finished rows fed the pad token,
    stop when every row met a stop token or after ``max_new_tokens`` steps. ``cache``: the one to
    fill when ``past`` is None (default: a new :func:`new_cache`).

    ``drafts`` (greedy decoding only): each row's earlier answers, oldest first (each with the token
    that closed it), to draft from (:class:`workbench.engine.lookup.Drafts`): after the prefill, each
    pass feeds every row's last chosen token and its draft as one chunk and keeps the drafted tokens
    greedy decoding chooses too (:func:`_lookup_steps`): the same tokens in fewer passes; logits
    within float rounding of one-token steps' (another pass shape), not bit for bit."""
    batch = len(prompts)
    pad_id = tokenizer.pad_token_id
    new_ids, mask = pad(prompts, pad_id, device, "left")
    if past is not None:
        mask = torch.cat([past.mask.to(mask.device), mask], 1)
        cache = past.cache
    elif cache is None:
        cache = new_cache(hf)
    prompt_len = mask.shape[1]
    steps = decoding.max_new_tokens
    for layer in getattr(cache, "layers", []):  # room for the round, the cut-off pass and option scoring
        layer.reserve = prompt_len + steps + _SLACK
    full_mask = torch.cat([mask, mask.new_ones(batch, steps)], 1)  # every step's mask is a prefix of it
    # a decode step's query sees every held position: the 4-D boolean mask sdpa would be given,
    # sliced per step instead of built per step (only where there are holes: with none, the model
    # skips the mask, and so do we)
    holes = not bool(mask.all())
    step_mask = full_mask.bool()[:, None, None, :] if _takes_bool_mask(hf) and holes else full_mask
    positions = mask.cumsum(-1) - 1
    positions.masked_fill_(mask == 0, 1)
    keep = {"logits_to_keep": 1} if _forward_takes(hf)[1] else {}
    lean = pass_plan(hf)  # the lean forward (same numbers, less Python), or None: hf(...)
    if lean is not None and not holes:
        step_mask = None  # a one-token pass over a cache without holes attends everything: no mask, as hf's own skips it
    elif lean is not None and step_mask.dtype == torch.bool:
        step_mask = attention_bias(step_mask, next(hf.parameters()).dtype)  # once per round, not per step and layer
    stops = stop_ids(hf, tokenizer)
    stop_tensor = torch.tensor(stops, device=device)
    processors = logits_processors(decoding)
    stream = ResponseStream(on_tokens, stops) if on_tokens is not None else None
    if stream is not None:
        stream.put(new_ids)
    drafting = drafts is not None and not decoding.do_sample and steps > 1
    if lean is not None:  # drafting: numbers to float rounding, so the last layer works only where it is read
        logits = lean_logits(hf, new_ids, mask, positions[:, -new_ids.shape[1]:], cache, 1, lean, tail=drafting)
    else:
        logits = hf(input_ids=new_ids, attention_mask=mask, position_ids=positions[:, -new_ids.shape[1]:], cache=cache,
                    use_cache=True, **keep).logits
    if drafting and drafts.cap > 0:
        return _lookup_steps(hf, logits[:, -1], drafts, stops, steps, stream, cache, mask, lean, pad_id)
    position = positions[:, -1:]
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    pad_token = torch.tensor(pad_id, device=device)
    step_logits, tokens = [], []
    for step in range(steps):
        scores = logits[:, -1].to(dtype=torch.float32, copy=True)  # [batch, vocab]
        step_logits.append(scores)
        if decoding.do_sample:
            chosen = torch.multinomial(torch.softmax(processors(None, scores), -1), num_samples=1).squeeze(1)
        else:
            chosen = scores.argmax(-1)
        chosen = torch.where(unfinished, chosen, pad_token)
        tokens.append(chosen)
        if stream is not None:
            stream.put(chosen[:, None])
        unfinished &= ~torch.isin(chosen, stop_tensor)
        if step == steps - 1 or not bool(unfinished.any()):
            break
        position = position + 1
        if lean is not None:
            logits = lean_logits(hf, chosen[:, None], None if step_mask is None else step_mask[..., : prompt_len + step + 1],
                                 position, cache, 1, lean)
        else:
            logits = hf(input_ids=chosen[:, None], attention_mask=step_mask[..., : prompt_len + step + 1], position_ids=position,
                        cache=cache, use_cache=True, **keep).logits
    generated = torch.stack(tokens, 1).tolist()  # [batch, n_steps]
    step_logits_t = torch.stack(step_logits, 1)  # [batch, n_steps, vocab]
    out = _round_output(generated, step_logits_t, stops, cache, mask)
    if drafting:  # a round that drafts nothing (cap 0) runs one token a pass here, and says whether the next should
        out = replace(out, lookup_cap=_probe(drafts, generated, stops, steps))
    return out


def _probe(drafts: Drafts, generated: list[list[int]], stops: list[int], steps: int) -> int:
    """The next round's draft width after a round that drafted nothing: 1 if, at its second token,
    every row still answering would have had a right one-token draft, else 0. ``generated``:
    ``[batch][steps]`` chosen tokens."""
    stop_set = set(stops)
    going = [i for i, g in enumerate(generated) if steps > 2 and len(g) > 1 and g[0] not in stop_set and g[1] not in stop_set]
    return int(bool(going) and all(draft(drafts.answers[i], generated[i][:1], 1) == generated[i][1:2] for i in going))


_SLACK = 32  # cache positions kept free beyond a round's own (the cut-off pass, option tokens)


def _lookup_steps(
    hf: Any, first: torch.Tensor, drafts: Drafts, stops: list[int], steps: int, stream: ResponseStream | None,
    cache: Any, prompt_mask: torch.Tensor, lean: Any, pad_id: int,
) -> RoundOutput:
    """Greedy decoding after the prefill by verifying lookup drafts (:mod:`workbench.engine.lookup`).

    ``first`` ``[batch, vocab]``: the prefill's last logits. Each pass feeds, per unfinished row, the
    last chosen token and a draft of what follows, ``[batch, 1 + widest draft]`` (pads after a short
    draft and for finished rows), attending the held cache and, causally, the chunk. The argmax at
    chunk position j is greedy decoding's next token if the tokens before it in the chunk were; so a
    row keeps its argmaxes up to and including the first one that differs from its draft (or is a
    stop token, or reaches ``steps`` tokens). Kept tokens' positions stay in the cache, the rest
    become holes (the response mask), and position ids count only what is held, so every chosen
    token, its logits and the cache's keys and values are those of one-token steps, up to float
    rounding. → the round's :class:`RoundOutput`; ``step_logits`` beyond a row's last step are 0.

    The widest draft a pass runs (``cap``): the slowest row sets how many passes a round takes, and
    on a CPU a wider pass costs more (its attention grows with the queries). So after a pass it is
    twice the fewest drafted tokens an unfinished row kept, plus one; 0 (one-token passes, for the
    rest of the round) once a row kept none. The round starts where the round before stood after its
    first pass (``drafts.cap``) and reports where it stands after its own (``RoundOutput.lookup_cap``);
    a round whose wide passes saved fewer passes than they were reports 0. A round told to draft
    nothing (cap 0) does not come here: :func:`decode_round` runs it one token a pass and reports 1
    if every row's one-token draft would have been right at its second token, else 0 (:func:`_probe`)."""
    device = prompt_mask.device  # where the inputs go (decode_round's device); the logits stay where the model left them
    batch = first.shape[0]
    stop_set = set(stops)
    dtype = next(hf.parameters()).dtype
    never = torch.tensor(float("-inf"), dtype=dtype, device=device)
    scores = first.to(dtype=torch.float32, copy=True)
    chosen = scores.argmax(-1).tolist()
    tokens = [[c] for c in chosen]  # per row: every chosen token (the stop token included)
    where = [[0] for _ in range(batch)]  # per row: where each token's logits are in the joined passes (0: the prefill's)
    passes = [scores[:, None]]  # every pass's logits [batch, positions chosen at, vocab], float32
    done = [c in stop_set for c in chosen]  # (steps > 1 here: decode_round stops a one-token round itself)
    if stream is not None:
        stream.put(torch.tensor(chosen)[:, None])
    held = prompt_mask.sum(-1).tolist()  # per row: positions held, so the next token's position id
    # [batch, 1, 1, room]: over the cache's positions, 0 where held, −inf at a hole; 0 beyond (a one-token
    # pass's own position: every unfinished row keeps it, and what a finished row sees matters to no one)
    width_now = prompt_mask.shape[1]
    bias = torch.zeros(batch, 1, 1, width_now + 2 * steps + MAX_DRAFT, dtype=dtype, device=device)
    bias[..., :width_now] = torch.where(prompt_mask.bool(), 0.0, never)[:, None, None, :]
    fed: list[list[int]] = [[] for _ in range(batch)]  # per row: 1 where a position after the prompt holds a fed token
    answers, cap, next_cap, joined, wide_passes = drafts.answers, drafts.cap, None, 1, 0
    while not all(done):
        proposals = [[] if done[i] or cap == 0 else draft(answers[i], tokens[i], min(cap, steps - len(tokens[i]) - 1))
                     for i in range(batch)]
        width = 1 + max(len(p) for p in proposals)
        ids = torch.tensor([([tokens[i][-1]] if not done[i] else [pad_id]) + p + [pad_id] * (width - 1 - len(p))
                            for i, p in enumerate(proposals)], device=device)  # [batch, width]
        if width_now + width > bias.shape[-1]:
            bias = torch.cat([bias, torch.zeros_like(bias)], -1)
        if width == 1:  # a one-token pass: the held cache and itself
            mask = bias[..., : width_now + 1]
        else:  # and, causally, the chunk's real tokens
            real = torch.tensor([[j <= len(p) for j in range(width)] for p in proposals], device=device)
            sees = torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] & real[:, None, :]
            mask = torch.cat([bias[..., :width_now].expand(-1, -1, width, -1), torch.where(sees, 0.0, never)[:, None]], -1)
        positions = torch.tensor(held, device=device)[:, None] + torch.arange(width, device=device)[None]
        for layer in getattr(cache, "layers", []):  # room for this pass, the cut-off pass and option scoring
            layer.reserve = max(getattr(layer, "reserve", 0), width_now + width + 2 * steps + _SLACK)
        out = lean_logits(hf, ids, mask, positions, cache, 0, lean).to(torch.float32)  # [batch, width, vocab]
        best = out.argmax(-1).tolist()  # [batch][width]
        kept = [[0] * width for _ in range(batch)]
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        for i in range(batch):
            if done[i]:
                continue
            proposal = proposals[i]
            for j in range(width):  # chunk token j (fed) is in the cache: row i's tokens so far are greedy's
                kept[i][j] = 1
                token = best[i][j]
                tokens[i].append(token)
                where[i].append(joined + j)
                new_tokens[i].append(token)
                if token in stop_set or len(tokens[i]) >= steps:
                    done[i] = True
                    break
                if j >= len(proposal) or proposal[j] != token:
                    break  # the draft's next token is not greedy's: its position and the rest are holes
        used = max(len(t) for t in new_tokens)  # chunk positions any row chose a token at: the only logits kept
        passes.append(out if used == width else out[:, :used].contiguous())  # (a slice's copy: the wide logits are freed)
        joined += used
        if stream is not None:
            stream.put_many(new_tokens)
        going = [i for i in range(batch) if not done[i]]
        if going and cap:
            fewest = min(sum(kept[i]) - 1 for i in going)  # kept counts the fed token too
            cap = min(MAX_DRAFT, 2 * fewest + 1) if fewest else 0
        next_cap = cap if next_cap is None else next_cap
        for i in range(batch):
            fed[i] += kept[i]
            held[i] += sum(kept[i])
        wide_passes += width > 1
        if width > 1:
            bias[..., width_now: width_now + width] = torch.where(torch.tensor(kept, dtype=torch.bool, device=device), 0.0, never)[:, None, None, :]
        width_now += width
    n_steps = max(len(t) for t in tokens)
    index = torch.tensor([w + [w[-1]] * (n_steps - len(w)) for w in where], device=first.device)  # [batch, n_steps]
    step_logits = torch.cat(passes, 1).gather(1, index[..., None].expand(-1, -1, scores.shape[-1]))  # [batch, n_steps, vocab]
    short = torch.tensor([[k >= len(w) for k in range(n_steps)] for w in where], device=first.device)
    step_logits.masked_fill_(short[..., None], 0.0)
    generated = [t + [stops[0]] * (n_steps - len(t)) for t in tokens]  # a row shorter than the longest has stopped
    out = _round_output(generated, step_logits, stops, cache, prompt_mask)
    if (n_steps - 1) - (len(passes) - 1) < wide_passes:  # drafts did not pay here: each wide pass saved less than a pass
        next_cap = 0
    return replace(out, response_mask=torch.tensor(fed, dtype=torch.long, device=device),
                   lookup_cap=cap if next_cap is None else next_cap)


def _takes_bool_mask(hf: Any) -> bool:
    """Whether the model's attention is PyTorch's sdpa, which takes a 4-D boolean mask as given."""
    return getattr(hf.config, "_attn_implementation", None) == "sdpa"


def _round_output(generated: list[list[int]], step_logits: torch.Tensor, stops: list[int], cache: Any, mask: torch.Tensor) -> RoundOutput:
    """Each row's tokens up to its stop token and their steps' entropies, as a :class:`RoundOutput`."""
    entropies = token_entropy(step_logits).tolist()
    response_ids, token_entropies = [], []
    stop_set = set(stops)
    for seq, row in zip(generated, entropies):
        n = next((j for j, tok in enumerate(seq) if tok in stop_set), len(seq))
        response_ids.append(seq[:n])
        token_entropies.append(row[: n + 1])
    return RoundOutput(response_ids, token_entropies, step_logits, cache, mask)


@torch.inference_mode()
def hf_generate_round(
    hf: Any, tokenizer: Any, prompts: list[list[int]], decoding: Decoding, device: str, past: CarriedCache | None = None,
    on_tokens: TokensCallback | None = None, model_kwargs: Callable[[torch.Tensor], dict[str, Any]] | None = None,
) -> RoundOutput:
    """:func:`generate_round` through ``hf.generate`` (the fallback, a VLM's image round, and the
    reference the tests compare the loop with)."""
    ids, mask = pad(prompts, tokenizer.pad_token_id, device, "left")
    if past is not None:  # generate takes the whole sequence and runs the part the cache lacks
        ids = torch.cat([ids.new_full((len(prompts), past.width), tokenizer.pad_token_id), ids], 1)
        mask = torch.cat([past.mask.to(mask.device), mask], 1)
    stops = stop_ids(hf, tokenizer)
    sampling = {"temperature": decoding.temperature, "top_p": decoding.top_p} if decoding.do_sample else {}
    cache = {"cache": past.cache} if past is not None else {}
    if model_kwargs is not None:
        cache.update(model_kwargs(ids))
    out = hf.generate(
        input_ids=ids,
        attention_mask=mask,
        **cache,
        do_sample=decoding.do_sample,
        max_new_tokens=decoding.max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        use_cache=True,
        top_k=None,
        streamer=ResponseStream(on_tokens, stops) if on_tokens is not None else None,
        **sampling,
    )
    prompt_len = ids.shape[1]
    generated = out.sequences[:, prompt_len:].tolist()
    step_logits = torch.stack(out.logits, dim=1)  # [batch, n_steps, vocab]
    return _round_output(generated, step_logits, stops, out.cache, mask)


@torch.inference_mode()
def carry(hf: Any, rnd: RoundOutput, pad_id: int) -> CarriedCache:
    """The round's cache with every response token in it, for the next round to continue.

    The decode passes fed every response token back but a cut-off one's last (it hit
    ``max_new_tokens``, nothing was generated after it; :meth:`RoundOutput.fed_mask` says where each
    fed token is). Those last tokens get one forward of one token per row (rows that need none run
    a masked pad). Positions that hold no response token (the steps after a row's stop token, a
    lookup draft's rejected tokens) become holes in the mask.
    """
    held = rnd.fed_mask()  # [batch, positions after the prompt]
    lengths = torch.tensor([len(ids) for ids in rnd.response_ids])
    mask = torch.cat([rnd.prompt_mask.cpu(), held], 1)
    missing = lengths > held.sum(1)  # an answer cut off by max_new_tokens: its last token was never fed
    if missing.any():
        last = torch.tensor([ids[-1] if m else pad_id for ids, m in zip(rnd.response_ids, missing.tolist())])
        mask = torch.cat([mask, missing.long()[:, None]], 1)
        device = rnd.prompt_mask.device
        lean_logits(hf, last[:, None].to(device), mask.to(device), (mask.sum(-1, keepdim=True) - 1).to(device), rnd.cache, 1,
                    pass_plan(hf))
    return CarriedCache(rnd.cache, mask.to(rnd.prompt_mask.device))


def crop_cache(cache: Any, length: int) -> None:
    """Drop a KV cache's positions beyond ``length``, in place."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # transformers 5: a negative count removes that many trailing tokens


@torch.inference_mode()
def score_options(
    hf: Any,
    rnd: RoundOutput,
    leads: list[int],
    options: list[list[list[int]]],
    pad_id: int,
) -> torch.Tensor:
    """Mean NLL of each option's tokens after the prompt and the response's first ``leads[i]`` tokens.

    options ``[batch][n_options][tokens]`` → ``[batch, n_options]`` float32 (NaN where a sample
    has fewer options than the widest one). One pass on ``rnd.cache`` with one row per sample: the
    lead, then every option, each option seeing only the prompt, the lead and itself (so the prompt's
    keys and values are never copied per option). The cache is left as it was.
    """
    batch = len(options)
    width = max(len(o) for o in options)
    nll = torch.full((batch, width), float("nan"))
    if width == 0:
        return nll
    single = all(len(tok) == 1 for opts in options for tok in opts)
    generated_to_answer = all(len(rnd.response_ids[i]) >= leads[i] and leads[i] < rnd.step_logits.shape[1] for i in range(batch))
    if single and generated_to_answer:  # one log-softmax over every row's step at its answer
        rows = [i for i in range(batch) if options[i]]
        counts = [len(options[i]) for i in rows]
        ids = [[tok[0] for tok in options[i]] + [0] * (width - n) for i, n in zip(rows, counts)]  # [rows, width]
        logits = rnd.step_logits[rows, [leads[i] for i in rows]].float()  # [rows, vocab]
        got = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids, device=logits.device)).cpu()  # [rows, width]
        if len(rows) == batch and min(counts) == width:
            return got
        known = torch.tensor([[k < n for k in range(width)] for n in counts])
        nll[rows] = got.where(known, nll[rows])
        return nll
    conts, groups, positions = [], [], []
    owner, predictor, target = [], [], []  # per option token: (sample, option), the position predicting it, its id
    for i in range(batch):
        lead = rnd.response_ids[i][: leads[i]]
        seq, group, pos = list(lead), [-1] * len(lead), list(range(len(lead)))
        for k, opt in enumerate(options[i]):
            for j, token in enumerate(opt):
                owner.append(i * width + k)
                predictor.append(len(seq) if j else len(lead))  # +1 below: index 0 is the prompt's last step
                target.append(token)
                seq.append(token)
                group.append(k)
                pos.append(len(lead) + j)
        conts.append(seq)
        groups.append(group)
        positions.append(pos)
    logits = forward_after_prompt(hf, rnd, conts, pad_id, positions, groups).float()  # [batch, n, vocab]
    first = rnd.step_logits[:, 0].float()  # predicts the first token after the prompt
    logp = torch.log_softmax(torch.cat([first[:, None].to(logits.device), logits], 1), -1)  # [batch, 1 + n, vocab]
    rows = torch.tensor(owner) // width
    token_logp = logp[rows, torch.tensor(predictor), torch.tensor(target)].cpu()
    total = torch.zeros(batch * width).index_add_(0, torch.tensor(owner), -token_logp)
    count = torch.zeros(batch * width).index_add_(0, torch.tensor(owner), torch.ones(len(owner)))
    scored = count > 0
    nll.view(-1)[scored] = total[scored] / count[scored]
    return nll


def forward_after_prompt(
    hf: Any,
    rnd: RoundOutput,
    conts: list[list[int]],
    pad_id: int,
    positions: list[list[int]] | None = None,
    groups: list[list[int]] | None = None,
    logits_to_keep: int = 0,
) -> torch.Tensor:
    """Run ``conts[i]`` after row i's prompt, on the prompt's KV cache.

    → logits ``[batch, cont_len, vocab]`` (the last ``logits_to_keep`` positions when it is not 0).
    ``positions[i][j]`` is token j's offset after the prompt (default ``j``); ``groups[i][j]`` lets
    several continuations share a row: a token sees the prompt and the earlier tokens of its own
    group and of group −1 (default: one group, plain causal attention). Continuations are
    right-padded; pads see only the prompt and nothing sees them. Cached positions after the
    prompt (the round's decode steps) are masked out. The cache is cropped back after the pass.
    """
    device = rnd.prompt_mask.device
    cont_ids, cont_mask = pad(conts, pad_id, device, "right")
    n = cont_ids.shape[1]
    positions = positions if positions is not None else [list(range(len(c))) for c in conts]
    groups = groups if groups is not None else [[0] * len(c) for c in conts]
    pos, _ = pad(positions, 0, device, "right")
    group, _ = pad([[g + 1 for g in gs] for gs in groups], -1, device, "right")  # 0: shared (−1), −1: padding
    real = cont_mask.bool()
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    same = (group[:, :, None] == group[:, None, :]) | (group[:, None, :] == 0)
    sees = causal[None] & same & real[:, None, :] & real[:, :, None]  # [batch, query, key]
    cached = rnd.cache.get_seq_length()
    after_prompt = torch.zeros(len(conts), n, cached - rnd.prompt_mask.shape[1], dtype=torch.bool, device=device)
    allowed = torch.cat([rnd.prompt_mask.bool()[:, None, :].expand(-1, n, -1), after_prompt, sees], dim=-1)
    if _takes_bool_mask(hf):  # sdpa takes the block mask as it is: no float copy of it
        mask = allowed
    else:  # eager attention adds its mask
        dtype = next(hf.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    prompt_len = rnd.prompt_mask.sum(-1, keepdim=True)
    # mask [batch, 1, query, cache + continuation]: boolean (sdpa) or additive
    logits = lean_logits(hf, cont_ids, mask[:, None], prompt_len + pos, rnd.cache, logits_to_keep, pass_plan(hf))
    crop_cache(rnd.cache, cached)
    return logits


def plain_cache(cache: Any) -> bool:
    """Whether every layer is a plain growing key/value cache (holes and crops mean what they say)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    kinds = (DynamicLayer, growing_layer_class())
    return bool(layers) and all(type(layer) in kinds for layer in layers)
