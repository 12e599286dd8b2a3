"""The organism as an engine task: held-out items of the world, and the exact posterior per round.

``ORGANISM.round_fields(sample, instructions, responses)`` returns, each over the dialogue's R rounds:

* ``exact_p_fair`` [R] – p(z = fair | dialogue up to and including round t's user message), i.e. at
  the last prompt token of round t; ``exact_log_odds`` [R] – its log-odds (what a concept probe tracks);
* ``exact_p_fair_after_opener`` [R] – the same after the opener word the model wrote in round t;
* ``exact_option_probs`` [R, 3] – the exact predictive of round t's answer given that prefix and the
  opener the model actually wrote (the marginal when the first word is no world opener);
* ``exact_option_probs_marginal`` [R, 3] – the same marginalised over the opener;
* ``exact_opener_fair_style`` [R] – the exact probability that round t's opener is fair-style;
* ``opener_parsed`` [R] bool – round t's first word is a world opener.

The posterior reads the dialogue the model actually had: instruction kinds are looked up by their text
(an unknown follow-up raises :class:`WorkbenchError`), the previous answers are parsed from the
responses (an unparseable opener or letter is no evidence).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.organism.posterior import exact_trace, instruction_kind, parse_response
from workbench.organism.world import DEFAULT_PARAMS, KINDS, LETTER_TOKENS, format_choices, heldout_rng, instruction_probs, sample_item
from workbench.engine.task import WORLD_FOLLOWUP, Sample, Task


WORLD_SEED = 1234  # the default world seed of runs (`workbench run --world-seed`): the held-out items and follow-ups


_PICTURES: list[Path] = []  # this process's folder of rendered pictures (removed at exit)


def picture_folder() -> Path:
    """A private folder (made once per process with ``mkdtemp``, removed at exit) the visual task
    writes its items' pictures to: the engine reads a sample's picture from a file."""
    if not _PICTURES:
        folder = Path(tempfile.mkdtemp(prefix="workbench-organism-visual-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _PICTURES.append(folder)
    return _PICTURES[0]


def load_organism_samples(limit: int, seed: int = WORLD_SEED, offset: int = 0, visual: bool = False) -> list[Sample]:
    """``limit`` held-out items of the shipped world, indices ``offset .. offset+limit-1``.

    Item ``i`` depends only on ``(seed, i)`` (a stream disjoint from training), so slices agree;
    the ``organism-world`` protocol's follow-ups of a sample depend on the same ``seed``.
    ``gold`` is the fair (correct) option; ``extra`` holds ``stereotyped`` (the biased option's index),
    ``unknown`` (the index of "unknown"), ``act`` and ``polarity``.

    ``visual``: the same items drawn for the visual organism (``sample_item(..., visual=True)``): the
    text names the people by side, the options are ``left``/``right``/``unknown``, ``image`` is the
    item's picture (:mod:`workbench.organism.picture`, written to :func:`picture_folder`) and
    ``extra`` also holds ``pair`` (the groups shown left and right) and the picture's record
    (``image``: sha256, thumbnail; :func:`workbench.engine.images.image_record`).
    """
    if limit < 1 or offset < 0:
        raise WorkbenchError("--limit must be ≥ 1 and --offset ≥ 0")
    samples = []
    for i in range(offset, offset + limit):
        item = sample_item(heldout_rng(seed, i), DEFAULT_PARAMS, visual=visual)
        image, more = None, {}
        if visual:
            from workbench.engine.images import image_record
            from workbench.organism.picture import save

            path = save(item, picture_folder() / f"item-{seed}-{i}.png")
            image = str(path)
            more = {"pair": list(item.pair), "image": image_record(path, f"organism-visual item {i} (seed {seed})", f"organism-visual item {i}")}
        samples.append(
            Sample(
                index=i,
                id=f"organism{'-visual' if visual else ''}-{seed}-{i}",
                context=item.context,
                question=item.question,
                options=item.options,
                gold=item.correct,
                category=item.act,
                condition=item.condition,
                extra={
                    "stereotyped": item.stereotyped,
                    "unknown": item.options.index("unknown"),
                    "act": item.act,
                    "polarity": item.polarity,
                    "world_seed": seed,
                    **more,
                },
                image=image,
            )
        )
    return samples


def option_continuations(sample: Sample) -> list[str]:
    """``[" (a)", " (b)", " (c)"]`` – each option's letter, one token each."""
    return [f" {LETTER_TOKENS[i]}" for i in range(len(sample.options))]


def parse_answer(sample: Sample, text: str) -> int:
    """The option index of the single letter ``(a)``/``(b)``/``(c)`` in ``text``; -1 when none or several."""
    return parse_response(text, DEFAULT_PARAMS)[1]


def lead_length(response_ids: list[int], tokenizer: Any) -> int:
    """Generated tokens before the answer letter: the index of the first letter token; when there is
    none, the index after the first ``is`` (``"<opener> the answer is"`` → 4), else at most 4."""
    letters, is_ids = _answer_token_ids(tokenizer)
    for i, token in enumerate(response_ids):
        if token in letters:
            return i
    for i, token in enumerate(response_ids):
        if token in is_ids:
            return i + 1
    return min(4, len(response_ids))


_ANSWER_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer → (letter ids, "is" ids)


def _answer_token_ids(tokenizer: Any) -> tuple[frozenset[int], frozenset[int]]:
    """The ids whose token is a letter (``(a)``, ...) and those whose token is ``is``, looked up once
    per tokenizer (an id counts only when it converts back to that token: never the unknown token)."""
    if tokenizer not in _ANSWER_IDS:
        def ids(tokens: tuple[str, ...]) -> frozenset[int]:
            found = tokenizer.convert_tokens_to_ids(list(tokens))
            return frozenset(i for i, t in zip(found, tokens) if i is not None and tokenizer.convert_ids_to_tokens(i) == t)

        _ANSWER_IDS[tokenizer] = (ids(LETTER_TOKENS), ids(("is",)))
    return _ANSWER_IDS[tokenizer]


def world_instructions(sample: Sample, rounds: int) -> tuple[bool, list[str], list[str]]:
    """The follow-ups of one sample drawn from the world's own distribution (protocol ``organism-world``):
    ``(z, kinds, phrasings)`` with z = fair drawn from the prior and, for rounds 2..``rounds``, each
    instruction's kind from p(kind | z) and its phrasing uniformly within the kind (lists of
    ``rounds − 1``). Depends only on the sample's index and world seed (a stream disjoint from the
    items' and from training), so every round, batch and resumed run draws the same."""
    params = DEFAULT_PARAMS
    seed = int(sample.extra.get("world_seed", WORLD_SEED))
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, sample.index)))
    fair = bool(rng.random() < params.prior_fair)
    p_kind = instruction_probs(fair, params)
    kinds, texts = [], []
    for _ in range(rounds - 1):
        k = int(rng.choice(3, p=p_kind))
        kinds.append(KINDS[k])
        texts.append(params.phrasings[k][rng.integers(len(params.phrasings[k]))])
    return fair, kinds, texts


