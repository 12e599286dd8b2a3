"""Per-round summaries of a run file: accuracy, uncertainty, calibration, flips, convergence.

Pure NumPy over :class:`workbench.store.RunFile` arrays; no torch.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from workbench.store import RunFile
from workbench.uncertainty import expected_calibration_error


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def convergence_round(values: list[float], eps: float = 0.01, k: int = 2) -> int | None:
    """The first round t* (1-based) from which |m(t+1) − m(t)| < eps for k consecutive steps, or None."""
    for t in range(len(values) - k):
        steps = [abs(values[t + j + 1] - values[t + j]) for j in range(k)]
        if all(np.isfinite(s) and s < eps for s in steps):
            return t + 1
    return None


def round_table(run: RunFile) -> list[dict[str, Any]]:
    """One row per round: accuracy, mean token entropy, mean option entropy, confidence of the
    chosen option, ECE (over [0, 1] and over [min, max]), unparseable rate, right→wrong and
    wrong→right flips relative to the previous round, and the mean of every task field.
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
             "option_answer", "answer", "correct"}
    extras = {name: run.array(f"rounds/{name}") for name in run.names("rounds") if name not in known}
    concepts = concept_scores(run)
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
            if t > 0 and n:
                row["right_to_wrong"] = int((correct[:, t - 1] & ~correct[:, t]).sum())
                row["wrong_to_right"] = int((~correct[:, t - 1] & correct[:, t]).sum())
            else:
                row["right_to_wrong"] = row["wrong_to_right"] = 0
        for name, values in extras.items():
            if values.dtype.kind == "f" and values.ndim == 2:
                row[f"mean_{name}"] = _nanmean(values[:, t]) if n else float("nan")
        for name, values in concepts.items():
            row[name] = _nanmean(values[:, t]) if n else float("nan")
        rows.append(row)
    return rows


def concept_scores(run: RunFile) -> dict[str, np.ndarray]:
    """Per tracked probe, ``concept:{name}`` → projections ``[n_done, R]`` at the probe's best layer
    (written by ``workbench probe track``); the stereotype variant's cosine at the last layer."""
    out = {}
    for name in run.names("probes"):
        group = run.f[f"probes/{name}"]
        layers = json.loads(group.attrs["layers"])
        if group.attrs.get("kind") == "probe":
            column = layers.index(int(group.attrs["best_layer"]))
            out[f"concept:{name}"] = run.array(f"probes/{name}/projection")[:, :, column]
        elif group.attrs.get("kind") == "stereotype-statement":
            out[f"stereotype_cos_L{layers[-1]}"] = run.array(f"probes/{name}/cosine")[:, :, -1]
    return out


def summary(run: RunFile) -> dict[str, Any]:
    """The run's metadata, per-round table, and the convergence round of each per-round metric."""
    rows = round_table(run)
    metrics = [k for k in (rows[0] if rows else {}) if k not in ("round", "n", "right_to_wrong", "wrong_to_right")]
    converged = {m: convergence_round([r[m] for r in rows]) for m in metrics}
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
    }
