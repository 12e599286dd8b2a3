"""Per-round summaries of a run file: accuracy, uncertainty, calibration, flips, convergence.

Pure NumPy over :class:`workbench.store.writer.RunFile` arrays; no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from workbench.errors import WorkbenchError
from workbench.store.reader import RunFile
from workbench.engine.uncertainty import expected_calibration_error


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


REL_EPS = 0.05  # default ε: at least this fraction of the metric's range over the rounds …
FLOOR = 0.01  # … and at least this fraction of the metric's scale (a change under 1 % of the scale is no change)
# metrics bounded by 1 in magnitude (accuracies, rates, confidences, ECE, probabilities, cosines): their scale is 1
UNIT_SCALE = ("accuracy", "unparse", "confidence", "ece", "p_fair", "cos")


def metric_scale(name: str, values: list[float] | np.ndarray) -> float:
    """The scale ε's floor is a fraction of: 1 for a metric bounded by 1 (its name holds one of
    :data:`UNIT_SCALE`), else the metric's largest magnitude over the rounds (NaN ignored; 0 when none)."""
    if any(word in name for word in UNIT_SCALE):
        return 1.0
    m = np.abs(np.asarray(values, dtype=np.float64))
    return float(m[np.isfinite(m)].max()) if np.isfinite(m).any() else 0.0


def epsilon_rule(eps: float | None) -> str:
    """How ε was chosen, in words, for tables and figures."""
    if eps is not None:
        return f"ε = {eps:g} (--eps)"
    return f"ε = max({REL_EPS:g} × the metric's range over the rounds, {FLOOR:g} × its scale: 1 for rates and probabilities, else its largest |value|)"


@dataclass(frozen=True)
class Convergence:
    """Whether and where one per-round metric converged.

    ``status`` is one of ``converged`` (``round`` is t*, 1-based), ``flat`` (every value within ε
    of every other, the metric never moved by ε: converged from round 1, ``round`` is 1), ``not
    converged`` (it kept moving by ε or more up to the last round), ``too few rounds`` (R ≤ k: k
    steps cannot follow any round), ``no values`` (a round without a finite value). ``eps`` is the
    threshold used; ``relative`` whether it was derived from the metric (``eps = max(REL_EPS ×
    (max − min), floor)``) rather than given; ``floor`` the part owed to the metric's scale
    (``FLOOR × scale``; 0 when ε was given).
    """

    status: str
    round: int | None
    eps: float
    relative: bool
    floor: float = 0.0

    def label(self) -> str:
        """``"3"`` when converged, else the status (``"flat"`` for a flat metric)."""
        return str(self.round) if self.status == "converged" else self.status


def convergence(values: list[float] | np.ndarray, eps: float | None = None, k: int = 2, rel_eps: float = REL_EPS,
                scale: float | None = None, floor: float = FLOOR) -> Convergence:
    """The convergence round t* of a per-round metric ``values`` ``[R]``: the first round from
    which every step to the end is smaller than ε (|m(s+1) − m(s)| < ε for s ≥ t*), every later
    value stays within ε of m(t*) (no slow drift), and at least ``k`` steps follow it. A metric
    whose whole range is below ε is ``flat`` (t* = 1).

    ``eps`` is absolute when given; otherwise ε = max(``rel_eps`` × the metric's range over the
    rounds, ``floor`` × ``scale``), ``scale`` defaulting to the metric's largest magnitude (see
    :func:`metric_scale`): a relative ε alone would call a metric that barely moves "not converged",
    since its own tiny range sets the bar.
    """
    if k < 1:
        raise WorkbenchError(f"--k must be ≥ 1, not {k}")
    if eps is not None and not eps > 0:
        raise WorkbenchError(f"--eps must be > 0, not {eps}")
    m = np.asarray(values, dtype=np.float64)
    relative = eps is None
    finite = np.isfinite(m)
    spread = float(m[finite].max() - m[finite].min()) if finite.any() else float("nan")
    if eps is not None:
        threshold, lowest = float(eps), 0.0
    else:
        if scale is None:
            scale = float(np.abs(m[finite]).max()) if finite.any() else 0.0
        lowest = floor * scale
        threshold = max(rel_eps * spread, lowest) if finite.any() else float("nan")
    if m.size <= k:
        return Convergence("too few rounds", None, threshold, relative, lowest)
    if not finite.all():
        return Convergence("no values", None, threshold, relative, lowest)
    if spread < threshold or spread == 0.0:
        return Convergence("flat", 1, threshold, relative, lowest)
    steps = np.abs(np.diff(m))
    for t in range(m.size - k):  # t is 0-based; k steps must follow
        if np.all(steps[t:] < threshold) and np.all(np.abs(m[t + 1 :] - m[t]) < threshold):
            return Convergence("converged", t + 1, threshold, relative, lowest)
    return Convergence("not converged", None, threshold, relative, lowest)


