"""The ``workbench`` command line (Typer). Heavy imports happen inside commands, so ``--help`` is instant.

Every user error is a :class:`workbench.errors.WorkbenchError`: :func:`main` prints its one line
and exits with status 2, without a traceback.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from workbench.errors import WorkbenchError, parse_int_list
from workbench.engine.models import Device, ModelDtype
from workbench.terminal import ProgressBar, Spinner

app = typer.Typer(
    name="workbench",
    help="Self-correction workbench: run a model through rounds of self-correction, capture every "
    "round's residual stream, and measure uncertainty and latent concepts round by round.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: one line per option at 80 columns, no <type> noise
    add_completion=True,
)
err = Console(stderr=True)
out = Console()

Task = Literal["organism", "bbq", "mc", "prompts", "vqa", "vqa-open", "organism-visual"]
ActivationDtype = Literal["float32", "float16"]
Condition = Literal["ambig", "disambig"]
OptionScoring = Literal["letter", "letter-text"]


def _version(value: bool) -> None:
    if value:
        from workbench.version import __version__

        print(f"workbench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


@functools.cache
def _mount_subcommands() -> None:
    """Add the command groups (once, however often main() is called): the place every group registers."""
    from workbench.organism.cli import app as organism_app
    from probes.cli import app as probe_app

    app.add_typer(organism_app, name="organism", help="The shipped organism: sample its world, train it, check it against the exact answers.")
    app.add_typer(probe_app, name="probe", help="Find latent concept directions and track them round by round.")
    app.add_typer(protocol_app, name="protocol", help="List and show the built-in protocols.")
    from workbench.cache.export import export_command

    app.command("export")(export_command)
    from workbench.analysis import cli as analysis_cli

    app.command("analyze")(analysis_cli.analyze)
    app.command("report", cls=analysis_cli.NamedArgumentsCommand)(analysis_cli.report)
    app.command("theory")(analysis_cli.theory)
    app.command("select")(analysis_cli.select)
    from workbench.analysis.finetune_cli import finetune_command

    app.command("finetune")(finetune_command)
    from tui.cli import tui as tui_command

    app.command(name="tui")(tui_command)


protocol_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None)


@protocol_app.command("list")
def protocol_list() -> None:
    """The built-in protocols: name, task, rounds, and what each is for."""
    from workbench.engine.protocol import builtin_protocols, load_protocol

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("name", "task", "rounds", "description"):
        table.add_column(col, no_wrap=col != "description", justify="right" if col == "rounds" else "left")
    for name in builtin_protocols():
        p = load_protocol(name)
        table.add_row(Text(p.name), Text(p.task or "any"), str(p.rounds), Text(p.description))
    out.print(table)


@protocol_app.command("show")
def protocol_show(
    name: str = typer.Argument(..., help="A built-in protocol name or a .toml path."),
    show_template: bool = typer.Option(False, "--template", help="Also print the protocol's chat template file."),
) -> None:
    """Every round's user message and assistant prefix, the system message, where the texts were
    quoted from, the chat template, the injections and the decoding settings."""
    from workbench.engine.protocol import load_protocol

    p = load_protocol(name)
    d = p.decoding
    decoding = f"sampled (temperature {d.temperature}, top_p {d.top_p})" if d.do_sample else "greedy"
    lines = [f"{p.name}: {p.description}" if p.description else p.name,
             f"task {p.task or 'any'}, {p.rounds} rounds, {decoding}, at most {d.max_new_tokens} new tokens per answer, "
             f"option scoring {p.option_scoring}"]
    if p.source:
        lines.append(f"quoted from: {p.source}")
    lines.append(f"chat template: {p.chat_template_file}" if p.chat_template else "chat template: the model's own")
    if p.system:
        lines.append(f"system: {p.system}")
    lines.append("")
    for t in range(1, p.rounds + 1):
        user = p.first if t == 1 else p.instruction(t)
        tag = " (injected)" if t in p.inject else ""
        lines.append(f"round {t}{tag}\n  user: {user}")
        if p.prefix(t):
            prefix = p.prefix(t)  # quoted when its own whitespace matters (the study's raw [INST] prefixes)
            lines.append(f"  assistant begins: {json.dumps(prefix, ensure_ascii=False) if prefix != prefix.strip() else prefix}")
    if p.chat_template and show_template:
        lines += ["", f"chat template ({p.chat_template_file}):", p.chat_template]
    out.print("\n".join(lines), markup=False, highlight=False, soft_wrap=True)  # the texts exactly, never re-wrapped


@app.command()
def run(
    out_path: Optional[Path] = typer.Option(None, "--out", help="Run file to write (HDF5). Default: artifacts/runs/<model>-<protocol>.h5"),
    model: str = typer.Option("organism", help="Hugging Face hub name, local model folder, 'organism' (the shipped model) or 'organism-visual' (the shipped visual organism, a tiny LLaVA; with --task organism-visual)."),
    task: Task = typer.Option("organism", help="bbq: BBQ JSONL files as published; mc: any multiple-choice file (--fields); prompts: open-ended prompts; organism: the shipped world; vqa: multiple-choice questions about pictures, vqa-open: open-ended ones (JSONL lines {\"image\": \"imgs/001.png\", \"question\": ..., \"options\": [...], \"label\": 1}, image paths relative to the file; an image-text-to-text --model: LLaVA, LLaVA-NeXT or Gemma3); organism-visual: the organism's world with its two people shown in a picture (--model organism-visual)."),
    data: list[Path] = typer.Option([], metavar="FILE", help="Data file(s): BBQ JSONL (repeatable); for mc (repeatable) and prompts a JSONL, a CSV (header line), a folder saved by datasets' save_to_disk, or (prompts) a .txt of one prompt per line; for vqa/vqa-open a JSONL."),
    condition: Optional[Condition] = typer.Option(None, help="BBQ: keep only ambiguous or disambiguated contexts."),
    category: Optional[str] = typer.Option(None, help="BBQ: keep one category (e.g. Religion)."),
    prompt_field: str = typer.Option("prompt", help="prompts: the JSON field holding the prompt."),
    fields: Optional[str] = typer.Option(None, metavar="NAME=PATH,...", help="mc and prompts: where each field is in a record; PATH is a key or dotted keys into nested records (prompt.text; choices.0). mc: id, context, question, options (a list field, or A|B|C: one field per option), label (an option's index or text), category. prompts: text, id."),
    options: Optional[str] = typer.Option(None, metavar="A|B|...", help="mc: the same options for every row, e.g. \"yes, this is harmful|no, this is not harmful\" (instead of --fields options=...)."),
    limit: Optional[int] = typer.Option(None, help="Number of samples (after filtering and --offset). organism default: 64."),
    offset: int = typer.Option(0, help="Skip this many samples first."),
    protocol: Optional[str] = typer.Option(None, metavar="NAME|FILE", help="A built-in protocol (`workbench protocol list`) or a .toml path. Default: the task's own (bbq: bbq-paper, organism: organism, prompts: prompts, vqa: vqa-moral, vqa-open: vqa-open)."),
    force: bool = typer.Option(False, "--force", help="Run a protocol written for another task."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", metavar="FILE", help="A Jinja chat template file used instead of the model's own and the protocol's (e.g. the raw [INST] strings the study fed zephyr); recorded in the run file."),
    rounds: Optional[int] = typer.Option(None, help="Number of rounds (overrides the protocol)."),
    inject: list[str] = typer.Option([], metavar="ROUND:TEXT", help="Replace a round's follow-up with TEXT (repeatable)."),
    option_scoring: Optional[OptionScoring] = typer.Option(None, help="What option confidence scores: the letter ' (a)' (the study's, default) or ' (a) option text'."),
    batch_size: int = typer.Option(16, help="Samples generated together (left padding, KV cache)."),
    hooks: str = typer.Option("hook_resid_post", metavar="HOOK,...", help="TransformerLens hooks captured at every layer, e.g. hook_resid_post,hook_resid_mid."),
    layers: Optional[str] = typer.Option(None, metavar="N,...", help="Layers to capture (default: all)."),
    activation_dtype: ActivationDtype = typer.Option("float32", help="Stored activation dtype."),
    device: Device = typer.Option("auto", help="auto: cuda, else mps, else cpu."),
    dtype: ModelDtype = typer.Option("auto", help="Model dtype; auto: bfloat16 on CUDA, else float32."),
    device_map: Optional[str] = typer.Option(None, metavar="auto|balanced|sequential|JSON|FILE", help="Place a model too large for one device over several (Hugging Face/accelerate device_map): a strategy, a JSON object {module: device} or a JSON file; devices are GPU indices, cpu or disk. Replaces --device."),
    max_memory: Optional[str] = typer.Option(None, metavar="DEV=SIZE,...", help="With --device-map: the memory budget per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB."),
    revision: Optional[str] = typer.Option(None, help="Hub revision (branch, tag or commit)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own Python code from the hub."),
    seed: int = typer.Option(0, help="Seed for sampled decoding (--sample, --samples-per-round). It does not change the organism's items: --world-seed does."),
    world_seed: Optional[int] = typer.Option(None, help="--task organism: seed of the world draw — the held-out items and, under organism-world, each sample's follow-ups (default 1234, the stream the docs' figures use). Recorded in the run file; --resume refuses another."),
    sample: Optional[bool] = typer.Option(None, "--sample/--greedy", show_default=False, help="Sample or decode greedily (default: the protocol's)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest answer per round (default: the protocol's)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in the same --out file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
    fsync: bool = typer.Option(True, "--fsync/--no-fsync", help="--fsync: wait for the disk (at most once a second, and at the end), so that a power cut or a kernel crash loses at most the last second's batches. --no-fsync: never wait; a killed or failed process still loses nothing finished, but a power cut loses the batches not yet on the disk and can damage a run file finished in the last ~30 s."),
    scorer: Optional[str] = typer.Option(None, metavar="toxicity:MODEL|python:MODULE:FUNCTION|refusal|label-match", help="prompts, vqa-open: score every round's answer into rounds/score. toxicity:MODEL: a Hugging Face sequence classifier (hub name or folder), the probability of one label; python:MODULE:FUNCTION: your FUNCTION(texts), given the round's answers as a list of strings, returns a list of floats, one per text (MODULE importable from the working directory: it is imported and run with your permissions, so name only code you trust); FUNCTION(texts, samples) also gets each text's sample (gold, options, extra: the row's other fields); refusal: 1 when the answer holds a GCG-style refusal phrase or has under 20 words (the study's jailbreak check); label-match: 1 when the gold label (--fields label=PATH) occurs in the answer."),
    scorer_label: Optional[str] = typer.Option(None, metavar="LABEL", help="The classifier label --scorer scores (name or index). Default: the one named toxic, else positive."),
    samples_per_round: int = typer.Option(0, metavar="K", help="Also draw K seeded sampled answers per round from the same prompt (the conversation goes on with the protocol's own answer) and store semantic entropy over them (discrete, probability-weighted, and the study's estimator). 0: off."),
    equivalence: str = typer.Option("exact", metavar="exact|nli:MODEL|nli-nocontra:MODEL", help="How --samples-per-round answers are clustered: exact (normalised exact match), nli:MODEL (bidirectional entailment with a Hugging Face NLI classifier, Kuhn/Farquhar) or nli-nocontra:MODEL (the study's: merged unless either direction is contradiction)."),
    likelihood: str = typer.Option("no-stop", metavar="no-stop|with-stop", help="The sampled answers' mean token log-likelihood (the weighted semantic entropy's): no-stop, Farquhar et al.'s (the stop token excluded), or with-stop (it included)."),
    adapter: Optional[Path] = typer.Option(None, metavar="DIR", help="A LoRA adapter folder (peft's format, e.g. from `workbench finetune`), merged into the model's weights after it loads; its path and sha256 are recorded, and --resume refuses another."),
    steer: list[str] = typer.Option([], metavar="FILE@LAYER=ALPHA", help="Add ALPHA × the unit direction at a layer in every forward pass of the chosen rounds (repeatable). FILE: a probe file (its hook; LAYER a number, all: each fitted layer its own direction, or blocks.L.HOOK), a .npy or .safetensors vector. E.g. fair.h5@3=+4."),
    ablate: list[str] = typer.Option([], metavar="FILE@LAYER", help="Project the direction out (repeatable), e.g. fair.h5@all."),
    clamp: list[str] = typer.Option([], metavar="FILE@LAYER=VALUE|pNN", help="Set the projection on the direction to VALUE (or the NN-th percentile of the probe's contrast-set projections, when the probe file holds them) (repeatable)."),
    steer_rounds: Optional[str] = typer.Option(None, metavar="A-B|N,...", help="Rounds the interventions act in (1-based, e.g. 2-6). Default: every round."),
    steer_positions: str = typer.Option("all", metavar="prompt|response|all", help="Which tokens of those rounds: the round's new prompt tokens, its generated ones (option scoring included), or both."),
    control: Optional[str] = typer.Option(None, metavar="random", help="random: the same interventions along seeded random directions of the same norms (a control run; the seeds are recorded)."),
    control_seed: int = typer.Option(0, help="Seed of --control random's first direction (the i-th uses seed + i)."),
    lookup: bool = typer.Option(True, "--lookup/--no-lookup", help="Greedy rounds: draft each answer's next tokens from the row's earlier answers (a self-correcting model mostly repeats itself) and verify the draft in one pass, keeping what greedy decoding chooses anyway: the same tokens in fewer passes; logits, entropies and activations agree with one-token steps to float rounding (about 1e-6), not bit for bit; their prefills compute the last layer only where it is read (the cache is unchanged). --no-lookup: one pass per token over every position, generate's numbers bit for bit. Sampled decoding (--sample) never drafts."),
    shard: Optional[str] = typer.Option(None, metavar="K/N", help="Run shard K of N, K counted from 0 (0/8 … 7/8): contiguous, batch-aligned samples into OUT.shards/shard-KKK-of-NNN.h5; the last shard to finish merges all into --out. Under torchrun or accelerate launch, RANK/WORLD_SIZE choose the shard and LOCAL_RANK the device (cuda:LOCAL_RANK, else cpu)."),
) -> None:
    """Run a model through rounds of self-correction and store every round in one HDF5 run file.

    Data-parallel: `torchrun --nproc-per-node 8 -m workbench run ...` (or `accelerate launch
    --multi_gpu --num_processes 8 -m workbench run ...`) gives each rank one shard; `--shard K/N`
    runs one by hand.
    """
    import shlex

    from workbench.engine.protocol import parse_inject
    from workbench.engine.run import RunConfig, run_protocol
    from workbench.engine.tasks import default_protocol
    from probes.directions import interventions_from_options

    interventions = interventions_from_options(steer, ablate, clamp, steer_rounds, steer_positions, control, control_seed)

    if out_path is None:
        stem = Path(model).name if model != "organism" else "organism"
        out_path = Path("artifacts/runs") / f"{stem}-{Path(protocol or default_protocol(task)).stem}.h5"
    cfg = RunConfig(
        out=out_path, model=model, task=task, data=tuple(str(p) for p in data), condition=condition,
        category=category, prompt_field=prompt_field, fields=fields, options=options, limit=limit, offset=offset, protocol=protocol,
        rounds=rounds, inject=parse_inject(inject), batch_size=batch_size,
        hooks=tuple(h.strip() for h in hooks.split(",")),
        layers=parse_int_list(layers, "--layers"), activation_dtype=activation_dtype, device=device,
        dtype=dtype, revision=revision, trust_remote_code=trust_remote_code, seed=seed, world_seed=world_seed, do_sample=sample,
        max_new_tokens=max_new_tokens, resume=resume, overwrite=overwrite, fsync=fsync, option_scoring=option_scoring,
        force=force, chat_template=None if chat_template is None else str(chat_template), command_line=shlex.join(["workbench", *sys.argv[1:]]), device_map=device_map, max_memory=max_memory,
        scorer=scorer, scorer_label=scorer_label, samples_per_round=samples_per_round, equivalence=equivalence,
        likelihood=likelihood, shard=shard, adapter=str(adapter) if adapter is not None else None, interventions=interventions,
        lookup=lookup,
    )
    merge_notes: list[str] = []
    try:
        with _ProgressReporter(_launched_rank(shard)) as reporter:
            run_file = run_protocol(cfg, on_batch=reporter.update, on_status=reporter.status, on_merge=merge_notes.append)
    except KeyboardInterrupt:
        err.print(Text(f"interrupted; finished batches are kept in {out_path}. Continue with:\n  "
                       f"{shlex.join(['workbench', *_resume_args(sys.argv[1:], out_path)])}"), highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    with run_file:
        if "shard" in run_file.f.attrs:  # a shard waiting for the others: no table of its own
            plan = json.loads(str(run_file.f.attrs["shard"]))
            merge_notes.insert(0, f"shard {plan['index']}/{plan['count']} done ({run_file.path});")
        if merge_notes:
            err.print(Text(" ".join(merge_notes)), highlight=False, soft_wrap=True)
        if "shard" not in run_file.f.attrs:
            _print_summary(run_file)


@app.command()
def sweep(
    steer: str = typer.Option(..., metavar="FILE@LAYER", help="The direction and place to steer (as for run --steer, without =ALPHA), e.g. fair.h5@3."),
    alphas: str = typer.Option("-8,-4,-2,0,2,4,8", metavar="A,B,...", help="The αs, one run each (0: the base run, no intervention)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the runs and sweep.json (`workbench report DIR` draws them)."),
    control: str = typer.Option("random", metavar="random|none", help="random: at every α ≠ 0 also a run along a seeded random direction of the same norm."),
    control_seed: int = typer.Option(0, help="Seed of the control's random direction (the same at every α)."),
    steer_rounds: Optional[str] = typer.Option(None, metavar="A-B", help="Rounds steered (default: all)."),
    steer_positions: str = typer.Option("all", metavar="prompt|response|all", help="Which tokens of those rounds."),
    limit: Optional[int] = typer.Option(None, help="Number of samples (organism default: 64)."),
    offset: int = typer.Option(0, help="Skip this many samples first."),
    protocol: Optional[str] = typer.Option(None, metavar="NAME|FILE", help="Protocol (default: the task's own)."),
    rounds: Optional[int] = typer.Option(None, help="Number of rounds (overrides the protocol)."),
    model: str = typer.Option("organism", help="Model (as for run)."),
    task: Task = typer.Option("organism", help="Task (as for run)."),
    data: list[Path] = typer.Option([], metavar="FILE", help="Data file(s) (as for run)."),
    batch_size: int = typer.Option(16, help="Samples generated together."),
    hooks: str = typer.Option("hook_resid_post", metavar="HOOK,...", help="Hooks captured (as for run)."),
    device: Device = typer.Option("auto", help="auto: cuda, else mps, else cpu."),
    dtype: ModelDtype = typer.Option("auto", help="Model dtype."),
    seed: int = typer.Option(0, help="Seed for sampled decoding."),
    resume: bool = typer.Option(False, "--resume", help="Keep the finished runs of an interrupted sweep and continue the rest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the sweep's run files."),
) -> None:
    """A steering sweep: one run per α on the same samples (the model loaded once), plus the random
    control at every α ≠ 0; sweep.json lists them. Then `workbench report DIR` draws the dose-response."""
    import shlex

    from probes.directions import interventions_from_options
    from workbench.engine.run import RunConfig, run_protocol

    try:
        values = sorted({float(a) for a in alphas.split(",") if a.strip()})
    except ValueError:
        raise WorkbenchError(f"--alphas takes comma-separated numbers, not {alphas!r}") from None
    if not values or not all(math.isfinite(a) for a in values):
        raise WorkbenchError(f"--alphas takes finite numbers, not {alphas!r}")
    if control not in ("random", "none"):
        raise WorkbenchError(f"--control takes random or none, not {control!r}")
    if "=" in steer:
        raise WorkbenchError(f"--steer {steer}: a sweep takes the αs from --alphas; give FILE@LAYER without =VALUE")
    values = sorted(set(values) | {0.0})
    plan = []  # (alpha, kind, file, interventions)
    for a in values:
        if a == 0:
            plan.append((a, "base", "alpha+0.h5", ()))
            continue
        ivs = interventions_from_options([f"{steer}={a}"], rounds=steer_rounds, positions=steer_positions)
        plan.append((a, "steer", f"alpha{a:+g}.h5", ivs))
        if control == "random":
            ctl = interventions_from_options([f"{steer}={a}"], rounds=steer_rounds, positions=steer_positions,
                                             control="random", control_seed=control_seed)
            plan.append((a, "control", f"control-alpha{a:+g}.h5", ctl))
    if out_dir.exists() and not out_dir.is_dir():
        raise WorkbenchError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"steer": steer, "alphas": values, "control": control, "control_seed": control_seed, "steer_rounds": steer_rounds,
                "steer_positions": steer_positions, "command_line": shlex.join(["workbench", *sys.argv[1:]]),
                "runs": [{"alpha": a, "kind": kind, "file": name} for a, kind, name, _ in plan]}
    base = RunConfig(out=out_dir / "x.h5", model=model, task=task, data=tuple(str(p) for p in data), limit=limit, offset=offset,
                     protocol=protocol, rounds=rounds, batch_size=batch_size, hooks=tuple(h.strip() for h in hooks.split(",")),
                     device=device, dtype=dtype, seed=seed, overwrite=overwrite, command_line=manifest["command_line"])
    from dataclasses import replace

    from workbench.engine.run import validate_config
    from workbench.store.format import run_exists
    from workbench.store.reader import RunFile

    for a, kind, name, ivs in plan:  # every run's options checked before the model loads
        path = out_dir / name
        done = resume and run_exists(path) and not overwrite
        validate_config(replace(base, out=path, interventions=ivs, resume=done))
    (out_dir / "sweep.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    from workbench.engine.models import load_model

    loaded = load_model(model, device, dtype)
    for i, (a, kind, name, ivs) in enumerate(plan):
        path = out_dir / name
        if resume and run_exists(path) and not overwrite:
            with RunFile(path) as existing:
                complete = existing.meta.get("status") == "complete"
            if complete:
                err.print(f"[{i + 1}/{len(plan)}] {name}: already complete", highlight=False, markup=False)
                continue
        err.print(f"[{i + 1}/{len(plan)}] {kind} α={a:+g} → {path}", highlight=False, markup=False)
        cfg = replace(base, out=path, interventions=ivs, resume=resume and run_exists(path))
        with _ProgressReporter() as reporter:
            run_protocol(cfg, model=loaded, on_batch=reporter.update).close()
    out.print(f"wrote {len(plan)} runs and sweep.json to {out_dir}; draw them with: workbench report {out_dir}",
              markup=False, highlight=False)


@app.command()
def merge(
    run_path: Path = typer.Argument(..., help="The --out of the sharded run; its shards are in RUN.h5.shards/."),
    copy: bool = typer.Option(False, "--copy", help="Copy the activations into RUN.h5 (a self-contained file) instead of virtual datasets that read the shard files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a RUN.h5 that is not a merge of these shards."),
) -> None:
    """Merge the shards of a data-parallel run (RUN.h5.shards/shard-KKK-of-NNN.h5) into one run file.

    Checks that every shard is complete and that they belong to one run (model, protocol, settings,
    data, shard plan); refuses in one line otherwise. By default RUN.h5's activations are HDF5 virtual
    datasets reading the shard files by relative path: keep RUN.h5.shards/ beside RUN.h5 (move
    them together). A sharded run merges itself when its last shard finishes; run this for --copy,
    or after fixing what stopped that merge.
    """
    from workbench.store.merge import merge_run

    result = merge_run(run_path, copy=copy, overwrite=overwrite)
    print(result.message)


def _resume_args(argv: list[str], out_path: Path) -> list[str]:
    """The same command line with --resume (and --out, and without --overwrite)."""
    args = [a for a in argv if a not in ("--overwrite", "--resume")]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out_path)]
    return [*args, "--resume"]




def _launched_rank(shard: Optional[str]) -> Optional[tuple[int, int]]:
    """``(rank, world size)`` of a process started by torchrun or accelerate launch, else None (a
    bad environment is None here: the run refuses it in one line)."""
    from workbench.store.shard import resolve_shard

    try:
        spec = resolve_shard(shard, os.environ)
    except WorkbenchError:
        return None
    return (spec.index, spec.count) if spec is not None and spec.launcher else None


class _ProgressReporter:
    """A rich progress bar (samples × rounds, tokens/s, ETA) on a terminal; a plain line per batch otherwise.

    Under a launcher (``rank`` = (rank, world size)) the ranks share one terminal: only rank 0 draws
    the bar and the loading spinner, labelled with its rank (the shards are equal, so it stands for
    all); in a log every rank writes its plain lines, each starting ``rank K/N:``."""

    def __init__(self, rank: Optional[tuple[int, int]] = None) -> None:
        self.rank = rank
        self.live = rank is None or rank[0] == 0
        self.prefix = "" if rank is None else f"rank {rank[0]}/{rank[1]}: "
        self.status = Spinner(err, show=self.live)  # what loading the model is doing, until the first batch
        label = "samples × rounds" if rank is None else f"rank 0 of {rank[1]}: samples × rounds"
        # a plain line per batch in a log (interval 0: every batch is a line, as before)
        self.bar = ProgressBar(label, "rounds", console=err, show=self.live, interval=0.0)
        self.tokens = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_ProgressReporter":
        return self

    @property
    def progress(self) -> Any:
        """The rich ``Progress`` drawn on a terminal (None before the first batch, and in a log)."""
        return self.bar.bar

    def __exit__(self, *exc: Any) -> None:
        self.status.stop()
        self.bar.close()

    def update(self, p: Any) -> None:
        """Called once before the first batch (new_tokens = 0), after every round and after every batch."""
        self.status.stop()
        if p.new_tokens == 0 and p.batch_rounds == 0:
            self.t0 = time.perf_counter()  # the model is loaded: start the clock
        if p.batch_rounds:
            self.tokens += p.new_tokens  # a written batch repeats its rounds' tokens
        speed = f"{self.tokens / max(1e-9, time.perf_counter() - self.t0):.0f} tok/s"
        if not err.is_terminal and p.batch_rounds != 0:
            return  # in a log: a line per batch, not per round
        what = "batch done" if p.new_tokens else "starting at"
        self.bar.update(p.done_rounds, p.total_samples * p.rounds, speed=speed,
                        line=f"{self.prefix}{what}: {p.done_samples}/{p.total_samples} samples ({speed})")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}"
    return str(value)


COLUMN_LABELS = {
    "round": "round", "accuracy": "acc", "mean_token_entropy": "tok H", "mean_option_entropy": "opt H",
    "mean_chosen_confidence": "conf", "ece": "ECE", "ece_range": "ECEr", "unparseable": "unpars",
    "right_to_wrong": "R→W", "wrong_to_right": "W→R", "accuracy_parsed": "parsed", "accuracy_option": "argmax",
}
COLUMN_LEGEND = {
    "acc": "the parsed answer, else the option argmax", "parsed": "accuracy of parsed answers (unparseable count wrong)",
    "argmax": "accuracy of the option-confidence argmax", "unpars": "unparseable answers",
    "R→W": "right→wrong flips of acc from the previous round", "W→R": "wrong→right flips",
    "tok H": "mean token entropy (nats)", "opt H": "mean option entropy (nats)",
    "conf": "confidence of the chosen option", "ECE": "calibration error over [0, 1]",
    "ECEr": "the same over [min, max] confidence",
}
# two tables that each fit 80 columns: answers, then uncertainty
TABLES = (("round", "accuracy", "accuracy_parsed", "accuracy_option", "unparseable", "right_to_wrong", "wrong_to_right"),
          ("round", "mean_token_entropy", "mean_option_entropy", "mean_chosen_confidence", "ece", "ece_range"))
JSON_ONLY = ("parsed_right_to_wrong", "parsed_wrong_to_right", "option_right_to_wrong", "option_wrong_to_right")


def _print_summary(run_file: Any) -> None:
    """The run's header line, the per-round metrics table with a legend under it, a table of task
    fields and concept scores (one row each, one column per round) when there are any, and the
    convergence rounds. Every name from the run file is printed literally (no Rich markup)."""
    from workbench.analysis.summary import summary

    from workbench.printable import visible

    s = summary(run_file)
    out.print(visible(f"{s['path']}  model={s['model']}  protocol={s['protocol']}  task={s['task']}  "
                      f"samples={s['n_done']}/{s['n_samples']}  status={s['status']}", newlines=False), markup=False, highlight=False)
    adapter = run_file.meta.get("adapter")
    if isinstance(adapter, dict) and adapter.get("path"):
        out.print(visible(f"adapter={adapter['path']}  sha256={str(adapter.get('sha256', ''))[:16]}…", newlines=False),
                  markup=False, highlight=False, soft_wrap=True)
    for line in _intervention_lines(run_file):
        out.print(Text(visible(f"intervention: {line}", newlines=False)), highlight=False, soft_wrap=True)
    rows = s["rounds"]
    if not rows:
        return
    for names in TABLES:
        columns = [c for c in names if c in rows[0]]
        if len(columns) < 2:
            continue
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
        for c in columns:
            table.add_column(Text(COLUMN_LABELS[c]), justify="right", no_wrap=True)
        for r in rows:
            table.add_row(*[Text(_fmt(r[c])) for c in columns])
        out.print(table)
        legend = [f"{label}: {COLUMN_LEGEND[label]}" for c in columns if (label := COLUMN_LABELS[c]) in COLUMN_LEGEND]
        out.print(Text("; ".join(legend), style="dim"), highlight=False)
    others = [k for k in rows[0] if k not in COLUMN_LABELS and k != "n" and k not in JSON_ONLY]
    if others:
        fields = Table(box=box.SIMPLE_HEAD, pad_edge=False, header_style="bold")
        fields.add_column(Text("mean per round"), no_wrap=True)
        for r in rows:
            fields.add_column(Text(str(r["round"])), justify="right", no_wrap=True)
        for name in others:
            fields.add_row(Text(visible(name.removeprefix("mean_").replace(":", " "), newlines=False)), *[Text(_fmt(r[name])) for r in rows])
        out.print(fields)
    conv = {COLUMN_LABELS.get(k, k.removeprefix("mean_")): c for k, c in s["convergence_detail"].items()}
    if conv:
        out.print(visible("convergence round (|Δ| < ε every step to the end; flat: the whole range < ε): " + ", ".join(
            f"{k} {c['round'] if c['status'] == 'converged' else c['status']} (ε {c['eps']:.2g})" for k, c in conv.items()),
            newlines=False), markup=False, highlight=False)
        out.print(Text(s["convergence_settings"]["rule"], style="dim"), highlight=False)


def _interventions_record(run_file: Any) -> list[dict[str, Any]]:
    """The run's recorded interventions (the ``interventions`` root attribute, JSON), or []."""
    raw = run_file.f.attrs.get("interventions")
    if raw is None:
        return []
    try:
        record = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except ValueError:
        raise WorkbenchError(f"{run_file.path}: attribute 'interventions' is not valid JSON") from None
    if not isinstance(record, list) or not all(isinstance(r, dict) for r in record):
        raise WorkbenchError(f"{run_file.path}: attribute 'interventions' is not a list of interventions")
    return record


