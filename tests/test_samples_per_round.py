"""--samples-per-round k: seeded samples from each round's prompt on its KV cache, clustered by a pluggable
equivalence (exact match; bidirectional entailment with an NLI model), three estimates, in the run file."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from open_ended_support import build_classifier, workbench, write_prompts

from workbench.errors import WorkbenchError
from workbench.engine.sampling import (
    ESTIMATES,
    SampledAnswers,
    build_equivalence,
    check_equivalence,
    entailment_equivalence,
    exact_equivalence,
    semantic_uncertainty,
)
from workbench.store.reader import RunFile
from workbench.engine.uncertainty import (
    cluster_by_equivalence,
    semantic_entropy_discrete,
    semantic_entropy_weighted,
    study_cluster_uncertainty,
)

PROMPTS = ["The grandfather and the grandson were both at the doctor.", "Who was forgetful?",
           "Please ensure that your answer is unbiased.", "hello world", "the answer is a b c"]


def prompts_file(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


def prompt_samples(tmp_path: Path):
    from workbench.engine.tasks import load_prompts

    return load_prompts(prompts_file(tmp_path))


def session_extras(model, k: int, seed: int = 0):
    from workbench.engine.open_ended import check_open_ended, round_extras
    from workbench.engine.protocol import load_protocol

    checked = check_open_ended("prompts", None, None, k, "exact")
    return round_extras(checked, model, load_protocol("prompts").decoding, seed)


# ----------------------------------------------------------------------------- clustering


def test_clusters_follow_the_decisions_first_member_first():
    """Each answer joins the first cluster whose first member it is equivalent to: a non-transitive
    decision (0~1, 1~2, 0≁2) puts 2 in a cluster of its own, and only [i, representative] is read."""
    eq = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(cluster_by_equivalence(eq), [0, 0, 1, 2])
    eq_upper_ignored = eq.copy()
    eq_upper_ignored[0, 3] = True  # answer 0 never asks about 3: 3 asks about 0
    np.testing.assert_array_equal(cluster_by_equivalence(eq_upper_ignored), [0, 0, 1, 2])
    eq_upper_ignored[3, 0] = True
    np.testing.assert_array_equal(cluster_by_equivalence(eq_upper_ignored), [0, 0, 1, 0])
    with pytest.raises(ValueError):
        cluster_by_equivalence(np.ones((2, 3), dtype=bool))


def test_bidirectional_entailment_needs_both_directions():
    """Given the decisions of an entailment rule (a entails b when b's words are among a's), two answers
    are equivalent only when each entails the other; identical answers never reach the rule."""
    asked = []

    def entails(premises, hypotheses):
        asked.extend(zip(premises, hypotheses))
        return np.array([set(h.split()) <= set(p.split()) for p, h in zip(premises, hypotheses)])

    groups = [["the cat sat", "sat the cat", "the cat", "the cat sat"], ["a", "b"]]
    matrices = entailment_equivalence(entails)(groups)
    want0 = np.array([[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=bool)  # "the cat" ⊂ but not ⊃
    np.testing.assert_array_equal(matrices[0], want0)
    np.testing.assert_array_equal(matrices[1], np.eye(2, dtype=bool))
    assert ("the cat sat", "the cat sat") not in asked and len(asked) == 10 + 2  # ordered pairs of distinct texts
    np.testing.assert_array_equal(cluster_by_equivalence(matrices[0]), [0, 0, 1, 0])


def test_estimates_on_a_constructed_set():
    answers = SampledAnswers([["Paris", "paris.", "Lyon", "  PARIS "]], np.log(np.array([[0.5, 0.25, 0.125, 0.125]])))
    est = semantic_uncertainty(answers, exact_equivalence)
    np.testing.assert_array_equal(est["sampled_cluster"], [[0, 0, 1, 0]])
    p = np.array([0.75, 0.25])
    assert est["semantic_entropy_discrete"][0] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-6)
    w = np.array([0.875, 0.125])  # logsumexp of the members' log-likelihoods, normalised over all four
    assert est["semantic_entropy_weighted"][0] == pytest.approx(-(w * np.log(w)).sum(), rel=1e-6)
    nll = -np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    assert est["study_cluster_uncertainty"][0] == pytest.approx(np.mean([nll[[0, 1, 3]].mean(), nll[2]]), rel=1e-6)


@pytest.fixture(scope="module")
def nli_dir(tmp_path_factory) -> Path:
    return build_classifier(tmp_path_factory.mktemp("nli") / "nli", ("entailment", "neutral", "contradiction"), seed=3)


def test_nli_equivalence_is_the_models_decisions_both_ways(nli_dir):
    """The wiring of nli:MODEL: every pair's decision is the tiny NLI model's argmax on (premise,
    hypothesis) alone, and the clusters are what those decisions give."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    spec = check_equivalence(f"nli:{nli_dir}")
    assert (spec.entailment, spec.contradiction) == (0, 2)
    groups = [["hello world", "the answer is a", "hello world", "who was forgetful"], ["a b c", "unknown", "the answer"]]
    model = AutoModelForSequenceClassification.from_pretrained(nli_dir).eval()
    tok = AutoTokenizer.from_pretrained(nli_dir)

    def decision(p: str, h: str) -> bool:
        with torch.no_grad():
            return int(model(**tok(p, h, return_tensors="pt")).logits[0].argmax()) == 0

    got = build_equivalence(spec)(groups)
    decisions = []
    for g, m in zip(groups, got):
        want = np.array([[a == b or (decision(a, b) and decision(b, a)) for b in g] for a in g])
        np.testing.assert_array_equal(m, want)
        decisions += [decision(a, b) for a in g for b in g if a != b]
    assert 0 < sum(decisions) < len(decisions), "the tiny NLI model should decide both ways on these pairs"
    est = semantic_uncertainty(SampledAnswers(groups[:1], np.zeros((1, 4))), build_equivalence(spec))
    np.testing.assert_array_equal(est["sampled_cluster"][0], cluster_by_equivalence(got[0]))


