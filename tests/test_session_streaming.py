"""Streaming a round's tokens as they are generated (``Session.step(on_tokens=...)``, which the
TUI's live mode shows growing): the streamed tokens are exactly the finished round's, and a round
without the callback is the same round."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from workbench.engine.protocol import load_protocol
from workbench.engine.session import Session


def sampled_protocol():
    """Sampled hot with room to stop early or run to the limit, so rows stop at different steps."""
    protocol = load_protocol("organism-inject")
    return dataclasses.replace(protocol, rounds=3, decoding=dataclasses.replace(
        protocol.decoding, do_sample=True, temperature=2.5, max_new_tokens=8))


def test_streamed_tokens_are_the_rounds_tokens_and_the_round_is_unchanged(organism):
    from workbench.organism.task import load_organism_samples

    samples = load_organism_samples(4, offset=3)
    instructions = (None, "answer with the stereotype about these groups .", None)
    # one after the other: a sampling session seeds the global generator when it is made
    plain = Session(organism, task="organism", protocol=sampled_protocol(), samples=samples, seed=1)
    plain_rounds = [plain.step(instruction) for instruction in instructions]
    streamed = Session(organism, task="organism", protocol=sampled_protocol(), samples=samples, seed=1)
    lengths_seen = set()
    for instruction, expected in zip(instructions, plain_rounds):
        calls: list[tuple[int, list[list[int]]]] = []
        got = streamed.step(instruction, on_tokens=lambda step, new: calls.append((step, new)))
        assert [step for step, _ in calls] == list(range(len(calls)))  # one call per decoding step, in order
        assert all(len(new) == len(samples) and all(len(ids) <= 1 for ids in new) for _, new in calls)
        joined = [[t for _, new in calls for t in new[i]] for i in range(len(samples))]
        assert joined == got.response_ids  # exactly the round's response tokens, the stop token left out
        lengths_seen.update(len(ids) for ids in got.response_ids)
        # the callback changes nothing: same tokens, entropies, option probabilities and activations
        assert got.response_ids == expected.response_ids and got.responses == expected.responses
        np.testing.assert_allclose(np.concatenate(got.token_entropies), np.concatenate(expected.token_entropies), rtol=1e-6)
        np.testing.assert_allclose(got.option_probs, expected.option_probs, rtol=1e-6)
        for hook, acts in expected.activations.items():
            np.testing.assert_allclose(got.activations[hook], acts, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert len(lengths_seen) > 1, "the rows should stop at different steps for this test to mean something"


def test_a_failing_callback_fails_the_round(organism):
    session = Session(organism, task="organism", protocol="organism", samples=1)

    def broken(step, new):
        raise RuntimeError("the display went away")

    with pytest.raises(RuntimeError, match="display went away"):
        session.step(on_tokens=broken)