def _intervention_lines(run_file: Any) -> list[str]:
    from workbench.engine.interventions import summarize

    return [summarize(r) for r in _interventions_record(run_file)]


@app.command()
def info(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`, or a cache file from `workbench export`."),
    as_json: bool = typer.Option(False, "--json", help="Print metadata and the per-round table as JSON."),
) -> None:
    """Show a run file's metadata and per-round table, or what a cache file from `workbench export` holds."""
    from workbench.cache.file import is_cache_file, print_cache_info

    if is_cache_file(run_path):
        return print_cache_info(run_path, as_json)
    from workbench.analysis.summary import summary
    from workbench.store.reader import RunFile

    with RunFile(run_path) as run_file:
        if as_json:
            s = summary(run_file)
            from workbench.json_values import finite

            s["interventions"] = _interventions_record(run_file)
            print(json.dumps(finite(s), indent=2, default=_json_default, allow_nan=False))
        else:
            _print_summary(run_file)


def _json_default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def main() -> None:
    """Console entry point: run the app; a WorkbenchError or a usage error (an unknown option, a
    value of the wrong type) becomes one ``error:`` line and exit status 2, Ctrl-C exit status 130."""
    from typer import _click as click  # Typer ≥ 0.24 vendors click: its exceptions, not the click package's

    _own_warnings_as_lines()
    try:
        _mount_subcommands()
        code = app(standalone_mode=False, prog_name="workbench")
    except WorkbenchError as e:
        _error_line(str(e))
        sys.exit(2)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help())
        sys.exit(0)
    except click.exceptions.UsageError as e:
        where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
        _error_line(f"{e.format_message()}{where}")
        sys.exit(e.exit_code)
    except click.exceptions.ClickException as e:
        _error_line(e.format_message())
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted", highlight=False)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def entry() -> None:
    """The ``workbench`` executable: :func:`main`, but after a failed write (a full disk) the process
    ends without the interpreter's teardown, where HDF5 retries flushing the file it could not write
    and can crash after the error line. Every part a run keeps is already fsynced and renamed."""
    try:
        main()
    except SystemExit as e:
        if "workbench.store.failed_writes" in sys.modules and sys.modules["workbench.store.failed_writes"].FAILED_WRITES:
            code = e.code if isinstance(e.code, int) else 2
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        raise


def _own_warnings_as_lines() -> None:
    """The workbench's own warnings (raised from its modules: a cache that would not fit, a resume on
    another device) print as one ``warning:`` line; other libraries' keep Python's format."""
    import warnings

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    packages = tuple(os.path.join(root, name) + os.sep for name in ("workbench", "probes", "tui"))
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        if os.path.abspath(filename).startswith(packages):
            from workbench.printable import visible

            err.print(Text.assemble(("warning: ", "bold yellow"), visible(" ".join(str(message).split()), newlines=False)),
                      highlight=False, soft_wrap=True)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning


def _error_line(message: str) -> None:
    from workbench.printable import visible

    err.print(Text.assemble(("error: ", "bold red"), visible(" ".join(message.split()), newlines=False)), highlight=False, soft_wrap=True)
