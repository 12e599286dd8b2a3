"""`workbench analyze STEERED.h5 --against BASE.h5`: what an intervention changed, sample by sample.

Two runs of the same samples (the same model, task, protocol and data; one with interventions,
:mod:`workbench.engine.interventions`) are paired by sample index. Per round, each metric's paired
difference steered − base with a paired bootstrap 95 % interval (the samples resampled together):
accuracy, option entropy, token entropy, the chosen option's confidence, both ECEs, each tracked
concept score; the round at which each sample's answer settles; and the flips between the runs
(which answers the intervention changed, right → wrong and wrong → right).

On organism runs, the **implied log-odds** of each (sample, round): the λ whose exact mixture
σ(λ)·p(answer | fair, item) + (1 − σ(λ))·p(answer | biased, item) is closest in KL (model ‖ mixture)
to the model's answer distribution (its option probabilities), found on a grid of λ over
[−``LAMBDA_MAX``, ``LAMBDA_MAX``] (step 0.01, then refined). An intervention on the concept should
act like evidence: it moves λ, and the mixture still fits (small KL). Reported: its mean per round
in each run, the paired shift, the mean KL of the best fit, and λ's variance across samples.

NumPy and SciPy only (no torch).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from workbench.analysis.analyze import CONFIDENCE, N_RESAMPLES, bootstrap_interval, ece_batched, mean_interval
from workbench.errors import WorkbenchError
from workbench.store.reader import RunFile

LAMBDA_MAX = 15.0
SAME = ("model_path", "model_revision", "task", "protocol", "n_rounds", "option_scoring")


def paired_rows(steered: RunFile, base: RunFile) -> tuple[np.ndarray, np.ndarray]:
    """Positions (among each run's done samples) of the samples done in both, in the same order:
    ``(rows in steered [n], rows in base [n])``. Refuses runs that are not of the same samples and
    settings (model, task, protocol, rounds), or that share no finished sample."""
    a, b = steered.meta, base.meta
    for key in SAME:
        if json.dumps(a.get(key), sort_keys=True) != json.dumps(b.get(key), sort_keys=True):
            raise WorkbenchError(f"--against: {steered.path} and {base.path} differ in {key}: they are not the same run "
                                 "with and without an intervention")
    fa, fb = (m.get("data", {}).get("fingerprint") if isinstance(m.get("data"), dict) else None for m in (a, b))
    ia, ib = steered.array("samples/index").astype(np.int64), base.array("samples/index").astype(np.int64)
    common = np.intersect1d(ia, ib)
    if fa != fb and len(common) < min(len(ia), len(ib)):
        raise WorkbenchError(f"--against: {steered.path} and {base.path} were run on different data")
    if not len(common):
        raise WorkbenchError(f"--against: {steered.path} and {base.path} share no finished sample")
    pa, pb = {int(x): i for i, x in enumerate(ia)}, {int(x): i for i, x in enumerate(ib)}
    return np.array([pa[int(x)] for x in common]), np.array([pb[int(x)] for x in common])


def _diff_interval(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float, float]:
    """Mean of the paired difference x − y ``[n]`` with its bootstrap interval."""
    return mean_interval(np.asarray(x, np.float64) - np.asarray(y, np.float64), seed)


def _per_round(x: np.ndarray, y: np.ndarray, seed: int, what: str, unit: str = "") -> dict[str, Any]:
    """``x``, ``y`` ``[n, R]`` → per-round means of each and of their paired difference with intervals."""
    est = [_diff_interval(x[:, t], y[:, t], seed + t) for t in range(x.shape[1])]
    return {"what": what, "unit": unit, "steered": np.nanmean(x, 0).tolist(), "base": np.nanmean(y, 0).tolist(),
            "value": [e[0] for e in est], "low": [e[1] for e in est], "high": [e[2] for e in est]}


def _ece_diff(cs: np.ndarray, ys: np.ndarray, cb: np.ndarray, yb: np.ndarray, span: str, seed: int) -> tuple[float, float, float]:
    def stat(c1: np.ndarray, y1: np.ndarray, c2: np.ndarray, y2: np.ndarray, axis: int = -1) -> np.ndarray:
        return ece_batched(c1, y1, span, axis=axis) - ece_batched(c2, y2, span, axis=axis)

    return bootstrap_interval((cs, ys.astype(float), cb, yb.astype(float)), stat, seed, vectorized=True)


def settling_round(answers: np.ndarray) -> np.ndarray:
    """``answers [n, R]`` → ``[n]`` the 1-based round from which each sample's answer never changes."""
    n, rounds = answers.shape
    changed = answers[:, 1:] != answers[:, :-1]  # [n, R-1]: round t+2 differs from t+1
    last = np.where(changed.any(1), rounds - 1 - np.argmax(changed[:, ::-1], 1), 0)  # index of the last change
    return (last + 1).astype(np.float64)


def mixture_components(run: RunFile) -> tuple[np.ndarray, np.ndarray]:
    """The organism's ``p(answer | fair, item)`` and ``p(answer | biased, item)``, each ``[n_done, 3]``
    (the run's option order), from each sample's gold (the fair option) and ``stereotyped``."""
    from workbench.organism.world import DEFAULT_PARAMS, answer_probs

    gold = run.array("samples/gold").astype(int)
    extra = [json.loads(e.decode() if isinstance(e, bytes) else str(e)) for e in run.array("samples/extra")]
    if any("stereotyped" not in e for e in extra):
        raise WorkbenchError(f"{run.path}: not an organism run (its samples name no stereotyped option)")
    fair = np.stack([answer_probs(int(g), int(e["stereotyped"]), True, DEFAULT_PARAMS) for g, e in zip(gold, extra)])
    biased = np.stack([answer_probs(int(g), int(e["stereotyped"]), False, DEFAULT_PARAMS) for g, e in zip(gold, extra)])
    return fair, biased


def implied_log_odds(probs: np.ndarray, fair: np.ndarray, biased: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """probs ``[n, R, 3]`` (the model's answer distributions), fair/biased ``[n, 3]`` → ``(λ [n, R],
    KL [n, R])``: the log-odds whose exact mixture is closest in KL(probs ‖ mixture), and that KL
    (nats). A grid of step 0.01 over ±``LAMBDA_MAX``, then a parabola through the best point and its
    neighbours (KL is convex in σ(λ)). NaN rows stay NaN."""
    p = np.asarray(probs, np.float64)
    grid = np.arange(-LAMBDA_MAX, LAMBDA_MAX + 1e-9, 0.01)
    s = 1.0 / (1.0 + np.exp(-grid))  # [G]
    mix = s[None, :, None] * fair[:, None, :] + (1 - s)[None, :, None] * biased[:, None, :]  # [n, G, 3]
    log_mix = np.log(np.clip(mix, 1e-300, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)  # [n, R]
        cross = np.einsum("nrk,ngk->nrg", np.where(p > 0, p, 0.0), log_mix)  # [n, R, G]
    kl = plogp[..., None] - cross
    best = np.argmin(np.where(np.isfinite(kl), kl, np.inf), -1)  # [n, R]
    lam = grid[best]
    inner = (best > 0) & (best < len(grid) - 1)
    i0, i1 = np.clip(best - 1, 0, len(grid) - 1), np.clip(best + 1, 0, len(grid) - 1)
    take = lambda i: np.take_along_axis(kl, i[..., None], -1)[..., 0]  # noqa: E731
    k0, k1, k2 = take(i0), take(best), take(i1)
    curve = k0 - 2 * k1 + k2
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.where(inner & (curve > 0), 0.5 * (k0 - k2) / curve, 0.0) * 0.01
    lam = lam + np.clip(step, -0.01, 0.01)
    best_kl = k1
    bad = ~np.isfinite(p).all(-1)
    lam[bad], best_kl[bad] = np.nan, np.nan
    return lam, np.maximum(best_kl, 0.0)


def compare(steered: RunFile, base: RunFile, seed: int = 0) -> dict[str, Any]:
    """The paired comparison (see the module docstring) as one JSON-ready dict: ``runs``,
    ``n_paired``, ``interventions`` (each run's record), ``metrics`` (name → per-round ``steered``,
    ``base``, ``value`` (the mean paired difference), ``low``, ``high`` ``[R]``), ``settling_round``,
    ``flips`` (per round), and for organism runs ``implied_log_odds``."""
    rs, rb = paired_rows(steered, base)
    rounds = steered.n_rounds
    multiple_choice = int(steered.meta.get("n_options", 0)) > 0
    get = lambda run, rows, name: run.array(name)[rows]  # noqa: E731
    metrics: dict[str, Any] = {}
    result: dict[str, Any] = {
        "runs": {"steered": str(steered.path), "base": str(base.path)}, "n_paired": int(len(rs)), "n_rounds": rounds,
        "interventions": {"steered": steered.meta.get("interventions") or [], "base": base.meta.get("interventions") or []},
        "settings": {"seed": seed, "bootstrap": f"percentile, {N_RESAMPLES} paired resamples of the samples, {CONFIDENCE:.0%}"},
    }
    if multiple_choice:
        cs, cb = get(steered, rs, "rounds/correct").astype(float), get(base, rb, "rounds/correct").astype(float)
        metrics["accuracy"] = _per_round(cs, cb, seed, "accuracy (parsed answer, else option argmax)")
        metrics["option_entropy"] = _per_round(get(steered, rs, "rounds/option_entropy"), get(base, rb, "rounds/option_entropy"),
                                               seed, "entropy of option confidence p̂", "nats")
        conf_s, conf_b = get(steered, rs, "rounds/chosen_confidence"), get(base, rb, "rounds/chosen_confidence")
        metrics["chosen_confidence"] = _per_round(conf_s, conf_b, seed, "confidence of the chosen option")
    metrics["token_entropy"] = _per_round(get(steered, rs, "rounds/mean_token_entropy"), get(base, rb, "rounds/mean_token_entropy"),
                                          seed, "mean next-token entropy of the response", "nats")
    if multiple_choice:
        for span, name, what in (("unit", "ece", "ECE over [0, 1]"), ("range", "ece_range", "ECE over [min, max] confidence")):
            est = [_ece_diff(conf_s[:, t], cs[:, t], conf_b[:, t], cb[:, t], span, seed + t) for t in range(rounds)]
            metrics[name] = {"what": what, "unit": "",
                             "steered": [float(ece_batched(conf_s[:, t], cs[:, t], span)) for t in range(rounds)],
                             "base": [float(ece_batched(conf_b[:, t], cb[:, t], span)) for t in range(rounds)],
                             "value": [e[0] for e in est], "low": [e[1] for e in est], "high": [e[2] for e in est]}
    concepts_s, concepts_b = steered.concept_scores(), base.concept_scores()
    for name in sorted(set(concepts_s) & set(concepts_b)):
        metrics[name] = _per_round(concepts_s[name][rs], concepts_b[name][rb], seed, f"mean {name} (tracked probe projection)")
    result["metrics"] = metrics
    if multiple_choice:
        answers_s, answers_b = get(steered, rs, "rounds/parsed_answer"), get(base, rb, "rounds/parsed_answer")
        settle_s, settle_b = settling_round(answers_s), settling_round(answers_b)
        est = _diff_interval(settle_s, settle_b, seed)
        result["settling_round"] = {"what": "the round from which a sample's parsed answer never changes",
                                    "steered": float(settle_s.mean()), "base": float(settle_b.mean()),
                                    "value": est[0], "low": est[1], "high": est[2]}
        gain_s, gain_b = cs[:, -1] - cs[:, 0], cb[:, -1] - cb[:, 0]
        est = _diff_interval(gain_s, gain_b, seed)
        result["accuracy_gain"] = {"what": f"accuracy gain round 1 → round {rounds}", "steered": float(gain_s.mean()),
                                   "base": float(gain_b.mean()), "value": est[0], "low": est[1], "high": est[2]}
        result["flips"] = [{"round": t + 1, "right_to_wrong": int(((cb[:, t] == 1) & (cs[:, t] == 0)).sum()),
                            "wrong_to_right": int(((cb[:, t] == 0) & (cs[:, t] == 1)).sum()),
                            "answer_changed": int((answers_s[:, t] != answers_b[:, t]).sum())} for t in range(rounds)]
    if steered.meta.get("task") == "organism" and multiple_choice:
        result["implied_log_odds"] = implied_log_odds_comparison(steered, base, rs, rb, seed)
    return result


def implied_log_odds_comparison(steered: RunFile, base: RunFile, rs: np.ndarray, rb: np.ndarray, seed: int) -> dict[str, Any]:
    """Per round: the mean implied log-odds of each run, the paired shift with its interval, the
    mean KL of the best fit in each run, and λ's variance across samples in each run."""
    fair, biased = mixture_components(steered)
    lam_s, kl_s = implied_log_odds(steered.array("rounds/option_probs")[rs][..., :3], fair[rs], biased[rs])
    fair_b, biased_b = mixture_components(base)
    lam_b, kl_b = implied_log_odds(base.array("rounds/option_probs")[rb][..., :3], fair_b[rb], biased_b[rb])
    shift = _per_round(lam_s, lam_b, seed, "implied log-odds λ: the exact mixture closest in KL to the answer distribution")
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    p_fair = _per_round(sig(lam_s), sig(lam_b), seed, "σ(λ): the implied p(fair), which saturation cannot move far")
    return {**shift, "p_fair": p_fair, "kl_steered": np.nanmean(kl_s, 0).tolist(), "kl_base": np.nanmean(kl_b, 0).tolist(),
            "variance_steered": np.nanvar(lam_s, 0).tolist(), "variance_base": np.nanvar(lam_b, 0).tolist(),
            "at_bound": int((np.abs(lam_s) >= LAMBDA_MAX - 0.02).sum())}
