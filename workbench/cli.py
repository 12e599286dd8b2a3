"""The ``workbench`` command line (Typer). Heavy imports happen inside commands, so ``--help`` is instant.

Every user error is a :class:`workbench.errors.WorkbenchError`: :func:`main` prints its one line
and exits with status 2, without a traceback.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from workbench.errors import WorkbenchError

app = typer.Typer(
    name="workbench",
    help="Self-correction workbench: run a model through rounds of self-correction, capture every "
    "round's residual stream, and measure uncertainty and latent concepts round by round.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    add_completion=False,
)
err = Console(stderr=True)
out = Console()


@functools.cache
def _mount_subcommands() -> None:
    """Add the `organism` and `probe` command groups (once, however often main() is called)."""
    from workbench.organism.cli import app as organism_app
    from probes.cli import app as probe_app

    app.add_typer(organism_app, name="organism", help="The shipped organism: sample its world, train it, check it against the exact answers.")
    app.add_typer(probe_app, name="probe", help="Find latent concept directions and track them round by round.")
    from workbench.export import export_command

    app.command("export")(export_command)
    from workbench import analysis_cli

    app.command("analyze")(analysis_cli.analyze)
    app.command("report")(analysis_cli.report)
    app.command("theory")(analysis_cli.theory)
    app.command("select")(analysis_cli.select)
    from tui.cli import tui as tui_command

    app.command(name="tui")(tui_command)


@app.command()
def run(
    out_path: Path = typer.Option(None, "--out", help="Run file to write (HDF5). Default: artifacts/runs/<model>-<protocol>.h5"),
    model: str = typer.Option("organism", help="Hugging Face hub name, local model folder, or 'organism' (the shipped model)."),
    task: str = typer.Option("organism", help="bbq (BBQ JSONL files as published), prompts (open-ended JSONL), or organism."),
    data: list[Path] = typer.Option([], help="Data file(s): BBQ JSONL (repeatable) or a prompts JSONL."),
    condition: Optional[str] = typer.Option(None, help="BBQ: keep only 'ambig' or 'disambig' contexts."),
    category: Optional[str] = typer.Option(None, help="BBQ: keep one category (e.g. Religion)."),
    prompt_field: str = typer.Option("prompt", help="prompts: the JSON field holding the prompt."),
    limit: Optional[int] = typer.Option(None, help="Number of samples (after filtering and --offset). organism default: 64."),
    offset: int = typer.Option(0, help="Skip this many samples first."),
    protocol: str = typer.Option("organism", help="Built-in protocol name (bbq-paper, bbq-baseline, bbq-negation, organism, organism-neutral, organism-inject) or a .toml path."),
    rounds: Optional[int] = typer.Option(None, help="Number of rounds (overrides the protocol)."),
    inject: list[str] = typer.Option([], help="Inject an instruction at a round, replacing its follow-up: ROUND:TEXT (repeatable)."),
    batch_size: int = typer.Option(16, help="Samples generated together (left padding, KV cache)."),
    hooks: str = typer.Option("hook_resid_post", help="Comma-separated TransformerLens hook names captured at every layer, e.g. hook_resid_post,hook_resid_mid (any d_model-wide hook at a module boundary)."),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layers to capture (default: all)."),
    activation_dtype: str = typer.Option("float32", help="Stored activation dtype: float32 or float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("auto", help="Model dtype: auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code from the hub (off by default)."),
    seed: int = typer.Option(0, help="Seed for sampled decoding."),
    sample: Optional[bool] = typer.Option(None, "--sample/--greedy", help="Sample instead of greedy decoding (default: the protocol's)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest answer per round (default: the protocol's)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run in the same --out file."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
) -> None:
    """Run a model through rounds of self-correction and store every round in one HDF5 run file."""
    from workbench.protocol import parse_inject
    from workbench.run import RunConfig, run_protocol

    if out_path is None:
        stem = Path(model).name if model != "organism" else "organism"
        out_path = Path("artifacts/runs") / f"{stem}-{Path(protocol).stem}.h5"
    cfg = RunConfig(
        out=out_path, model=model, task=task, data=tuple(str(p) for p in data), condition=condition,
        category=category, prompt_field=prompt_field, limit=limit, offset=offset, protocol=protocol,
        rounds=rounds, inject=parse_inject(inject), batch_size=batch_size,
        hooks=tuple(h.strip() for h in hooks.split(",") if h.strip()),
        layers=_int_list(layers, "--layers"), activation_dtype=activation_dtype, device=device,
        dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, seed=seed, do_sample=sample,
        max_new_tokens=max_new_tokens, resume=resume, overwrite=overwrite,
    )
    with _ProgressReporter() as reporter:
        run_file = run_protocol(cfg, on_batch=reporter.update)
    with run_file:
        _print_summary(run_file)


def _int_list(text: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    if text is None:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise WorkbenchError(f"{option} takes comma-separated integers, not {text!r}") from None


class _ProgressReporter:
    """A rich progress bar (samples × rounds, tokens/s, ETA) on a terminal; a plain line per batch otherwise."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task_id: Any = None
        self.tokens = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_ProgressReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, p: Any) -> None:
        """Called once before the first batch (new_tokens = 0), after every round and after every batch."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        total, done = p.total_samples * p.rounds, p.done_rounds
        if p.new_tokens == 0 and p.batch_rounds == 0:
            self.t0 = time.perf_counter()  # the model is loaded: start the clock
        if p.batch_rounds:
            self.tokens += p.new_tokens  # a written batch repeats its rounds' tokens
        speed = f"{self.tokens / max(1e-9, time.perf_counter() - self.t0):.0f} tok/s"
        if not err.is_terminal:
            if p.batch_rounds == 0:
                what = "batch done" if p.new_tokens else "starting at"
                print(f"{what}: {p.done_samples}/{p.total_samples} samples ({speed})", file=sys.stderr, flush=True)
        elif self.progress is None:
            self.progress = Progress(
                TextColumn("[bold]samples × rounds"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), console=err,
                speed_estimate_period=600,  # a round of a large model can take longer than rich's default 30 s
            )
            self.progress.start()
            self.task_id = self.progress.add_task("run", total=total, completed=done, speed="")
        else:
            self.progress.update(self.task_id, completed=done, speed=speed)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


COLUMN_LABELS = {
    "round": "round", "accuracy": "acc", "mean_token_entropy": "tok H", "mean_option_entropy": "opt H",
    "mean_chosen_confidence": "conf", "ece": "ECE", "ece_range": "ECE min–max", "unparseable": "unparsed",
    "right_to_wrong": "R→W", "wrong_to_right": "W→R", "accuracy_parsed": "acc parsed", "accuracy_option": "acc option",
}
JSON_ONLY = ("parsed_right_to_wrong", "parsed_wrong_to_right", "option_right_to_wrong", "option_wrong_to_right")


def _print_summary(run_file: Any) -> None:
    """The run's header line, the per-round metrics table, a table of task fields and concept
    scores when there are any, and the convergence rounds."""
    from workbench.analysis import summary

    s = summary(run_file)
    out.print(f"{s['path']}  model={s['model']}  protocol={s['protocol']}  task={s['task']}  "
              f"samples={s['n_done']}/{s['n_samples']}  status={s['status']}", markup=False, highlight=False)
    rows = s["rounds"]
    if not rows:
        return
    metrics = [k for k in rows[0] if k in COLUMN_LABELS]
    others = [k for k in rows[0] if k not in COLUMN_LABELS and k != "n" and k not in JSON_ONLY]
    for columns in (metrics, ["round", *others] if others else []):
        if not columns:
            continue
        table = Table(show_header=True, header_style="bold")
        for c in columns:
            table.add_column(COLUMN_LABELS.get(c, c.removeprefix("mean_").replace("_", " ").replace(":", " ")), justify="right", overflow="fold")
        for r in rows:
            table.add_row(*[_fmt(r[c]) for c in columns])
        out.print(table)
    conv = {COLUMN_LABELS.get(k, k.removeprefix("mean_")): c for k, c in s["convergence_detail"].items()}
    if conv:
        out.print("convergence (|Δ| < ε every step to the end, ε = 0.05 × the metric's range): " + ", ".join(
            f"{k} {c['round'] if c['round'] is not None else c['status']}" for k, c in conv.items()), markup=False, highlight=False)


@app.command()
def info(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`, or a cache file from `workbench export`."),
    as_json: bool = typer.Option(False, "--json", help="Print metadata and the per-round table as JSON."),
) -> None:
    """Show a run file's metadata and per-round table, or what a cache file from `workbench export` holds."""
    from workbench.cache_file import is_cache_file, print_cache_info

    if is_cache_file(run_path):
        return print_cache_info(run_path, as_json)
    from workbench.analysis import summary
    from workbench.store import RunFile

    with RunFile(run_path) as run_file:
        if as_json:
            s = summary(run_file)
            print(json.dumps(_finite(s), indent=2, default=_json_default, allow_nan=False))
        else:
            _print_summary(run_file)


def _finite(value: Any) -> Any:
    """NaN → null, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def main() -> None:
    """Console entry point: run the app, turning WorkbenchError into one line and exit status 2."""
    try:
        _mount_subcommands()
        app()
    except WorkbenchError as e:
        from rich.text import Text

        err.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; finished batches are kept (continue with --resume)")
        sys.exit(130)