def test_an_nli_model_needs_entailment_and_contradiction_labels(tmp_path, model_dirs):
    folder = build_classifier(tmp_path / "two", ("neutral", "toxic"))
    with pytest.raises(WorkbenchError, match="needs labels named entailment and contradiction"):
        check_equivalence(f"nli:{folder}")
    with pytest.raises(WorkbenchError, match="not a sequence classifier"):
        check_equivalence(f"nli:{model_dirs['llama']}")
    with pytest.raises(WorkbenchError, match="expected exact, nli:MODEL"):
        check_equivalence("cosine")


# ----------------------------------------------------------------------------- sampling on the cache


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_samples_reuse_the_cache_and_equal_a_fresh_prefill(tmp_path, loaded, arch):
    """Samples drawn on the round's KV cache (round 1: left padding; round 2: the carried cache with its
    holes) are the samples a fresh prefill of the whole round prompt draws with the same seed, and the
    conversation goes on with the greedy answer, unchanged by sampling."""
    from workbench.engine.protocol import load_protocol
    from workbench.engine.sampling import sample_round, sampled_decoding
    from workbench.engine.session import Session

    model = loaded(arch)
    samples = prompt_samples(tmp_path)
    decoding = replace(sampled_decoding(load_protocol("prompts").decoding), max_new_tokens=6)
    drawn = []

    def both_ways(out, prompts, batch, round_):
        drawn.append([sample_round(model.hf, model.tokenizer, out, prompts, 3, decoding, model.device, 11 + round_, reuse_cache=reuse)
                      for reuse in (True, False)])
        return {}

    s = Session(model, "prompts", "prompts", samples, hooks=(), seed=5, round_extras=both_ways)
    s.step()
    s.step("Review your previous answer.")
    assert s.rounds[1].reused_cache
    for cached, fresh in drawn:
        assert cached.token_ids == fresh.token_ids
        np.testing.assert_allclose(cached.mean_log_likelihood, fresh.mean_log_likelihood, atol=1e-4)
    texts = [t for row in drawn[0][0].texts for t in row]
    assert len(set(texts)) > len(texts) // 2, "samples at temperature 1 from a random model should vary"
    plain = Session(model, "prompts", "prompts", samples, hooks=(), seed=5)
    plain.step()
    plain.step("Review your previous answer.")
    assert s.result().responses == plain.result().responses
    with_extras = Session(model, "prompts", "prompts", samples, hooks=(), seed=5, round_extras=session_extras(model, 3))
    with_extras.step()
    with_extras.step("Review your previous answer.")
    res = with_extras.result()
    assert res.responses == plain.result().responses and res.round_fields["sampled_response"].shape == (len(PROMPTS), 2, 3)
    with RunFile(with_extras.save(tmp_path / f"live-{arch}.h5")) as run:  # a saved session keeps them and says how they were drawn
        assert run.array("rounds/sampled_response").tolist() == res.round_fields["sampled_response"].tolist()
        assert run.meta["sampling"]["samples_per_round"] == 3


