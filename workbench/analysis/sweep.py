"""Dose–response of a steering sweep (``workbench sweep``): every run of a sweep folder against its
α = 0 run, per round, for the steered direction and for its random control beside it.

A sweep folder holds ``sweep.json`` (:data:`MANIFEST`: the spec, the αs, the control, and one entry
per run: ``{"alpha", "kind": "base"|"steer"|"control", "file"}``) and the run files. Each run is
compared with the base run by :func:`workbench.analysis.paired.compare` (paired by sample, paired
bootstrap intervals). :func:`dose_response` gathers, per metric, the paired differences against α;
:func:`targets` states what the issue's organism targets reach (monotone implied log-odds, the
mixture's fit, the control's share). NumPy, SciPy and matplotlib only.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from workbench.json_values import finite

from workbench.analysis.paired import compare
from workbench.errors import WorkbenchError
from workbench.store.reader import RunFile

MANIFEST = "sweep.json"
CURVES = ("implied λ", "p_fair", "accuracy", "option_entropy", "token_entropy", "chosen_confidence", "ece")


def read_manifest(folder: Path) -> dict[str, Any]:
    """A sweep folder's ``sweep.json``, checked: a list of runs, each a file inside the folder."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise WorkbenchError(f"{folder} is not a sweep folder (no {MANIFEST}; `workbench sweep` writes one)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WorkbenchError(f"{path}: not readable JSON ({e})") from None
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and isinstance(r.get("file"), str)
                                             and isinstance(r.get("alpha"), (int, float)) and r.get("kind") in ("base", "steer", "control")
                                             for r in runs):
        raise WorkbenchError(f"{path}: 'runs' must be a list of {{alpha, kind, file}}")
    for r in runs:
        name = Path(r["file"])
        if name.name != r["file"] or name.name in ("", ".", ".."):
            raise WorkbenchError(f"{path}: run file {r['file']!r} must be a plain name inside the folder")
    if sum(r["kind"] == "base" for r in runs) != 1:
        raise WorkbenchError(f"{path}: a sweep needs exactly one base run (α = 0)")
    return manifest


