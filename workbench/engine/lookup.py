"""Lookup drafts: the tokens a row will probably generate next, read off its own earlier answers.

In rounds of self-correction a model mostly says again what it said the round before ("The answer
is (B)." → "Upon review, the answer is (B)."), and a small or random model repeats itself inside an
answer too. :func:`draft` proposes the next tokens of a row from those texts, the way Hugging Face's
prompt-lookup decoding (``prompt_lookup_num_tokens``) proposes them from the prompt; the decode loop
(:func:`workbench.engine.generation.decode_round`) then runs the proposal as one chunk and keeps the
longest part of it that greedy decoding would have chosen anyway, plus the token the model chose
after it. A wrong draft costs only the wider pass: the tokens kept are the greedy tokens, whatever
was proposed.

Plain Python on short lists (a row's earlier answers): no tensors, nothing to load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MAX_DRAFT = 10  # tokens proposed per pass at most: a wider chunk costs more on a CPU than a wrong guess saves
FIRST_DRAFT = 3  # the widest draft of a round's first pass when nothing says yet how well drafts do


@dataclass(frozen=True)
class Drafts:
    """What a round drafts from: ``answers[i]``, row i's earlier answers, oldest first (each with the
    token that closed its turn), and ``cap``, the widest draft its first pass runs (the round before
    reports the next one: :attr:`workbench.engine.generation.RoundOutput.lookup_cap`)."""

    answers: list[list[list[int]]]
    cap: int = FIRST_DRAFT


def draft(answers: Sequence[Sequence[int]], generated: Sequence[int], limit: int = MAX_DRAFT) -> list[int]:
    """Up to ``limit`` tokens row's generation is likely to continue with.

    ``answers``: the row's earlier answers, oldest first, each with the token that ended it (its
    turn's closing token) when known; ``generated``: what the row generated this round so far (at
    least one token). → the draft, ``[]`` when nothing is known to propose. Tried in order:

    1. the last answer, after the latest place where it holds the last two (then the last one)
       generated tokens: the model is saying again what it said last round;
    2. any earlier answer or this round's own tokens, after the latest earlier place where the
       last three (then two) generated tokens occur: it repeats itself;
    3. the last answer at the same offset: the model changed a word and goes on as before.
    """
    if limit <= 0 or not generated:
        return []
    last = list(answers[-1]) if answers else []
    tail = list(generated)
    for n in (2, 1):
        if len(tail) >= n:
            key = tail[-n:]
            for j in range(len(last) - n - 1, -1, -1):  # a continuation after the match must exist
                if last[j:j + n] == key:
                    return last[j + n:j + n + limit]
    history = [tok for answer in answers for tok in answer] + tail
    for n in (3, 2):
        if len(tail) >= n:
            key = tail[-n:]
            for j in range(len(history) - n - 1, -1, -1):  # not the tail itself
                if history[j:j + n] == key:
                    return history[j + n:j + n + limit]
    return last[len(tail):len(tail) + limit]
