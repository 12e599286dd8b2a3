"""Running a protocol over a dataset into a run file: the one function a notebook needs.

    from workbench import run_protocol
    run = run_protocol(model="organism", task="organism", limit=64, out="artifacts/runs/demo.h5")
    run.array("rounds/correct").mean(0)     # accuracy per round

Batches are fixed by sample index (``[k·B, (k+1)·B)``), so a resumed run recomputes exactly the
batches that were missing, with the same padding and seeds, and gives identical arrays.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError
from workbench.store import RunFile, RunWriter, SampleTable


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
    limit: int | None = None
    offset: int = 0
    protocol: str = "organism"
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
    seed: int = 0
    do_sample: bool | None = None
    max_new_tokens: int | None = None
    resume: bool = False
    overwrite: bool = False


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
    from workbench import tasks

    if cfg.task == "bbq":
        if not cfg.data:
            raise WorkbenchError("--task bbq needs --data FILE.jsonl (BBQ files as published)")
        return tasks.load_bbq([Path(p) for p in cfg.data], cfg.condition, cfg.category, cfg.offset, cfg.limit)
    if cfg.task == "prompts":
        if len(cfg.data) != 1:
            raise WorkbenchError("--task prompts needs one --data FILE.jsonl")
        return tasks.load_prompts(Path(cfg.data[0]), cfg.prompt_field, cfg.offset, cfg.limit)
    if cfg.task == "organism":
        from workbench.organism.task import load_organism_samples

        return load_organism_samples(limit=cfg.limit or 64, offset=cfg.offset)
    tasks.get_task(cfg.task)  # raises the clean error for unknown tasks
    raise AssertionError(cfg.task)


def _sample_table(samples: list[Any]) -> SampleTable:
    return SampleTable(
        index=[s.index for s in samples],
        id=[s.id for s in samples],
        context=[s.context for s in samples],
        question=[s.question for s in samples],
        options=[tuple(s.options) for s in samples],
        gold=[s.gold for s in samples],
        category=[s.category for s in samples],
        condition=[s.condition for s in samples],
        extra=[json.dumps(s.extra, ensure_ascii=False, sort_keys=True) for s in samples],
    )


def _data_fingerprint(samples: list[Any]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.index, s.id, s.context, s.question, list(s.options), s.gold], ensure_ascii=False).encode())
    return h.hexdigest()[:16]


def run_protocol(
    config: RunConfig | None = None,
    model: Any = None,
    on_batch: Callable[[Progress], None] | None = None,
    **kwargs: Any,
) -> RunFile:
    """Run a protocol over a dataset into ``config.out`` and return the finished run file (read-only).

    Give a :class:`RunConfig` or its fields as keyword arguments. ``model`` may be an already
    loaded :class:`workbench.models.LoadedModel` (saves loading it again in a notebook).
    ``on_batch`` is called with a :class:`Progress` before the first batch, after every round and
    after every written batch.
    """
    from dataclasses import replace

    from workbench.capture import check_layers, hook_sites
    from workbench.engine import batch_arrays, run_batch
    from workbench.models import load_model
    from workbench.protocol import load_protocol
    from workbench.tasks import get_task

    cfg = config if config is not None else RunConfig(**kwargs)
    if config is not None and kwargs:
        cfg = replace(cfg, **kwargs)
    out = Path(cfg.out)
    if cfg.batch_size < 1:
        raise WorkbenchError("--batch-size must be ≥ 1")
    task = get_task(cfg.task)
    protocol = load_protocol(cfg.protocol, cfg.rounds, cfg.inject)
    decoding = protocol.decoding
    if cfg.do_sample is not None or cfg.max_new_tokens is not None:
        decoding = replace(
            decoding,
            do_sample=decoding.do_sample if cfg.do_sample is None else cfg.do_sample,
            max_new_tokens=decoding.max_new_tokens if cfg.max_new_tokens is None else cfg.max_new_tokens,
        )
        protocol = replace(protocol, decoding=decoding)
    samples = load_samples(cfg)
    if out.exists() and not cfg.resume:
        if not cfg.overwrite:
            raise WorkbenchError(f"{out} already exists (use --resume to continue it, or --overwrite)")
        out.unlink()
    if cfg.activation_dtype not in ("float32", "float16"):
        raise WorkbenchError("--activation-dtype must be float32 or float16")
    if model is None:
        model = load_model(cfg.model, cfg.device, cfg.dtype, cfg.revision, cfg.trust_remote_code)
    layers = check_layers(list(cfg.layers) if cfg.layers is not None else None, model.n_layers)
    sites = hook_sites(model, list(cfg.hooks), layers)
    settings = {
        **model.metadata(),
        "task": cfg.task,
        "data": {"files": [str(p) for p in cfg.data], "condition": cfg.condition, "category": cfg.category,
                 "offset": cfg.offset, "limit": cfg.limit, "fingerprint": _data_fingerprint(samples)},
        "protocol": json.loads(protocol.to_json()),
        "decoding": json.loads(json.dumps(protocol.decoding.__dict__)),
        "seed": cfg.seed,
        "hooks": list(cfg.hooks),
        "layers": layers,
        "batch_size": cfg.batch_size,
        "activation_dtype": cfg.activation_dtype,
        "n_samples": len(samples),
        "n_rounds": protocol.rounds,
        "device": model.device,
    }
    if cfg.resume and out.exists():
        writer = RunWriter.resume(out, settings)
    else:
        writer = RunWriter.create(out, settings, _sample_table(samples), protocol.rounds,
                                  {h: (len(layers), model.d_model) for h in cfg.hooks}, cfg.activation_dtype)
    gold = np.asarray([s.gold for s in samples])
    with writer:
        done = writer.done_mask()
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

            res = run_batch(model, task, protocol, batch, sites, cfg.seed, on_round=round_done)
            arrays = batch_arrays(res, gold[start:stop], int(writer.f.attrs["n_options"]))
            writer.write_batch(start, arrays, res.activations, res.transcripts)
            n_done += len(batch)
            if on_batch is not None:
                new_tokens = sum(len(ids) for per in res.response_ids for ids in per)
                on_batch(Progress(n_done, len(samples), protocol.rounds, new_tokens))
        writer.finish()
    return RunFile(out)

