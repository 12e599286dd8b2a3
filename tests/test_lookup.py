"""Lookup decoding (``workbench.engine.lookup``): a greedy round drafts each row's next tokens from its
earlier answers and verifies the draft in one pass. Whatever is drafted, the tokens are greedy
decoding's (``generate``'s), the logits, entropies, cache and activations those of one-token steps to
float rounding; a right draft saves passes, a wrong one none of the answer."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import ARCHS

import workbench.engine.generation as generation
from workbench.engine.generation import carry, decode_round, hf_generate_round, stop_ids
from workbench.engine.lookup import MAX_DRAFT, Drafts, draft
from workbench.engine.protocol import Decoding, load_protocol
from workbench.engine.session import Session

GREEDY = Decoding(max_new_tokens=8)


def test_a_draft_follows_the_last_answer_then_the_rows_own_repeats_then_the_same_offset():
    # 1. the last answer after the latest place holding the last two (then one) generated tokens
    assert draft([[9, 9], [1, 2, 3, 4, 0]], [7, 2, 3]) == [4, 0]
    assert draft([[5, 1, 2, 1, 3, 0]], [1]) == [3, 0]
    # 2. a repeat of an earlier answer's or this round's own tokens
    assert draft([], [7, 8, 7, 8]) == [7, 8]
    assert draft([[4, 5, 6, 2], [1]], [4, 5]) == [6, 2, 1, 4, 5]  # after the match: the rest of the earlier answers, then this round
    # 3. the last answer at the same offset: a changed first word, then as before
    assert draft([[1, 2, 3, 0]], [5]) == [2, 3, 0]
    # never more than asked, nothing when nothing is known
    assert draft([[1, 2, 3, 0]], [5], limit=1) == [2]
    assert draft([[1, 2, 3, 0]], [5], limit=0) == []
    assert draft([], [5]) == []


def _prompts(tok, vocab: int):
    texts = ["The grandfather and the grandson were both at the doctor.", "Who was forgetful?", "hello world the answer is"]
    return [tok(t)["input_ids"] for t in texts], [[7 % vocab, 8 % vocab], [9 % vocab], [10 % vocab, 11 % vocab, 12 % vocab]]


def _same_round(a, b, tol=1e-5):
    """Two RoundOutputs of one round: the same tokens; each row's step logits and entropies up to its
    last step, and the keys and values the carried caches hold, within ``tol``."""
    assert a.response_ids == b.response_ids
    for i, ids in enumerate(a.response_ids):
        n = len(a.token_entropies[i])
        torch.testing.assert_close(a.step_logits[i, :n], b.step_logits[i, :n], rtol=tol, atol=tol)
        torch.testing.assert_close(torch.tensor(a.token_entropies[i]), torch.tensor(b.token_entropies[i]), rtol=tol, atol=tol)


def _held(cache, mask):
    """Every layer's keys and values at the held positions, row by row in order."""
    held = mask.bool()
    out = []
    for layer in cache.layers:
        w = held.shape[1]
        out += [layer.keys[:, :, :w].transpose(1, 2)[held], layer.values[:, :, :w].transpose(1, 2)[held]]
    return out


