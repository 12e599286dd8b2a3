"""The analysis commands of the ``workbench`` CLI: ``analyze`` (and the ones that build on it).

Registered on the main app by :mod:`workbench.cli`; heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

out = Console()

SHORT = {
    "accuracy_parsed": "acc parsed", "accuracy_option": "acc option", "accuracy": "acc", "unparsed": "unparsed",
    "mean_token_entropy": "tok H", "mean_option_entropy": "opt H", "ece": "ECE", "ece_range": "ECE mm",
    "exact_p_fair": "p(fair)", "exact_log_odds": "log-odds",
}


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _short(name: str) -> str:
    return SHORT.get(name, name.replace("concept:", "c:"))


def analyze(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`."),
    probe: Optional[str] = typer.Option(None, help="Analyse only this tracked probe (default: every probe in the run)."),
    eps: Optional[float] = typer.Option(None, help="Absolute convergence threshold ε (default per metric: the larger of 0.05 × its range over the rounds and 0.01 × its scale — 1 for rates and probabilities, else its largest |value|; a metric whose range is below ε is 'flat')."),
    k: int = typer.Option(2, help="Convergence needs |Δ| < ε for at least this many steps after t*, and to the end."),
    seed: int = typer.Option(0, help="Seed of the bootstrap and of the simulation task's folds."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole analysis as JSON on stdout."),
    write: bool = typer.Option(True, "--write/--no-write", help="Store the analysis in the run file under analysis/."),
) -> None:
    """Per-round accuracy (parsed and option argmax), uncertainty, calibration and concept scores with
    95 % bootstrap intervals; convergence; flips; concept ↔ uncertainty correlations; the organism's
    probe against the exact posterior; the simulation task."""
    from workbench.analysis.analyze import _finite, analyze as run_analysis, write_analysis
    from workbench.store.writer import RunFile

    with RunFile(run_path) as run:
        result = run_analysis(run, probe=probe, eps=eps, k=k, seed=seed)
    if write:
        write_analysis(run_path, result)
    if as_json:
        print(json.dumps(_finite(result), indent=1, allow_nan=False))
    else:
        print_analysis(result)


def print_analysis(result: dict[str, Any]) -> None:
    """The analysis as tables: per-round metrics with intervals, convergence, flips, correlations."""
    from workbench.analysis.analyze import probe_label

    r = result["run"]
    out.print(f"{r['path']}  model={r['model']}  protocol={r['protocol']}  samples={r['n_done']}/{r['n_samples']}  "
              f"rounds={r['n_rounds']}", markup=False, highlight=False)
    metrics = result["metrics"]
    names = list(metrics)
    for chunk in (names[i : i + 5] for i in range(0, len(names), 5)):
        table = Table(show_header=True, header_style="bold", title_justify="left")
        table.add_column("round", justify="right")
        for name in chunk:
            table.add_column(_short(name), justify="right", overflow="fold")
        for t in range(r["n_rounds"]):
            cells = []
            for name in chunk:
                m = metrics[name]
                digits = 2 if abs(m["value"][t] or 0) >= 10 else 3
                cells.append(f"{_num(m['value'][t], digits)}\n{_num(m['low'][t], 2)}–{_num(m['high'][t], 2)}")
            table.add_row(str(t + 1), *cells)
        out.print(table)
    out.print("each cell: the estimate, then its 95 % bootstrap interval (percentile distances from the bootstrap median, "
              "around the estimate); entropies in nats. " + "; ".join(
        f"{_short(n)}: {metrics[n]['what']}" for n in names), markup=False, highlight=False)

    conv = result["convergence"]
    table = Table("metric", "converged at", "ε", title="convergence: |Δ| < ε every step from t* to the end (≥ k steps); flat: range < ε",
                  title_justify="left")
    for name, c in conv.items():
        how = "" if not c["relative"] else " (floor)" if c["eps"] == c.get("floor") else " (range)"
        table.add_row(_short(name), f"round {c['round']}" if c["status"] == "converged" else c["status"], f"{c['eps']:.3g}{how}")
    out.print(table)
    out.print(result["settings"].get("eps_rule", "") + "; (range): 0.05 × the range set ε, (floor): the scale did",
              markup=False, highlight=False)

    if "flips" in result:
        table = Table("t→t+1", "parsed R→W", "parsed W→R", "→unparsed", "option R→W", "option W→R", title="flips between rounds", title_justify="left")
        for f in result["flips"]["transitions"]:
            p, o = f["parsed"], f["option"]
            table.add_row(f"{f['from']}→{f['to']}", str(p[0][1]), str(p[1][0]), str(p[0][2] + p[1][2]), str(o[0][1]), str(o[1][0]))
        out.print(table)

    for name, views in result["concept_uncertainty"].items():
        for u, v in views.items():
            if u == "layer":
                continue
            _print_views(f"concept {name} (layer {views['layer']}) vs {u.replace('_', ' ')}: Spearman ρ", v)

    if "probe_vs_exact" in result:
        pve = result["probe_vs_exact"]
        out.print(f"round number alone vs exact log-odds, pooled: ρ = {_num(pve['round_number_pooled']['rho'])} "
                  "(what a pooled figure can owe to the round number)", markup=False, highlight=False)
        blocks = [(f"probe {probe_label(name, p)} vs exact log-odds (Spearman ρ; best layer {p['best_layer']})", p["layers"])
                  for name, p in pve["probes"].items()]
        readout = result.get("readout_vs_exact", {})
        blocks += [(f"{readout['what']} ({hook}) vs exact log-odds (Spearman ρ)", layers) for hook, layers in readout.get("hooks", {}).items()]
        levels = pve.get("exact_levels", {})
        within_ok, changes_ok = levels.get("within_ok"), levels.get("changes_ok")

        def shown(values: list[dict[str, Any]], ok: list[bool] | None) -> str:  # (ρ): left out of the minimum
            return " ".join(_num(x["rho"], 2) if ok is None or ok[t] or x["rho"] is None or not math.isfinite(x["rho"])
                            else f"({_num(x['rho'], 2)})" for t, x in enumerate(values))

        for title, layers in blocks:
            table = Table("layer", "min within", "within each round", "min Δ", "Δ each transition", "pooled", title=title, title_justify="left")
            for layer, v in layers.items():
                within = shown(v["within_round"], within_ok)
                changes = shown(v["changes"], changes_ok)
                table.add_row(layer, _num(v["min_within_round"]), within, _num(v["min_changes"]), changes, _num(v["pooled"]["rho"]))
            out.print(table)
        out.print("within: across samples in each round (round 1: every sample has the prior, so ρ is undefined); "
                  "Δ: across samples, of the change from round t to t+1", markup=False, highlight=False)
        if pve.get("exact_levels", {}).get("note"):
            out.print(f"note: {pve['exact_levels']['note']}; (ρ): left out; min columns: – when no round is left",
                      markup=False, highlight=False)
        if "world_sign" in result:
            ws = result["world_sign"]
            out.print(f"the world's own sign: exact log-odds vs exact option entropy, ρ pooled {_num(ws['pooled']['rho'])}, "
                      f"on changes {_num(ws['changes_pooled']['rho'])}", markup=False, highlight=False)

    sim = result["simulation_task"]
    out.print("simulation task (" + sim["what"] + ")", markup=False, highlight=False)
    if "skipped" in sim:
        out.print(f"  skipped: {sim['skipped']}", markup=False, highlight=False)
    for feature, s in sim["features"].items():
        if "skipped" in s:
            out.print(f"  {feature}: skipped ({s['skipped']})", markup=False, highlight=False)
        else:
            out.print(f"  {feature}: accuracy {s['accuracy_mean']:.4f} (variance {s['accuracy_variance']:.5f}) vs majority "
                      f"{s['baseline_mean']:.4f}, n = {s['n']} transitions, {s['n_falls']} fall", markup=False, highlight=False)
    st = sim["study"]
    out.print(f"  the study reports {st['accuracy']:.2%} (variance {st['variance']}) on {st['data']}: {st['note']}", markup=False, highlight=False)


def _print_views(title: str, v: dict[str, Any]) -> None:
    within = " ".join(_num(x["rho"], 2) for x in v["within_round"])
    changes = " ".join(_num(x["rho"], 2) for x in v["changes"])
    out.print(f"{title}\n  within each round (across samples): {within}\n  on changes t→t+1 (across samples): {changes}; "
              f"all transitions {_num(v['changes_pooled']['rho'])}\n  across rounds (of the per-round means; both move with the round): "
              f"{_num(v['across_rounds']['rho'])}; pooled over samples and rounds: {_num(v['pooled']['rho'])}", markup=False, highlight=False)


class NamedArgumentsCommand(typer.core.TyperCommand):
    """A command whose positional arguments with a ``metavar`` show just it in ``--help``, as options
    do (Typer prints the annotation too: ``RUN... <list[Path]>``); a repeatable one as ``RUN...``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, typer.core.TyperArgument) and param.metavar is not None:
                param.__class__ = _NamedArgument


