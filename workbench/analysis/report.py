"""`workbench report`: figures (PNG and SVG, matplotlib's headless Agg backend) and one index.html.

For one or more run files: per-round curves of performance, uncertainty, calibration error and
concept score with 95 % intervals and the convergence round marked (several runs overlaid);
reliability diagrams per round; a layers × rounds heatmap of each probe's score; the flips between
rounds; and, on organism runs, the model's fair-answer probability and the probe score against the
exact posterior. NumPy, matplotlib and :mod:`workbench.analysis.analyze` only: no torch.
"""

from __future__ import annotations

import html
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workbench.analysis.analyze import analyze, probe_label
from workbench.errors import WorkbenchError
from workbench.store.reader import RunFile


@dataclass(frozen=True)
class Figure:
    """One figure of the report: its file stem, title and caption."""

    stem: str
    title: str
    caption: str


DPI = 200  # PNG resolution: sharp in a paper or on a high-density screen


def figure_text(text: str) -> str:
    """A name from the run file made safe for a figure: control characters written as escapes
    (:func:`workbench.printable.visible`); ``$`` stays text, as mathtext is off (:func:`pyplot`)."""
    from workbench.printable import visible

    return visible(text, newlines=False, pictures=False)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, with the report's style (shared with the sweep report)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": DPI, "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "svg.fonttype": "none", "svg.hashsalt": "workbench"})
    plt.rcParams["text.parse_math"] = False  # names from a run file are text: "$…$" in one never fails a figure
    return plt


def save_figure(fig: Any, out: Path, stem: str) -> None:
    """Write ``fig`` as ``out/stem.png`` and ``.svg`` (reproducible SVG) and close it."""
    for suffix in ("png", "svg"):
        fig.savefig(out / f"{stem}.{suffix}", bbox_inches="tight", metadata={"Date": None} if suffix == "svg" else None)
    pyplot().close(fig)


# one panel per quantity and scale: token entropy (≈ log vocabulary) and option entropy (≤ log 3) on one
# axis would flatten the second
PANELS = (
    ("performance", ("accuracy_parsed", "accuracy_option", "score", "first_choice_probability"), "accuracy / score / p̂"),
    ("option uncertainty", ("mean_option_entropy",), "option entropy (nats)"),
    ("token uncertainty", ("mean_token_entropy",), "mean token entropy (nats)"),
    ("semantic uncertainty", ("semantic_entropy_discrete", "semantic_entropy_weighted"), "semantic entropy (nats)"),
    ("calibration", ("ece", "ece_range", "rce:mean_token_entropy", "rce:semantic_entropy_discrete", "rce:semantic_entropy_weighted"),
     "calibration error (ECE; RCE)"),
)
OFFSET = 0.06  # rounds: the curves of one panel are drawn this far apart on x, so one never hides another
LABELS = {"accuracy_parsed": "parsed answer", "accuracy_option": "option argmax", "mean_option_entropy": "option entropy",
          "mean_token_entropy": "token entropy", "ece": "ECE [0, 1]", "ece_range": "ECE [min, max]",
          "score": "scorer's score", "semantic_entropy_discrete": "semantic entropy (discrete)",
          "semantic_entropy_weighted": "semantic entropy (weighted)", "first_choice_probability": "p̂ of the round-1 choice",
          "rce:mean_token_entropy": "RCE, token entropy", "rce:semantic_entropy_discrete": "RCE, semantic entropy (discrete)",
          "rce:semantic_entropy_weighted": "RCE, semantic entropy (weighted)"}


