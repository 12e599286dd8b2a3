"""The study's uncertainty measures for generation: rank-calibration error against a hand-computed example
(the reference code's plug-in estimator, shuoli90/Rank-Calibration), the nli-nocontra clustering on
constructed NLI outputs, semantic entropy's likelihood as Farquhar et al. compute it (the stop token
excluded) recomputed from the token ids a run file stores, Pearson beside Spearman, and the probability of
the round-1 choice per round."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workbench.analysis.analyze import first_choice_probability, pearson, spearman
from workbench.engine.sampling import mean_log_likelihoods, no_contradiction_equivalence
from workbench.engine.uncertainty import cluster_by_equivalence, rank_calibration_error

CONTRADICTION, NEUTRAL, ENTAILMENT = 0, 1, 2  # microsoft/deberta-large-mnli's labels, as the study read them


def test_rank_calibration_error_by_hand():
    """n = 4, B = 2 bins of two. Uncertainty CDF of the sorted answers: 0, 1/3, 2/3, 1.

    Rank-calibrated (correctness 1, 1, 0, 0 as uncertainty rises): the bins' mean correctness is 1 and 0;
    the share of others with correctness ≥ a bin's is (2 − 1)/3 = 1/3 for the first, (4 − 1)/3 = 1 for the
    second; de-tied by (2 − 1)/(2·3) = 1/6: 1/6 and 5/6. RCE = (1/6 + 1/6 + 1/6 + 1/6)/4 = 1/6 (the
    binning's own floor). Reversed (0, 0, 1, 1): de-tied 5/6 and 1/6, RCE = (5/6 + 3/6 + 3/6 + 5/6)/4 = 2/3."""
    u = np.array([0.1, 0.2, 0.3, 0.4])
    assert rank_calibration_error(u, np.array([1.0, 1, 0, 0]), n_bins=2) == pytest.approx(1 / 6)
    assert rank_calibration_error(u, np.array([0.0, 0, 1, 1]), n_bins=2) == pytest.approx(2 / 3)
    shuffled = np.array([2, 0, 3, 1])  # order does not matter, only the pairing
    assert rank_calibration_error(u[shuffled], np.array([0.0, 0, 1, 1])[shuffled], n_bins=2) == pytest.approx(2 / 3)
    batched = rank_calibration_error(np.stack([u, u]), np.array([[1.0, 1, 0, 0], [0, 0, 1, 1]]), n_bins=2)
    np.testing.assert_allclose(batched, [1 / 6, 2 / 3])
    assert np.isnan(rank_calibration_error(u[:1], np.array([1.0])))


def _reference_rce(correctness, uncertainties, num_bins=20):
    """shuoli90/Rank-Calibration metrics/calibration.py plugin_RCE_est (p=1, no kernel), transcribed
    (its argsort made stable, as ties are otherwise in an arbitrary order)."""
    n = len(uncertainties)
    order = np.argsort(uncertainties, kind="stable")
    sorted_correctness = correctness[order]
    uncertainty_cdfs = np.arange(0, n) / (n - 1)
    regressed = np.zeros(n)
    ends = [round(e) for e in np.linspace(0, n, num_bins + 1)]
    for b in range(1, num_bins + 1):
        lo, hi = ends[b - 1], ends[b]
        if hi > lo:
            regressed[lo:hi] = np.mean(sorted_correctness[lo:hi])
    inv = np.array([(np.sum([regressed[i] <= regressed]) - 1) / (n - 1) for i in range(n)])
    detied = np.zeros(n)
    for b in range(1, num_bins + 1):
        lo, hi = ends[b - 1], ends[b]
        if hi > lo:
            detied[lo:hi] = np.mean(inv[lo:hi]) - (hi - lo - 1) / (2 * (n - 1))
    return np.sum(np.abs(detied - uncertainty_cdfs)) / n


@pytest.mark.parametrize("n", [2, 5, 19, 20, 57])
def test_rank_calibration_error_is_the_reference_estimator(n):
    rng = np.random.default_rng(n)
    u, a = rng.normal(size=n), (rng.random(n) < 0.6).astype(float)
    for bins in (3, 20):
        assert rank_calibration_error(u, a, bins) == pytest.approx(_reference_rce(a, u, bins), abs=1e-12)


def test_nli_nocontra_merges_unless_either_direction_is_contradiction():
    """Constructed NLI outputs for answers A, B, C, D: A→B neutral, B→A entailment (merged: no contradiction,
    though not bidirectional entailment); A→C entailment but C→A contradiction (apart); D contradicts no one
    one way but B→D is contradiction (apart from B, merged with A)."""
    outputs = {("A", "B"): NEUTRAL, ("B", "A"): ENTAILMENT, ("A", "C"): ENTAILMENT, ("C", "A"): CONTRADICTION,
               ("A", "D"): NEUTRAL, ("D", "A"): NEUTRAL, ("B", "C"): NEUTRAL, ("C", "B"): NEUTRAL,
               ("B", "D"): CONTRADICTION, ("D", "B"): ENTAILMENT, ("C", "D"): ENTAILMENT, ("D", "C"): ENTAILMENT}
    asked = []

    def labels(premises, hypotheses):
        asked.extend(zip(premises, hypotheses))
        return np.array([outputs[p, h] for p, h in zip(premises, hypotheses)])

    [eq] = no_contradiction_equivalence(labels, CONTRADICTION)([["A", "B", "C", "D", "A"]])
    assert eq[0, 1] and eq[1, 0] and not eq[0, 2] and not eq[1, 3] and eq[0, 3] and eq[2, 3] and eq[0, 4]
    np.testing.assert_array_equal(cluster_by_equivalence(eq), [0, 0, 1, 0, 0])
    assert ("A", "A") not in asked  # identical answers are equivalent without asking


def test_nli_nocontra_is_checked_and_recorded(tmp_path):
    from open_ended_support import build_classifier

    from workbench.engine.sampling import build_equivalence, check_equivalence

    folder = build_classifier(tmp_path / "nli", ("contradiction", "neutral", "entailment"), seed=3)
    spec = check_equivalence(f"nli-nocontra:{folder}")
    assert spec.kind == "nli-nocontra" and spec.contradiction == 0 and spec.record()["kind"] == "nli-nocontra"
    eq = build_equivalence(spec)
    texts = ["hello world", "the answer is a", "a b c"]
    from workbench.engine.scorers import SequenceClassifier

    clf = SequenceClassifier(str(folder), "cpu")
    [m] = eq([texts])
    for i, a in enumerate(texts):
        for j, b in enumerate(texts):
            if i != j:
                want = clf.logits([a], [b]).argmax(-1)[0] != 0 and clf.logits([b], [a]).argmax(-1)[0] != 0
                assert m[i, j] == want


def test_the_likelihood_leaves_the_stop_out_by_default():
    """Constructed step logits over a vocabulary of 4 (token 3 the stop): an answer [0, 1] that stopped,
    one that ran to the limit, and one that was only a stop (Farquhar et al. then take the stop's)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 3, 4)
    logp = torch.log_softmax(logits, -1)
    ids = [[0, 1], [2, 2, 1], []]
    farquhar = mean_log_likelihoods(logits, ids, [3])
    with_stop = mean_log_likelihoods(logits, ids, [3], "with-stop")
    assert farquhar[0] == pytest.approx(float((logp[0, 0, 0] + logp[0, 1, 1]) / 2))
    assert with_stop[0] == pytest.approx(float((logp[0, 0, 0] + logp[0, 1, 1] + logp[0, 2, 3]) / 3))
    assert farquhar[1] == with_stop[1] == pytest.approx(float((logp[1, 0, 2] + logp[1, 1, 2] + logp[1, 2, 1]) / 3))
    assert farquhar[2] == with_stop[2] == pytest.approx(float(logp[2, 0, 3]))


def test_the_stored_token_ids_recompute_every_likelihood(capsys, monkeypatch, tmp_path, model_dirs):
    """A run with --samples-per-round keeps each answer's token ids; a plain forward pass over the round's
    prompt (from the stored transcript) and those ids gives back the stored mean log-likelihood, by
    Farquhar's rule (no stop) by default; --likelihood with-stop is recorded and gives the other rule."""
    from open_ended_support import workbench, write_prompts
    from transformers import AutoModelForCausalLM

    from workbench.engine.generation import stop_ids
    from workbench.store.reader import RunFile

    from transformers import AutoTokenizer

    data = write_prompts(tmp_path / "p.jsonl", ["hello world", "the answer is"])
    model_dir = tmp_path / "stopping"  # the tiny model, made to stop often (p(stop) ≈ 0.3): answers of every length
    hf = AutoModelForCausalLM.from_pretrained(model_dirs["llama"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dirs["llama"])
    with torch.no_grad():
        h = hf.model(torch.tensor(tok(["hello world the answer is a b c"])["input_ids"])).last_hidden_state[0].mean(0)
        hf.lm_head.weight[tok.eos_token_id] = 6.0 * h / h.norm() ** 2
    hf.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    stops = stop_ids(hf, tok)
    lengths, stored = [], {}
    for rule in ("no-stop", "with-stop"):
        out = tmp_path / f"{rule}.h5"
        code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dir), "--task", "prompts", "--data", str(data),
                                 "--rounds", "2", "--max-new-tokens", "4", "--device", "cpu", "--samples-per-round", "3",
                                 "--likelihood", rule, "--out", str(out))
        assert code == 0, err
        with RunFile(out) as run:
            assert run.meta["sampling"]["likelihood"] == rule
            ids, ll = run.array("rounds/sampled_token_ids"), run.array("rounds/sampled_mean_log_likelihood")
            transcripts, spans = run.array("transcripts/token_ids"), run.array("rounds/prompt_span")
            texts = run.array("rounds/sampled_response")
        assert ids.shape == (2, 2, 3, 4) and ids.dtype == np.int32
        for i in range(2):
            for t in range(2):
                prompt = list(transcripts[i][: spans[i, t, 1]])
                for j in range(3):
                    answer = [int(x) for x in ids[i, t, j] if x >= 0]
                    lengths.append(len(answer))
                    assert texts[i, t, j] == tok.decode(answer, skip_special_tokens=True).strip()
                    with torch.no_grad():
                        logp = torch.log_softmax(hf(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 :].float(), -1)
                    terms = [float(logp[p, tok]) for p, tok in enumerate(answer)]
                    stopped = len(answer) < 4
                    if stopped and (rule == "with-stop" or not answer):
                        terms.append(float(torch.logsumexp(logp[len(answer), stops], 0)))
                    assert ll[i, t, j] == pytest.approx(np.mean(terms), abs=2e-4)
        stored[rule] = ll
    assert 0 in lengths and 4 in lengths and any(0 < n < 4 for n in lengths)  # stopped at once, ran to the limit, stopped between
    assert not np.allclose(stored["no-stop"], stored["with-stop"])  # the same seeded answers, the two rules

    # a file made before the likelihood was recorded counted the stop: --resume takes it as with-stop
    import h5py

    from workbench.engine.open_ended import check_resume
    from workbench.errors import WorkbenchError

    path = tmp_path / "with-stop.h5"
    with h5py.File(path, "r") as f:
        record = json.loads(f.attrs["sampling"])
    with h5py.File(path, "r+") as f:
        f.attrs["sampling"] = json.dumps({k: v for k, v in record.items() if not k.startswith("likelihood")})
    check_resume(path, {"sampling": record})
    with pytest.raises(WorkbenchError, match="--resume"):
        check_resume(path, {"sampling": {**record, "likelihood": "no-stop"}})