class _NamedArgument(typer.core.TyperArgument):
    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _rich_display_name(self) -> str:
        return self.metavar + ("..." if self.nargs != 1 else "")

    def _usage_display_name(self) -> str:
        return self._rich_display_name() if self.required else f"[{self._rich_display_name()}]"


def report(
    run_paths: list[Path] = typer.Argument(..., metavar="RUN", help="One or more run files; several are overlaid (e.g. moral vs neutral vs inject)."),
    out_dir: Path = typer.Option(Path("artifacts/runs/reports/report"), "--out", help="Folder for the figures (PNG + SVG) and index.html."),
    seed: int = typer.Option(0, help="Seed of the bootstrap intervals."),
) -> None:
    """Figures a paper would use (per-round curves with intervals and convergence, reliability
    diagrams, layers × rounds concept heatmap, flips, the organism against its exact posterior) and
    one index.html that ties them together."""
    from workbench.analysis.report import build_report

    index = build_report(list(run_paths), out_dir, seed=seed)
    out.print(f"wrote {index} and {len(list(out_dir.glob('*.png')))} figures (PNG + SVG)", markup=False, highlight=False)


def theory(
    c_x: Optional[float] = typer.Option(None, "--c-x", help="p(C_p | x): the concept's posterior given the question alone."),
    c_i: Optional[float] = typer.Option(None, "--c-i", help="p(C_p | i): given one instruction alone."),
    c_y: Optional[float] = typer.Option(None, "--c-y", help="p(C_p | y): given one answer alone."),
    c_p: Optional[float] = typer.Option(None, "--c-p", help="p(C_p): the prior."),
    rounds: int = typer.Option(10, help="Rounds to compute."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Also draw the curves to this PNG or SVG file."),
    organism: bool = typer.Option(False, "--organism", help="Take the parameters from the organism's world and add its exact posterior."),
    run_path: Optional[Path] = typer.Option(None, "--run", help="A run file: add its per-round mean exact p(fair) and probe scores."),
) -> None:
    """The study's two-concept Bayesian formulation: per round the normalised posterior p(C_p | q_t)
    beside the study's unnormalised (c_i·c_y)^(t−1)·p(C_p | q_0), whose normalisation is wrong."""
    from workbench.errors import WorkbenchError
    from workbench.analysis.theory import TheoryParams, organism_exact, organism_params, plot, posterior, run_columns, study_expression

    given = {"--c-x": c_x, "--c-i": c_i, "--c-y": c_y, "--c-p": c_p}
    if organism:
        params, note = organism_params()
        params = TheoryParams(**{k: v if given[f"--{k.replace('_', '-')}"] is None else given[f"--{k.replace('_', '-')}"]
                                 for k, v in params.__dict__.items()})
        out.print(note, markup=False, highlight=False)
    else:
        missing = [name for name, value in given.items() if value is None]
        if missing:
            raise WorkbenchError(f"theory needs {', '.join(missing)} (or --organism)")
        params = TheoryParams(c_x=c_x, c_i=c_i, c_y=c_y, c_p=c_p)  # type: ignore[arg-type]
    columns: dict[str, Any] = {"normalised": posterior(params, rounds), "study": study_expression(params, rounds)}
    if organism:
        columns["organism exact"] = organism_exact(rounds)
    if run_path is not None:
        columns.update(run_columns(str(run_path), rounds))
    out.print(f"c_x = {params.c_x:.4g}, c_i = {params.c_i:.4g}, c_y = {params.c_y:.4g}, c_p = {params.c_p:.4g}", markup=False, highlight=False)
    table = Table("round", *columns.keys())
    for t in range(rounds):
        table.add_row(str(t + 1), *[_num(float(v[t]), 4) for v in columns.values()])
    out.print(table)
    out.print("normalised: p(C_p | q_t) by Bayes' rule over both concepts; study: the study's unnormalised "
              "(c_i·c_y)^(t−1)·p(C_p | q_0), not a probability" + ("; organism exact: the world's exact p(fair) of that dialogue" if organism else "")
              + ("; run: per-round means of the run file (projection: probe score, not a probability)" if run_path else ""),
              markup=False, highlight=False)
    if plot_path is not None:
        plot(columns, str(plot_path))
        out.print(f"wrote {plot_path}", markup=False, highlight=False)


def select(
    candidates: Path = typer.Argument(..., help="JSONL of candidate texts, one object per line."),
    model: str = typer.Option("organism", help="Hugging Face hub name, local folder, or 'organism'."),
    k: int = typer.Option(5, help="Answers sampled per candidate (seeded)."),
    size: int = typer.Option(1000, help="Candidates in each written subset (low, high, random)."),
    out_dir: Path = typer.Option(Path("artifacts/runs/selected"), "--out", help="Folder for low.jsonl, high.jsonl, random.jsonl, all.jsonl."),
    text_field: str = typer.Option("text", help="The JSON field holding the candidate text."),
    by: str = typer.Option("weighted", help="Uncertainty that ranks: weighted (probability-weighted semantic entropy), discrete, or study."),
    probe: Optional[Path] = typer.Option(None, help="A probe file: add its concept score of the question's last token."),
    max_new_tokens: int = typer.Option(8, help="Longest sampled answer."),
    batch_size: int = typer.Option(16, help="Candidates generated together (each k times)."),
    seed: int = typer.Option(0, help="Seed of the sampled answers and of the random subset."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """Task-agnostic debiasing sample selection: ask the model the study's question about each text
    ("Does the above text contain bias or stereotypes?"), sample k answers, measure semantic entropy
    (and the concept score with --probe), and write the low- and high-uncertainty and a random subset."""
    from workbench.engine.models import load_model
    from workbench.analysis.select import read_candidates, score_candidates, select_subsets, write_subsets

    rows = read_candidates(candidates, text_field)
    if 2 * size > len(rows):
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"--size {size}: needs at most half of the {len(rows)} candidates (low and high are disjoint)")
    loaded_probe = None
    if probe is not None:
        from probes.probe_file import load_probe

        loaded_probe = load_probe(probe)
    loaded = load_model(model, device=device)
    scored = score_candidates(loaded, rows, text_field, k, seed, max_new_tokens, batch_size, loaded_probe)
    paths = write_subsets(out_dir, select_subsets(scored, size, by, seed), scored)
    out.print("wrote " + ", ".join(str(p) for p in paths), markup=False, highlight=False)
