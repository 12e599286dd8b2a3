"""The round engine: one batch of samples through every round of a protocol, as plain arrays.

:func:`run_batch` steps a :class:`workbench.engine.session.Session` through the protocol's rounds (one
code path for runs and for live sessions; the session's docstring says how a round runs, how its
KV cache is carried to the next round and where activations come from) and returns a
:class:`~workbench.engine.batch_result.BatchResult`; :func:`~workbench.engine.batch_result.batch_arrays`
turns it into the arrays the run file stores.
"""

from __future__ import annotations

from typing import Callable

from workbench.engine.capture import HookSite
from workbench.engine.models import LoadedModel
from workbench.engine.protocol import Protocol
from workbench.engine.session import RoundResult, Session, protocol_instruction, protocol_prefix
from workbench.engine.task import Sample, Task
from workbench.engine.batch_result import BatchResult


def first_instruction(protocol: Protocol, task: Task, sample: Sample) -> str:
    """The round-1 user message: the protocol's ``first`` template filled with the sample."""
    return protocol_instruction(protocol, task, sample, 1)


def conversation_texts(protocol: Protocol, task: Task, sample: Sample) -> tuple[list[str], list[str]]:
    """The user message and assistant prefix of every round: ``([R] instructions, [R] prefixes)``."""
    instructions = [protocol_instruction(protocol, task, sample, t) for t in range(1, protocol.rounds + 1)]
    prefixes = [protocol_prefix(protocol, task, sample, t) for t in range(1, protocol.rounds + 1)]
    return instructions, prefixes


def run_batch(
    model: LoadedModel,
    task: Task,
    protocol: Protocol,
    samples: list[Sample],
    sites: list[HookSite],
    seed: int,
    instruction_for: Callable[[Sample, int], str] | None = None,
    reuse_cache: bool = True,
    on_round: Callable[[RoundResult], None] | None = None,
    round_extras: Callable | None = None,
    interventions: tuple = (),
    lookup: bool = True,
) -> BatchResult:
    """Run ``samples`` through every round of ``protocol``, capturing ``sites`` (from
    :func:`workbench.engine.capture.hook_sites`; none: answers and uncertainty only). ``instruction_for``
    (sample, 1-based round) → user message overrides the protocol's (see :class:`Session`);
    ``reuse_cache=False`` re-runs every round's whole conversation (the reference for the tests);
    ``on_round`` is called with each round's result as it finishes; ``round_extras`` adds per-round
    arrays (a scorer, sampled answers: :func:`workbench.engine.open_ended.round_extras`);
    ``interventions`` act in the rounds they name (:mod:`workbench.engine.interventions`); ``lookup``:
    greedy rounds verify drafts from each row's earlier answers (:mod:`workbench.engine.lookup`)."""
    session = Session(model, task, protocol, samples, sites=sites, seed=seed, instruction_for=instruction_for,
                      reuse_cache=reuse_cache, strict=True, fields_every_round=False,
                      round_extras=round_extras, interventions=interventions, lookup=lookup)
    for _ in range(protocol.rounds):
        result = session.step()
        if on_round is not None:
            on_round(result)
    return session.result()
