"""``workbench probe``: fit concept directions on every layer, show them, track them through runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from workbench.errors import WorkbenchError, parse_int_list
from workbench.engine.models import Device, ModelDtype
from workbench.terminal import load_model_showing_steps

Method = Literal["diffmean", "logreg", "pca", "ccs", "ridge"]  # the keys of probes.methods.METHODS (a test keeps them equal)
Position = Literal["last", "mean"]
TextFormat = Literal["raw", "chat"]

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)
out = Console()
err = Console(stderr=True)

METHOD_HELP = ("diffmean (mean difference), logreg (L2 logistic regression, all layers at once), pca (first PC of paired differences), "
               "ccs (Contrast-Consistent Search, unsupervised, needs pairs), ridge (ridge regression on the contrast's continuous target: "
               "for the organism the exact log-odds of every prefix, none left out, best layer by held-out Spearman ρ with it; "
               "on a JSONL contrast the 0/1 label).")


@app.command()
def fit(
    contrast: str = typer.Option("organism", help="'organism' (the shipped world's concept), or a JSONL file: {\"positive\": ..., \"negative\": ...} or {\"text\": ..., \"label\": 0|1} per line; for a vision-language model each line may carry an \"image\" (a path relative to the file, every line or none; with --format chat)."),
    method: Method = typer.Option("diffmean", help=METHOD_HELP),
    model: str = typer.Option("organism", help="Hub name, local folder, or 'organism'."),
    hook: str = typer.Option("hook_resid_post", help="Hook captured at every layer (TransformerLens name without the block)."),
    position: Position = typer.Option("last", help="last (the text's last token) or mean (mean over its tokens). Tracking maps last → a round's last prompt token, mean → the mean over its response."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    n: int = typer.Option(2000, help="organism: number of contrast texts to draw."),
    text_format: TextFormat = typer.Option("raw", "--format", help="JSONL texts: raw (as written) or chat (one user message through the chat template)."),
    test_fraction: float = typer.Option(0.25, help="Held-out fraction for accuracy and AUROC."),
    seed: int = typer.Option(0, min=0, max=2**63 - 1, help="Seed of the held-out split (and of CCS restarts)."),
    batch_size: int = typer.Option(64, help="Texts per forward pass."),
    device: Device = typer.Option("auto", help="auto: cuda, else mps, else cpu."),
    dtype: ModelDtype = typer.Option("auto", help="Model dtype; auto: bfloat16 on CUDA, else float32."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Probe file to write. Default: artifacts/probes/<contrast>-<method>.h5"),
    adapter: Optional[Path] = typer.Option(None, metavar="DIR", help="A LoRA adapter (e.g. from `workbench finetune`) merged into the model after it loads; its sha256 is recorded in the probe file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing probe file at --out (never another kind of file)."),
    max_lines: int = typer.Option(100_000, "--max-lines", min=1, help="A JSONL contrast with more lines is refused before any is used (one forward pass per text)."),
) -> None:
    """Find a concept direction at every layer from a contrast set; report held-out accuracy and AUROC."""
    from probes.contrast import ORGANISM_MARGIN, check_splittable, load_contrast, read_contrast_file
    from probes.fit import fit_probe, save_fitted
    from probes.methods import PAIRED_METHODS, REGRESSION_METHODS
    from probes.probe_file import check_probe_out
    from workbench.engine.capture import check_layers, hook_sites
    from workbench.errors import check_output_path

    if not 0 < test_fraction < 1:
        raise WorkbenchError(f"--test-fraction must be between 0 and 1, not {test_fraction}")
    if n < 1 or batch_size < 1:
        raise WorkbenchError(f"--{'n' if n < 1 else 'batch-size'} must be ≥ 1")
    wanted = parse_int_list(layers, "--layers")
    wanted = None if wanted is None else list(wanted)
    if wanted is not None and (not wanted or min(wanted) < 0):
        raise WorkbenchError("--layers takes one or more layer numbers ≥ 0 (leave it out for all)")
    path = out_path or Path("artifacts/probes") / f"{Path(contrast).stem}-{method}.h5"
    check_output_path(path)
    check_probe_out(path, overwrite)
    paired = method in PAIRED_METHODS
    if contrast != "organism":
        texts = read_contrast_file(Path(contrast), max_lines) if Path(contrast).exists() else None
        if texts is None:
            raise WorkbenchError(f"--contrast: {contrast} is neither 'organism' nor an existing JSONL file")
        if paired and texts.pairs is None:
            raise WorkbenchError(f"{contrast}: --method {method} needs pairs ({{\"positive\": ..., \"negative\": ...}} per line)")
        check_splittable(contrast, texts.labels, texts.pairs if paired else None, test_fraction)
    loaded = load_model_showing_steps(model, device, dtype, adapter=adapter)
    chosen = check_layers(wanted, loaded.n_layers)
    hook_sites(loaded, [hook], chosen)
    margin = 0.0 if method in REGRESSION_METHODS else ORGANISM_MARGIN
    data = load_contrast(contrast, loaded.tokenizer, paired=paired, n=n, fmt=text_format, margin=margin, processor=loaded.processor,
                         max_lines=max_lines)
    check_splittable(contrast, data.labels, data.pairs if paired else None, test_fraction)
    from workbench.terminal import ProgressBar

    with ProgressBar("activations", "texts", console=err) as bar:
        bar.update(0, len(data.token_ids))
        ev, arrays = fit_probe(loaded, data, method, hook, chosen, position, test_fraction, seed, batch_size, bar.advance)
    save_fitted(path, loaded, data, method, hook, position, test_fraction, seed, ev, arrays)
    from probes.probe_file import load_probe

    _show(load_probe(path))




def _show(probe) -> None:
    """The probe's metadata, its per-layer table (best layer in bold green) and how the best layer won.
    Every string from the file is printed literally (no Rich markup)."""
    from probes.probe_file import tie_break
    from workbench.printable import visible

    m = probe.meta
    c = m.get("contrast") if isinstance(m.get("contrast"), dict) else {}
    out.print(Text(visible(probe.path, newlines=False), style="bold").append(visible(
        f"  method={m['method']}  model={m['model_name']}  hook={m['hook']}  position={m['position']}  d_model={m['d_model']}",
        newlines=False), style=""), highlight=False)
    out.print(Text(visible(f"contrast {c.get('name', '?')}: {c.get('n', '?')} texts ({c.get('n_positive', '?')} positive, "
                           f"{c.get('n_pairs', '?')} pairs), digest {c.get('digest', '?')}; held-out fraction "
                           f"{m.get('test_fraction', '?')}, seed {m.get('seed', '?')}", newlines=False)), highlight=False)
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    a = probe.arrays
    cols = [("layer", None), ("train acc", "train_accuracy"), ("test acc", "test_accuracy"), ("test AUROC", "test_auroc"),
            ("margin", "test_margin"), ("ρ exact", "test_target_spearman"), ("α", "alpha")]
    cols = [(label, key) for label, key in cols if key is None or key in a]
    for label, _ in cols:
        table.add_column(label, justify="right", no_wrap=True)
    for j, layer in enumerate(a["layers"]):
        row = [str(int(layer))] + [f"{a[key][j]:.3g}" if key == "alpha" else f"{a[key][j]:.3f}" for _, key in cols[1:]]
        style = "bold green" if int(layer) == probe.best_layer else None
        table.add_row(*row, style=style)
    out.print(table)
    legend = "test: the held-out split; margin: mean |projection − threshold| on it"
    if "test_target_spearman" in a:
        legend += "; ρ exact: Spearman with the exact posterior log-odds"
    if "alpha" in a:
        legend += "; α: the ridge penalty chosen by leave-one-out error"
    out.print(Text(legend, style="dim"), highlight=False)
    best_row = [int(x) for x in a["layers"]].index(probe.best_layer)
    if m.get("best_layer_by") == "test_target_spearman":
        out.print(Text(f"best layer: {probe.best_layer} (the highest held-out ρ exact: a regression probe fitted to the target)"), highlight=False)
        return
    how = tie_break(a["test_accuracy"], a["test_auroc"], a.get("test_margin"), best_row)
    tied = [int(l) for l, acc in zip(a["layers"], a["test_accuracy"]) if acc == a["test_accuracy"][best_row]]
    line = f"best layer: {probe.best_layer}"
    if how:
        by = {"auroc": "the higher held-out AUROC", "margin": "the larger margin (AUROC tied too)",
              "index": "the lower layer (AUROC and margin tied too)"}[how]
        line += f" (a tie: layers {', '.join(map(str, tied))} have the same held-out accuracy; chosen by {by})"
    out.print(Text(line), highlight=False)


@app.command()
def show(probe_path: Path = typer.Argument(..., help="A probe file written by `workbench probe fit`.")) -> None:
    """Per-layer held-out accuracy and AUROC, the best layer, and the probe's metadata."""
    from probes.probe_file import load_probe

    _show(load_probe(probe_path))