def curves_figure(results: list[dict[str, Any]], names: list[str], out: Path) -> Figure:
    """Per-round curves, one panel per kind of metric (and one for concept scores), every run overlaid;
    shaded: 95 % bootstrap interval; a dotted vertical line marks each curve's convergence round."""
    plt = pyplot()
    concept_panels = []
    for kind, title, ylabel in (("projection", "concept", "concept score (projection on the probe direction)"),
                                ("cosine", "stereotype statement", "cosine with the stereotyped statement")):
        chosen = sorted({m for r in results for m, v in r["metrics"].items()
                         if m.startswith("concept:") and v.get("kind", "projection") == kind})
        if chosen:
            concept_panels.append((title, tuple(chosen), ylabel))
    present = {m for r in results for m in r["metrics"]}
    panels = [p for p in PANELS if p[0] in ("performance", "calibration", "token uncertainty") or set(p[1]) & present]
    panels += concept_panels
    cols = 2
    rows = (len(panels) + 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(10, 3.6 * rows), squeeze=False)
    for extra in axes.ravel()[len(panels):]:
        extra.axis("off")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ("-", "--", ":", "-.")
    markers = ("o", "s", "^", "D")
    for ax, (title, metrics, ylabel) in zip(axes.ravel(), panels):
        drawn = False
        curves = [(i, j, metric) for i in range(len(results)) for j, metric in enumerate(metrics) if metric in results[i]["metrics"]]
        for n_drawn, (i, j, metric) in enumerate(curves):
            result, run_name = results[i], names[i]
            m = result["metrics"][metric]
            value, low, high = (np.array(m[key], dtype=float) for key in ("value", "low", "high"))
            # side by side on x (the same round), so that identical curves stay visible
            x = np.arange(1, len(value) + 1) + (n_drawn - (len(curves) - 1) / 2) * OFFSET
            # one colour per run (per metric when there is one run), one line style and marker per metric
            color = colors[i % len(colors)] if len(results) > 1 else colors[j % len(colors)]
            label = figure_text(LABELS.get(metric, metric.removeprefix("concept:")))
            same = [LABELS.get(other, other) for other in metrics[:j] if other in result["metrics"]
                    and np.allclose(np.array(result["metrics"][other]["value"], dtype=float), value, equal_nan=True)]
            if same:
                label += f" (identical to {same[0]})"
            if result["convergence"].get(metric, {}).get("status") == "flat":
                label += " (flat)"
            label = f"{run_name}: {label}" if len(results) > 1 else label
            ax.plot(x, value, styles[j % len(styles)], color=color, marker=markers[j % len(markers)], ms=3.5, label=label,
                    mfc="white" if j % 2 else color)
            ax.fill_between(x, low, high, color=color, alpha=0.12, lw=0)
            conv = result["convergence"].get(metric, {})
            if conv.get("status") == "converged":
                ax.axvline(conv["round"], color=color, ls=styles[j % len(styles)], lw=0.8, alpha=0.6)
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        if drawn and len(curves) > 2:  # below the panel, where it hides no curve
            ax.legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1)
        elif drawn:
            ax.legend(fontsize=7, frameon=False, loc="best")
        if drawn:
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        else:
            ax.text(0.5, 0.5, "not measured\n(no options)", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    save_figure(fig, out, "curves")
    return Figure("curves", "Per-round metrics", "Means over samples per round; shaded: 95 % bootstrap interval (the percentile interval's distances from the "
                  "bootstrap median, laid around the estimate); "
                  f"the curves of a panel are drawn {OFFSET} round apart so that none hides another, and a legend entry says when "
                  "two are identical; "
                  "thin vertical line (same colour and style as its curve): the round from which the metric stays within ε of its value "
                  "to the end (convergence; ε = max(0.05 × the metric's range over the rounds, 0.01 × its scale): 1 for rates and "
                  "probabilities, else its largest |value|; no line for a flat metric, whose whole range is below ε: its legend says flat).")


def reliability_figure(run: RunFile, out: Path, stem: str) -> Figure | None:
    """Reliability diagram of every round: accuracy per confidence bin (10 equal-width bins over
    [0, 1]) against the diagonal, with the bin counts; None for runs without options."""
    if int(run.meta.get("n_options", 0)) == 0:
        return None
    plt = pyplot()
    conf = run.array("rounds/chosen_confidence").astype(float)
    correct = run.array("rounds/correct").astype(float)
    rounds = conf.shape[1]
    cols = min(rounds, 6)
    rows = (rounds + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False, sharey=True)
    edges = np.linspace(0, 1, 11)
    for t in range(rows * cols):
        ax = axes[t // cols][t % cols]
        if t >= rounds:
            ax.axis("off")
            continue
        c, y = conf[:, t], correct[:, t]
        keep = np.isfinite(c)
        bins = np.clip((c[keep] * 10).astype(int), 0, 9)
        acc = np.array([y[keep][bins == b].mean() if (bins == b).any() else np.nan for b in range(10)])
        counts = np.bincount(bins, minlength=10)
        ax.bar(edges[:-1], np.nan_to_num(acc), width=0.1, align="edge", color="#4c72b0", alpha=0.8, edgecolor="white")
        ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
        for b in np.flatnonzero(counts):
            ax.text(edges[b] + 0.05, 0.02, str(counts[b]), ha="center", va="bottom", fontsize=6, color="white" if acc[b] > 0.12 else "black", rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"round {t + 1}")
        ax.set_xlabel("confidence")
        if t % cols == 0:
            ax.set_ylabel("accuracy")
    fig.tight_layout()
    save_figure(fig, out, stem)
    return Figure(stem, "Reliability diagrams", "Accuracy of the answer per bin of its option confidence (10 equal-width bins "
                  "over [0, 1]); dashed: perfect calibration; numbers: samples per bin.")


def heatmap_colors(values: np.ndarray) -> dict[str, Any]:
    """The colour map of a heatmap chosen from its values: a diverging map centred on 0 (``RdBu_r``,
    ±max |v|) when they have both signs, else a sequential one over [min, max] (``viridis``), so
    that an all-positive map is not drawn in half a diverging scale. Returns imshow's ``cmap``,
    ``vmin`` and ``vmax``."""
    finite = np.asarray(values, dtype=float)[np.isfinite(values)]
    if finite.size == 0:
        return {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0}
    lo, hi = float(finite.min()), float(finite.max())
    if lo < 0 < hi:
        top = max(-lo, hi)
        return {"cmap": "RdBu_r", "vmin": -top, "vmax": top}
    return {"cmap": "viridis", "vmin": lo, "vmax": hi if hi > lo else lo + 1e-12}


def heatmap_figure(run: RunFile, out: Path, stem: str) -> Figure | None:
    """Layers × rounds heatmap of the mean concept score of every tracked probe (its projection) and
    stereotype-statement group (its cosine); None when none is tracked."""
    groups = [(n, run.f[f"probes/{n}"].attrs.get("kind")) for n in run.names("probes")]
    groups = [(n, "projection" if kind == "probe" else "cosine") for n, kind in groups if kind in ("probe", "stereotype-statement")]
    if not groups:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(3.8 * len(groups), 2.9), squeeze=False)
    for ax, (name, measure) in zip(axes[0], groups):
        g = run.f[f"probes/{name}"]
        layers = json.loads(g.attrs["layers"])
        scores = run.array(f"probes/{name}/{measure}").astype(float)  # [n, R, L]
        mean = np.nanmean(scores, 0).T  # [L, R]
        im = ax.imshow(mean, aspect="auto", origin="lower", extent=(0.5, mean.shape[1] + 0.5, -0.5, len(layers) - 0.5),
                       **heatmap_colors(mean))
        ax.set_yticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xticks(range(1, mean.shape[1] + 1))
        ax.set_xlabel("round")
        ax.set_ylabel("layer")
        if measure == "projection":
            ax.set_title(figure_text(f"{name} ({g.attrs.get('method', '')}, best layer {g.attrs.get('best_layer')})"), fontsize=8)
        else:
            ax.set_title(figure_text(f"{name} (stereotyped statement)"), fontsize=8)
        fig.colorbar(im, ax=ax, label=f"mean {'projection' if measure == 'projection' else 'cosine'}")
    fig.tight_layout()
    save_figure(fig, out, stem)
    return Figure(stem, "Concept score by layer and round", "Per layer and round, the mean over samples of the projection of "
                  "the pooled residual on each probe's direction, and of its cosine with the stereotyped statement's state "
                  "(`probe stereotype`). Colours: a diverging map centred on 0 when the values have both signs, else a "
                  "sequential one over their range.")


def flips_figure(result: dict[str, Any], out: Path, stem: str) -> Figure | None:
    """Stacked bars per transition: how the parsed answers of round t fared in round t+1."""
    if "flips" not in result:
        return None
    plt = pyplot()
    transitions = result["flips"]["transitions"]
    kinds = [("right → right", 0, 0, "#55a868"), ("wrong → right", 1, 0, "#8ecf9b"), ("right → wrong", 0, 1, "#c44e52"),
             ("wrong → wrong", 1, 1, "#e8a0a2"), ("→ unparsed", None, 2, "#999999"), ("unparsed →", 2, None, "#cccccc")]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(transitions), 3.0))
    x = np.arange(len(transitions))
    bottom = np.zeros(len(transitions))
    for label, a, b, color in kinds:
        counts = []
        for f in transitions:
            m = np.array(f["parsed"])
            if a is None:
                counts.append(m[:2, 2].sum())
            elif b is None:
                counts.append(m[2, :].sum())
            else:
                counts.append(m[a, b])
        counts = np.array(counts, dtype=float)
        ax.bar(x, counts, bottom=bottom, color=color, label=label, width=0.7)
        bottom += counts
    ax.set_xticks(x, [f"{f['from']}→{f['to']}" for f in transitions])
    ax.set_xlabel("transition")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7, frameon=False, bbox_to_anchor=(1.0, 1.0), loc="upper left")
    fig.tight_layout()
    save_figure(fig, out, stem)
    return Figure(stem, "Flips between rounds", "Parsed answers of round t against round t+1: kept right, corrected "
                  "(wrong → right), broken (right → wrong), kept wrong, and unparseable answers.")


