"""Running a protocol over a dataset into a run file: the one function a notebook needs.

    from workbench import run_protocol
    run = run_protocol(model="organism", task="organism", limit=64, out="artifacts/runs/demo.h5")
    run.array("rounds/correct").mean(0)     # accuracy per round

Batches are fixed by sample index (``[k·B, (k+1)·B)``), so a resumed run recomputes exactly the
batches that were missing, with the same padding and seeds, and gives identical arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError
from workbench.engine.settings import data_fingerprint, run_settings, sample_table
from workbench.store.format import run_exists
from workbench.store.lock import check_output
from workbench.store.reader import RunFile
from workbench.store.writer import RunWriter


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines a run (the CLI's ``workbench run`` options)."""

    out: Path
    model: str = "organism"
    task: str = "organism"
    data: tuple[str, ...] = ()
    condition: str | None = None
    category: str | None = None
    prompt_field: str = "prompt"
    fields: str | None = None  # --fields NAME=PATH,...: mc and prompts map their names to (dotted) paths
    options: str | None = None  # --options "A|B": mc's fixed options, the same for every row
    limit: int | None = None
    offset: int = 0
    protocol: str | None = None  # None: the task's own (bbq → bbq-paper, organism → organism)
    rounds: int | None = None
    inject: dict[int, str] = field(default_factory=dict)
    batch_size: int = 16
    hooks: tuple[str, ...] = ("hook_resid_post",)
    layers: tuple[int, ...] | None = None
    activation_dtype: str = "float32"
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    seed: int = 0  # sampled decoding (and --samples-per-round); not the organism's items
    world_seed: int | None = None  # organism: the world draw (items and organism-world follow-ups); None: WORLD_SEED
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    resume: bool = False
    overwrite: bool = False
    fsync: bool = True  # wait for the disk so that a power cut loses at most the last second (workbench.store.writer)
    option_scoring: str | None = None  # letter | letter-text; None: the protocol's (letter by default)
    force: bool = False  # run a protocol written for another task
    command_line: str = ""  # how the run was started (the CLI fills it in; recorded in the run file)
    scorer: str | None = None  # toxicity:MODEL | python:module:function (workbench.engine.scorers)
    scorer_label: str | None = None  # the classifier label scored (default: toxic, else positive)
    samples_per_round: int = 0  # k sampled answers per round beside the greedy one (workbench.engine.sampling)
    equivalence: str = "exact"  # how sampled answers are clustered: exact | nli:MODEL | nli-nocontra:MODEL
    chat_template: str | None = None  # a Jinja chat template file used instead of the model's (and the protocol's)
    likelihood: str = "no-stop"  # sampled answers' mean log-likelihood: no-stop (Farquhar et al.) | with-stop
    device_map: str | None = None  # auto | balanced | balanced_low_0 | sequential | JSON object | JSON file (models.parse_device_map)
    max_memory: str | None = None  # "0=70GiB,1=70GiB,cpu=200GiB" (models.parse_max_memory); needs device_map
    adapter: str | None = None  # a LoRA adapter folder merged into the model after it loads (workbench.engine.adapter)
    shard: str | None = None  # "K/N": shard K (from 0) of N, into OUT.shards/; None: RANK/WORLD_SIZE under torchrun, else all
    interventions: tuple[Any, ...] = ()  # Steer/Ablate/Clamp (workbench.engine.interventions), in every batch's rounds
    lookup: bool = True  # greedy rounds verify drafts read off each row's earlier answers (workbench.engine.lookup)


@dataclass(frozen=True)
class CheckedRun:
    """What :func:`validate_config` checked and resolved, before any model is loaded."""

    task: Any  # workbench.engine.task.Task
    protocol: Any  # workbench.engine.protocol.Protocol, with the command line's overrides applied
    samples: list[Any]  # [N] workbench.engine.task.Sample
    model_path: str  # the resolved folder or hub name ("" when a loaded model was given)
    open_ended: Any = None  # workbench.engine.open_ended.OpenEnded: --scorer / --samples-per-round, or None
    shard: Any = None  # workbench.store.shard.ShardPlan of this process's shard; None: the whole dataset
    local_rank: int | None = None  # the rank's LOCAL_RANK under torchrun/accelerate launch (its device)
    out: Path | None = None  # the file this process writes: the shard's file, or cfg.out


