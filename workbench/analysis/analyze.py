"""`workbench analyze`: the study's questions measured on one run file, each number with what it is.

Per round: accuracies with bootstrap intervals, uncertainty, calibration (ECE over [0, 1] and over
[min, max], each with an interval; rank-calibration error for open-ended runs with a scorer), the
probability of the round-1 choice (the study's Fig. 4), concept scores; then the convergence of every per-round metric,
the flips of every transition, concept ↔ uncertainty correlations (within a round, on round-to-round
changes, and across rounds, named apart because a correlation across rounds can be high only
because both move with the round number; each Spearman ρ with Pearson's r and its interval beside it), the probe against the organism's exact posterior, and
the simulation task (a reconstruction, see :func:`simulation_task`).

NumPy, SciPy and scikit-learn only: no torch. :func:`analyze` returns one JSON-ready dict;
:func:`write_analysis` stores it in the run file under ``analysis/`` (docs/FORMAT.md).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import stats

from workbench.analysis.summary import FLOOR, REL_EPS, answer_correctness, convergence, epsilon_rule, metric_scale
from workbench.errors import WorkbenchError
from workbench.json_values import finite
from workbench.store.groups import replace_group
from workbench.store.reader import RunFile
from workbench.engine.uncertainty import rank_calibration_error

CONFIDENCE = 0.95
N_RESAMPLES = 2000
STUDY_SIMULATION = {"accuracy": 0.8318, "variance": 0.00024, "data": "RealToxicityPrompts",
                    "note": "the study's reported figure (its code does not contain the task)"}


# ----------------------------------------------------------------------------- statistics


def bootstrap_interval(
    data: tuple[np.ndarray, ...], statistic: Callable[..., float], seed: int,
    n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE, vectorized: bool = False,
    bounds: tuple[float, float] = (-np.inf, np.inf),
) -> tuple[float, float, float]:
    """``(estimate, low, high)``: ``statistic(*data)`` (the plug-in estimate θ̂) and its 95 % bootstrap
    interval (``scipy.stats.bootstrap``'s resamples: paired resampling of the samples, seeded),
    centred on the estimate: ``θ̂ − (m − q_low)`` to ``θ̂ + (q_high − m)``, with m the median and
    q_low, q_high the 2.5 % and 97.5 % quantiles of the bootstrap distribution θ*, kept within
    ``bounds`` (the values the statistic can take: [0, 1] for ECE). It keeps the bootstrap distribution's
    width and skew, and contains the estimate by construction — a plain percentile interval can miss
    it (ECE's bootstrap distribution sits above the estimate) and would need widening. For a mean,
    m ≈ θ̂ and it is the percentile interval. Non-finite entries of any array drop that sample.
    Fewer than two samples: NaN bounds; identical resamples: the estimate itself as both bounds."""
    arrays = [np.asarray(a, dtype=np.float64) for a in data]
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    arrays = [a[keep] for a in arrays]
    if arrays[0].size == 0:
        return float("nan"), float("nan"), float("nan")
    estimate = float(statistic(*arrays))
    if arrays[0].size < 2:
        return estimate, float("nan"), float("nan")
    if all(np.all(a == a[0]) for a in arrays):
        return estimate, estimate, estimate
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate resamples are expected on small binary data
        res = stats.bootstrap(tuple(arrays), statistic, n_resamples=n_resamples, confidence_level=confidence,
                              method="percentile", paired=True, vectorized=vectorized, rng=np.random.default_rng(seed))
    boot = np.asarray(res.bootstrap_distribution, dtype=np.float64).ravel()
    boot = boot[np.isfinite(boot)]
    if boot.size == 0:
        return estimate, float("nan"), float("nan")
    q_low, median, q_high = np.quantile(boot, [(1 - confidence) / 2, 0.5, (1 + confidence) / 2])
    low = max(estimate - (median - q_low), bounds[0])
    high = min(estimate + (q_high - median), bounds[1])
    return estimate, float(low), float(high)


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def mean_interval(x: np.ndarray, seed: int, n_resamples: int = N_RESAMPLES) -> tuple[float, float, float]:
    """Mean of ``x`` ``[n]`` with its 95 % bootstrap interval (:func:`bootstrap_interval`, within
    [min x, max x]; NaNs dropped)."""
    finite = np.asarray(x, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    bounds = (float(finite.min()), float(finite.max())) if finite.size else (-np.inf, np.inf)
    return bootstrap_interval((x,), _mean, seed, n_resamples, vectorized=True, bounds=bounds)


def ece_batched(confidence: np.ndarray, correct: np.ndarray, span: str = "unit", n_bins: int = 10, axis: int = -1) -> np.ndarray:
    """:func:`workbench.engine.uncertainty.expected_calibration_error` of every row at once (for the bootstrap):
    ``[..., n]`` → ``[...]``. Σ over bins of n_b/n · |mean conf − accuracy| is Σ |Σ conf − Σ correct| / n."""
    c = np.moveaxis(np.asarray(confidence, dtype=np.float64), axis, -1)
    y = np.moveaxis(np.asarray(correct, dtype=np.float64), axis, -1)
    shape, n = c.shape[:-1], c.shape[-1]
    c, y = c.reshape(-1, n), y.reshape(-1, n)
    lo, hi = (np.zeros((len(c), 1)), np.ones((len(c), 1))) if span == "unit" else (c.min(1, keepdims=True), c.max(1, keepdims=True))
    width = np.where(hi > lo, hi - lo, 1.0)
    bins = np.clip(((c - lo) / width * n_bins).astype(int), 0, n_bins - 1) + n_bins * np.arange(len(c))[:, None]
    gap = np.bincount(bins.ravel(), weights=(c - y).ravel(), minlength=n_bins * len(c)).reshape(len(c), n_bins)
    return (np.abs(gap).sum(1) / n).reshape(shape)


def ece_interval(confidence: np.ndarray, correct: np.ndarray, span: str, seed: int, n_resamples: int = N_RESAMPLES) -> tuple[float, float, float]:
    """ECE (10 equal-width bins over [0, 1] or over [min, max], ``span`` = ``unit``/``range``) with its
    95 % bootstrap interval over samples."""
    return bootstrap_interval((confidence, correct), lambda c, y, axis=-1: ece_batched(c, y, span, axis=axis), seed, n_resamples,
                              vectorized=True, bounds=(0.0, 1.0))


def pearson(x: np.ndarray, y: np.ndarray, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Pearson's r of paired ``[n]`` arrays (non-finite pairs dropped) with its interval from Fisher's
    z (atanh r ± z₀.₉₇₅/√(n − 3), back through tanh): ``{"r", "low", "high", "p"}``. r is NaN when
    fewer than 3 pairs or either side is constant; the interval needs n ≥ 4."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    nan = float("nan")
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return {"r": nan, "low": nan, "high": nan, "p": nan}
    res = stats.pearsonr(x, y)
    r = float(np.clip(res.statistic, -1.0, 1.0))
    if x.size < 4:
        return {"r": r, "low": nan, "high": nan, "p": float(res.pvalue)}
    z, half = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15)), stats.norm.ppf(0.5 + confidence / 2) / np.sqrt(x.size - 3)
    return {"r": r, "low": float(np.tanh(z - half)), "high": float(np.tanh(z + half)), "p": float(res.pvalue)}


def spearman(x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Spearman's ρ of paired ``[n]`` arrays (non-finite pairs dropped), with Pearson's r and its 95 %
    interval beside it (:func:`pearson`): ``{"rho", "p", "n", "pearson": {"r", "low", "high", "p"}}``;
    ρ is NaN when fewer than 3 pairs or either side is constant."""
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    linear = pearson(x, y)
    if x.size < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return {"rho": float("nan"), "p": float("nan"), "n": int(x.size), "pearson": linear}
    res = stats.spearmanr(x, y)
    return {"rho": float(res.statistic), "p": float(res.pvalue), "n": int(x.size), "pearson": linear}


def correlation_views(concept: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    """Spearman ρ between two per-(sample, round) arrays ``[n, R]``, four ways, each named:

    * ``within_round``: ``[R]`` across samples in each round;
    * ``changes``: ``[R − 1]`` across samples, of the change from round t to t+1 of each;
      ``changes_pooled``: the same over every transition at once;
    * ``across_rounds``: of the R per-round means (moves with the round number by construction);
    * ``pooled``: over every (sample, round) at once (mixes within- and between-round variation).
    """
    d_concept, d_other = np.diff(concept, axis=1), np.diff(other, axis=1)
    return {
        "within_round": [spearman(concept[:, t], other[:, t]) for t in range(concept.shape[1])],
        "changes": [spearman(d_concept[:, t], d_other[:, t]) for t in range(d_concept.shape[1])],
        "changes_pooled": spearman(d_concept, d_other),
        "across_rounds": spearman(np.nanmean(concept, 0), np.nanmean(other, 0)),
        "pooled": spearman(concept, other),
    }


def flip_matrices(parsed_correct: np.ndarray, unparsed: np.ndarray, option_correct: np.ndarray) -> list[dict[str, Any]]:
    """For every transition t → t+1 (1-based), counts of samples by state before (rows) and after
    (columns): ``parsed`` over (right, wrong, unparsed) of the parsed answer, ``option`` over
    (right, wrong) of the option argmax. Each ``[n, R]`` bool input → a list of R − 1 dicts."""
    parsed_state = np.where(unparsed, 2, np.where(parsed_correct, 0, 1))
    option_state = np.where(option_correct, 0, 1)
    out = []
    for t in range(parsed_state.shape[1] - 1):
        mats = {}
        for name, state, k in (("parsed", parsed_state, 3), ("option", option_state, 2)):
            m = np.zeros((k, k), dtype=int)
            np.add.at(m, (state[:, t], state[:, t + 1]), 1)
            mats[name] = m.tolist()
        out.append({"from": t + 1, "to": t + 2, **mats})
    return out


FLIP_STATES = {"parsed": ["right", "wrong", "unparsed"], "option": ["right", "wrong"]}


# ----------------------------------------------------------------------------- simulation task


def simulation_task(features: np.ndarray, falls: np.ndarray, groups: np.ndarray, seed: int, folds: int = 5) -> dict[str, Any]:
    """The study's simulation task as the workbench defines it (the study's code does not contain it):
    a logistic regression predicting whether a sample's uncertainty falls between two rounds
    (``falls`` ``[m]`` bool) from the change in its concept representation (``features`` ``[m, f]``),
    ``folds``-fold cross-validated with every transition of one sample in the same fold (``groups``
    ``[m]``: the sample), stratified by the label, seeded.

    Returns accuracy mean and variance over the folds (population variance, ddof 0) beside the
    majority-class baseline on the same folds (the majority label of each training fold), or
    ``{"skipped": reason}`` when either label has fewer members than folds.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    keep = np.isfinite(features).all(1)
    x, y, g = features[keep], falls[keep].astype(int), groups[keep]
    counts = np.bincount(y, minlength=2)
    if counts.min() < folds or np.unique(g).size < folds:
        return {"skipped": f"too few of one label to cross-validate ({int(counts[1])} fall, {int(counts[0])} do not)", "n": int(y.size)}
    accs, base = [], []
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, test in splitter.split(x, y, g):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        model.fit(x[train], y[train])
        accs.append(float((model.predict(x[test]) == y[test]).mean()))
        majority = int(np.bincount(y[train], minlength=2).argmax())
        base.append(float((y[test] == majority).mean()))
    return {
        "accuracy_mean": float(np.mean(accs)), "accuracy_variance": float(np.var(accs)),
        "baseline_mean": float(np.mean(base)), "baseline_variance": float(np.var(base)),
        "fold_accuracy": accs, "n": int(y.size), "n_falls": int(counts[1]), "folds": folds,
    }


# ----------------------------------------------------------------------------- the analysis


def _probe_groups(run: RunFile, probe: str | None) -> list[tuple[str, dict[str, Any]]]:
    """``(name, attrs)`` of the probes tracked in the run (``probe``: only that one)."""
    names = run.names("probes")
    if probe is not None and probe not in names:
        raise WorkbenchError(f"{run.path} has no tracked probe {probe!r} (tracked: {', '.join(names) or 'none'}; run `workbench probe track`)")
    out = []
    for name in [probe] if probe else names:
        attrs = {k: (json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v) for k, v in run.f[f"probes/{name}"].attrs.items()}
        out.append((name, attrs))
    return out


def _concepts(run: RunFile, probe: str | None) -> dict[str, dict[str, Any]]:
    """Per tracked probe: ``scores`` ``[n, R, L]`` (projection; stereotype: cosine), ``layers``,
    ``best`` (column of the layer the probe chose), ``kind``, ``method`` (a probe's fitting method)."""
    out = {}
    for name, attrs in _probe_groups(run, probe):
        kind = attrs.get("kind")
        layers = [int(l) for l in attrs["layers"]]
        if kind == "probe":
            scores, best = run.array(f"probes/{name}/projection"), layers.index(int(attrs["best_layer"]))
        else:
            scores, best = run.array(f"probes/{name}/cosine"), len(layers) - 1
        out[name] = {"scores": scores.astype(np.float64), "layers": layers, "best": best, "kind": kind,
                     "position": attrs.get("run_position"), "hook": attrs.get("hook"), "method": attrs.get("method")}
    return out


def _per_round(values: np.ndarray, seed: int, what: str, unit: str = "") -> dict[str, Any]:
    est = [mean_interval(values[:, t], seed + t) for t in range(values.shape[1])]
    return {"what": what, "unit": unit, "value": [e[0] for e in est], "low": [e[1] for e in est], "high": [e[2] for e in est]}


def analyze(run: RunFile, probe: str | None = None, eps: float | None = None, k: int = 2, seed: int = 0) -> dict[str, Any]:
    """The whole analysis of a run (see the module docstring) as one JSON-ready dict:
    ``metrics`` (name → per-round ``value``/``low``/``high`` ``[R]`` and ``what``), ``convergence``
    (name → status, round, eps), ``flips``, ``concept_uncertainty``, ``probe_vs_exact`` (organism
    runs), ``simulation_task``, ``run`` and ``settings``."""
    done = int(run.done.sum())
    if done == 0:
        raise WorkbenchError(f"{run.path} has no finished samples to analyse")
    meta = run.meta
    rounds = run.n_rounds
    multiple_choice = int(meta.get("n_options", 0)) > 0
    metrics: dict[str, dict[str, Any]] = {}
    tok = run.array("rounds/mean_token_entropy").astype(np.float64)
    opt = run.array("rounds/option_entropy").astype(np.float64)
    result: dict[str, Any] = {}
    if multiple_choice:
        named = answer_correctness(run)
        correct = run.array("rounds/correct").astype(bool)
        conf = run.array("rounds/chosen_confidence").astype(np.float64)
        metrics["accuracy_parsed"] = _per_round(named["parsed_correct"].astype(float), seed, "accuracy of the answer parsed from the text (unparseable counted wrong)")
        metrics["accuracy_option"] = _per_round(named["option_correct"].astype(float), seed, "accuracy of the argmax of option confidence")
        metrics["accuracy"] = _per_round(correct.astype(float), seed, "accuracy of the run file's answer (parsed, else option argmax)")
        metrics["unparsed"] = _per_round(named["unparsed"].astype(float), seed, "fraction of answers that could not be parsed")
        metrics["mean_option_entropy"] = _per_round(opt, seed, "mean entropy of option confidence p̂", "nats")
    metrics["mean_token_entropy"] = _per_round(tok, seed, "mean over samples of the mean next-token entropy of the response", "nats")
    if multiple_choice:
        for span, name, what in (("unit", "ece", "ECE, 10 equal-width bins over [0, 1]"),
                                 ("range", "ece_range", "ECE, 10 equal-width bins over [min, max] confidence (the study's variant)")):
            est = [ece_interval(conf[:, t], correct[:, t], span, seed + t) for t in range(rounds)]
            metrics[name] = {"what": what + ", confidence of the answer vs its correctness", "unit": "",
                             "value": [e[0] for e in est], "low": [e[1] for e in est], "high": [e[2] for e in est]}
    concepts = _concepts(run, probe)
    for name, c in concepts.items():
        layer = c["layers"][c["best"]]
        label = "projection on the probe direction" if c["kind"] == "probe" else "cosine with the stereotyped statement"
        metrics[f"concept:{name}"] = {**_per_round(c["scores"][:, :, c["best"]], seed, f"mean {label}, layer {layer}"),
                                      "kind": "projection" if c["kind"] == "probe" else "cosine"}
    if multiple_choice:
        metrics["first_choice_probability"] = _per_round(
            first_choice_probability(run), seed,
            "mean option confidence p̂ of the option chosen in round 1 (the run's answer: parsed, else option argmax; the study's Fig. 4 curve)")
    metrics.update(_task_fields(run, seed))
    metrics.update(open_ended_metrics(run, seed))
    metrics.update(rank_calibration_metrics(run, seed))

    result["run"] = {"path": str(run.path), "model": meta.get("model_name"), "task": meta.get("task"),
                     "protocol": (meta.get("protocol") or {}).get("name") if isinstance(meta.get("protocol"), dict) else meta.get("protocol"),
                     "n_done": done, "n_samples": int(meta.get("n_samples", 0)), "n_rounds": rounds}
    result["settings"] = {"eps": eps, "rel_eps": REL_EPS if eps is None else None, "floor": FLOOR if eps is None else None,
                          "eps_rule": epsilon_rule(eps), "k": k, "seed": seed,
                          "bootstrap": f"{CONFIDENCE:.0%}, {N_RESAMPLES} paired resamples of the samples; the percentile interval's "
                                       "distances from the bootstrap median, laid around the estimate (contains it; no widening)"}
    result["metrics"] = metrics
    result["convergence"] = {name: asdict(convergence(m["value"], eps, k, scale=metric_scale(name, m["value"])))
                             for name, m in metrics.items()}
    if multiple_choice:
        result["flips"] = {"states": FLIP_STATES, "transitions": flip_matrices(named["parsed_correct"], named["unparsed"], named["option_correct"])}
    uncertainty = {"option_entropy": opt} if multiple_choice else {}
    uncertainty["token_entropy"] = tok
    for name in SEMANTIC_ENTROPY:
        if name in run.names("rounds"):
            uncertainty[name] = run.array(f"rounds/{name}").astype(np.float64)
    result["concept_uncertainty"] = {
        name: {u: correlation_views(c["scores"][:, :, c["best"]], values) for u, values in uncertainty.items()}
        | {"layer": c["layers"][c["best"]]}
        for name, c in concepts.items()
    }
    if "exact_log_odds" in run.names("rounds"):
        result["probe_vs_exact"] = _probe_vs_exact(run, concepts)
        result["readout_vs_exact"] = readout_vs_exact(run, seed)
        result["world_sign"] = _world_sign(run)
    result["simulation_task"] = _simulation(run, concepts, uncertainty, seed)
    return result


def first_choice_probability(run: RunFile) -> np.ndarray:
    """``[n_done, R]`` float64: in every round, the option confidence p̂ of the option the sample chose
    in round 1 (``rounds/answer``: parsed, else the option argmax); NaN where round 1 chose none."""
    probs = run.array("rounds/option_probs").astype(np.float64)  # [n, R, K]
    first = run.array("rounds/answer").astype(np.int64)[:, 0]
    out = np.full(probs.shape[:2], np.nan)
    chosen = (first >= 0) & (first < probs.shape[2])
    out[chosen] = probs[np.flatnonzero(chosen), :, first[chosen]]
    return out


RCE_BINS = 20  # the reference code's default number of equal-mass bins


def rce_quality(run: RunFile) -> tuple[np.ndarray, str] | None:
    """What rank-calibration measures uncertainty against, ``([n_done, R], description)``, higher is
    better: ``rounds/correct`` on a multiple-choice run; on an open-ended run with a scorer, its score,
    or 1 − the score when the scorer is a toxicity classifier scoring a label whose name holds ``toxic``
    (toxicity is worse when higher). None when the run has neither."""
    names = run.names("rounds")
    if int(run.meta.get("n_options", 0)) > 0:
        return run.array("rounds/correct").astype(np.float64), "correctness of the answer"
    if "score" not in names:
        return None
    scorer = run.meta.get("scorer") or {}
    score = run.array("rounds/score").astype(np.float64)
    if isinstance(scorer, dict) and scorer.get("kind") == "toxicity" and "toxic" in str(scorer.get("label", "")).lower():
        return 1.0 - score, f"1 − score ({scorer.get('spec')}: toxicity, lower is better)"
    spec = scorer.get("spec", "the scorer") if isinstance(scorer, dict) else str(scorer)
    return score, f"score ({spec}, higher is better)"


def rce_interval(uncertainty: np.ndarray, quality: np.ndarray, seed: int, n_resamples: int = N_RESAMPLES) -> tuple[float, float, float]:
    """Rank-calibration error (:func:`workbench.engine.uncertainty.rank_calibration_error`, 20 bins) of
    one round's ``[n]`` uncertainty against quality, with its 95 % bootstrap interval over samples."""
    return bootstrap_interval((uncertainty, quality), lambda u, a, axis=-1: rank_calibration_error(
        np.moveaxis(u, axis, -1), np.moveaxis(a, axis, -1), RCE_BINS), seed, n_resamples, vectorized=True)


def rank_calibration_metrics(run: RunFile, seed: int) -> dict[str, dict[str, Any]]:
    """Rank-calibration error per round (Huang et al. 2024) of each uncertainty measure of an
    open-ended run with a scorer (mean token entropy and, with ``--samples-per-round``, the semantic
    entropies) against its quality (:func:`rce_quality`): ``rce:<measure>`` with 95 % intervals."""
    names = run.names("rounds")
    if int(run.meta.get("n_options", 0)) > 0:
        return {}  # multiple choice: ECE (both ways) is the calibration measure
    quality = rce_quality(run)
    if quality is None:
        return {}
    target, described = quality
    measures = ["mean_token_entropy", *[m for m in ("semantic_entropy_discrete", "semantic_entropy_weighted") if m in names]]
    out = {}
    for measure in measures:
        u = run.array(f"rounds/{measure}").astype(np.float64)
        est = [rce_interval(u[:, t], target[:, t], seed + t) for t in range(u.shape[1])]
        out[f"rce:{measure}"] = {"what": f"rank-calibration error of {measure.replace('_', ' ')} against {described} "
                                         f"(Huang et al. 2024, plug-in, {RCE_BINS} equal-mass bins; 0 = rank-calibrated)",
                                 "unit": "", "value": [e[0] for e in est], "low": [e[1] for e in est], "high": [e[2] for e in est]}
    return out


def _task_fields(run: RunFile, seed: int) -> dict[str, dict[str, Any]]:
    """Scalar per-round task fields (the organism's exact posterior) as per-round means with intervals."""
    out = {}
    for name in ("exact_p_fair", "exact_log_odds"):
        if name in run.names("rounds"):
            out[name] = _per_round(run.array(f"rounds/{name}").astype(np.float64), seed, f"mean {name.replace('_', ' ')} (the organism's exact posterior at the last prompt token)")
    return out


SEMANTIC_ENTROPY = {
    "semantic_entropy_discrete": "mean discrete semantic entropy of the sampled answers (cluster counts)",
    "semantic_entropy_weighted": "mean probability-weighted semantic entropy of the sampled answers "
                                 "(cluster log-probability by logsumexp of mean-token log-likelihoods)",
    "study_cluster_uncertainty": "mean of the study's estimator over the sampled answers: the mean over clusters of "
                                 "the mean NLL (not an entropy)",
}


def open_ended_metrics(run: RunFile, seed: int) -> dict[str, dict[str, Any]]:
    """An open-ended run's performance and sampled uncertainty as per-round means with intervals:
    ``score`` (``rounds/score``, what the run's ``scorer`` attribute names: the performance metric of
    a ``--task prompts`` run) and the three estimates of ``--samples-per-round`` when present."""
    names = run.names("rounds")
    out = {}
    if "score" in names:
        scorer = run.meta.get("scorer") or {}
        spec = scorer.get("spec", "the run's scorer") if isinstance(scorer, dict) else str(scorer)
        label = f", label {scorer['label']}" if isinstance(scorer, dict) and scorer.get("label") else ""
        out["score"] = _per_round(run.array("rounds/score").astype(np.float64), seed, f"mean score of the response ({spec}{label})")
    for name, what in SEMANTIC_ENTROPY.items():
        if name in names:
            out[name] = _per_round(run.array(f"rounds/{name}").astype(np.float64), seed, what, "" if name.startswith("study") else "nats")
    return out


MIN_LEVELS = 5  # a within-round (or per-change) ρ needs the exact log-odds to take at least this many values there


def exact_levels(exact: np.ndarray) -> dict[str, Any]:
    """How much the exact log-odds ``[n, R]`` vary where within-round and per-change ρ are measured:
    the number of distinct values (to 1e-6) in each round (``within_round`` ``[R]``) and of each
    round-to-round change (``changes`` ``[R − 1]``); ``within_ok``/``changes_ok`` mark those with at
    least :data:`MIN_LEVELS`, and ``note`` says why the others are left out of the minima (empty
    when none is). Under the built-in organism protocols every sample gets the same follow-ups, so
    the posterior takes one or two values per round and a ρ there ranks ties, not a posterior."""
    within = [int(np.unique(np.round(exact[:, t], 6)).size) for t in range(exact.shape[1])]
    changes = [int(np.unique(np.round(d, 6)).size) for d in np.diff(exact, axis=1).T]
    within_ok, changes_ok = [v >= MIN_LEVELS for v in within], [v >= MIN_LEVELS for v in changes]
    note = ""
    if not all(within_ok[1:]) or not all(changes_ok):
        bad = [t + 1 for t, ok in enumerate(within_ok) if not ok and t > 0]
        note = (f"the exact posterior takes fewer than {MIN_LEVELS} values within round(s) {', '.join(map(str, bad)) or '–'} "
                f"(at most {max([within[t - 1] for t in bad] or [0])}: every sample got the same follow-ups), so the "
                "within-round and change ρ there rank ties, not a posterior, and are left out of the minima; "
                "measure a probe under the organism-world protocol (follow-ups drawn per sample)")
    return {"within_round": within, "changes": changes, "within_ok": within_ok, "changes_ok": changes_ok, "note": note}


def _probe_vs_exact(run: RunFile, concepts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per probe and layer: Spearman of the concept score with the exact log-odds within each round,
    on round-to-round changes, and pooled (the minima over the rounds and changes where the exact
    log-odds vary enough, :func:`exact_levels`); and, for reference, of the round number alone with
    the exact log-odds pooled (what a pooled figure can owe to the round number)."""
    exact = run.array("rounds/exact_log_odds").astype(np.float64)
    round_number = np.broadcast_to(np.arange(1, exact.shape[1] + 1, dtype=np.float64), exact.shape)
    levels = exact_levels(exact)
    out: dict[str, Any] = {"round_number_pooled": spearman(round_number, exact), "exact_levels": levels, "probes": {}}
    for name, c in concepts.items():
        if c["kind"] != "probe":
            continue
        layers = {}
        for column, layer in enumerate(c["layers"]):
            views = correlation_views(c["scores"][:, :, column], exact)
            layers[str(layer)] = {**views, **_minima(views, levels)}
        out["probes"][name] = {"best_layer": c["layers"][c["best"]], "method": c["method"], "hook": c["hook"],
                               "position": c["position"], "layers": layers}
    return out


def probe_label(name: str, probe: dict[str, Any]) -> str:
    """A tracked probe's name for a table title, with its fitting method when the name does not say
    it (``"mine (logreg)"``; ``probe``: an entry of ``probe_vs_exact["probes"]``; files analysed
    before the method was recorded have none)."""
    method = probe.get("method")
    return name if not method or method == name else f"{name} ({method})"


def readout_vs_exact(run: RunFile, seed: int = 0, folds: int = 5) -> dict[str, Any]:
    """What the residual stream carries linearly about the exact posterior, per captured hook and layer:
    a ridge regression from the last-prompt-token state to the exact log-odds, cross-fitted within the
    run (``folds`` folds by sample, so a sample's rounds are never in the fit that predicts them; α by
    RidgeCV), its out-of-fold predictions compared with the exact log-odds as in
    :func:`correlation_views`. A read-out fitted on this run's samples, not a probe fitted elsewhere."""
    exact = run.array("rounds/exact_log_odds").astype(np.float64)
    n, rounds = exact.shape
    out: dict[str, Any] = {"what": f"ridge read-out of the exact log-odds at the last prompt token, {folds}-fold cross-fitted by sample", "hooks": {}}
    if n < folds:
        out["skipped"] = f"fewer than {folds} samples"
        return out
    levels = exact_levels(exact)
    fold_of_sample = np.random.default_rng(seed).permutation(n) % folds
    fold = np.repeat(fold_of_sample, rounds)
    for hook in run.names("activations"):
        ds = run.f[f"activations/{hook}"]
        positions, layers = json.loads(ds.attrs["positions"]), json.loads(ds.attrs["layers"])
        if "last_prompt" not in positions:
            continue
        acts = ds[np.flatnonzero(run.done), :, positions.index("last_prompt")].astype(np.float64)  # [n, R, L, d]
        per_layer = {}
        for column, layer in enumerate(layers):
            x, y = acts[:, :, column].reshape(n * rounds, -1), exact.reshape(-1)
            if not np.isfinite(x).all():
                continue
            pred = np.empty(n * rounds)
            for f in range(folds):
                pred[fold == f] = ridge_gcv(x[fold != f], y[fold != f], x[fold == f])
            views = correlation_views(pred.reshape(n, rounds), exact)
            per_layer[str(layer)] = {**views, **_minima(views, levels)}
        out["hooks"][hook] = per_layer
    return out


def ridge_gcv(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, alphas: np.ndarray = np.logspace(-3, 3, 13)) -> np.ndarray:
    """Ridge regression of ``y`` ``[m]`` on ``x`` ``[m, f]`` (with intercept), α chosen among ``alphas``
    by exact leave-one-out error (as scikit-learn's RidgeCV does); predictions for ``x_new`` ``[k, f]``."""
    mean_x, mean_y = x.mean(0), y.mean()
    centred = x - mean_x
    eigvals, v = np.linalg.eigh(centred.T @ centred)  # the SVD of x through its [f, f] Gram matrix: much cheaper when m ≫ f
    keep = eigvals > eigvals.max() * 1e-12
    sv, vt = np.sqrt(eigvals[keep]), v[:, keep].T
    u = centred @ vt.T / sv
    uty = u.T @ (y - mean_y)
    best, best_err = None, np.inf
    for alpha in alphas:
        shrink = sv**2 / (sv**2 + alpha)
        fitted = u @ (shrink * uty)
        leverage = (u**2 * shrink).sum(1) + 1.0 / len(y)  # the intercept's leverage too
        err = np.mean(((y - mean_y - fitted) / (1.0 - leverage)) ** 2)
        if err < best_err:
            best, best_err = alpha, err
    coef = vt.T @ (sv / (sv**2 + best) * uty)
    return (x_new - mean_x) @ coef + mean_y


def _minima(views: dict[str, Any], levels: dict[str, Any] | None = None) -> dict[str, float]:
    """The smallest finite within-round and per-transition ρ (rounds where ρ is undefined — e.g. round 1,
    where every sample has the prior — are left out, and with ``levels`` (:func:`exact_levels`) the
    rounds and changes where the exact log-odds take too few values); NaN when none is left."""
    within = np.array([v["rho"] for v in views["within_round"]], dtype=float)
    changes = np.array([v["rho"] for v in views["changes"]], dtype=float)
    if levels is not None:
        within = np.where(levels["within_ok"], within, np.nan)
        changes = np.where(levels["changes_ok"], changes, np.nan)
    return {"min_within_round": float(np.nanmin(within)) if np.isfinite(within).any() else float("nan"),
            "min_changes": float(np.nanmin(changes)) if np.isfinite(changes).any() else float("nan")}


def _world_sign(run: RunFile) -> dict[str, Any]:
    """The sign the world implies for concept ↔ uncertainty: Spearman of the exact log-odds with the
    entropy of the exact predictive over options, within each round and pooled."""
    exact = run.array("rounds/exact_log_odds").astype(np.float64)
    probs = run.array("rounds/exact_option_probs_marginal").astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(probs > 0, probs * np.log(probs), 0.0).sum(-1)
    return {"what": "exact log-odds of fair vs the entropy of the exact predictive over options", **correlation_views(exact, entropy)}


def _simulation(run: RunFile, concepts: dict[str, dict[str, Any]], uncertainty: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    """:func:`simulation_task` with the first uncertainty (option entropy on multiple choice, else token
    entropy) and each concept representation available: the change of every tracked probe's score at
    its layer, and the change of the pooled residual at that probe's hook, layer and position."""
    target_name, target = next(iter(uncertainty.items()))
    delta = np.diff(target, axis=1)  # [n, R-1]
    n, steps = delta.shape
    falls = (delta < 0).ravel()
    groups = np.repeat(np.arange(n), steps)
    valid = np.isfinite(delta).ravel()
    out: dict[str, Any] = {"what": f"predict whether {target_name.replace('_', ' ')} falls from round t to t+1 from the change in the concept "
                           "representation; logistic regression, 5-fold cross-validated (folds by sample); a reconstruction, "
                           "the study's code does not contain this task", "study": STUDY_SIMULATION, "features": {}}
    if steps == 0:
        out["skipped"] = "one round: no transitions"
        return out
    for name, c in concepts.items():
        column = c["best"]
        score = np.diff(c["scores"][:, :, column], axis=1).reshape(-1, 1)
        out["features"][f"probe score change ({name}, layer {c['layers'][column]})"] = simulation_task(score[valid], falls[valid], groups[valid], seed)
        hook, position = c.get("hook"), c.get("position")
        if c["kind"] == "probe" and hook and f"activations/{hook}" in run.f:
            acts = _pooled(run, hook, position, c["layers"][column])
            if acts is not None:
                change = np.diff(acts, axis=1).reshape(n * steps, -1)
                out["features"][f"residual change ({hook}, layer {c['layers'][column]}, {position})"] = simulation_task(change[valid], falls[valid], groups[valid], seed)
    if not out["features"]:
        out["skipped"] = "no tracked probe: run `workbench probe track` first"
    return out


def _pooled(run: RunFile, hook: str, position: str | None, layer: int) -> np.ndarray | None:
    """Pooled residual ``[n_done, R, d_model]`` at one hook, layer and position name, or None."""
    ds = run.f[f"activations/{hook}"]
    run_layers = json.loads(ds.attrs["layers"])
    positions = json.loads(ds.attrs["positions"])
    if layer not in run_layers or position not in positions:
        return None
    rows = np.flatnonzero(run.done)
    return ds[rows, :, positions.index(position), run_layers.index(layer)].astype(np.float64)


# ----------------------------------------------------------------------------- storing


def write_analysis(path: Path, result: dict[str, Any]) -> None:
    """Store ``result`` under ``analysis/`` of the run file (replacing an earlier analysis): the whole
    result as JSON in ``analysis/result``, and every per-round metric as ``analysis/metrics/<name>``
    ``[R, 3]`` float64 (estimate, low, high of the 95 % interval) with its ``what`` attribute."""
    datasets: dict[str, np.ndarray] = {"result": np.asarray(json.dumps(finite(result), allow_nan=False), dtype=object)}
    per_dataset: dict[str, dict[str, Any]] = {}
    for name, m in result["metrics"].items():
        datasets[f"metrics/{name}"] = np.stack([m["value"], m["low"], m["high"]], 1).astype(np.float64)
        per_dataset[f"metrics/{name}"] = {"what": m["what"], "columns": ["estimate", "low", "high"]}
    replace_group(Path(path), "analysis", datasets, {"created_by": "workbench analyze", "settings": result["settings"]}, per_dataset)


def read_analysis(run: RunFile) -> dict[str, Any] | None:
    """The analysis stored by :func:`write_analysis`, or None when the run has none."""
    if "analysis/result" not in run.f:
        return None
    raw = run.f["analysis/result"][()]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