def organism_figure(run: RunFile, result: dict[str, Any], out: Path, stem: str) -> Figure | None:
    """On organism runs: the model's probability of the fair option against the exact predictive's, and
    every tracked probe's best-layer score against the exact log-odds, coloured by round."""
    if "exact_option_probs" not in run.names("rounds"):
        return None
    plt = pyplot()
    gold = run.array("samples/gold").astype(int)
    model = run.array("rounds/option_probs").astype(float)
    exact = run.array("rounds/exact_option_probs").astype(float)
    rounds = model.shape[1]
    take = lambda p: np.take_along_axis(p, gold[:, None, None].repeat(rounds, 1), -1)[..., 0]  # noqa: E731
    probes = [n for n in run.names("probes") if run.f[f"probes/{n}"].attrs.get("kind") == "probe"]
    fig, axes = plt.subplots(1, 1 + len(probes), figsize=(4.0 * (1 + len(probes)), 3.2), squeeze=False)
    cmap = plt.get_cmap("viridis", rounds)
    round_index = np.broadcast_to(np.arange(rounds), (gold.size, rounds))
    ax = axes[0][0]
    sc = ax.scatter(take(exact).ravel(), take(model).ravel(), c=round_index.ravel() + 1, cmap=cmap, s=8, alpha=0.7, vmin=0.5, vmax=rounds + 0.5)
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax.set_xlabel("exact p(fair option)")
    ax.set_ylabel("model p̂(fair option)")
    ax.set_title("answer vs the exact predictive", fontsize=8)
    log_odds = run.array("rounds/exact_log_odds").astype(float)
    for ax, name in zip(axes[0][1:], probes):
        g = run.f[f"probes/{name}"]
        layers = json.loads(g.attrs["layers"])
        best = layers.index(int(g.attrs["best_layer"]))
        score = run.array(f"probes/{name}/projection")[:, :, best].astype(float)
        ax.scatter(log_odds.ravel(), score.ravel(), c=round_index.ravel() + 1, cmap=cmap, s=8, alpha=0.7, vmin=0.5, vmax=rounds + 0.5)
        v = result.get("probe_vs_exact", {}).get("probes", {}).get(name, {}).get("layers", {}).get(str(layers[best]), {})
        rho = v.get("min_within_round")
        levels = result.get("probe_vs_exact", {}).get("exact_levels", {})
        if rho is not None and np.isfinite(rho):
            detail = f"\nmin within-round ρ {rho:.2f}, pooled {v['pooled']['rho']:.2f}"
        elif levels.get("note"):
            detail = (f"\nwithin-round ρ not measurable here: the exact\nposterior takes ≤ {max(levels['within_round'])} values "
                      "per round\n(the same follow-ups for every sample;\nsee the organism-world protocol)")
        else:
            detail = ""
        ax.set_title(figure_text(f"{name}, layer {layers[best]}") + detail, fontsize=8)
        ax.set_xlabel("exact log-odds of fair")
        ax.set_ylabel("probe score (projection)")
    fig.colorbar(sc, ax=axes[0].tolist(), label="round", ticks=range(1, rounds + 1))
    save_figure(fig, out, stem)
    return Figure(stem, "The organism against its exact posterior", "Left: the model's option confidence of the fair (correct) "
                  "option against the exact predictive given the dialogue it had. Right: each probe's score at its best layer against "
                  "the exact log-odds; colour: round. A pooled cloud can look tight only because rounds separate; the titles give "
                  "the smallest within-round Spearman ρ, measurable only where the exact posterior varies within a round "
                  "(the organism-world protocol draws each sample's follow-ups; under a protocol that gives every sample the "
                  "same follow-ups it takes one or two values per round).")