@dataclass(frozen=True)
class Progress:
    """What a progress callback is told: once before the first batch, after each round of a batch
    (``batch_rounds`` > 0), and after each written batch (``batch_rounds`` = 0)."""

    done_samples: int  # written to the file
    total_samples: int
    rounds: int
    new_tokens: int  # generated in this round (this batch, for a written batch)
    batch_samples: int = 0  # samples of the batch in flight
    batch_rounds: int = 0  # rounds of the batch in flight that are done; 0 once it is written

    @property
    def done_rounds(self) -> int:
        """Sample-rounds finished, the batch in flight included."""
        return self.done_samples * self.rounds + self.batch_samples * self.batch_rounds


def load_samples(cfg: RunConfig) -> list[Any]:
    """The run's samples, by task."""
    from workbench.engine import tasks

    if cfg.task == "bbq":
        if not cfg.data:
            raise WorkbenchError("--task bbq needs --data FILE.jsonl (BBQ files as published)")
        return tasks.load_bbq([Path(p) for p in cfg.data], cfg.condition, cfg.category, cfg.offset, cfg.limit)
    from workbench.engine.records import parse_fields

    if cfg.task not in ("mc", "prompts") and (cfg.fields or cfg.options):
        raise WorkbenchError(f"--fields and --options map a file's fields for --task mc or prompts, not {cfg.task}")
    if cfg.task == "prompts":
        if len(cfg.data) != 1:
            raise WorkbenchError("--task prompts needs one --data FILE (JSONL, CSV or a saved dataset folder)")
        if cfg.options:
            raise WorkbenchError("--options gives a multiple-choice task's options; --task prompts has none")
        fields = parse_fields(cfg.fields, tasks.PROMPT_FIELDS)
        return tasks.load_prompts(Path(cfg.data[0]), cfg.prompt_field, cfg.offset, cfg.limit, fields)
    if cfg.task == "mc":
        if not cfg.data:
            raise WorkbenchError("--task mc needs --data FILE (JSONL, CSV or a saved dataset folder) and --fields")
        fields = parse_fields(cfg.fields, tasks.MC_FIELDS)
        return tasks.load_mc([Path(p) for p in cfg.data], fields, cfg.options, cfg.offset, cfg.limit)
    if cfg.task in ("organism", "organism-visual"):
        from workbench.organism.task import WORLD_SEED, load_organism_samples

        world_seed = WORLD_SEED if cfg.world_seed is None else cfg.world_seed
        return load_organism_samples(limit=64 if cfg.limit is None else cfg.limit, seed=world_seed, offset=cfg.offset,
                                     visual=cfg.task == "organism-visual")
    if cfg.task in tasks.VISION_TASKS:
        if len(cfg.data) != 1:
            raise WorkbenchError(f"--task {cfg.task} needs one --data FILE.jsonl "
                                 '(lines {"image": "imgs/001.png", "question": ..., "options": [...], "label": 0})')
        return tasks.load_vqa(Path(cfg.data[0]), cfg.task == "vqa-open", cfg.offset, cfg.limit)
    tasks.get_task(cfg.task)  # raises the clean error for unknown tasks
    raise AssertionError(cfg.task)


MAX_ROUNDS = 10_000  # far past any context window: a larger count is refused before the context check plans it
MAX_COUNT = 10**9  # samples, batch size, new tokens: past what any machine runs


