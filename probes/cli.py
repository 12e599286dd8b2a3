"""``workbench probe``: fit concept directions on every layer, show them, track them through runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from workbench.errors import WorkbenchError

app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich")
out = Console()
err = Console(stderr=True)

METHOD_HELP = "diffmean (mean difference), logreg (L2 logistic regression, all layers at once), pca (first PC of paired differences), ccs (Contrast-Consistent Search, unsupervised, needs pairs)."


@app.command()
def fit(
    contrast: str = typer.Option("organism", help="'organism' (the shipped world's concept), or a JSONL file: {\"positive\": ..., \"negative\": ...} or {\"text\": ..., \"label\": 0|1} per line."),
    method: str = typer.Option("diffmean", help=METHOD_HELP),
    model: str = typer.Option("organism", help="Hub name, local folder, or 'organism'."),
    hook: str = typer.Option("hook_resid_post", help="Hook captured at every layer (TransformerLens name without the block)."),
    position: str = typer.Option("last", help="last (the text's last token) or mean (mean over its tokens). Tracking maps last → a round's last prompt token, mean → the mean over its response."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers (default: all)."),
    n: int = typer.Option(2000, help="organism: number of contrast texts to draw."),
    text_format: str = typer.Option("raw", "--format", help="JSONL texts: raw (as written) or chat (one user message through the chat template)."),
    test_fraction: float = typer.Option(0.25, help="Held-out fraction for accuracy and AUROC."),
    seed: int = typer.Option(0, help="Seed of the held-out split (and of CCS restarts)."),
    batch_size: int = typer.Option(64, help="Texts per forward pass."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="auto, float32, bfloat16 or float16."),
    out_path: Optional[Path] = typer.Option(None, "--out", help="Probe file to write. Default: artifacts/probes/<contrast>-<method>.h5"),
) -> None:
    """Find a concept direction at every layer from a contrast set; report held-out accuracy and AUROC."""
    from probes.contrast import load_contrast
    from probes.fit import fit_probe, save_fitted
    from probes.methods import METHODS, PAIRED_METHODS
    from workbench.capture import check_layers, hook_sites
    from workbench.models import load_model

    if method not in METHODS:
        raise WorkbenchError(f"--method must be one of {', '.join(sorted(METHODS))}, not {method!r}")
    if position not in ("last", "mean"):
        raise WorkbenchError(f"--position must be last or mean, not {position!r}")
    if not 0 < test_fraction < 1:
        raise WorkbenchError("--test-fraction must be between 0 and 1")
    loaded = load_model(model, device, dtype)
    chosen = check_layers(_ints(layers), loaded.n_layers)
    hook_sites(loaded, [hook], chosen)
    data = load_contrast(contrast, loaded.tokenizer, paired=method in PAIRED_METHODS, n=n, fmt=text_format)
    with _progress(len(data.token_ids)) as advance:
        ev, arrays = fit_probe(loaded, data, method, hook, chosen, position, test_fraction, seed, batch_size, advance)
    path = out_path or Path("artifacts/probes") / f"{Path(contrast).stem}-{method}.h5"
    save_fitted(path, loaded, data, method, hook, position, test_fraction, seed, ev, arrays)
    from probes.probe_file import load_probe

    _show(load_probe(path))


def _ints(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"--layers takes comma-separated integers, not {text!r}") from None


class _progress:
    """A progress bar over contrast texts on a terminal; silent otherwise."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if err.is_terminal:
            self.bar = Progress(TextColumn("[bold]activations"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=err)
            self.bar.start()
            task = self.bar.add_task("acts", total=self.total)
            return lambda k: self.bar.advance(task, k)
        return None

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def _show(probe) -> None:
    m = probe.meta
    c = m["contrast"]
    out.print(f"[bold]{probe.path}[/]  method={m['method']}  model={m['model_name']}  hook={m['hook']}  "
              f"position={m['position']}  d_model={m['d_model']}", highlight=False)
    out.print(f"contrast {c['name']}: {c['n']} texts ({c['n_positive']} positive, {c['n_pairs']} pairs), "
              f"digest {c['digest']}; held-out fraction {m['test_fraction']}, seed {m['seed']}", highlight=False)
    table = Table(header_style="bold")
    cols = ["layer", "train acc", "test acc", "test AUROC"]
    has_target = "test_target_spearman" in probe.arrays
    if has_target:
        cols.append("Spearman vs exact log-odds")
    for col in cols:
        table.add_column(col, justify="right")
    a = probe.arrays
    for j, layer in enumerate(a["layers"]):
        row = [str(int(layer)), f"{a['train_accuracy'][j]:.3f}", f"{a['test_accuracy'][j]:.3f}", f"{a['test_auroc'][j]:.3f}"]
        if has_target:
            row.append(f"{a['test_target_spearman'][j]:.3f}")
        style = "bold green" if int(layer) == probe.best_layer else None
        table.add_row(*row, style=style)
    out.print(table)
    out.print(f"best layer: {probe.best_layer}", highlight=False)


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
    from probes.probe_file import load_probe
    from probes.track import track as track_run

    probe = load_probe(probe_path)
    scores = track_run(run_path, probe, name)
    rows = list(probe.arrays["layers"]).index(probe.best_layer)
    proj = scores["projection"][:, :, rows]
    table = Table(title=f"{name or probe.name}: mean concept score at layer {probe.best_layer}", header_style="bold")
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
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
) -> None:
    """The study's BBQ variant: cosine between each round's prompt state and the stereotyped statement."""
    from probes.stereotype import stereotype_similarity
    from workbench.models import load_model
    from workbench.store import RunFile

    with RunFile(run_path) as run:
        recorded = run.meta.get("model_name")
    cos = stereotype_similarity(run_path, load_model(model or recorded, device), hook)
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