def convergence_round(values: list[float], eps: float | None = None, k: int = 2) -> int | None:
    """t* of :func:`convergence` (1-based), or None when the metric did not converge."""
    return convergence(values, eps, k).round


def answer_correctness(run: RunFile) -> dict[str, np.ndarray]:
    """Per (sample, round) ``[n_done, R]`` bool arrays of the two named accuracies:

    * ``parsed_correct``: the answer parsed from the text is the gold option (unparseable = wrong);
    * ``option_correct``: the argmax of option confidence is the gold option;

    and ``unparsed`` (no answer could be parsed). Read from ``rounds/parsed_correct`` and
    ``rounds/option_correct`` when the run file has them, else computed from ``rounds/parsed_answer``,
    ``rounds/option_answer`` and ``samples/gold``. Samples without a gold label count as wrong.
    """
    parsed = run.array("rounds/parsed_answer").astype(np.int64)
    option = run.array("rounds/option_answer").astype(np.int64)
    gold = run.array("samples/gold").astype(np.int64)[:, None]
    names = run.names("rounds")
    out = {"unparsed": parsed < 0}
    for key, answer in (("parsed_correct", parsed), ("option_correct", option)):
        if key in names:
            out[key] = run.array(f"rounds/{key}").astype(bool)
        else:
            out[key] = (answer >= 0) & (answer == gold) & (gold >= 0)
    return out


