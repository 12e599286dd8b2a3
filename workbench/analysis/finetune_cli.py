"""``workbench finetune``: the command line of :mod:`workbench.analysis.finetune` (registered by
:mod:`workbench.cli`). Heavy imports happen inside the command."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.text import Text

err = Console(stderr=True)


class StepReporter:
    """A progress bar with the loss and the time left on a terminal; in a log, a plain line at
    every tenth of the steps (and the last), each with the loss and the time left."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        self.t0 = 0.0  # the first step's end: the time left is measured from the steps after it
        self.last_line = 0

    def __call__(self, step: int, total: int, loss: float) -> None:
        if err.is_terminal:
            if self.progress is None:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

                self.progress = Progress(TextColumn("[bold]fine-tuning steps"), BarColumn(), MofNCompleteColumn(),
                                         TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn(), console=err)
                self.progress.start()
                self.task = self.progress.add_task("finetune", total=total, loss=loss)
            self.progress.update(self.task, completed=step, loss=loss)
            return
        now = time.perf_counter()
        if step == 1:
            self.t0 = now
        if step == total or step >= self.last_line + max(1, total // 10):
            self.last_line = step
            left = f", about {(now - self.t0) / (step - 1) * (total - step):.0f} s left" if step > 1 else ""
            print(f"step {step}/{total}: loss {loss:.4f}{left}", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def finetune_command(
    data: Path = typer.Option(..., "--data", metavar="FILE.jsonl", help="Training records: {\"text\": ...} per line (or the field --text-field names), or chat records {\"messages\": [{\"role\", \"content\"}, ...]} trained on the assistant turns only."),
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="Folder to write: the adapter in peft's format (or the merged model with --merge), finetune.json, loss.json, loss.png. Written under a temporary name and renamed when complete."),
    model: str = typer.Option("organism", help="Hugging Face hub name, local model folder, or 'organism'."),
    method: str = typer.Option("lora", help="Fine-tuning method: lora (through peft)."),
    rank: int = typer.Option(8, help="LoRA rank r."),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha (the update is scaled by alpha/r). Default: 2 × rank."),
    dropout: float = typer.Option(0.0, help="LoRA dropout."),
    target_modules: Optional[str] = typer.Option(None, metavar="NAME,...", help="Modules to adapt, e.g. q_proj,v_proj. Default: peft's choice for the architecture."),
    epochs: int = typer.Option(2, help="Passes over the data."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate (constant)."),
    batch_size: int = typer.Option(8, help="Records per optimiser step (right-padded)."),
    seed: int = typer.Option(0, help="Seed of LoRA's initial weights, the order of the records and dropout."),
    text_field: Optional[str] = typer.Option(None, help="The JSON field holding each text. Default: chat records if the file has \"messages\", else \"text\"."),
    max_length: Optional[int] = typer.Option(None, help="Cut longer records to this many tokens. Default: the model's context."),
    merge: bool = typer.Option(False, "--merge", help="Write a merged model folder (runs with --model DIR) instead of the adapter."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out folder that holds files (only once the new one is complete)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    dtype: str = typer.Option("float32", help="Model dtype while training: float32, bfloat16, float16 or auto."),
) -> None:
    """Fine-tune a model with LoRA on the texts of a JSONL file and save the adapter in peft's own
    format (loadable by PeftModel.from_pretrained), with its loss curve. Use it with
    `workbench run --adapter DIR`."""
    import shlex

    from workbench.analysis.finetune import FinetuneConfig, finetune
    from workbench.terminal import Spinner

    modules = tuple(m.strip() for m in target_modules.split(",") if m.strip()) if target_modules else None
    cfg = FinetuneConfig(data=data, out=out_dir, model=model, method=method, rank=rank, alpha=alpha, dropout=dropout,
                         target_modules=modules, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, text_field=text_field,
                         max_length=max_length, merge=merge, overwrite=overwrite, device=device, dtype=dtype,
                         command_line=shlex.join(["workbench", *sys.argv[1:]]))
    spinner, steps = Spinner(err), StepReporter()

    def on_step(step: int, total: int, loss: float) -> None:
        spinner.stop()
        steps(step, total, loss)

    try:
        record = finetune(cfg, on_step=on_step, on_status=spinner)
    finally:
        spinner.stop()
        steps.stop()
    what = "merged model" if merge else "adapter"
    err.print(Text(f"loss on the training data {record['loss_before']:.4f} → {record['loss_after']:.4f} nats/token "
                   f"({record['steps']} steps, {record['tokens_per_s']:.0f} tokens/s); {what} written to {out_dir}"),
              highlight=False, soft_wrap=True)