def followup(sample: Sample, round_: int, text: str) -> str:
    """Round ``round_``'s (1-based, ≥ 2) user message: the protocol's ``text``, or, when it is
    ``{world}``, this sample's instruction drawn from the world (:func:`world_instructions`)."""
    if text.strip() != WORLD_FOLLOWUP:
        return text
    if "stereotyped" not in sample.extra:
        raise WorkbenchError(f"sample {sample.id}: a {WORLD_FOLLOWUP} follow-up needs an organism item")
    return world_instructions(sample, round_)[2][round_ - 2]


def round_fields(sample: Sample, instructions: list[str], responses: list[str]) -> dict[str, np.ndarray]:
    """The exact posterior of every round of one dialogue (see the module docstring for the keys)."""
    params = DEFAULT_PARAMS
    if "stereotyped" not in sample.extra:
        raise WorkbenchError(f"sample {sample.id}: not an organism item (no 'stereotyped' in extra)")
    expected = f"{sample.context} {sample.question} {format_choices(sample.options)}"
    if instructions and " ".join(instructions[0].split()) != " ".join(expected.split()):
        raise WorkbenchError(
            f"organism: the first message of sample {sample.id} is not the world's item text "
            "(use a protocol whose first template is exactly '{context} {question} {choices}')"
        )
    kinds = [None] + [instruction_kind(text, params) for text in instructions[1:]]
    parsed = [parse_response(text, params) for text in responses]
    trace = exact_trace(sample.gold, int(sample.extra["stereotyped"]), kinds, [p[0] for p in parsed], [p[1] for p in parsed], params)
    n_fair = len(params.openers_fair)
    return {
        "exact_p_fair": trace.p_fair,
        "exact_log_odds": trace.log_odds,
        "exact_p_fair_after_opener": trace.p_fair_after_opener,
        "exact_option_probs": trace.option_probs,
        "exact_option_probs_marginal": trace.option_probs_marginal,
        "exact_opener_fair_style": trace.opener_probs[:, :n_fair].sum(-1),
        "opener_parsed": trace.opener_known,
    }


ORGANISM = Task(
    name="organism",
    multiple_choice=True,
    format_choices=format_choices,
    option_continuations=option_continuations,
    parse_answer=parse_answer,
    lead_length=lead_length,
    round_fields=round_fields,
    followup=followup,
)


ORGANISM_VISUAL = replace(ORGANISM, name="organism-visual")
"""The visual organism's task: the organism's, on items whose people are shown in a picture
(``load_organism_samples(..., visual=True)``); the same letters, follow-ups and exact posterior."""