def flips(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right→wrong and wrong→right counts of every transition: correct ``[n, R]`` bool →
    two int arrays ``[R − 1]`` (entry t is round t+1 → t+2, 1-based)."""
    before, after = correct[:, :-1], correct[:, 1:]
    return (before & ~after).sum(0).astype(int), (~before & after).sum(0).astype(int)


def round_table(run: RunFile) -> list[dict[str, Any]]:
    """One row per round: accuracy, mean token entropy, mean option entropy, confidence of the
    chosen option, ECE (over [0, 1] and over [min, max]), unparseable rate, right→wrong and
    wrong→right flips relative to the previous round, and the mean of every task field.

    Multiple-choice runs also get the two named accuracies of :func:`answer_correctness`:
    ``accuracy_parsed`` (unparseable = wrong) and ``accuracy_option`` (option argmax), with their
    flips (``parsed_right_to_wrong``, ``option_wrong_to_right``, …). ``accuracy`` is the run file's
    ``rounds/correct``.
    """
    correct = run.array("rounds/correct").astype(bool)
    n, rounds = correct.shape if correct.ndim == 2 else (0, run.n_rounds)
    multiple_choice = int(run.f.attrs.get("n_options", 0)) > 0
    tok_ent = run.array("rounds/mean_token_entropy")
    opt_ent = run.array("rounds/option_entropy")
    conf = run.array("rounds/chosen_confidence")
    parsed = run.array("rounds/parsed_answer")
    known = {"instruction", "response", "response_token_ids", "token_entropy", "prompt_span", "response_span",
             "mean_token_entropy", "option_entropy", "chosen_confidence", "option_probs", "parsed_answer",
             "option_answer", "answer", "correct", "parsed_correct", "option_correct"}
    named = answer_correctness(run) if multiple_choice else {}
    extras = {name: run.array(f"rounds/{name}") for name in run.names("rounds") if name not in known}
    concepts = run.concept_scores()
    rows = []
    for t in range(rounds):
        row: dict[str, Any] = {"round": t + 1, "n": int(n)}
        row["mean_token_entropy"] = _nanmean(tok_ent[:, t]) if n else float("nan")
        if multiple_choice:
            row["accuracy"] = float(correct[:, t].mean()) if n else float("nan")
            row["mean_option_entropy"] = _nanmean(opt_ent[:, t]) if n else float("nan")
            row["mean_chosen_confidence"] = _nanmean(conf[:, t]) if n else float("nan")
            row["ece"] = expected_calibration_error(conf[:, t], correct[:, t]) if n else float("nan")
            row["ece_range"] = expected_calibration_error(conf[:, t], correct[:, t], span="range") if n else float("nan")
            row["unparseable"] = float((parsed[:, t] < 0).mean()) if n else float("nan")
            row["accuracy_parsed"] = float(named["parsed_correct"][:, t].mean()) if n else float("nan")
            row["accuracy_option"] = float(named["option_correct"][:, t].mean()) if n else float("nan")
            for prefix, flags in (("", correct), ("parsed_", named["parsed_correct"]), ("option_", named["option_correct"])):
                if t > 0 and n:
                    row[f"{prefix}right_to_wrong"] = int((flags[:, t - 1] & ~flags[:, t]).sum())
                    row[f"{prefix}wrong_to_right"] = int((~flags[:, t - 1] & flags[:, t]).sum())
                else:
                    row[f"{prefix}right_to_wrong"] = row[f"{prefix}wrong_to_right"] = 0
        for name, values in extras.items():
            if values.dtype.kind == "f" and values.ndim == 2:
                row[f"mean_{name}"] = _nanmean(values[:, t]) if n else float("nan")
        for name, values in concepts.items():
            row[name] = _nanmean(values[:, t]) if n else float("nan")
        rows.append(row)
    return rows


def summary(run: RunFile, eps: float | None = None, k: int = 2) -> dict[str, Any]:
    """The run's metadata, per-round table, and the convergence of each per-round metric:
    ``convergence`` maps metric → t* (1-based) or None; ``convergence_detail`` maps metric → the
    :class:`Convergence` as a dict (status, round, eps, relative, floor); ``convergence_settings``
    says which ε and k were used (``rule``: the same in words)."""
    rows = round_table(run)
    metrics = [m for m in (rows[0] if rows else {}) if m not in ("round", "n") and not m.endswith(("right_to_wrong", "wrong_to_right"))]
    detail = {m: convergence([r[m] for r in rows], eps, k, scale=metric_scale(m, [r[m] for r in rows])) for m in metrics}
    converged = {m: c.round for m, c in detail.items()}
    meta = run.meta
    return {
        "path": str(run.path),
        "status": meta.get("status"),
        "n_samples": int(meta.get("n_samples", 0)),
        "n_done": int(run.done.sum()),
        "n_rounds": run.n_rounds,
        "model": meta.get("model_name"),
        "protocol": (meta.get("protocol") or {}).get("name") if isinstance(meta.get("protocol"), dict) else meta.get("protocol"),
        "task": meta.get("task"),
        "meta": meta,
        "rounds": rows,
        "convergence": converged,
        "convergence_detail": {m: asdict(c) for m, c in detail.items()},
        "convergence_settings": {"eps": eps, "k": k, "rel_eps": REL_EPS if eps is None else None,
                                 "floor": FLOOR if eps is None else None, "rule": epsilon_rule(eps)},
    }
