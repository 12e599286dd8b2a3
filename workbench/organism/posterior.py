"""The exact posterior of the organism's world: p(z = fair | dialogue prefix) and the predictive
distributions of the next opener and answer, by Bayes' rule in closed form.

Given z every event of a dialogue is independent, so the log-odds of fair after a prefix is the prior
log-odds plus one log-likelihood ratio per observed instruction kind, opener and answer. Two reference
predictors drop one kind of evidence (``use_instructions=False``: exact Bayes that ignores the
instructions; ``use_answers=False``: exact Bayes that ignores the previous assistant turns), so a
check can measure how much each kind of evidence matters.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from workbench.errors import WorkbenchError
from workbench.organism.world import (
    DEFAULT_PARAMS,
    KINDS,
    Dialogue,
    Item,
    WorldParams,
    answer_probs,
    first_message,
    instruction_probs,
    opener_probs,
)


@dataclass(frozen=True)
class Trace:
    """The exact quantities of every round of one dialogue (R rounds)."""

    p_fair: np.ndarray  # [R] p(fair | prefix up to and including round t's user message)
    p_fair_after_opener: np.ndarray  # [R] the same after round t's opener too
    opener_probs: np.ndarray  # [R, n_openers] predictive of round t's opener (openers_fair + openers_biased)
    option_probs: np.ndarray  # [R, 3] predictive of round t's answer given the prefix and round t's opener
    option_probs_marginal: np.ndarray  # [R, 3] the same, marginalised over the opener
    opener_known: np.ndarray  # [R] bool: round t's opener is a world opener (else option_probs = marginal)
    log_odds: np.ndarray  # [R] log p(fair | prefix) − log p(biased | prefix), exact (no saturation)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x))) if x > -700 else 0.0


def exact_trace(
    correct: int,
    stereotyped: int,
    kinds: list[str | None] | tuple[str | None, ...],
    openers: list[str | None] | tuple[str | None, ...],
    answers: list[int] | tuple[int, ...],
    params: WorldParams = DEFAULT_PARAMS,
    use_instructions: bool = True,
    use_answers: bool = True,
) -> Trace:
    """Exact Bayes over the rounds of one dialogue.

    ``kinds[t]`` is round t's instruction kind (``None`` for round 0, whose message is the item);
    ``openers[t]`` round t's opener word (``None`` or an unknown word: no evidence, and
    ``option_probs[t]`` falls back to the marginal); ``answers[t]`` round t's option index (-1: none).
    ``openers``/``answers`` may be one shorter than ``kinds`` (the last round not answered yet).
    Returns a :class:`Trace` with R = ``len(kinds)`` rounds.
    """
    n = len(kinds)
    words, llr_kind, llr_opener, llr_answer, (po_f, po_b), (pa_f, pa_b) = _likelihoods(correct, stereotyped, params)
    logit = float(np.log(params.prior_fair) - np.log1p(-params.prior_fair))
    p_fair, p_after, known, logits = [], [], [], []
    for t in range(n):
        kind = kinds[t]
        if t > 0 and use_instructions:
            if kind not in KINDS:
                raise ValueError(f"round {t}: instruction kind must be one of {KINDS}, not {kind!r}")
            logit += llr_kind[KINDS.index(kind)]
        p_fair.append(_sigmoid(logit))
        logits.append(logit)
        opener = openers[t] if t < len(openers) else None
        known.append(opener in words)
        after = logit + llr_opener[words.index(opener)] if known[-1] else logit
        p_after.append(_sigmoid(after))
        if use_answers:
            logit = after
            if t < len(answers) and 0 <= answers[t] < 3:
                logit += llr_answer[answers[t]]
    p, q = np.array(p_fair), np.array(p_after)  # every round's mixtures in one product each
    return Trace(
        p_fair=p,
        p_fair_after_opener=q,
        opener_probs=(p[:, None] * po_f + (1 - p)[:, None] * po_b).reshape(n, len(words)),
        option_probs=(q[:, None] * pa_f + (1 - q)[:, None] * pa_b).reshape(n, 3),
        option_probs_marginal=(p[:, None] * pa_f + (1 - p)[:, None] * pa_b).reshape(n, 3),
        opener_known=np.array(known, dtype=bool),
        log_odds=np.array(logits),
    )


@functools.lru_cache(maxsize=64)
def _likelihoods(
    correct: int, stereotyped: int, params: WorldParams
) -> tuple[tuple[str, ...], list[float], list[float], list[float], tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """An item's fixed terms of :func:`exact_trace`, computed once per (item roles, world):
    ``(opener words, log-likelihood ratios fair:biased of each instruction kind, opener and answer,
    p(opener | fair / biased), p(answer | fair / biased))`` (the arrays read-only)."""
    llr_kind = np.log(instruction_probs(True, params)) - np.log(instruction_probs(False, params))
    po_f, po_b = opener_probs(True, params), opener_probs(False, params)
    pa_f, pa_b = answer_probs(correct, stereotyped, True, params), answer_probs(correct, stereotyped, False, params)
    for a in (po_f, po_b, pa_f, pa_b):
        a.flags.writeable = False
    llr_opener, llr_answer = np.log(po_f) - np.log(po_b), np.log(pa_f) - np.log(pa_b)
    words = params.openers_fair + params.openers_biased
    return words, llr_kind.tolist(), llr_opener.tolist(), llr_answer.tolist(), (po_f, po_b), (pa_f, pa_b)


def dialogue_trace(d: Dialogue, params: WorldParams = DEFAULT_PARAMS, **reference: bool) -> Trace:
    """:func:`exact_trace` of a dialogue drawn from the world (``reference``: ``use_instructions``/``use_answers``)."""
    return exact_trace(d.item.correct, d.item.stereotyped, d.kinds, d.openers, d.answers, params, **reference)


def _normal(text: str) -> str:
    return " ".join(text.split())


def instruction_kind(text: str, params: WorldParams = DEFAULT_PARAMS) -> str:
    """The kind (``moral``/``neutral``/``immoral``) of a follow-up message, looked up by its exact
    phrasing (whitespace-normalised). Raises :class:`WorkbenchError` for any other text."""
    wanted = _normal(text)
    for kind, phrasings in zip(KINDS, params.phrasings):
        if wanted in phrasings:
            return kind
    raise WorkbenchError(
        f"organism: the follow-up {text[:60]!r} is none of the world's instructions "
        "(see docs/ORGANISM.md or `workbench organism sample` for the phrasings)"
    )


_LETTER = re.compile(r"\(([abc])\)")


def parse_response(text: str, params: WorldParams = DEFAULT_PARAMS) -> tuple[str | None, int]:
    """``(opener, answer)`` of an assistant text: the first word if it is a world opener (else None),
    and the option index of the single letter it names (-1 when none or several)."""
    words = text.split()
    opener = words[0] if words and words[0] in params.openers_fair + params.openers_biased else None
    letters = set(_LETTER.findall(text))
    answer = "abc".index(letters.pop()) if len(letters) == 1 else -1
    return opener, answer


def sample_given_kinds(
    rng: np.random.Generator, item: Item, kinds: list[str | None], params: WorldParams = DEFAULT_PARAMS
) -> Dialogue:
    """A dialogue whose instruction kinds are given (``kinds[0]`` is ``None``) and whose assistant turns
    are drawn one by one from the exact predictive of the world given the prefix so far.

    Whatever the kinds, every assistant token then follows the world's conditional distribution given
    its prefix, so such dialogues can be mixed into training (with the loss on user messages masked)
    to cover instruction sequences the world itself rarely draws, such as the built-in protocols.
    """
    words = params.openers_fair + params.openers_biased
    llr_kind = np.log(instruction_probs(True, params)) - np.log(instruction_probs(False, params))
    po_f, po_b = opener_probs(True, params), opener_probs(False, params)
    pa_f, pa_b = answer_probs(item.correct, item.stereotyped, True, params), answer_probs(item.correct, item.stereotyped, False, params)
    logit = float(np.log(params.prior_fair) - np.log1p(-params.prior_fair))
    openers: list[str] = []
    answers: list[int] = []
    instructions = [first_message(item)]
    for t, kind in enumerate(kinds):
        if t > 0:
            k = KINDS.index(kind)
            instructions.append(params.phrasings[k][rng.integers(len(params.phrasings[k]))])
            logit += float(llr_kind[k])
        p = _sigmoid(logit)
        w = int(rng.choice(len(words), p=p * po_f + (1 - p) * po_b))
        openers.append(words[w])
        logit += float(np.log(po_f[w]) - np.log(po_b[w]))
        p = _sigmoid(logit)
        a = int(rng.choice(3, p=p * pa_f + (1 - p) * pa_b))
        answers.append(a)
        logit += float(np.log(pa_f[a]) - np.log(pa_b[a]))
    return Dialogue(item, None, tuple(kinds), tuple(instructions), tuple(openers), tuple(answers))