def validate_config(cfg: RunConfig, model_given: bool = False) -> CheckedRun:
    """Check everything about a run that needs no model: options, the task and its data, the
    protocol (and that it was written for this task, unless ``cfg.force``), the model folder, and
    the output file. Returns the resolved task, protocol and samples; raises :class:`WorkbenchError`.
    ``model_given``: the caller passes a loaded model, so ``cfg.model`` is not resolved.
    """
    from dataclasses import replace

    from workbench.engine.models import DEVICES, DTYPES, check_model_folder, check_placement, resolve_model_path, takes_images
    from workbench.engine.protocol import load_protocol
    from workbench.engine.tasks import PROTOCOL_TASK, default_protocol, get_task

    if cfg.batch_size < 1:
        raise WorkbenchError(f"--batch-size must be ≥ 1, not {cfg.batch_size}")
    for option, value, most in (("--batch-size", cfg.batch_size, MAX_COUNT), ("--limit", cfg.limit, MAX_COUNT),
                                ("--offset", cfg.offset, MAX_COUNT), ("--rounds", cfg.rounds, MAX_ROUNDS),
                                ("--max-new-tokens", cfg.max_new_tokens, MAX_COUNT)):
        if value is not None and value > most:
            raise WorkbenchError(f"{option} {value} is more than this workbench runs (at most {most:,})")
    if cfg.rounds is not None and cfg.rounds < 1:
        raise WorkbenchError(f"--rounds must be ≥ 1, not {cfg.rounds}")
    if not 0 <= cfg.seed < 2**63:
        raise WorkbenchError(f"--seed must be between 0 and 2**63 - 1, not {cfg.seed}")
    if cfg.limit is not None and cfg.limit < 1:
        raise WorkbenchError(f"--limit must be ≥ 1, not {cfg.limit}")
    if cfg.offset < 0:
        raise WorkbenchError(f"--offset must be ≥ 0, not {cfg.offset}")
    if cfg.activation_dtype not in ("float32", "float16"):
        raise WorkbenchError(f"--activation-dtype must be float32 or float16, not {cfg.activation_dtype!r}")
    if cfg.device not in DEVICES:
        raise WorkbenchError(f"--device must be one of {', '.join(DEVICES)}, not {cfg.device!r}")
    if cfg.dtype not in DTYPES:
        raise WorkbenchError(f"--dtype must be one of {', '.join(DTYPES)}, not {cfg.dtype!r}")
    check_placement(cfg.device, cfg.device_map, cfg.max_memory)
    if not cfg.hooks or any(not h for h in cfg.hooks):
        raise WorkbenchError("--hooks takes one or more comma-separated hook names")
    repeated = sorted({h for h in cfg.hooks if cfg.hooks.count(h) > 1})
    if repeated:
        raise WorkbenchError(f"--hooks names {repeated[0]!r} more than once")
    if cfg.layers is not None:
        if not cfg.layers:
            raise WorkbenchError("--layers takes one or more comma-separated layer numbers (leave it out for all)")
        if min(cfg.layers) < 0:
            raise WorkbenchError(f"layer {min(cfg.layers)} is out of range (layers count from 0)")
        if len(set(cfg.layers)) != len(cfg.layers):
            raise WorkbenchError(f"--layers names layer {sorted(l for l in cfg.layers if cfg.layers.count(l) > 1)[0]} more than once")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise WorkbenchError(f"--max-new-tokens must be ≥ 1, not {cfg.max_new_tokens}")
    task = get_task(cfg.task, cfg.option_scoring or "letter")
    protocol = load_protocol(cfg.protocol or default_protocol(cfg.task), cfg.rounds, cfg.inject, cfg.option_scoring,
                             cfg.chat_template)
    if protocol.task and protocol.task not in (cfg.task, PROTOCOL_TASK.get(cfg.task)) and not cfg.force:
        raise WorkbenchError(f"protocol {protocol.name!r} is written for --task {protocol.task}, not {cfg.task} "
                             f"(the {cfg.task} task's own is {default_protocol(cfg.task)!r}; --force runs it anyway)")
    task = get_task(cfg.task, protocol.option_scoring)
    if cfg.do_sample is not None or cfg.max_new_tokens is not None:
        decoding = protocol.decoding
        decoding = replace(
            decoding,
            do_sample=decoding.do_sample if cfg.do_sample is None else cfg.do_sample,
            max_new_tokens=decoding.max_new_tokens if cfg.max_new_tokens is None else cfg.max_new_tokens,
        )
        protocol = replace(protocol, decoding=decoding)
    if cfg.world_seed is not None and cfg.task not in ("organism", "organism-visual"):
        raise WorkbenchError("--world-seed draws the organism's items and follow-ups: it needs --task organism "
                             "(--seed seeds sampled decoding)")
    if cfg.world_seed is not None and not 0 <= cfg.world_seed < 2**63:
        raise WorkbenchError(f"--world-seed must be in [0, 2^63), not {cfg.world_seed}")
    spec, out = _shard_spec(cfg)
    if cfg.interventions:
        from workbench.engine.interventions import check_against

        late = [iv for iv in cfg.interventions if iv.rounds is not None and min(iv.rounds) > protocol.rounds]
        if late:
            raise WorkbenchError(f"an intervention acts in rounds {list(late[0].rounds)}, but the protocol has "
                                 f"{protocol.rounds} rounds")
    check_output(out, cfg.resume, cfg.overwrite)  # --overwrite replaces nothing yet: the writer does, at its first batch
    if cfg.resume and cfg.task in ("organism", "organism-visual"):
        _check_world_seed(out, cfg.world_seed)
    model_path = ""
    if not model_given:
        model_path = resolve_model_path(cfg.model)
        check_model_folder(model_path, cfg.model)
        if cfg.task in ("organism", "organism-visual") and not (Path(model_path) / "organism.json").is_file():
            raise WorkbenchError(f"--task {cfg.task} needs an organism checkpoint; --model {cfg.model} is not one "
                                 "(no organism.json). Use --task bbq or --task prompts for other models")
        check_vision_model(cfg.task, cfg.model, takes_images(model_path))
        shape = model_shape(model_path)
        if cfg.interventions and shape is not None:
            check_against(cfg.interventions, *shape)  # width and layers, before the model loads
    if cfg.adapter is not None:
        from workbench.engine.adapter import check_adapter

        if model_given:
            raise WorkbenchError("--adapter with an already loaded model: apply it with workbench.engine.adapter.apply_adapter first")
        check_adapter(cfg.adapter, model_path if Path(model_path).is_dir() else None)
    if cfg.task in ("organism", "organism-visual") and (cfg.data or cfg.condition or cfg.category):
        given = ", ".join(o for o, v in (("--data", cfg.data), ("--condition", cfg.condition), ("--category", cfg.category)) if v)
        raise WorkbenchError(f"{given}: not used by --task organism (its items are drawn from the organism's world); leave it out")
    samples = load_samples(cfg)
    from workbench.engine.open_ended import check_open_ended

    open_ended = check_open_ended(cfg.task, cfg.scorer, cfg.scorer_label, cfg.samples_per_round, cfg.equivalence, cfg.likelihood)
    plan = None
    if spec is not None:
        from workbench.store.shard import make_plan

        plan = make_plan(spec, len(samples), cfg.batch_size, data_fingerprint(samples))
    return CheckedRun(task, protocol, samples, model_path, open_ended=open_ended, shard=plan,
                      local_rank=spec.local_rank if spec else None, out=out)