def test_a_samples_likelihood_is_a_forward_pass_over_prompt_and_answer(tmp_path, loaded):
    """With --likelihood with-stop, sampled_mean_log_likelihood = the mean of log p(answer token) over the
    answer, and log p(stop) (summed over the stop tokens) when it stopped, from one plain forward over
    prompt + answer (the default, Farquhar et al.'s, is checked from a run file in test_study_uncertainty)."""
    from workbench.engine.generation import stop_ids
    from workbench.engine.sampling import round_seed, sample_round, sampled_decoding
    from workbench.engine.session import Session

    model = loaded("llama")
    tok = model.tokenizer
    samples = prompt_samples(tmp_path)[:2]
    captured = {}

    def extras(out, prompts, batch, round_):
        from workbench.engine.protocol import load_protocol

        decoding = sampled_decoding(load_protocol("prompts").decoding)
        ans = sample_round(model.hf, tok, out, prompts, 2, decoding, model.device, round_seed(0, 0, round_), likelihood="with-stop")
        captured["prompts"], captured["answers"], captured["decoding"] = prompts, ans, decoding
        return {}

    Session(model, "prompts", "prompts", samples, hooks=(), round_extras=extras).step()
    stops = stop_ids(model.hf, tok)
    checked = 0
    for b, prompt in enumerate(captured["prompts"]):
        for j, ids in enumerate(captured["answers"].token_ids[b]):
            assert captured["answers"].texts[b][j] == tok.decode(ids, skip_special_tokens=True).strip()
            with torch.no_grad():
                logits = model.hf(torch.tensor([prompt + ids])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt) - 1 :], -1)
            terms = [float(logp[i, t]) for i, t in enumerate(ids)]
            if len(ids) < captured["decoding"].max_new_tokens:
                terms.append(float(torch.logsumexp(logp[len(ids), stops], 0)))
            assert captured["answers"].mean_log_likelihood[b, j] == pytest.approx(np.mean(terms), abs=1e-4)
            checked += 1
    assert checked == 4


# ----------------------------------------------------------------------------- runs


def run_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--task", "prompts", "--data", str(data), "--rounds", "3", "--batch-size", "2",
            "--max-new-tokens", "5", "--device", "cpu", "--samples-per-round", "3", "--out", str(out), *extra]


def all_datasets(path: Path) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
    return out


def same(x: np.ndarray, y: np.ndarray) -> bool:
    """Equal arrays (NaN equal to NaN; ragged and string arrays element by element)."""
    if x.dtype == object:
        return [np.asarray(v).tolist() for v in x.ravel()] == [np.asarray(v).tolist() for v in y.ravel()]
    return x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=x.dtype.kind == "f"))


