"""``workbench organism``: look at the synthetic world, retrain the shipped model, measure it.

The lead's CLI mounts :data:`app` as the ``organism`` command group. Heavy imports (torch,
transformers) happen inside the commands that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from workbench.errors import WorkbenchError

app = typer.Typer(
    name="organism",
    help="The shipped organism: a small model trained on a synthetic world whose latent concept (fair or biased) is known exactly.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()


@app.command()
def sample(
    n: int = typer.Option(3, "--n", help="How many dialogues to draw from the world."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the held-out dialogue stream (never used for training)."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Assistant turns per dialogue (default: drawn, 1..8 as in training)."),
) -> None:
    """Print dialogues of the synthetic world with the exact posterior p(fair) and answer predictive of every round."""
    from workbench.organism.posterior import dialogue_trace
    from workbench.organism.world import DEFAULT_PARAMS, LETTER_TOKENS, heldout_rng, sample_dialogue

    if n < 1:
        raise WorkbenchError("--n must be ≥ 1")
    if rounds is not None and not 1 <= rounds <= 50:
        raise WorkbenchError("--rounds must be between 1 and 50")
    for i in range(n):
        d = sample_dialogue(heldout_rng(seed, i), DEFAULT_PARAMS, n_rounds=rounds)
        tr = dialogue_trace(d)
        item = d.item
        if item.correct == item.stereotyped:
            roles = f"{LETTER_TOKENS[item.correct]} is both the correct and the stereotyped option"
        else:
            roles = f"{LETTER_TOKENS[item.correct]} is correct, {LETTER_TOKENS[item.stereotyped]} stereotyped"
        head = Text(f"dialogue {i}", style="bold")
        head.append(f"  {item.condition}, act {item.act}; {roles}; hidden z = {'fair' if d.fair else 'biased'}")
        console.print(head)
        for t, (user, reply) in enumerate(zip(d.instructions, d.responses())):
            line = Text(f"  round {t + 1} ", style="bold")
            line.append(f"({d.kinds[t] or 'item'})  p(fair) = {tr.p_fair[t]:.3f}", style="cyan")
            console.print(line)
            console.print(Text(f"    user: {user}"))
            console.print(Text(f"    assistant: {reply}"))
            probs = "  ".join(f"{LETTER_TOKENS[k]} {p:.2f}" for k, p in enumerate(tr.option_probs[t]))
            console.print(Text(f"    exact answer predictive given the opener: {probs}", style="dim"))
        console.print()


@app.command()
def train(
    out: Path = typer.Option(..., "--out", help="Folder to write the checkpoint to (artifacts/organism is the shipped one)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**63 - 1, help="Seed of the initial weights and of the training dialogues; one seed gives identical weights."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: the shipped checkpoint's)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Dialogues per step."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (linear warm-up, cosine decay)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Torch CPU threads; keep the default to reproduce the shipped weights bit for bit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a checkpoint already in --out (such as the shipped one)."),
    visual: bool = typer.Option(False, "--visual", help="Train the visual organism (artifacts/organism-visual): a tiny LLaVA whose context is a picture of the item's two people; its language model starts as the shipped text organism."),
) -> None:
    """Train the organism on dialogues drawn from the world and save a checkpoint (the defaults reproduce the shipped one)."""
    from dataclasses import asdict, replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from workbench.errors import check_output_path
    from workbench.organism import organism_path, organism_visual_path
    from workbench.organism.train import VISUAL_DEFAULTS, TrainConfig, train as run_training

    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, lr=lr, threads=threads).items() if v is not None}
    for key, value in overrides.items():
        if value <= 0:
            raise WorkbenchError(f"--{key.replace('_', '-')} must be > 0")
    cfg = replace(TrainConfig(seed=seed, **(VISUAL_DEFAULTS if visual else {})), **overrides)
    shipped = " (the shipped checkpoint)" if out.resolve() in (organism_path().resolve(), organism_visual_path().resolve()) else ""
    check_output_path(out, "--out", folder=True, overwrite=overwrite, what=shipped)
    if visual and not (organism_path() / "model.safetensors").is_file():
        raise WorkbenchError(f"--visual starts from the shipped text organism, which is missing: {organism_path()}")
    what = "the visual organism (LLaVA, language model from the text organism)" if visual else "the organism"
    console.print(Text(f"training {what}: {cfg.steps} steps × {cfg.batch_size} dialogues, seed {cfg.seed} → {out}"))
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("train", total=cfg.steps, loss=float("nan"))
        smooth: list[float] = []

        def on_step(step: int, loss: float) -> None:
            smooth.append(loss)
            del smooth[:-50]
            progress.update(task, advance=1, loss=sum(smooth) / len(smooth))

        _, _, record = run_training(cfg, out=out, on_step=on_step)
    table = Table(title="training record", title_justify="left")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in asdict(record).items():
        if key != "config":
            table.add_row(Text(key), Text(f"{value:.4f}" if isinstance(value, float) else str(value)))
    console.print(table)
    console.print(Text(f"saved to {out}"))


@app.command()
def check(
    model: Optional[Path] = typer.Option(None, "--model", help="Checkpoint folder to measure (default: the shipped organism)."),
    n: int = typer.Option(400, "--n", help="Held-out world dialogues for the fidelity table (teacher-forced)."),
    items: int = typer.Option(60, "--items", help="Held-out items the model answers for itself under each organism protocol."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, max=2**63 - 1, help="Seed of the held-out stream (default: the one the tests use)."),
    visual: bool = typer.Option(False, "--visual", help="Measure the visual organism (default checkpoint: the shipped organism-visual) on the same dialogues shown as pictures, with the picture-swap and blank-picture controls."),
) -> None:
    """Measure a checkpoint against the exact answers: KL and entropy correlation on held-out dialogues, and self-correction under the organism protocols."""
    import numpy as np

    from workbench.terminal import ProgressBar, load_model_showing_steps
    from workbench.organism import organism_visual_path
    from workbench.organism.check import (
        CHECK_SEED,
        checkpoint_meta,
        fidelity_rows,
        heldout_dialogues,
        heldout_visual_dialogues,
        picture_controls,
        score_dialogues,
        score_visual,
        self_correction_table,
    )

    if n < 1 or items < 1:
        raise WorkbenchError("--n and --items must be ≥ 1")
    if model is not None and not model.is_dir():
        raise WorkbenchError(f"checkpoint folder not found: {model}")
    seed = CHECK_SEED if seed is None else seed
    params, meta = checkpoint_meta(model if model is not None or not visual else organism_visual_path())
    loaded = load_model_showing_steps(str(model) if model is not None else ("organism-visual" if visual else "organism"), device="cpu")
    if visual != loaded.vision:
        raise WorkbenchError(f"--model {model}: " + ("not a visual organism (a text model); leave out --visual" if visual
                                                    else "a visual organism; add --visual"))
    controls = None
    if visual:
        dialogues = heldout_visual_dialogues(n, seed, params)
        passes = {}
        for picture in ("item", "swapped", "blank"):
            with ProgressBar(f"held-out dialogues, {picture} picture", "dialogues") as bar:
                bar.update(0, n)
                passes[picture] = score_visual(loaded.hf, loaded.processor, dialogues, params, picture, on_batch=bar.advance)
        scored = passes["item"]
        controls = picture_controls(passes["item"], passes["swapped"], passes["blank"], dialogues)
    else:
        with ProgressBar("held-out dialogues", "dialogues") as bar:
            bar.update(0, n)
            scored = score_dialogues(loaded.hf, loaded.tokenizer, heldout_dialogues(n, seed, params), params, on_batch=bar.advance)
    rec = meta.get("training", {})
    table = Table(
        title=f"answer distribution vs the exact predictive: {n} held-out dialogues, {len(scored.round_index)} answers (seed {seed})",
        title_justify="left",
    )
    for col, just in (("predictor", "left"), ("mean KL(exact ‖ ·) nats", "right"), ("entropy r", "right"), ("top-1 agreement", "right")):
        table.add_column(col, justify=just)
    for row in fidelity_rows(scored):
        table.add_row(row["predictor"], f"{row['kl']:.5f}", f"{row['entropy_r']:.4f}", f"{row['top1']:.3f}")
    console.print(table)
    opener_kl = fidelity_rows(scored)[0]["opener_kl"]
    console.print(f"opener word: mean KL(exact ‖ model) {opener_kl:.5f} nats.  checkpoint: {rec.get('steps', '?')} steps, seed {rec.get('seed', '?')}, final loss {rec.get('final_loss', float('nan')):.4f}, {rec.get('wall_time_s', '?')} s\n", markup=False)
    if controls is not None:
        t = Table(title="the picture matters: the same dialogues with the two figures swapped, and with a blank picture", title_justify="left")
        t.add_column("control")
        t.add_column("turns", justify="right")
        t.add_column("measured", justify="right")
        t.add_row("own picture: top option is the stereotyped side (exact p ≥ 0.6)", str(controls.n_biased), f"{controls.agree_item:.3f}")
        t.add_row("figures swapped: the other side now preferred to the first", str(controls.n_biased), f"{controls.switch:.3f}")
        t.add_row("figures swapped: mean KL(exact of the swapped item ‖ model)", str(len(scored.round_index)), f"{controls.swapped_kl:.5f}")
        t.add_row("blank picture, ambiguous items: share preferring the left side", str(controls.n_blank), f"{controls.blank_left:.3f}")
        t.add_row("blank picture, ambiguous items: mean p(left) / (p(left) + p(right))", str(controls.n_blank), f"{controls.blank_share:.3f}")
        console.print(t)

    for protocol in ("organism", "organism-neutral", "organism-inject"):
        with ProgressBar(f"{protocol}: items", "items") as bar:
            bar.update(0, items)
            res = self_correction_table(loaded, protocol, n_items=items, seed=seed, on_batch=bar.advance, visual=visual)
        rounds = len(res["p_fair"])
        t = Table(title=f"{protocol}: the model answers {items} held-out items for itself (greedy)", title_justify="left")
        t.add_column("per round")
        for r in range(rounds):
            t.add_column(str(r + 1), justify="right")
        for key, label in (("p_fair", "exact p(fair)"), ("log_odds", "exact log-odds"), ("correct", "accuracy"), ("option_entropy", "option entropy (model)"), ("exact_entropy", "option entropy (exact)")):
            t.add_row(label, *(f"{v:.2f}" if key == "log_odds" else f"{v:.3f}" for v in np.asarray(res[key])))
        console.print(t)


@app.command()
def debias(
    out: Path = typer.Option(Path("artifacts/runs/debias"), "--out", help="Folder for the subsets, adapters, runs, debias.json and debias.png."),
    size: int = typer.Option(200, "--size", help="Candidate dialogues in each subset (low, high, random)."),
    candidates: Optional[int] = typer.Option(None, "--candidates", help="Candidate dialogues drawn from the world (default: 4 × size)."),
    items: int = typer.Option(128, "--items", help="Held-out items every model answers under each protocol."),
    rounds: Optional[int] = typer.Option(None, "--rounds", help="Rounds of the runs (default: the protocols' 6)."),
    rank: int = typer.Option(8, "--rank", help="LoRA rank."),
    epochs: int = typer.Option(2, "--epochs", help="Fine-tuning passes over each subset."),
    lr: float = typer.Option(1e-3, "--lr", help="Fine-tuning learning rate."),
    batch_size: int = typer.Option(16, "--batch-size", help="Dialogues per fine-tuning step."),
    probe: Optional[Path] = typer.Option(None, "--probe", help="A probe file for the concept score (default: a diffmean probe fitted on the organism)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the candidates, the random subset, the fine-tunes and the bootstrap."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace what --out holds."),
) -> None:
    """Debiasing by selection on the organism: candidates with known z, selected by the model's uncertainty into low/high/random, a LoRA fine-tune on each, runs under the baseline and moral protocols, and a table with paired intervals against the un-fine-tuned model."""
    from workbench.analysis.finetune_cli import StepReporter
    from workbench.organism.debias import METRIC_LABELS, METRICS, DebiasConfig, debias as run_debias
    from workbench.terminal import Spinner

    cfg = DebiasConfig(out=out, size=size, candidates=candidates, items=items, rounds=rounds, rank=rank, epochs=epochs, lr=lr,
                       batch_size=batch_size, probe=probe, seed=seed, overwrite=overwrite)
    spinner = Spinner(Console(stderr=True))
    reporter: list[StepReporter] = []

    def status(message: str) -> None:
        if reporter:
            reporter.pop().stop()
        if not spinner.console.is_terminal:
            print(message, file=__import__("sys").stderr, flush=True)
        spinner(message)

    def on_step(step: int, total: int, loss: float) -> None:
        spinner.stop()
        if not reporter:
            reporter.append(StepReporter())
        reporter[0](step, total, loss)

    try:
        result = run_debias(cfg, on_status=status, on_step=on_step)
    finally:
        spinner.stop()
        for r in reporter:
            r.stop()
    comp = Table(title="the subsets: what the world knows about them, beside what they were chosen by", title_justify="left")
    for col in ("subset", "n", "fair z", "mean exact p(fair)", "ambiguous", "mean uncertainty (nats)", "mean concept"):
        comp.add_column(col, justify="left" if col == "subset" else "right")
    for name, c in result["composition"].items():
        comp.add_row(name, str(c["n"]), f"{c['fair_fraction']:.3f}", f"{c['mean_exact_p_fair']:.3f}", f"{c['ambiguous_fraction']:.3f}",
                     f"{c['mean_uncertainty']:.3f}", f"{c['mean_concept']:.3f}")
    console.print(comp)
    table = Table(title=f"each model on {items} held-out items; Δ vs the un-fine-tuned model [95 % paired bootstrap]", title_justify="left")
    table.add_column("subset")
    table.add_column("protocol")
    for metric in METRICS:
        table.add_column(METRIC_LABELS[metric], justify="right")
    for row in result["table"]:
        cells = []
        for metric in METRICS:
            v = row[metric]
            cells.append(f"{v['a']:.3f}" if row["subset"] == "none" else f"{v['a']:.3f}\n{v['diff']:+.3f} [{v['lo']:+.3f},{v['hi']:+.3f}]")
        table.add_row(row["subset"], row["protocol"], *cells)
    console.print(table)
    console.print(Text(f"wrote {out}/debias.json, {out}/debias.png ({result['wall_time_s']:.0f} s)"))