def model_shape(model_path: str) -> tuple[int, int] | None:
    """``(d_model, n_layers)`` from a local model folder's ``config.json`` (the usual key names),
    without loading it; None for a hub name or keys it does not know."""
    import json

    try:
        config = json.loads((Path(model_path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    width = next((config[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(config.get(k), int)), None)
    depth = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(config.get(k), int)), None)
    return None if width is None or depth is None else (width, depth)


def check_resume_interventions(path: Path, settings: dict[str, Any]) -> None:
    """Refuse ``--resume`` with other interventions than the file records (or with some where it
    has none, or none where it has some): the batches still to run would be another experiment."""
    import json

    with RunFile(path) as run:
        have = run.f.attrs.get("interventions")
    have = json.loads(have.decode() if isinstance(have, bytes) else have) if have is not None else []
    want = json.loads(json.dumps(settings.get("interventions", [])))
    if have != want:
        from workbench.engine.interventions import summarize

        said = lambda x: "; ".join(summarize(r) for r in x) or "none"  # noqa: E731
        raise WorkbenchError(f"--resume: {path} was made with other interventions ({said(have)[:120]} in the file, "
                             f"{said(want)[:120]} now)")


def world_seed_of(data: dict[str, Any]) -> int:
    """The world seed an organism run file's ``data`` setting records (files from before it was
    recorded: the default, the only one they could have)."""
    from workbench.organism.task import WORLD_SEED

    return int(data.get("world_seed", WORLD_SEED))


def _check_world_seed(out: Path, world_seed: int | None) -> None:
    """Refuse ``--resume`` of an organism run made with another ``--world-seed`` (before any model loads)."""
    import json

    from workbench.organism.task import WORLD_SEED

    if not run_exists(out):
        return
    with RunFile(out) as run:
        data = run.f.attrs.get("data")
    try:
        have = world_seed_of(json.loads(data)) if data is not None else WORLD_SEED
    except (ValueError, TypeError, AttributeError):
        return  # an unreadable setting: the writer's own resume check refuses it
    want = WORLD_SEED if world_seed is None else world_seed
    if have != want:
        raise WorkbenchError(f"--resume: {out} was made with --world-seed {have}, not {want}: its items and "
                             f"follow-ups differ; give --world-seed {have} to continue it")


def _shard_spec(cfg: RunConfig) -> tuple[Any, Path]:
    """This process's shard (``--shard``, or RANK/WORLD_SIZE under a launcher; None: all samples)
    and the file it writes; for a shard, also checks that the merged ``cfg.out`` can be written."""
    import os

    from workbench.store.shard import resolve_shard, shard_path

    spec = resolve_shard(cfg.shard, os.environ)
    if spec is None:
        return None, Path(cfg.out)
    from workbench.store.merge import check_merge_target

    check_merge_target(Path(cfg.out), cfg.overwrite)
    return spec, shard_path(Path(cfg.out), spec.index, spec.count)


def _rank_device(device: str, local_rank: int | None) -> tuple[str, str | None]:
    """A launcher's rank uses ``cuda:LOCAL_RANK`` when CUDA exists (made the current device, so
    ``cuda`` means it), else the CPU. Returns ``(device to load on, device to record)``."""
    if local_rank is None or device not in ("auto", "cuda"):
        return device, None
    import torch

    if not torch.cuda.is_available():
        return ("cpu", None) if device == "auto" else (device, None)
    if local_rank >= torch.cuda.device_count():
        raise WorkbenchError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA device(s): "
                             "start at most one rank per device")
    torch.cuda.set_device(local_rank)
    return "cuda", f"cuda:{local_rank}"


def check_vision_model(task: str, model_name: str, takes_images: bool | None) -> None:
    """Refuse a picture task (``vqa``, ``vqa-open``) on a text-only model, and a text task on nothing
    (a vision-language model runs text tasks too). ``takes_images`` None: not known yet (a hub
    name, checked again once loaded)."""
    from workbench.engine.tasks import VISION_TASKS

    if task in VISION_TASKS and takes_images is False:
        from workbench.engine.models import supported_families

        raise WorkbenchError(f"--task {task} asks questions about pictures, but --model {model_name} is a text-only model "
                             f"(give an image-text-to-text model: {supported_families()})")


def check_context_length(model: Any, protocol: Any, task: Any, samples: list[Any]) -> None:
    """Refuse a sample whose conversation cannot fit the model's context: every round's templated
    input (as the engine encodes it) plus ``max_new_tokens`` per answer. Only the first message
    differs between samples, so the sample with the longest one is the one planned in full."""
    from workbench.engine.chat import encode, plan_conversation
    from workbench.engine.batch import conversation_texts, first_instruction

    hf_config = getattr(model.hf, "config", None)
    n_ctx = getattr(hf_config, "max_position_embeddings", None) or getattr(hf_config, "n_positions", None)
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        return
    answers = protocol.rounds * protocol.decoding.max_new_tokens
    lengths = [len(ids) for ids in encode(model.tokenizer, [first_instruction(protocol, task, s) for s in samples])]
    for s in [samples[int(np.argmax(lengths))]]:
        plan = plan_conversation(model.tokenizer, *conversation_texts(protocol, task, s),
                                 image=bool(getattr(s, "image", None)) and getattr(model, "vision", False))
        prompt = sum(len(ids) for ids in encode(model.tokenizer, list(plan.round_inputs)))
        if getattr(model, "vision", False) and s.image:  # the image placeholder becomes the image tokens
            prompt += int(getattr(model.processor, "image_seq_length", 0) or getattr(hf_config, "image_seq_length", 0) or 0)
        if prompt + answers > n_ctx:
            raise WorkbenchError(f"sample {s.id} (index {s.index}): its {protocol.rounds}-round conversation needs up to "
                                 f"{prompt + answers} tokens ({prompt} of prompts, {protocol.decoding.max_new_tokens} per answer); "
                                 f"the model's context is {n_ctx} (shorten the data, --rounds or --max-new-tokens)")


def run_protocol(
    config: RunConfig | None = None,
    model: Any = None,
    on_batch: Callable[[Progress], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    on_merge: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> RunFile:
    """Run a protocol over a dataset into ``config.out`` and return the finished run file (read-only).

    Give a :class:`RunConfig` or its fields as keyword arguments. ``model`` is a model name (hub
    name, folder or ``"organism"``, the same as ``RunConfig.model``) or an already loaded
    :class:`workbench.engine.models.LoadedModel` (saves loading it again in a notebook). Everything that
    needs no model is checked first (:func:`validate_config`), so a bad input fails at once.
    ``on_batch`` is called with a :class:`Progress` before the first batch, after every round and
    after every written batch; ``on_status`` with each step of loading the model.

    A shard (``shard="K/N"``, or RANK/WORLD_SIZE under torchrun) runs only its samples into
    ``OUT.shards/shard-KKK-of-NNN.h5``; when it completes, the process merges every shard into
    ``OUT`` if they are all complete (:func:`workbench.store.merge.merge_when_complete`), tells
    ``on_merge`` one line about it, and returns the merged file, else the shard's.
    """
    from dataclasses import replace

    from workbench.engine.capture import check_layers, hook_sites
    from workbench.engine.batch import run_batch
    from workbench.engine.batch_result import batch_arrays
    from workbench.engine.models import load_model

    if isinstance(model, (str, Path)):
        kwargs["model"], model = str(model), None
    cfg = config if config is not None else RunConfig(**kwargs)
    if config is not None and kwargs:
        cfg = replace(cfg, **kwargs)
    checked = validate_config(cfg, model_given=model is not None)
    task, protocol, samples = checked.task, checked.protocol, checked.samples
    out, plan, all_samples = checked.out or Path(cfg.out), checked.shard, samples
    if plan is not None:
        samples = samples[plan.start : plan.stop]
    load_device, rank_device = _rank_device(cfg.device, checked.local_rank) if model is None else (cfg.device, None)
    if model is None:
        model = load_model(cfg.model, load_device, cfg.dtype, cfg.revision, cfg.trust_remote_code, on_status=on_status,
                           device_map=cfg.device_map, max_memory=cfg.max_memory)
        if cfg.adapter is not None:
            from workbench.engine.adapter import apply_adapter

            if on_status is not None:
                on_status(f"merging the adapter {cfg.adapter} into the weights")
            model = apply_adapter(model, cfg.adapter)
    elif cfg.task in ("organism", "organism-visual") and not (Path(model.path) / "organism.json").is_file():
        raise WorkbenchError(f"--task {cfg.task} needs an organism checkpoint; the given model ({model.name}) is not one")
    from workbench.engine.chat import styled_model

    model = styled_model(model, protocol)  # the protocol's chat template and system message, when it has them
    check_vision_model(cfg.task, model.name, model.vision)
    layers = check_layers(list(cfg.layers) if cfg.layers is not None else None, model.n_layers)
    sites = hook_sites(model, list(cfg.hooks), layers)
    check_context_length(model, protocol, task, all_samples)  # every shard refuses alike
    data = {"files": [str(p) for p in cfg.data], "condition": cfg.condition, "category": cfg.category,
            "offset": cfg.offset, "limit": cfg.limit}
    if cfg.fields or cfg.options:
        data.update(fields=cfg.fields, options=cfg.options)
    if cfg.task in ("organism", "organism-visual"):
        data["world_seed"] = int(all_samples[0].extra["world_seed"]) if all_samples else None
    settings = run_settings(model, task, protocol, samples, data, list(cfg.hooks), layers, cfg.batch_size,
                            cfg.activation_dtype, cfg.seed, cfg.command_line, lookup=cfg.lookup)
    if rank_device is not None:
        settings["device"] = rank_device
    if cfg.interventions:
        from workbench.engine.interventions import settings_json

        settings["interventions"] = settings_json(cfg.interventions)
    if plan is not None:
        settings["data"]["fingerprint"] = plan.fingerprint  # the whole dataset's, as a single-process run records
        settings["shard"] = plan.to_json()
    extras = None
    if checked.open_ended is not None:
        from workbench.engine.open_ended import round_extras

        extras = round_extras(checked.open_ended, model, protocol.decoding, cfg.seed)
        settings.update(extras.settings)
    writer, creating = None, None
    if cfg.resume and run_exists(out):
        from workbench.engine.open_ended import check_resume

        check_resume(out, settings)
        from workbench.engine.adapter import check_resume_adapter

        check_resume_adapter(out, settings)
        check_resume_interventions(out, settings)
        writer = RunWriter.resume(out, settings, durable=cfg.fsync)
    else:  # a new file is created on a thread while the first batch runs (its fsyncs wait off the critical path)
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="workbench-create")
        creating = pool.submit(RunWriter.create, out, settings, sample_table(samples), protocol.rounds,
                               {h: (len(layers), model.d_model) for h in cfg.hooks}, cfg.activation_dtype,
                               overwrite=cfg.overwrite, durable=cfg.fsync)
        pool.shutdown(wait=False)
    gold = np.asarray([s.gold for s in samples])
    try:
        done = writer.done_mask() if writer is not None else np.zeros(len(samples), dtype=bool)
        n_done = int(done.sum())
        if on_batch is not None:
            on_batch(Progress(n_done, len(samples), protocol.rounds, 0))
        for start in range(0, len(samples), cfg.batch_size):
            stop = min(start + cfg.batch_size, len(samples))
            if done[start:stop].all():
                continue
            batch = samples[start:stop]

            def round_done(r: Any, n_done: int = n_done, size: int = len(batch)) -> None:
                if on_batch is not None:
                    on_batch(Progress(n_done, len(samples), protocol.rounds, sum(map(len, r.response_ids)), size, r.round))

            res = run_batch(model, task, protocol, batch, sites, cfg.seed, on_round=round_done, round_extras=extras,
                            interventions=cfg.interventions, lookup=cfg.lookup)
            if writer is None:
                writer = creating.result()  # raises what creating it raised
            arrays = batch_arrays(res, gold[start:stop], writer.n_options)
            writer.write_batch(start, arrays, res.activations, res.transcripts)
            n_done += len(batch)
            if on_batch is not None:
                new_tokens = sum(len(ids) for per in res.response_ids for ids in per)
                on_batch(Progress(n_done, len(samples), protocol.rounds, new_tokens))
        if writer is None:
            writer = creating.result()
        writer.finish()
    finally:
        if writer is None and creating is not None:  # a batch failed while the file was being created
            try:
                writer = creating.result()
            except Exception:  # the batch's error is the one to report
                writer = None
        if writer is not None:
            writer.close()
    if plan is not None and out.exists():
        from workbench.store.merge import merge_when_complete

        merged = merge_when_complete(Path(cfg.out), plan.count, overwrite=cfg.overwrite)
        if on_merge is not None:
            on_merge(merged.message)
        if merged.action != "waiting":
            return RunFile(cfg.out)
    return RunFile(out)