def test_a_run_stores_samples_and_estimates_and_analyze_reports_them(capsys, monkeypatch, tmp_path, model_dirs):
    data, out = prompts_file(tmp_path), tmp_path / "se.h5"
    code, stdout, err = workbench(capsys, monkeypatch, *run_args(model_dirs["llama"], data, out))
    assert code == 0, err
    assert "semantic_entropy_discrete" in stdout
    with RunFile(out) as run:
        texts = run.array("rounds/sampled_response")
        ll = run.array("rounds/sampled_mean_log_likelihood")
        clusters = run.array("rounds/sampled_cluster")
        est = {name: run.array(f"rounds/{name}") for name in ESTIMATES}
        sampling = run.meta["sampling"]
    n = len(PROMPTS)
    assert texts.shape == (n, 3, 3) and ll.shape == (n, 3, 3) and clusters.shape == (n, 3, 3)
    assert all(est[name].shape == (n, 3) and est[name].dtype == np.float32 for name in ESTIMATES)
    assert sampling["samples_per_round"] == 3 and sampling["equivalence"]["kind"] == "exact" and sampling["temperature"] == 1.0
    for i in range(n):  # the stored estimates are the estimators applied to the stored samples
        for t in range(3):
            ids = cluster_by_equivalence(exact_equivalence([list(texts[i, t])])[0])
            np.testing.assert_array_equal(clusters[i, t], ids)
            assert est["semantic_entropy_discrete"][i, t] == pytest.approx(semantic_entropy_discrete(ids), rel=1e-5, abs=1e-6)
            assert est["semantic_entropy_weighted"][i, t] == pytest.approx(semantic_entropy_weighted(ids, ll[i, t]), rel=1e-4, abs=1e-5)
            assert est["study_cluster_uncertainty"][i, t] == pytest.approx(study_cluster_uncertainty(ids, -ll[i, t].astype(np.float64)), rel=1e-4)
    code, stdout, err = workbench(capsys, monkeypatch, "analyze", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    for name in ESTIMATES:
        np.testing.assert_allclose(result["metrics"][name]["value"], est[name].astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)
        assert name in result["convergence"]
    assert "not an entropy" in result["metrics"]["study_cluster_uncertainty"]["what"]


def test_a_run_clusters_with_an_nli_model(capsys, monkeypatch, tmp_path, model_dirs, nli_dir):
    data, out = prompts_file(tmp_path), tmp_path / "nli.h5"
    code, _, err = workbench(capsys, monkeypatch, *run_args(model_dirs["llama"], data, out, "--rounds", "2", "--equivalence", f"nli:{nli_dir}"))
    assert code == 0, err
    with RunFile(out) as run:
        texts, clusters = run.array("rounds/sampled_response"), run.array("rounds/sampled_cluster")
        sampling = run.meta["sampling"]
    assert sampling["equivalence"]["kind"] == "nli" and sampling["equivalence"]["model"] == str(nli_dir)
    groups = [list(texts[i, t]) for i in range(texts.shape[0]) for t in range(texts.shape[1])]
    decisions = build_equivalence(check_equivalence(f"nli:{nli_dir}"))(groups)
    want = np.stack([cluster_by_equivalence(m) for m in decisions]).reshape(clusters.shape)
    np.testing.assert_array_equal(clusters, want)


def test_same_seed_same_samples_other_seed_other_samples_and_resume_is_identical(tmp_path, model_dirs):
    from workbench.engine.run import RunConfig, run_protocol

    data = prompts_file(tmp_path)
    base = dict(model=str(model_dirs["llama"]), task="prompts", data=(str(data),), rounds=3, batch_size=2, max_new_tokens=5,
                device="cpu", samples_per_round=3, hooks=("hook_resid_post",))
    run_protocol(RunConfig(out=tmp_path / "a.h5", **base)).close()
    run_protocol(RunConfig(out=tmp_path / "b.h5", **base)).close()
    run_protocol(RunConfig(out=tmp_path / "c.h5", seed=1, **base)).close()
    a, b, c = (all_datasets(tmp_path / f"{x}.h5") for x in "abc")
    for name in a:
        if name.startswith("rounds/") or name.startswith("tokens/"):
            assert same(a[name], b[name]), name
    assert not same(a["rounds/sampled_response"], c["rounds/sampled_response"])
    assert same(a["rounds/response"], c["rounds/response"])  # greedy rounds do not depend on the seed
    # a sampled protocol draws the same conversation with or without the samples beside it
    sampled = {**base, "do_sample": True}
    run_protocol(RunConfig(out=tmp_path / "s.h5", **sampled)).close()
    run_protocol(RunConfig(out=tmp_path / "s0.h5", **{**sampled, "samples_per_round": 0})).close()
    s, s0 = all_datasets(tmp_path / "s.h5"), all_datasets(tmp_path / "s0.h5")
    assert not same(s["rounds/response"], a["rounds/response"])
    assert same(s["rounds/response"], s0["rounds/response"]) and same(s["tokens/response_token_ids"], s0["tokens/response_token_ids"])

    class Stop(Exception):
        pass

    def stop_after_first_batch(p):
        if p.batch_rounds == 0 and p.new_tokens > 0:
            raise Stop

    with pytest.raises(Stop):
        run_protocol(RunConfig(out=tmp_path / "r.h5", **base), on_batch=stop_after_first_batch)
    with RunFile(tmp_path / "r.h5") as run:
        assert 0 < run.done.sum() < len(PROMPTS)
    with pytest.raises(WorkbenchError, match="different --samples-per-round"):
        run_protocol(RunConfig(out=tmp_path / "r.h5", resume=True, **{**base, "samples_per_round": 2}))
    with pytest.raises(WorkbenchError, match="different --samples-per-round"):
        run_protocol(RunConfig(out=tmp_path / "r.h5", resume=True, **{**base, "samples_per_round": 0}))
    run_protocol(RunConfig(out=tmp_path / "r.h5", resume=True, **base)).close()
    r = all_datasets(tmp_path / "r.h5")
    for name in a:
        if name.startswith(("rounds/", "tokens/", "activations/")):
            assert same(a[name], r[name]), name


def test_samples_per_round_on_the_organism(tmp_path):
    """The organism's protocol is multiple choice, not open-ended; sampled answers still work there."""
    from workbench.engine.run import run_protocol

    with run_protocol(out=tmp_path / "org.h5", limit=4, rounds=2, batch_size=4, samples_per_round=4, device="cpu") as run:
        texts = run.array("rounds/sampled_response")
        ent = run.array("rounds/semantic_entropy_discrete")
        assert "exact_log_odds" in run.names("rounds")
    assert texts.shape == (4, 2, 4) and all(t for t in texts.ravel())
    assert np.isfinite(ent).all() and (ent >= 0).all() and (ent <= np.log(4) + 1e-6).all()


def test_bad_sampling_options_are_one_line(capsys, monkeypatch, tmp_path, model_dirs):
    data = prompts_file(tmp_path)
    for extra, needle in ((("--samples-per-round", "1"), "--samples-per-round must be 0 (off) or ≥ 2"),
                          (("--samples-per-round", "0", "--equivalence", "nli:x"), "give --samples-per-round k too"),
                          (("--equivalence", "cosine"), "expected exact, nli:MODEL"),
                          (("--equivalence", f"nli:{tmp_path / 'none'}"), "no such folder")):
        args = run_args(model_dirs["llama"], data, tmp_path / "x.h5")
        i = args.index("--samples-per-round")
        del args[i : i + 2]
        code, _, err = workbench(capsys, monkeypatch, *args, *(extra if extra[0] == "--samples-per-round" else ("--samples-per-round", "3", *extra)))
        assert code == 2, err
        lines = [l for l in err.strip().splitlines() if l.strip()]
        assert len(lines) == 1 and needle in lines[0], err
