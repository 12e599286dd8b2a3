"""The task type: a :class:`Sample` of a dataset and the :class:`Task` that tells the engine how to talk to
it (how options are written and scored, how answers are read, what a follow-up round says).

A task is a frozen dataclass of plain functions (no hierarchy). The engine only ever calls:

* ``format_choices(options) -> str`` – the ``{choices}`` text of the first-round template;
* ``option_continuations(sample) -> list[str]`` – the text scored for each option
  (option confidence, DESIGN §6); empty for open-ended tasks;
* ``lead_length(response_ids, tokenizer) -> int`` – how many generated tokens come before the
  answer, so options are scored after them (0 when the assistant prefix already leads to it);
* ``parse_answer(sample, response_text) -> int`` – the option the text names, or ``-1``;
* ``round_fields(sample, instructions, responses) -> dict[str, np.ndarray]`` – extra per-round
  arrays stored in the run file (the organism's exact posterior), each ``[n_rounds, ...]``;
* ``followup(sample, round, text) -> str`` – the user message of a round ≥ 2 given the protocol's
  text (the organism draws ``{world}`` follow-ups per sample; others take the text as it is).

The built-in tasks and their loaders are in :mod:`workbench.engine.tasks`; the organism's in
:mod:`workbench.organism.task`. This module imports nothing of the workbench but its errors, so both can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError

LETTERS = "abcdefghij"


@dataclass(frozen=True)
class Sample:
    """One item of a dataset. ``index`` is its stable global position in the (filtered) dataset."""

    index: int
    id: str
    context: str
    question: str
    options: tuple[str, ...] = ()
    gold: int = -1  # index into options; -1 when the task has no gold label
    category: str = ""
    condition: str = ""  # "ambig" / "disambig" for BBQ-shaped tasks
    extra: dict[str, Any] = field(default_factory=dict)  # task-specific fields, stored as JSON
    image: str | None = None  # a vision task's picture (a file path), shown in the first user turn


def _no_round_fields(sample: Sample, instructions: list[str], responses: list[str]) -> dict[str, np.ndarray]:
    return {}


def _no_lead(response_ids: list[int], tokenizer: Any) -> int:
    return 0


WORLD_FOLLOWUP = "{world}"  # a protocol follow-up the organism draws per sample from its world


def _protocol_followup(sample: Sample, round_: int, text: str) -> str:
    if text.strip() == WORLD_FOLLOWUP:
        raise WorkbenchError(f"the follow-up {WORLD_FOLLOWUP} is drawn from the organism's world: use it with --task organism")
    return text


@dataclass(frozen=True)
class Task:
    """How the engine talks to one kind of data (see the module docstring)."""

    name: str
    multiple_choice: bool
    format_choices: Callable[[tuple[str, ...]], str]
    option_continuations: Callable[[Sample], list[str]]
    parse_answer: Callable[[Sample, str], int]
    lead_length: Callable[[list[int], Any], int] = _no_lead
    round_fields: Callable[[Sample, list[str], list[str]], dict[str, np.ndarray]] = _no_round_fields
    followup: Callable[[Sample, int, str], str] = _protocol_followup  # (sample, round ≥ 2, protocol text) → user message