def test_pearson_interval_beside_spearman():
    """Fisher's z interval: r = 0.5 on n = 28 gives atanh(0.5) ± 1.96/5, back through tanh."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=28)
    y = x + rng.normal(size=28)
    got = pearson(x, y)
    r = float(np.corrcoef(x, y)[0, 1])
    half = 1.959963984540054 / 5
    assert got["r"] == pytest.approx(r) and got["low"] == pytest.approx(np.tanh(np.arctanh(r) - half))
    assert got["high"] == pytest.approx(np.tanh(np.arctanh(r) + half)) and got["low"] < r < got["high"]
    assert spearman(x, y)["pearson"] == got
    assert np.isnan(pearson(x[:3], y[:3])["low"]) and np.isnan(pearson(np.ones(5), y[:5])["r"])


def test_analyze_reports_the_round_one_choice_and_rce(capsys, monkeypatch, tmp_path, model_dirs):
    """On a multiple-choice run: the p̂ of the round-1 answer in every round (the study's Fig. 4), from the
    stored option probabilities; on an open-ended run with a scorer: RCE per round; both in the JSON."""
    from open_ended_support import workbench, write_prompts

    from workbench.analysis.analyze import analyze
    from workbench.store.reader import RunFile

    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"q": f"Who {i}?", "o": ["a b", "hello", "world"], "y": i % 3}) + "\n" for i in range(6)))
    out = tmp_path / "mc.h5"
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "mc", "--data", str(data),
                             "--fields", "question=q,options=o,label=y", "--rounds", "3", "--max-new-tokens", "2", "--out", str(out))
    assert code == 0, err
    code, stdout, err = workbench(capsys, monkeypatch, "analyze", str(out), "--json", "--no-write")
    assert code == 0, err
    result = json.loads(stdout)
    with RunFile(out) as run:
        probs, answer = run.array("rounds/option_probs"), run.array("rounds/answer")
        expected = first_choice_probability(run)
    for i in range(6):
        if answer[i, 0] >= 0:
            np.testing.assert_allclose(expected[i], probs[i, :, answer[i, 0]])
    np.testing.assert_allclose(result["metrics"]["first_choice_probability"]["value"], np.nanmean(expected, 0), rtol=1e-6)

    prompts = write_prompts(tmp_path / "p.jsonl", ["hello world", "the answer is", "a b c", "hello", "world", "the"])
    out = tmp_path / "open.h5"
    (tmp_path / "quality.py").write_text("def q(texts):\n    return [float(len(t) % 3) / 2 for t in texts]\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = workbench(capsys, monkeypatch, "run", "--model", str(model_dirs["llama"]), "--task", "prompts", "--data", str(prompts),
                             "--rounds", "2", "--max-new-tokens", "3", "--scorer", "python:quality:q", "--out", str(out))
    assert code == 0, err
    with RunFile(out) as run:
        result = analyze(run)
        tok, score = run.array("rounds/mean_token_entropy"), run.array("rounds/score")
    rce = result["metrics"]["rce:mean_token_entropy"]
    for t in range(2):
        assert rce["value"][t] == pytest.approx(rank_calibration_error(tok[:, t].astype(float), score[:, t].astype(float), 20))
    code, stdout, err = workbench(capsys, monkeypatch, "analyze", str(out), "--no-write")
    assert code == 0 and "RCE tok H" in stdout