@app.command()
def track(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`."),
    probe_path: Path = typer.Argument(..., help="A probe file fitted on the same model."),
    name: Optional[str] = typer.Option(None, help="Name of the scores in the run file (default: the probe file's name)."),
) -> None:
    """Concept scores (cosine and projection) for every sample, round and layer, into the run file."""
    import re

    from probes.probe_file import load_probe
    from probes.track import track as track_run
    from workbench.store.reader import RunFile

    probe = load_probe(probe_path)
    name = name if name is not None else probe.name
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*", name) or name in (".", ".."):
        raise WorkbenchError(f"--name {name!r}: use letters, digits and _ . + - (it names a group in the run file)")
    with RunFile(run_path):
        pass  # refuse a foreign or damaged run file before anything is written
    scores = track_run(run_path, probe, name)
    rows = list(probe.arrays["layers"]).index(probe.best_layer)
    proj = scores["projection"][:, :, rows]
    table = Table(title=Text(f"{name}: mean concept score at layer {probe.best_layer}"), header_style="bold")
    for col in ("round", "projection", "cosine"):
        table.add_column(col, justify="right")
    for t in range(proj.shape[1]):
        table.add_row(str(t + 1), _f(_nanmean(proj[:, t])), _f(_nanmean(scores["cosine"][:, t, rows])))
    out.print(table)


@app.command()
def stereotype(
    run_path: Path = typer.Argument(..., help="A BBQ or organism run file."),
    model: Optional[str] = typer.Option(None, help="The run's model (default: the one recorded in the run file)."),
    hook: str = typer.Option("hook_resid_post", help="A hook the run captured."),
    device: Device = typer.Option("auto", help="auto: cuda, else mps, else cpu."),
    adapter: Optional[Path] = typer.Option(None, metavar="DIR", help="A LoRA adapter merged into the model (default: the one the run recorded, if any)."),
) -> None:
    """The study's BBQ variant: cosine between each round's prompt state and the stereotyped statement."""
    from probes.stereotype import stereotype_similarity
    from workbench.store.reader import RunFile

    with RunFile(run_path) as run:
        recorded = run.meta.get("model_name")
        recorded_adapter = (run.meta.get("adapter") or {}).get("path") if isinstance(run.meta.get("adapter"), dict) else None
    loaded = load_model_showing_steps(model or recorded, device, adapter=adapter or recorded_adapter)
    cos = stereotype_similarity(run_path, loaded, hook)
    table = Table(title="cosine with the stereotyped statement (mean over samples)", header_style="bold")
    table.add_column("round", justify="right")
    for layer in range(cos.shape[2]):
        table.add_column(f"L{layer}", justify="right")
    for t in range(cos.shape[1]):
        table.add_row(str(t + 1), *[_f(_nanmean(cos[:, t, j])) for j in range(cos.shape[2])])
    out.print(table)


def _nanmean(x) -> float:
    import numpy as np

    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _f(v: float) -> str:
    return "–" if math.isnan(v) else f"{v:.3f}"