@pytest.mark.parametrize("name", [*ARCHS, "organism"])
@pytest.mark.parametrize("kind", ["right", "wrong", "mixed", "own answers"])
def test_whatever_is_drafted_the_round_is_generates(name, kind, loaded, organism):
    """Round 2 on the carried cache, drafted four ways: the answer greedy decoding gives (all kept),
    tokens it never gives (none kept), one of each, and each row's round-1 answer; the tokens, step
    logits, entropies and carried keys and values are generate's, and round 3 goes on from the cache."""
    model = organism if name == "organism" else loaded(name)
    hf, tok = model.hf, model.tokenizer
    first, second = _prompts(tok, hf.config.vocab_size)
    stop = stop_ids(hf, tok)[0]
    ref1 = hf_generate_round(hf, tok, first, GREEDY, "cpu")
    ref2 = hf_generate_round(hf, tok, second, GREEDY, "cpu", carry(hf, ref1, tok.pad_token_id))
    right = [[ids + [stop]] for ids in ref2.response_ids]
    wrong = [[[(t + 1) % hf.config.vocab_size for t in ids[1:]] + [stop]] for ids in ref2.response_ids]
    answers = {"right": right, "wrong": wrong, "mixed": [right[0], wrong[1], right[2]],
               "own answers": [[ids + [stop]] for ids in ref1.response_ids]}[kind]
    out1 = decode_round(hf, tok, first, GREEDY, "cpu", drafts=Drafts([[] for _ in first]))
    _same_round(out1, ref1)
    past = carry(hf, out1, tok.pad_token_id)
    out2 = decode_round(hf, tok, second, GREEDY, "cpu", past, drafts=Drafts(answers, MAX_DRAFT))
    _same_round(out2, ref2)
    ours, theirs = carry(hf, out2, tok.pad_token_id), carry(hf, ref2, tok.pad_token_id)
    assert [int(x) for x in ours.mask.sum(1)] == [int(x) for x in theirs.mask.sum(1)]
    for x, y in zip(_held(ours.cache, ours.mask), _held(theirs.cache, theirs.mask)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    third = [[13 % hf.config.vocab_size]] * 3
    _same_round(decode_round(hf, tok, third, GREEDY, "cpu", ours), hf_generate_round(hf, tok, third, GREEDY, "cpu", theirs))


def _passes(monkeypatch) -> list[int]:
    """The width of every forward pass the round engine makes from now on."""
    widths: list[int] = []
    real = generation.lean_logits

    def counted(hf, ids, *args, **kwargs):
        widths.append(int(ids.shape[1]))
        return real(hf, ids, *args, **kwargs)

    monkeypatch.setattr(generation, "lean_logits", counted)
    return widths


def test_a_right_draft_takes_one_pass_and_a_wrong_one_a_pass_per_token(organism, monkeypatch):
    hf, tok = organism.hf, organism.tokenizer
    s = Session(organism, "organism", "organism", 5, lookup=False)
    r = s.step()
    first = [t[: int(end)] for t, end in zip(s.transcripts, r.prompt_spans[:, 1])]  # the organism's round-1 prompts
    stop = stop_ids(hf, tok)[0]
    ref = hf_generate_round(hf, tok, first, GREEDY, "cpu")
    assert ref.response_ids == r.response_ids
    longest = max(len(ids) for ids in ref.response_ids)
    assert ref.step_logits.shape[1] == longest + 1  # the longest answer stopped
    widths = _passes(monkeypatch)
    decode_round(hf, tok, first, GREEDY, "cpu", drafts=Drafts([[ids + [stop]] for ids in ref.response_ids], MAX_DRAFT))
    assert len(widths) == 2  # the prefill, then one pass that keeps every drafted token
    widths.clear()
    used = {t for ids in ref.response_ids for t in ids} | set(stop_ids(hf, tok))
    never = next(t for t in range(hf.config.vocab_size) if t not in used)  # a token greedy decoding never chooses here
    out = decode_round(hf, tok, first, GREEDY, "cpu", drafts=Drafts([[[never] * 8] for _ in ref.response_ids], MAX_DRAFT))
    assert out.response_ids == ref.response_ids
    assert len(widths) == 1 + longest  # every draft wrong: one token a pass, as generate
    assert widths[2:] == [1] * (longest - 1)  # after a pass whose drafts all failed, one-token passes
    assert out.lookup_cap == 0  # and the next round drafts nothing
    for answers, cap in (([[ids + [stop]] for ids in ref.response_ids], 1), ([[[never] * 8] for _ in ref.response_ids], 0)):
        widths.clear()  # a round told to draft nothing runs one token a pass, and says whether the next should draft
        out = decode_round(hf, tok, first, GREEDY, "cpu", drafts=Drafts(answers, 0))
        assert out.response_ids == ref.response_ids and widths == [widths[0]] + [1] * longest
        assert out.lookup_cap == cap


def _run(model, lookup, interventions=(), rounds=5, samples=8):
    protocol = load_protocol("organism")
    protocol = dataclasses.replace(protocol, rounds=rounds)
    s = Session(model, "organism", protocol, samples, lookup=lookup, interventions=interventions)
    for _ in range(rounds):
        s.step()
    return s.result()


def _same_result(a, b):
    assert a.response_ids == b.response_ids
    np.testing.assert_allclose(a.option_probs, b.option_probs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.mean_token_entropy, b.mean_token_entropy, rtol=1e-5, atol=1e-6)
    for hook in a.activations:
        np.testing.assert_allclose(a.activations[hook], b.activations[hook], rtol=1e-5, atol=1e-5, equal_nan=True)
    for key in a.round_fields:
        if np.issubdtype(np.asarray(a.round_fields[key]).dtype, np.floating):
            np.testing.assert_allclose(a.round_fields[key], b.round_fields[key], rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_session_with_lookup_is_the_session_without_it_in_fewer_passes(organism, monkeypatch):
    widths = _passes(monkeypatch)
    plain = _run(organism, lookup=False)
    plain_passes = len(widths)
    widths.clear()
    looked = _run(organism, lookup=True)
    _same_result(looked, plain)
    assert len(widths) < 0.8 * plain_passes  # the organism says again what it said: rounds 2+ take about two passes


def test_steered_rounds_with_lookup_are_steered_rounds_without_it(organism):
    from workbench.engine.interventions import Steer
    from workbench.engine.session import PROJECTION_BEFORE

    direction = np.random.default_rng(0).standard_normal(organism.d_model)
    steer = [Steer(direction / np.linalg.norm(direction), layer=2, alpha=3.0, rounds=(2, 3, 4), positions="response")]
    plain, looked = _run(organism, False, steer), _run(organism, True, steer)
    _same_result(looked, plain)
    np.testing.assert_allclose(looked.round_fields[PROJECTION_BEFORE], plain.round_fields[PROJECTION_BEFORE],
                               rtol=1e-5, atol=1e-5, equal_nan=True)


def test_streamed_tokens_of_a_drafted_round_are_its_tokens(organism):
    s = Session(organism, "organism", "organism", 6)
    s.step()
    calls: list[list[list[int]]] = []
    got = s.step(on_tokens=lambda step, new: calls.append(new))
    assert any(any(len(ids) > 1 for ids in new) for new in calls)  # a pass kept several drafted tokens
    assert [[t for new in calls for t in new[i]] for i in range(6)] == got.response_ids


def test_run_records_whether_it_drafted_and_no_lookup_is_one_token_a_pass(capsys, monkeypatch, tmp_path):
    from cli_support import workbench

    from workbench.store.reader import RunFile

    for flag, name in (("--lookup", "a.h5"), ("--no-lookup", "b.h5")):
        code, _, err = workbench(capsys, monkeypatch, "run", "--limit", "8", "--rounds", "3", "--out", str(tmp_path / name), flag)
        assert code == 0, err
    with RunFile(tmp_path / "a.h5") as a, RunFile(tmp_path / "b.h5") as b:
        assert a.meta["lookup_decoding"] is True and b.meta["lookup_decoding"] is False
        tokens = [[[list(t) for t in row] for row in f.array("tokens/response_token_ids")] for f in (a, b)]
        assert tokens[0] == tokens[1]
        np.testing.assert_allclose(a.array("activations/hook_resid_post"), b.array("activations/hook_resid_post"),
                                   rtol=1e-5, atol=1e-5, equal_nan=True)


def test_drafted_rounds_through_the_models_own_forward_are_generates(loaded, monkeypatch):
    """Where the lean forward steps aside (``hf(...)`` takes the 4-D mask of a drafted pass), the same."""
    monkeypatch.setattr(generation, "pass_plan", lambda hf: None)
    model = loaded("llama")
    hf, tok = model.hf, model.tokenizer
    first, second = _prompts(tok, hf.config.vocab_size)
    stop = stop_ids(hf, tok)[0]
    ref1 = hf_generate_round(hf, tok, first, GREEDY, "cpu")
    ref2 = hf_generate_round(hf, tok, second, GREEDY, "cpu", carry(hf, ref1, tok.pad_token_id))
    out1 = decode_round(hf, tok, first, GREEDY, "cpu", drafts=Drafts([[] for _ in first]))
    answers = [[ids + [stop]] for ids in ref2.response_ids[:2]] + [[[0] * 5]]  # two right, one wrong
    out2 = decode_round(hf, tok, second, GREEDY, "cpu", carry(hf, out1, tok.pad_token_id), drafts=Drafts(answers, MAX_DRAFT))
    _same_round(out1, ref1)
    _same_round(out2, ref2)


# ------------------------------------------------------------------ the prefill's last layer, cut to what is read
def _prefill(model, tail: bool, changes=()):
    """One lean prefill of a batch with holes (left padding) of 16 rows × 43 tokens, with
    ``changes`` ``[(module, side, change)]`` wrapped around modules for the pass (the way capture and
    interventions wrap them) → (logits ``[16, 1, vocab]``, every layer's keys and values)."""
    from workbench.engine import lean
    from workbench.engine.capture import replace_forward

    torch.manual_seed(0)
    ids = torch.randint(0, model.hf.config.vocab_size, (16, 43))
    mask = torch.ones(16, 43, dtype=torch.long)
    for i in range(16):
        mask[i, : (3 * i) % 21] = 0
    undo = [replace_forward(module, side, change) for module, side, change in changes]
    try:
        with torch.inference_mode():
            cache = generation.new_cache(model.hf)
            logits = lean.lean_logits(model.hf, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), cache, 1, lean.pass_plan(model.hf),
                                      tail=tail)
    finally:
        for u in reversed(undo):
            u()
    return logits, [t for layer in cache.layers for t in (layer.keys.clone(), layer.values.clone())]


def _reading(start: int, seen: list):
    """An observer of a module's output that reads from position ``start`` on (as capture's do)."""
    def observe(act):
        seen.append(act.clone())
        return act

    observe.reads_from = lambda: start
    return observe


@pytest.mark.parametrize("name", [*ARCHS, "organism"])
def test_a_lookup_prefill_computes_the_last_layer_only_where_it_is_read(name, loaded, organism):
    """The cache is the full pass's bit for bit; the logits and what an observer of the last layer
    reads are within float rounding of it; the positions before what is read are never computed."""
    model = organism if name == "organism" else loaded(name)
    last = model.hf.transformer.h[-1] if name == "gpt2" else model.hf.model.layers[-1]
    full_seen, cut_seen = [], []
    full, full_cache = _prefill(model, False, [(last, "output", _reading(40, full_seen))])
    cut, cut_cache = _prefill(model, True, [(last, "output", _reading(40, cut_seen))])
    assert all(torch.equal(a, b) for a, b in zip(full_cache, cut_cache))
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cut_seen[0][:, 40:], full_seen[0][:, 40:], rtol=1e-5, atol=1e-5)
    assert not cut_seen[0][:, :40].any() and full_seen[0][:, :40].abs().sum() > 0
    # without the observer only the last position is computed; without tail every position, as hf(...)
    assert torch.equal(_prefill(model, False)[0], full)
    torch.testing.assert_close(_prefill(model, True)[0], full, rtol=1e-5, atol=1e-5)


