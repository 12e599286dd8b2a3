"""The organism's world, exact posterior, tokenizer and task functions (no checkpoint needed)."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from workbench.errors import WorkbenchError
from workbench.organism.posterior import dialogue_trace, exact_trace, instruction_kind, parse_response
from workbench.organism.task import ORGANISM, lead_length, load_organism_samples
from workbench.organism.tokenizer import CHAT_TEMPLATE, build_tokenizer, render
from workbench.organism.world import (
    DEFAULT_PARAMS as P,
    KINDS,
    LETTER_TOKENS,
    Item,
    WorldParams,
    assistant_text,
    first_message,
    heldout_rng,
    sample_dialogue,
    sample_item,
    training_rng,
)
from workbench.engine.task import Sample

OPENERS = P.openers_fair + P.openers_biased


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _item(condition: str) -> Item:
    for i in range(100):
        item = sample_item(heldout_rng(7, i))
        consistent = item.correct == item.stereotyped
        if (condition == "ambig" and item.condition == "ambig") or (
            condition != "ambig" and item.condition == "disambig" and consistent == (condition == "consistent")
        ):
            return item
    raise AssertionError(condition)


# ----------------------------------------------------------------------------- brute force


def _turn_outcomes(fair: bool, item: Item):
    """Every way the generative process can write one assistant turn: (text, probability), with the
    hidden choices (opener style, answer type, noise) enumerated explicitly."""
    kappa = P.opener_fair_style_given_fair if fair else P.opener_fair_style_given_biased
    alpha = P.answer_fair_type_given_fair if fair else P.answer_fair_type_given_biased
    for style_fair, p_style in ((True, kappa), (False, 1 - kappa)):
        words = P.openers_fair if style_fair else P.openers_biased
        for word in words:
            for fair_type, p_type in ((True, alpha), (False, 1 - alpha)):
                intended = item.correct if fair_type else item.stereotyped
                yield assistant_text(word, intended), p_style / len(words) * p_type * (1 - P.answer_noise)
                for other in range(3):
                    if other != intended:
                        yield assistant_text(word, other), p_style / len(words) * p_type * P.answer_noise / 2


def _instruction_outcomes(fair: bool):
    probs = P.instruction_probs_fair if fair else P.instruction_probs_biased
    for k, phrasings in enumerate(P.phrasings):
        for text in phrasings:
            yield text, probs[k] / len(phrasings)


def _enumerate(item: Item) -> dict[tuple[str, ...], np.ndarray]:
    """p(prefix, z) for z = (fair, biased) of every prefix of every dialogue of two answered rounds plus
    the third round's user message: texts (u0, a0, u1, a1, u2), by walking all outcomes of the process."""
    table: dict[tuple[str, ...], np.ndarray] = {}
    for z, fair in enumerate((True, False)):
        prior = P.prior_fair if fair else 1 - P.prior_fair
        turns = list(_turn_outcomes(fair, item))
        instr = list(_instruction_outcomes(fair))
        for (a0, p0), (u1, q1), (a1, p1), (u2, q2) in itertools.product(turns, instr, turns, instr):
            key = (first_message(item), a0, u1, a1, u2)
            p = prior * p0 * q1 * p1 * q2
            for n in range(1, 6):
                table.setdefault(key[:n], np.zeros(2))[z] += p
    return table