def dose_response(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Every finished run of the sweep against its base: ``{"manifest", "n_rounds", "curves": {metric:
    {kind: {"alpha": [A], "value"/"low"/"high": [A][R]}}}, "kl": {kind: {"alpha", "value": [A][R]}},
    "targets"}`` (kind: steer or control; α = 0 is the base itself, a zero difference)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    base_entry = next(r for r in manifest["runs"] if r["kind"] == "base")
    curves: dict[str, dict[str, dict[str, list]]] = {}
    kl: dict[str, dict[str, list]] = {}
    variance: dict[str, dict[str, list]] = {}
    n_rounds = 0
    with RunFile(folder / base_entry["file"]) as base:
        n_rounds = base.n_rounds
        for entry in sorted(manifest["runs"], key=lambda r: (r["kind"], r["alpha"])):
            if entry["kind"] == "base" or not (folder / entry["file"]).exists():
                continue
            with RunFile(folder / entry["file"]) as run:
                result = compare(run, base, seed=seed)
            blocks = dict(result["metrics"])
            if "implied_log_odds" in result:
                blocks["implied λ"] = result["implied_log_odds"]
                blocks["p_fair"] = result["implied_log_odds"]["p_fair"]
            for name, m in blocks.items():
                c = curves.setdefault(name, {}).setdefault(entry["kind"], {"alpha": [], "value": [], "low": [], "high": []})
                c["alpha"].append(float(entry["alpha"]))
                for key in ("value", "low", "high"):
                    c[key].append(m[key])
            if "implied_log_odds" in result:
                il = result["implied_log_odds"]
                for store, key in ((kl, "kl_steered"), (variance, "variance_steered")):
                    k = store.setdefault(entry["kind"], {"alpha": [], "value": []})
                    k["alpha"].append(float(entry["alpha"]))
                    k["value"].append(il[key])
                for store, key in ((kl, "kl_base"), (variance, "variance_base")):
                    store.setdefault("base", {"alpha": [0.0], "value": [il[key]]})
    for by_kind in curves.values():  # α = 0: the base against itself
        for c in by_kind.values():
            order = np.argsort(c["alpha"] + [0.0], kind="stable")
            for key, zero in (("alpha", 0.0), ("value", [0.0] * n_rounds), ("low", [0.0] * n_rounds), ("high", [0.0] * n_rounds)):
                values = c[key] + [zero]
                c[key] = [values[i] for i in order]
    out = {"manifest": manifest, "n_rounds": n_rounds, "curves": curves, "kl": kl, "variance": variance}
    out["targets"] = targets(out)
    return out


def targets(dr: dict[str, Any]) -> dict[str, Any]:
    """What the issue's organism targets reach on a sweep: the Spearman ρ of the mean implied
    log-odds shift (over every round the steer acted in) against α, the largest mean best-fit KL for
    |α| ≤ 4, and the control's mean |shift| as a fraction of the steer's at each α. Empty when the
    runs are not organism runs."""
    from scipy.stats import spearmanr

    curve = dr["curves"].get("implied λ")
    if not curve or "steer" not in curve:
        return {}
    steer = curve["steer"]
    alphas = np.array(steer["alpha"])
    shift = np.array(steer["value"], dtype=np.float64)  # [A, R]
    acted = np.abs(shift).sum(0) > 0  # rounds the intervention acted in (others are 0 at every α)
    mean_shift = shift[:, acted].mean(1) if acted.any() else np.zeros(len(alphas))
    rho = float(spearmanr(alphas, mean_shift).statistic) if len(alphas) >= 3 else float("nan")
    out: dict[str, Any] = {"alphas": alphas.tolist(), "mean_shift": mean_shift.tolist(), "spearman_shift_vs_alpha": rho,
                           "n_alphas": int(len(alphas))}
    k = dr["kl"].get("steer")
    if k:
        a, v = np.array(k["alpha"]), np.array(k["value"], dtype=np.float64)
        small = np.abs(a) <= 4
        out["max_mean_kl_small_alpha"] = float(np.nanmax(np.nanmean(v[small][:, acted], 1))) if small.any() and acted.any() else None
        out["mean_kl_by_alpha"] = dict(zip([f"{x:+g}" for x in a], np.nanmean(v[:, acted] if acted.any() else v, 1).tolist()))
    if "control" in curve:
        ctl = curve["control"]
        c_shift = dict(zip(ctl["alpha"], np.array(ctl["value"], dtype=np.float64)[:, acted].mean(1) if acted.any() else [0.0] * len(ctl["alpha"])))
        ratios = {f"{a:+g}": (abs(c_shift[a]) / abs(s) if s else None) for a, s in zip(alphas.tolist(), mean_shift.tolist())
                  if a in c_shift and a != 0}
        out["control_over_steer"] = ratios
    return out


def build_sweep_report(folder: Path, out: Path, seed: int = 0) -> Path:
    """Dose–response figures (PNG + SVG; one panel per round, the paired difference against α with
    its 95 % interval, the control dashed beside the steer) and ``index.html`` with the targets'
    figures; also ``dose_response.json``. Returns the index path."""
    from workbench.analysis.report import Figure, figure_html, pyplot, save_figure

    dr = dose_response(folder, seed)
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    plt = pyplot()
    figures = []
    rounds = dr["n_rounds"]
    for name in [n for n in CURVES if n in dr["curves"]] + [n for n in dr["curves"] if n.startswith("concept:")]:
        by_kind = dr["curves"][name]
        fig, axes = plt.subplots(1, rounds, figsize=(2.2 * rounds, 2.4), sharey=True, squeeze=False)
        for t in range(rounds):
            ax = axes[0, t]
            for kind, style in (("steer", dict(color="C0", ls="-", marker="o")), ("control", dict(color="C3", ls="--", marker="s"))):
                if kind not in by_kind:
                    continue
                c = by_kind[kind]
                a = np.array(c["alpha"])
                v = np.array([x[t] for x in c["value"]], dtype=float)
                lo = np.array([x[t] for x in c["low"]], dtype=float)
                hi = np.array([x[t] for x in c["high"]], dtype=float)
                ax.fill_between(a, lo, hi, color=style["color"], alpha=0.15, lw=0)
                ax.plot(a, v, ms=3, lw=1.2, label="random control" if kind == "control" else "steer", **style)
            ax.axhline(0, color="#999", lw=0.6)
            ax.set_title(f"round {t + 1}")
            ax.set_xlabel("α")
        axes[0, 0].set_ylabel(f"Δ {name}")
        axes[0, -1].legend(fontsize=7, frameon=False)
        stem = "dose-" + "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in name.replace("λ", "lambda"))
        save_figure(fig, out, stem)
        figures.append(Figure(stem, f"Δ {name} against α", "Per round, the mean paired difference from the α = 0 run with "
                              "its 95 % paired bootstrap interval (shaded); the random direction of the same norm dashed."))
    (out / "dose_response.json").write_text(json.dumps(finite(dr), indent=1, allow_nan=False), encoding="utf-8")
    e = html.escape
    manifest = dr["manifest"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>sweep report</title><style>",
             "body{font-family:sans-serif;max-width:1300px;margin:2em auto;color:#222} img{max-width:100%}",
             "table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:2px 8px}</style></head><body>",
             f"<h1>Dose–response: {e(str(manifest.get('steer', '')))}</h1>",
             f"<p>αs {e(', '.join(f'{a:+g}' for a in manifest.get('alphas', [])))}; control: {e(str(manifest.get('control')))}; "
             f"rounds steered: {e(str(manifest.get('steer_rounds') or 'all'))}; positions: {e(str(manifest.get('steer_positions', 'all')))}. "
             "An effect is quoted only beside its control.</p>"]
    if dr["targets"]:
        parts.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td>{e(json.dumps(finite(v)))}</td></tr>" for k, v in dr["targets"].items()) + "</table>")
    parts += [figure_html(f) for f in figures]
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
