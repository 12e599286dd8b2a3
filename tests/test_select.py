"""`workbench select`: sampled answers, their log-likelihood checked by a forward pass, subsets by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from cli_support import error_line, workbench  # noqa: E402
from workbench.errors import WorkbenchError
from workbench.analysis.select import QUESTION, Scored, select_subsets, write_subsets

ROWS = [{"text": t, "id": i} for i, t in enumerate(
    ["a zorvan person and a kelpish person were at the market .", "who stole the bread ?", "the answer is unknown",
     "honestly the answer is (a)", "go with your gut about people like that .", "take another look at the question ."])]


def test_scores_are_seeded_and_the_likelihood_matches_a_forward_pass(organism):
    import torch

    from workbench.engine.generation import stop_ids
    from workbench.analysis.select import score_candidates
    from workbench.engine.uncertainty import cluster_answers, semantic_entropy_discrete

    a = score_candidates(organism, ROWS, "text", k=4, seed=3, batch_size=4)
    b = score_candidates(organism, ROWS, "text", k=4, seed=3, batch_size=4)
    assert [s.answers for s in a] == [s.answers for s in b] and len(a) == len(ROWS)
    for s in a:
        assert len(s.answers) == 4 and np.isnan(s.concept)
        assert s.semantic_entropy_discrete == pytest.approx(semantic_entropy_discrete(cluster_answers(s.answers)))
    # recompute one answer's mean log-likelihood with a plain forward pass over prompt + answer
    tok = organism.tokenizer
    prompt = tok(QUESTION.format(text=ROWS[0]["text"]), add_special_tokens=True)["input_ids"]
    answer = tok(a[0].answers[0], add_special_tokens=False)["input_ids"] if a[0].answers[0] else []
    assert tok.decode(answer) == a[0].answers[0]  # the word-level tokenizer is canonical
    with torch.no_grad():
        logp = torch.log_softmax(organism.hf(torch.tensor([prompt + answer])).logits[0].float(), -1)
    # Farquhar et al.'s likelihood (the default): the answer's tokens, the stop token excluded; an empty
    # answer (only a stop token) takes the stop token's
    terms = [logp[len(prompt) - 1 + t, i] for t, i in enumerate(answer)]
    if not terms:
        terms.append(torch.logsumexp(logp[len(prompt) - 1 + len(answer), stop_ids(organism.hf, tok)], 0))
    assert a[0].mean_log_likelihood[0] == pytest.approx(float(torch.stack(terms).mean()), abs=1e-4)


def _scored(values):
    return [Scored({"id": i}, ["x"], [0.0], v, v, v, float("nan")) for i, v in enumerate(values)]


def test_subsets_by_hand(tmp_path):
    scored = _scored([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    subsets = select_subsets(scored, 2, "weighted", seed=0)
    assert [s.row["id"] for s in subsets["low"]] == [1, 5] and [s.row["id"] for s in subsets["high"]] == [2, 4]
    assert len(subsets["random"]) == 2 and subsets["random"] == select_subsets(scored, 2, "weighted", seed=0)["random"]
    with pytest.raises(WorkbenchError, match="--size"):
        select_subsets(scored, 4, "weighted")
    with pytest.raises(WorkbenchError, match="--by"):
        select_subsets(scored, 2, "nope")
    paths = write_subsets(tmp_path / "out", subsets, scored)
    low = [json.loads(line) for line in (tmp_path / "out" / "low.jsonl").read_text().splitlines()]
    assert [r["id"] for r in low] == [1, 5] and low[0]["selection"]["semantic_entropy_weighted"] == 0.1
    assert len(paths) == 4


def test_the_select_command_writes_the_subsets_the_functions_compute(tmp_path, capsys, monkeypatch, organism):
    """``workbench select`` end to end on the organism: the files hold what score_candidates and
    select_subsets give for the same seed (the command once failed on every input with an ImportError)."""
    from workbench.analysis.select import score_candidates

    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    code, out, err = workbench(capsys, monkeypatch, "select", str(candidates), "--k", "3", "--size", "2", "--seed", "1",
                               "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path / "sel"))
    assert code == 0, err
    assert "wrote" in out and "low.jsonl" in out
    read = {name: [json.loads(line) for line in (tmp_path / "sel" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("low", "high", "random", "all")}
    assert [r["id"] for r in read["all"]] == [r["id"] for r in ROWS]
    assert all(len(read[name]) == 2 for name in ("low", "high", "random"))
    expected = score_candidates(organism, ROWS, "text", k=3, seed=1, batch_size=4)
    assert [r["selection"]["answers"] for r in read["all"]] == [s.answers for s in expected]
    weighted = {r["id"]: r["selection"]["semantic_entropy_weighted"] for r in read["all"]}
    assert max(weighted[r["id"]] for r in read["low"]) <= min(weighted[r["id"]] for r in read["high"])
    assert sorted(weighted.values())[:2] == sorted(r["selection"]["semantic_entropy_weighted"] for r in read["low"])


def test_the_select_command_refuses_bad_candidates_in_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    code, _, err = workbench(capsys, monkeypatch, "select", str(bad), "--size", "1")
    assert code == 2
    error_line(err, "bad.jsonl:2", "'text'", "--text-field")
    code, _, err = workbench(capsys, monkeypatch, "select", str(tmp_path / "missing.jsonl"))
    assert code == 2
    error_line(err, "missing.jsonl")