def build_report(paths: list[Path], out: Path, seed: int = 0) -> Path:
    """Write every figure (PNG + SVG) and ``index.html`` for the runs ``paths`` into ``out``; returns the
    index path. Several runs: the curves are overlaid; the per-run figures come once per run."""
    if not paths:
        raise WorkbenchError("report: give at least one run file")
    if out.exists() and not out.is_dir():
        raise WorkbenchError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    results, names, sections, pictures = [], [], [], {}
    stems = _unique_stems(paths)
    for path, stem in zip(paths, stems):
        with RunFile(path) as run:
            result = analyze(run, seed=seed)
            figures = [f for f in (
                reliability_figure(run, out, f"{stem}-reliability"),
                heatmap_figure(run, out, f"{stem}-concept-heatmap"),
                flips_figure(result, out, f"{stem}-flips"),
                organism_figure(run, result, out, f"{stem}-organism"),
            ) if f is not None]
            sections.append((stem, run.meta, result, figures))
            if isinstance(run.meta.get("vision"), dict):
                pictures[stem] = pictures_html(run)
        results.append(result)
        names.append(stem)
    curves = curves_figure(results, names, out)
    warning = size_warning(results, names)
    if warning:
        warnings.warn(warning, stacklevel=2)
    index = out / "index.html"
    index.write_text(_html(curves, sections, pictures, warning), encoding="utf-8")
    return index