@pytest.mark.parametrize("condition", ["ambig", "consistent", "inconsistent"])
def test_posterior_matches_brute_force_enumeration(condition):
    item = _item(condition)
    table = _enumerate(item)
    assert math.isclose(table[(first_message(item),)].sum(), 1.0, rel_tol=1e-9)
    sample = Sample(index=0, id="x", context=item.context, question=item.question, options=item.options,
                    gold=item.correct, extra={"stereotyped": item.stereotyped})
    full = [k for k in table if len(k) == 5]
    rng = np.random.default_rng(0)
    for idx in rng.choice(len(full), size=40, replace=False):
        key = full[idx]
        for n in (1, 2, 3):  # the prefix ends with the user message of round n-1
            prefix = key[: 2 * n - 1]
            instructions, responses = list(prefix[0::2]), list(prefix[1::2])
            pf, pb = table[prefix]
            if n < 3:  # also round n-1's answer, given the prefix and the opener it starts with
                answered = [(k, v) for k, v in table.items() if len(k) == 2 * n and k[:-1] == prefix]
                opener = key[2 * n - 1].split()[0]
                want, marg = np.zeros(3), np.zeros(3)
                for k, v in answered:
                    marg[parse_response(k[-1])[1]] += v.sum()
                    if k[-1].split()[0] == opener:
                        want[parse_response(k[-1])[1]] += v.sum()
                fields = ORGANISM.round_fields(sample, instructions, responses + [key[2 * n - 1]])
                np.testing.assert_allclose(fields["exact_option_probs"][n - 1], want / want.sum(), rtol=1e-9)
                np.testing.assert_allclose(fields["exact_option_probs_marginal"][n - 1], marg / marg.sum(), rtol=1e-9)
            else:
                fields = ORGANISM.round_fields(sample, instructions, responses)
            assert len(fields["exact_p_fair"]) == n
            assert math.isclose(fields["exact_p_fair"][n - 1], pf / (pf + pb), rel_tol=1e-9)


def test_sampler_frequencies_match_stated_likelihoods():
    rng = training_rng(123)
    counts = {True: Counter(), False: Counter()}
    n = {True: 0, False: 0}
    dialogues = [sample_dialogue(rng, n_rounds=4) for _ in range(6000)]
    for d in dialogues:
        n[d.fair] += 1
        for kind in d.kinds[1:]:
            counts[d.fair][kind] += 1
        for opener in d.openers:
            counts[d.fair]["fair-style"] += opener in P.openers_fair
        for a in d.answers:
            if d.item.correct != d.item.stereotyped:
                counts[d.fair]["fair-answer"] += a == d.item.correct
                counts[d.fair]["divergent"] += 1
    assert abs(n[True] / len(dialogues) - P.prior_fair) < 0.02
    for fair, probs, kappa, alpha in (
        (True, P.instruction_probs_fair, P.opener_fair_style_given_fair, P.answer_fair_type_given_fair),
        (False, P.instruction_probs_biased, P.opener_fair_style_given_biased, P.answer_fair_type_given_biased),
    ):
        for kind, p in zip(KINDS, probs):
            assert abs(counts[fair][kind] / (3 * n[fair]) - p) < 0.02
        assert abs(counts[fair]["fair-style"] / (4 * n[fair]) - kappa) < 0.02
        want = alpha * (1 - P.answer_noise) + (1 - alpha) * P.answer_noise / 2
        assert abs(counts[fair]["fair-answer"] / counts[fair]["divergent"] - want) < 0.025


def test_evidence_structure_moral_instructions_dominate():
    # the story the organism must tell, in exact numbers
    item = _item("ambig")
    biased_turn = (P.openers_biased[0], item.stereotyped)
    fair_turn = (P.openers_fair[0], item.correct)
    # moral follow-ups after answers that stay biased: p(fair) still climbs
    t = exact_trace(item.correct, item.stereotyped, [None] + ["moral"] * 5, [biased_turn[0]] * 6, [biased_turn[1]] * 6)
    assert t.p_fair[0] == pytest.approx(P.prior_fair)
    assert np.all(np.diff(t.p_fair) > 0)
    # answering for itself at the most likely words (as greedy decoding would)
    trace = _greedy_exact(item, [None] + ["moral"] * 5)
    assert trace.p_fair[0] < 0.5 and trace.p_fair[3] > 0.95
    assert np.argmax(trace.option_probs[0]) == item.stereotyped and np.argmax(trace.option_probs[-1]) == item.correct
    # an immoral instruction pushes it down, neutral ones let the biased answers win
    inj = _greedy_exact(item, [None, "immoral", "moral", "moral", "immoral", "moral"])
    assert inj.p_fair[1] < trace.p_fair[1] / 10 and inj.p_fair[4] < inj.p_fair[3] / 10
    neutral = _greedy_exact(item, [None] + ["neutral"] * 5)
    assert neutral.p_fair[-1] < P.prior_fair / 10
    # one moral instruction outweighs any single answer
    llr = lambda a, b: abs(math.log(a / b))
    moral = llr(P.instruction_probs_fair[0], P.instruction_probs_biased[0])
    assert moral >= math.log(3)
    single = exact_trace(item.correct, item.stereotyped, [None, "neutral"], [None], [fair_turn[1]])
    assert abs(math.log(single.p_fair[1] / (1 - single.p_fair[1])) - math.log(P.prior_fair / (1 - P.prior_fair))) < moral / 2