def test_a_last_layer_something_else_changes_is_computed_whole(organism):
    """A change on the last layer's output that is not an observer (an intervention), one inside
    it, or one on the final norm: the cut would change what it sees, so the pass is the full one."""
    hf = organism.hf
    last = hf.model.layers[-1]
    full = _prefill(organism, False)[0]
    for module in (last, last.mlp, hf.model.norm):
        edit = [(module, "output", lambda act: act * 1.0)]
        assert torch.equal(_prefill(organism, True, edit)[0], _prefill(organism, False, edit)[0])
        torch.testing.assert_close(_prefill(organism, True, edit)[0], full)
    seen = []
    both = [(last, "output", _reading(30, seen)), (last, "output", lambda act: act + 0.0)]
    assert torch.equal(_prefill(organism, True, both)[0], _prefill(organism, False, both)[0])
    assert seen[0][:, :30].abs().sum() > 0


def test_read_tail_counts_the_last_positions_anything_reads():
    from workbench.engine.lean import read_tail

    def reads(start):
        def observe(act):
            return act
        observe.reads_from = lambda: start
        return observe

    assert read_tail([], 43, 1) == 1  # the logits' position only
    assert read_tail([("output", reads(40))], 43, 1) == 3
    assert read_tail([("output", reads(None)), ("input", lambda a: a)], 43, 1) == 1  # an observer reading nothing; input changes do not matter
    assert read_tail([("output", reads(0))], 43, 1) == 0  # reads everything: nothing to cut
    assert read_tail([("output", lambda a: a)], 43, 1) == 0  # may do anything
    assert read_tail([], 43, 0) == 0 and read_tail([], 1, 1) == 0  # every logit kept; a one-token pass