def size_warning(results: list[dict[str, Any]], names: list[str]) -> str:
    """A sentence when overlaid runs differ in samples analysed or rounds (their intervals and
    convergence rounds are then not like for like); empty otherwise."""
    sizes = [(r["run"]["n_done"], r["run"]["n_rounds"]) for r in results]
    if len(set(sizes)) <= 1:
        return ""
    listed = ", ".join(f"{name} {n} samples × {rounds} rounds" for name, (n, rounds) in zip(names, sizes))
    return (f"the overlaid runs differ in size ({listed}): their intervals differ in width for that reason alone, "
            "and convergence rounds over different numbers of rounds are not comparable")


def _unique_stems(paths: list[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i + 1}" for i, s in enumerate(stems)]


META_KEYS = ("model_name", "model_path", "model_dtype", "task", "n_samples", "n_rounds", "seed", "status", "created", "workbench_version")


PICTURES_SHOWN = 24  # thumbnails in a vision-language run's section


def pictures_html(run: RunFile) -> str:
    """A vision-language run's first ``PICTURES_SHOWN`` pictures (the thumbnails the run file keeps,
    inline as PNG data), each with its sample id and whether round 1's and the last round's answers
    were right."""
    import base64

    from workbench.engine.images import thumbnail_from_extra

    e = html.escape
    n = min(PICTURES_SHOWN, int(run.done.sum()))
    if not n:
        return ""
    rows = list(range(n))
    ids, extras, correct = run.array("samples/id", rows), run.array("samples/extra", rows), run.array("rounds/correct", rows)
    cells = []
    for sample_id, extra, right in zip(ids, extras, correct):
        try:
            png = thumbnail_from_extra(json.loads(str(extra)))
        except (ValueError, TypeError):
            png = None
        if png is None:
            continue
        mark = lambda ok: "✓" if ok else "✗"  # noqa: E731
        cells.append(f"<figure style='display:inline-block;margin:4px;text-align:center'>"
                     f"<img src='data:image/png;base64,{base64.b64encode(png).decode()}' style='width:96px;image-rendering:pixelated'>"
                     f"<figcaption>{e(str(sample_id))} r1 {mark(right[0])} r{len(right)} {mark(right[-1])}</figcaption></figure>")
    if not cells:
        return ""
    return (f"<h3>Pictures</h3><p>The first {len(cells)} samples' pictures (the run file's thumbnails) with round 1's "
            f"and the last round's answer (✓ right, ✗ wrong).</p><div>{''.join(cells)}</div>")


def _html(curves: Figure, sections: list[tuple[str, dict[str, Any], dict[str, Any], list[Figure]]],
          pictures: dict[str, str] | None = None, warning: str = "") -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>workbench report</title><style>",
             "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222} img{max-width:100%}",
             "table{border-collapse:collapse;font-size:13px;margin:0.5em 0} td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}",
             "figure{margin:1.5em 0} figcaption{font-size:13px;color:#555} h2{border-bottom:1px solid #ddd}</style></head><body>",
             "<h1>Self-correction report</h1>",
             f"<p>{len(sections)} run(s): {', '.join(e(s[0]) for s in sections)}. Every interval is a 95 % bootstrap "
             "over samples (seeded): the percentile interval's distances from the bootstrap median, laid around the "
             "estimate, so it contains the estimate without widening; entropies are in nats.</p>",
             f"<p style='color:#a40'><b>Warning:</b> {e(warning)}.</p>" if warning else "", figure_html(curves)]
    for stem, meta, result, figures in sections:
        protocol = meta.get("protocol")
        protocol = protocol.get("name") if isinstance(protocol, dict) else protocol
        parts.append(f"<h2>{e(stem)}</h2><table>")
        parts.append(f"<tr><th>protocol</th><td>{e(str(protocol))}</td></tr>")
        for key in META_KEYS:
            if key in meta:
                parts.append(f"<tr><th>{e(key)}</th><td>{e(str(meta[key]))}</td></tr>")
        records = meta.get("interventions")
        for record in records if isinstance(records, list) else []:
            from workbench.engine.interventions import summarize

            parts.append(f"<tr><th>intervention</th><td>{e(summarize(record))}</td></tr>")
        parts.append(f"<tr><th>samples analysed</th><td>{result['run']['n_done']}</td></tr></table>")
        parts.append("<table><tr><th>metric</th><th>convergence</th><th>ε</th><th>first round</th><th>last round</th></tr>")
        for name, c in result["convergence"].items():
            m = result["metrics"][name]
            when = f"round {c['round']}" if c["status"] == "converged" else c["status"]
            parts.append(f"<tr><td title='{e(m['what'])}'>{e(name)}</td><td>{e(when)}</td><td>{c['eps']:.3g}</td>"
                         f"<td>{_cell(m, 0)}</td><td>{_cell(m, -1)}</td></tr>")
        parts.append(f"</table><p style='font-size:13px;color:#555'>{e(result['settings'].get('eps_rule', ''))}; "
                     "flat: the whole range is below ε (converged from round 1).</p>")
        parts.append(_correlations_html(result))
        sim = result["simulation_task"]
        for feature, s in sim.get("features", {}).items():
            if "accuracy_mean" in s:
                parts.append(f"<p>Simulation task (reconstruction), {e(feature)}: accuracy {s['accuracy_mean']:.3f} "
                             f"(variance {s['accuracy_variance']:.5f}) vs majority baseline {s['baseline_mean']:.3f}, "
                             f"{s['n']} transitions. The study reports 83.18 % on RealToxicityPrompts.</p>")
        parts += [figure_html(f) for f in figures]
        parts.append((pictures or {}).get(stem, ""))
    parts.append("</body></html>")
    return "\n".join(parts)