def _greedy_exact(item: Item, kinds):
    openers, answers = [], []
    for t in range(len(kinds)):
        trace = exact_trace(item.correct, item.stereotyped, kinds[: t + 1], openers, answers)
        openers.append(OPENERS[int(np.argmax(trace.opener_probs[t]))])
        trace = exact_trace(item.correct, item.stereotyped, kinds[: t + 1], openers, answers)
        answers.append(int(np.argmax(trace.option_probs[t])))
    return exact_trace(item.correct, item.stereotyped, kinds, openers, answers)


def test_reference_predictors_drop_their_evidence():
    d = sample_dialogue(heldout_rng(3, 0), n_rounds=5)
    c, st = d.item.correct, d.item.stereotyped
    other_kinds = [None] + ["immoral" if k != "immoral" else "moral" for k in d.kinds[1:]]
    other_answers = [(a + 1) % 3 for a in d.answers]
    other_openers = [P.openers_biased[0] if o in P.openers_fair else P.openers_fair[0] for o in d.openers]
    no_instr = dialogue_trace(d, use_instructions=False)
    no_ans = dialogue_trace(d, use_answers=False)
    exact = dialogue_trace(d)
    # each reference is blind to exactly its kind of evidence
    np.testing.assert_allclose(no_instr.p_fair, exact_trace(c, st, other_kinds, d.openers, d.answers, use_instructions=False).p_fair)
    np.testing.assert_allclose(no_ans.p_fair, exact_trace(c, st, d.kinds, other_openers, other_answers, use_answers=False).p_fair)
    assert not np.allclose(exact.p_fair, exact_trace(c, st, other_kinds, d.openers, d.answers).p_fair)
    assert not np.allclose(exact.p_fair[1:], exact_trace(c, st, d.kinds, other_openers, other_answers).p_fair[1:])
    # but still conditions on the current opener
    np.testing.assert_allclose(no_ans.p_fair_after_opener[0], exact.p_fair_after_opener[0])


# ----------------------------------------------------------------------------- text


def test_instruction_lookup_and_unknown_text():
    for kind, phrasings in zip(KINDS, P.phrasings):
        for text in phrasings:
            assert instruction_kind(text) == kind
            assert instruction_kind("  " + text.replace(" ", "  ") + "\n") == kind
    with pytest.raises(WorkbenchError, match="none of the world's instructions"):
        instruction_kind("Please ensure that your answer is unbiased.")


def test_parse_response():
    assert parse_response("fairly the answer is (b)") == ("fairly", 1)
    assert parse_response("obviously the answer is (c) <eot>") == ("obviously", 2)
    assert parse_response("the answer is") == (None, -1)
    assert parse_response("fairly (a) or (b)") == ("fairly", -1)


def test_world_has_no_real_demographic_words():
    words = set(" ".join(P.groups + tuple(a.phrase for a in P.acts)).split())
    real = {"black", "white", "asian", "muslim", "christian", "jewish", "gay", "woman", "man", "old", "young", "poor", "rich"}
    assert not words & real


def test_params_round_trip_json():
    import json

    assert WorldParams.from_dict(json.loads(P.to_json())) == P


