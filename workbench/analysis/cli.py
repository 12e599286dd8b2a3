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
    "exact_p_fair": "p(fair)", "exact_log_odds": "log-odds", "first_choice_probability": "p(1st choice)",
}


def _num(x: Any, digits: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def _short(name: str) -> str:
    return SHORT.get(name, name.replace("concept:", "c:").replace("rce:semantic_entropy_", "RCE SE ").replace("rce:mean_token_entropy", "RCE tok H"))


def analyze(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`."),
    probe: Optional[str] = typer.Option(None, help="Analyse only this tracked probe (default: every probe in the run)."),
    eps: Optional[float] = typer.Option(None, help="Absolute convergence threshold ε (default per metric: the larger of 0.05 × its range over the rounds and 0.01 × its scale — 1 for rates and probabilities, else its largest |value|; a metric whose range is below ε is 'flat')."),
    k: int = typer.Option(2, help="Convergence needs |Δ| < ε for at least this many steps after t*, and to the end."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the bootstrap and of the simulation task's folds."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole analysis as JSON on stdout."),
    write: bool = typer.Option(True, "--write/--no-write", help="Store the analysis in the run file under analysis/."),
    against: Optional[Path] = typer.Option(None, "--against", metavar="BASE.h5", help="Compare with a run of the same samples without the intervention: per round, paired differences (this run − BASE) with paired bootstrap intervals, flips between the runs, and on the organism the implied log-odds. Nothing is written to either file."),
) -> None:
    """Per-round accuracy (parsed and option argmax), uncertainty, calibration and concept scores with
    95 % bootstrap intervals; convergence; flips; concept ↔ uncertainty correlations; the organism's
    probe against the exact posterior; the simulation task. With --against BASE.h5: what an
    intervention changed, sample by sample."""
    from workbench.analysis.analyze import analyze as run_analysis, write_analysis
    from workbench.json_values import finite
    from workbench.store.reader import RunFile

    if against is not None:
        from workbench.analysis.paired import compare

        with RunFile(run_path) as steered, RunFile(against) as base:
            result = compare(steered, base, seed=seed)
        if as_json:
            print(json.dumps(finite(result), indent=1, allow_nan=False))
        else:
            print_comparison(result)
        return

    with RunFile(run_path) as run:
        result = run_analysis(run, probe=probe, eps=eps, k=k, seed=seed)
    if write:
        write_analysis(run_path, result)
    if as_json:
        print(json.dumps(finite(result), indent=1, allow_nan=False))
    else:
        print_analysis(result)


def print_analysis(result: dict[str, Any]) -> None:
    """The analysis as tables: per-round metrics with intervals, convergence, flips, correlations."""
    from workbench.analysis.analyze import probe_label
    from workbench.printable import visible_tree

    result = visible_tree(result)  # names from the run file: control characters shown, never obeyed
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


def _pearson(c: dict[str, Any]) -> str:
    """Pearson's r with its 95 % interval, ``0.41 [0.12, 0.63]`` (analyses made before it was recorded: –)."""
    p = c.get("pearson") or {}
    return f"{_num(p.get('r'), 2)} [{_num(p.get('low'), 2)}, {_num(p.get('high'), 2)}]"


def print_comparison(result: dict[str, Any]) -> None:
    """``analyze --against``: the runs and their interventions, then per round each metric's paired
    difference with its interval (and the two runs' means), the flips and the implied log-odds."""
    from rich.text import Text

    from workbench.engine.interventions import summarize

    runs = result["runs"]
    out.print(Text(f"{runs['steered']} against {runs['base']}: {result['n_paired']} paired samples, {result['n_rounds']} rounds"),
              highlight=False, soft_wrap=True)
    for which in ("steered", "base"):
        for record in result["interventions"][which]:
            out.print(Text(f"  {which}: {summarize(record)}"), highlight=False, soft_wrap=True)
    blocks = dict(result["metrics"])
    if "implied_log_odds" in result:
        blocks["implied λ"] = result["implied_log_odds"]
    names = list(blocks)
    for chunk in (names[i : i + 4] for i in range(0, len(names), 4)):
        table = Table(show_header=True, header_style="bold")
        table.add_column("round", justify="right")
        for name in chunk:
            table.add_column(Text(_short(name)), justify="right", overflow="fold")
        for t in range(result["n_rounds"]):
            cells = []
            for name in chunk:
                m = blocks[name]
                cells.append(f"{_num(m['value'][t])}\n{_num(m['low'][t], 2)}–{_num(m['high'][t], 2)}\n"
                             f"{_num(m['base'][t], 2)}→{_num(m['steered'][t], 2)}")
            table.add_row(str(t + 1), *cells)
        out.print(table)
    out.print("each cell: the mean paired difference (this run − base), its 95 % paired bootstrap interval, "
              "and base → this run", markup=False, highlight=False)
    if "implied_log_odds" in result:
        il = result["implied_log_odds"]
        out.print("implied λ: the log-odds whose exact mixture is closest in KL to the answer distribution; best-fit KL "
                  f"per round {' '.join(_num(x, 4) for x in il['kl_steered'])} (base {' '.join(_num(x, 4) for x in il['kl_base'])}); "
                  f"variance of λ across samples {' '.join(_num(x, 2) for x in il['variance_steered'])} "
                  f"(base {' '.join(_num(x, 2) for x in il['variance_base'])}); {il['at_bound']} fits at the grid's bound",
                  markup=False, highlight=False, soft_wrap=True)
    if "accuracy_gain" in result:
        g = result["accuracy_gain"]
        out.print(f"{g['what']}: {_num(g['base'])} → {_num(g['steered'])}: Δ {_num(g['value'])} [{_num(g['low'], 2)}, {_num(g['high'], 2)}]",
                  markup=False, highlight=False)
    if "settling_round" in result:
        sr = result["settling_round"]
        out.print(f"answer settles at round {_num(sr['base'], 2)} → {_num(sr['steered'], 2)}: Δ {_num(sr['value'])} "
                  f"[{_num(sr['low'], 2)}, {_num(sr['high'], 2)}]", markup=False, highlight=False)
    if "flips" in result:
        table = Table("round", "right→wrong", "wrong→right", "answer changed", title="flips between the runs (base → this run)",
                      title_justify="left")
        for f in result["flips"]:
            table.add_row(str(f["round"]), str(f["right_to_wrong"]), str(f["wrong_to_right"]), str(f["answer_changed"]))
        out.print(table)


def _print_views(title: str, v: dict[str, Any]) -> None:
    within = " ".join(_num(x["rho"], 2) for x in v["within_round"])
    changes = " ".join(_num(x["rho"], 2) for x in v["changes"])
    out.print(f"{title}\n  within each round (across samples): {within}\n  on changes t→t+1 (across samples): {changes}; "
              f"all transitions {_num(v['changes_pooled']['rho'])}\n  across rounds (of the per-round means; both move with the round): "
              f"{_num(v['across_rounds']['rho'])}; pooled over samples and rounds: {_num(v['pooled']['rho'])}", markup=False, highlight=False)
    out.print(f"  Pearson r [95 % interval] within each round: {'; '.join(_pearson(x) for x in v['within_round'])}\n"
              f"  on all transitions {_pearson(v['changes_pooled'])}; across rounds {_pearson(v['across_rounds'])}; "
              f"pooled {_pearson(v['pooled'])}", markup=False, highlight=False)


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
    run_paths: list[Path] = typer.Argument(..., metavar="RUN", help="One or more run files; several are overlaid (e.g. moral vs neutral vs inject). Or one sweep folder (`workbench sweep --out DIR`): its dose-response curves."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the figures (PNG + SVG) and index.html. Default: artifacts/runs/reports/report, or DIR/report for a sweep folder."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the bootstrap intervals."),
) -> None:
    """Figures a paper would use (per-round curves with intervals and convergence, reliability
    diagrams, layers × rounds concept heatmap, flips, the organism against its exact posterior) and
    one index.html that ties them together. For a sweep folder: per round, each metric's paired
    difference from the α = 0 run against α, the random control beside it."""
    from workbench.analysis.report import build_report

    if len(run_paths) == 1 and run_paths[0].is_dir():
        from workbench.analysis.sweep import build_sweep_report

        out_dir = out_dir if out_dir is not None else run_paths[0] / "report"
        index = build_sweep_report(run_paths[0], out_dir, seed=seed)
        out.print(f"wrote {index} and {len(list(out_dir.glob('*.png')))} dose-response figures (PNG + SVG)", markup=False, highlight=False)
        return
    out_dir = out_dir if out_dir is not None else Path("artifacts/runs/reports/report")
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
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the sampled answers and of the random subset."),
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