def _correlations_html(result: dict[str, Any]) -> str:
    """Tables of Spearman ρ: concept vs uncertainty, and (organism) probe or read-out vs the exact log-odds,
    within each round, on each transition's changes, and pooled, each column named."""
    e = html.escape
    fmt = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:.2f}"  # noqa: E731
    pearson = lambda c: (lambda p: f"{fmt(p.get('r'))} [{fmt(p.get('low'))}, {fmt(p.get('high'))}]")(c.get("pearson") or {})  # noqa: E731
    rows = []
    for name, views in result["concept_uncertainty"].items():
        for u, v in views.items():
            if u != "layer":
                rows.append((f"concept {name} (layer {views['layer']}) vs {u.replace('_', ' ')}", v))
    for name, p in result.get("probe_vs_exact", {}).get("probes", {}).items():
        rows.append((f"probe {probe_label(name, p)} (best layer {p['best_layer']}) vs exact log-odds", p["layers"][str(p["best_layer"])]))
    for hook, layers in result.get("readout_vs_exact", {}).get("hooks", {}).items():
        best = max(layers, key=lambda l: layers[l]["min_within_round"] if np.isfinite(layers[l]["min_within_round"]) else -2, default=None)
        if best is not None:
            rows.append((f"ridge read-out, cross-fitted ({hook}, layer {best}) vs exact log-odds", layers[best]))
    if not rows:
        return ""
    out = ["<table><tr><th>Spearman ρ</th><th>within each round (across samples)</th><th>on changes t→t+1 (across samples)</th>"
           "<th>all changes</th><th>across rounds (per-round means)</th><th>pooled</th><th>Pearson r pooled [95 %]</th></tr>"]
    for label, v in rows:
        within = " ".join(fmt(x["rho"]) for x in v["within_round"])
        changes = " ".join(fmt(x["rho"]) for x in v["changes"])
        out.append(f"<tr><td>{e(label)}</td><td>{within}</td><td>{changes}</td><td>{fmt(v['changes_pooled']['rho'])}</td>"
                   f"<td>{fmt(v['across_rounds']['rho'])}</td><td>{fmt(v['pooled']['rho'])}</td><td>{pearson(v['pooled'])}</td></tr>")
    out.append("</table><p style='font-size:13px;color:#555'>Across rounds and pooled figures move with the round number "
               "whenever both quantities do; the within-round and on-changes columns do not.</p>")
    return "\n".join(out)


def _cell(m: dict[str, Any], t: int) -> str:
    v, lo, hi = m["value"][t], m["low"][t], m["high"][t]
    fmt = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:.3f}"  # noqa: E731
    return f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def figure_html(f: Figure) -> str:
    """One figure of a report page: its SVG, title, caption and links to both files."""
    e = html.escape
    return (f"<figure id='{e(f.stem)}'><h3>{e(f.title)}</h3><img src='{e(f.stem)}.svg' alt='{e(f.title)}'>"
            f"<figcaption>{e(f.caption)} (<a href='{e(f.stem)}.png'>PNG</a>, <a href='{e(f.stem)}.svg'>SVG</a>)</figcaption></figure>")