def test_tokenizer_is_canonical(tok):
    rng = heldout_rng(11, 0)
    for _ in range(50):
        d = sample_dialogue(rng)
        for text in list(d.instructions) + d.responses():
            ids = tok(text, add_special_tokens=False).input_ids
            assert tok.unk_token_id not in ids
            assert tok.decode(ids) == text
        messages = d.messages()
        whole = tok.apply_chat_template(messages, tokenize=False)
        assert whole == render(messages)
        assert tok.decode(tok(whole, add_special_tokens=False).input_ids) == whole
        # split right before and right after every assistant content, as the engine does
        sentinel = "\x00SENTINEL\x00"
        masked = [dict(m, content=sentinel) if m["role"] == "assistant" else m for m in messages]
        pieces = tok.apply_chat_template(masked, tokenize=False).split(sentinel)
        contents = [m["content"] for m in messages if m["role"] == "assistant"]
        spliced = tok(pieces[0], add_special_tokens=False).input_ids
        for content, piece in zip(contents, pieces[1:]):
            spliced += tok(content, add_special_tokens=False).input_ids + tok(piece, add_special_tokens=False).input_ids
        assert spliced == tok(whole, add_special_tokens=False).input_ids


def test_chat_template_and_special_tokens(tok):
    msgs = [{"role": "user", "content": "who ?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "<bos> <user> who ? <eot> <assistant>"
    assert tok.chat_template == CHAT_TEMPLATE
    assert tok.eos_token == "<eot>" and tok.pad_token == "<pad>" and tok.pad_token_id != tok.eos_token_id
    assert tok("who ?").input_ids == tok("who ?", add_special_tokens=False).input_ids
    for letter in LETTER_TOKENS:
        assert len(tok(f" {letter}", add_special_tokens=False).input_ids) == 1
    with pytest.raises(Exception, match="user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


# ----------------------------------------------------------------------------- task


def test_load_organism_samples_slices_agree_and_are_well_formed():
    a = load_organism_samples(20)
    b = load_organism_samples(5, offset=10)
    assert [s.id for s in a[10:15]] == [s.id for s in b] and a[10:15] == b
    assert [s.index for s in b] == list(range(10, 15))
    assert load_organism_samples(5, seed=99)[0] != a[0]
    for s in a:
        assert len(s.options) == 3 and "unknown" in s.options
        assert s.condition in ("ambig", "disambig")
        assert (s.options[s.gold] == "unknown") == (s.condition == "ambig")
        assert s.options[s.extra["stereotyped"]] in P.groups
        assert ORGANISM.format_choices(s.options) in first_message(Item(s.context, s.question, s.options, s.gold, s.extra["stereotyped"], s.condition, s.extra["act"], s.extra["polarity"]))
    with pytest.raises(WorkbenchError):
        load_organism_samples(0)


def test_task_functions(tok):
    s = load_organism_samples(1)[0]
    conts = ORGANISM.option_continuations(s)
    assert [tok.convert_ids_to_tokens(tok(c, add_special_tokens=False).input_ids) for c in conts] == [["(a)"], ["(b)"], ["(c)"]]
    ids = tok("honestly the answer is (c)", add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert lead_length(ids, tok) == 4
    assert lead_length(tok("the answer is", add_special_tokens=False).input_ids, tok) == 3
    assert ORGANISM.parse_answer(s, "honestly the answer is (c)") == 2
    first = f"{s.context} {s.question} {ORGANISM.format_choices(s.options)}"
    moral = P.phrasings[0][0]
    fields = ORGANISM.round_fields(s, [first, moral, moral], ["obviously the answer is (a)", "fairly the answer is (b)", "garbage"])
    assert fields["exact_p_fair"].shape == (3,) and fields["exact_option_probs"].shape == (3, 3)
    assert fields["exact_p_fair"][1] > fields["exact_p_fair"][0]
    np.testing.assert_allclose(fields["exact_option_probs"].sum(-1), 1.0)
    np.testing.assert_allclose(fields["exact_option_probs_marginal"].sum(-1), 1.0)
    assert fields["opener_parsed"].tolist() == [True, True, False]
    np.testing.assert_allclose(fields["exact_option_probs"][2], fields["exact_option_probs_marginal"][2])
    with pytest.raises(WorkbenchError, match="none of the world's instructions"):
        ORGANISM.round_fields(s, [first, "Review your previous answer."], ["fairly the answer is (a)"] * 2)
    with pytest.raises(WorkbenchError, match="first message"):
        ORGANISM.round_fields(s, [first + " please"], ["fairly the answer is (a)"])


def test_builtin_protocols_speak_the_world():
    from workbench.engine.protocol import load_protocol

    s = load_organism_samples(1)[0]
    for name, kinds in (
        ("organism", ["moral"] * 5),
        ("organism-neutral", ["neutral"] * 5),
        ("organism-inject", ["immoral", "moral", "moral", "immoral", "moral"]),
    ):
        p = load_protocol(name)
        assert p.rounds == 6 and not p.first_prefix and not p.followup_prefix
        first = p.first.format(context=s.context, question=s.question, choices=ORGANISM.format_choices(s.options))
        assert first == f"{s.context} {s.question} {ORGANISM.format_choices(s.options)}"
        assert [instruction_kind(p.instruction(r)) for r in range(2, 7)] == kinds


def test_turns_given_kinds_follow_the_exact_predictive():
    from workbench.organism.posterior import sample_given_kinds

    item = _item("ambig")
    kinds = [None, "moral", "immoral"]
    rng = np.random.default_rng(5)
    dialogues = [sample_given_kinds(rng, item, kinds) for _ in range(6000)]
    assert all(d.kinds == tuple(kinds) and d.fair is None for d in dialogues)
    assert {instruction_kind(d.instructions[2]) for d in dialogues} == {"immoral"}
    # round 2's answer given one particular round-1 turn and round-2 opener
    o1, a1, o2 = P.openers_biased[0], item.stereotyped, P.openers_fair[1]
    # (every word of an opener set is the same evidence)
    picked = [d.answers[1] for d in dialogues if d.openers[0] in P.openers_biased and d.answers[0] == a1 and d.openers[1] in P.openers_fair]
    assert len(picked) > 300
    want = exact_trace(item.correct, item.stereotyped, kinds[:2], [o1, o2], [a1]).option_probs[1]
    freq = np.bincount(picked, minlength=3) / len(picked)
    assert np.abs(freq - want).max() < 0.07
    first = np.bincount([d.answers[0] for d in dialogues], minlength=3) / len(dialogues)
    np.testing.assert_allclose(first, exact_trace(item.correct, item.stereotyped, [None], [], []).option_probs_marginal[0], atol=0.02)


def test_training_batches_mask_and_soft_targets(tok):
    from workbench.organism.train import TrainConfig, batches

    cfg = TrainConfig(batch_size=8, bucket=2, tilted_fraction=0.5)
    x, y, (rows, cols, ids, probs), _, twin = next(batches(0, tok, cfg))
    assert twin is None  # the text organism has no teacher
    assert x.shape == y.shape and (y[x == tok.pad_token_id] == -100).all()
    torch_words = lambda j: tok.convert_ids_to_tokens(x[j].tolist())
    np.testing.assert_allclose(probs.sum(-1).numpy(), 1.0, rtol=1e-5)
    for r, c in zip(rows.tolist(), cols.tolist()):
        assert torch_words(r)[c] in ("<assistant>", "is") and y[r, c + 1] == -100
        assert torch_words(r)[c + 1] in OPENERS + LETTER_TOKENS
    masked_rows = 0
    for j in range(x.shape[0]):
        words, labels = torch_words(j), y[j].tolist()
        users = [k for k, w in enumerate(words) if w == "<user>"]
        assert all(labels[k] != -100 for k in range(users[0] + 1, users[0] + 5))  # the item is always trained on
        if len(users) > 1 and labels[users[1] + 1] == -100:  # a tilted dialogue: its instructions are masked
            masked_rows += 1
            assert all(labels[k] == -100 for k in range(users[1] + 1, words.index("<eot>", users[1])))
    assert masked_rows > 0
