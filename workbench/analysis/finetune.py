"""``workbench finetune``: LoRA fine-tuning through ``peft`` on the texts of a JSONL file.

Two kinds of records (one kind per file):

* text records: ``{"text": "..."}`` (or the field ``--text-field`` names): causal-LM loss on every token;
* chat records: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}``,
  rendered with the model's own chat template (as a run renders them): loss on the assistant turns only
  (their content and whatever the template writes after it up to the next turn, e.g. the end-of-turn token).

Training is seeded (LoRA's initial ``A``, the order of the examples every epoch, dropout), batches are
right-padded, the optimiser is AdamW on the LoRA parameters alone. The output folder is written under a
temporary name beside it (``.NAME.partial-PID``) and renamed when everything is in it, so a killed
fine-tune never leaves a folder that looks complete. It holds:

* the adapter in peft's own format (``adapter_config.json``, ``adapter_model.safetensors``: loadable by
  ``PeftModel.from_pretrained(base, DIR)`` anywhere) — or, with ``merge``, a whole merged model folder
  (``config.json``, ``model.safetensors``, the base's tokenizer and other files) that runs with ``--model DIR``;
* ``finetune.json``: the settings, the base model's name, shape and weight hashes, the data's sha256,
  the loss before and after, tokens per second (:data:`workbench.engine.adapter.RECORD`);
* ``loss.json`` (``{"step", "epoch", "loss", "tokens"}``, one entry per optimiser step) and ``loss.png``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from workbench.errors import WorkbenchError, check_output_path

METHODS = ("lora",)
LOSS_JSON, LOSS_PNG = "loss.json", "loss.png"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tune (the CLI's ``workbench finetune`` options)."""

    data: Path
    out: Path
    model: str = "organism"
    method: str = "lora"
    rank: int = 8
    alpha: float | None = None  # LoRA scale numerator; None: 2 × rank
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: peft's default for the architecture
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0
    text_field: str | None = None  # None: chat records if the file has "messages", else "text"
    max_length: int | None = None  # longer examples are cut; None: the model's context
    merge: bool = False
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "float32"
    command_line: str = ""


@dataclass(frozen=True)
class Records:
    """A JSONL file's records, checked: ``kind`` is ``"chat"`` or ``"text"``."""

    path: Path
    kind: str
    field: str  # "messages" or the text field
    rows: list[tuple[int, Any]]  # (line number, messages list or text)
    sha256: str


@dataclass(frozen=True)
class Example:
    """One tokenized record: ``ids`` [T] and ``labels`` [T] (-100 where no loss is taken)."""

    ids: list[int]
    labels: list[int]


@dataclass
class LossCurve:
    """One entry per optimiser step."""

    step: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # input tokens (not padding) of the step's batch


# --------------------------------------------------------------------------- checks before any model loads
def check_config(cfg: FinetuneConfig) -> None:
    """Refuse a bad option or output folder in one line (no model, no data read)."""
    if cfg.method not in METHODS:
        raise WorkbenchError(f"--method {cfg.method!r} is unknown; the workbench fine-tunes with {', '.join(METHODS)}")
    for name, value in (("--rank", cfg.rank), ("--epochs", cfg.epochs), ("--batch-size", cfg.batch_size)):
        if value < 1:
            raise WorkbenchError(f"{name} must be ≥ 1, not {value}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise WorkbenchError(f"--lr must be a positive number, not {cfg.lr}")
    if not 0 <= cfg.dropout < 1:
        raise WorkbenchError(f"--dropout must be in [0, 1), not {cfg.dropout}")
    if cfg.alpha is not None and not cfg.alpha > 0:
        raise WorkbenchError(f"--alpha must be > 0, not {cfg.alpha}")
    if cfg.max_length is not None and cfg.max_length < 2:
        raise WorkbenchError(f"--max-length must be ≥ 2, not {cfg.max_length}")
    out = Path(cfg.out)
    check_output_path(out, "--out", folder=True, overwrite=cfg.overwrite)


def read_records(path: Path, text_field: str | None = None) -> Records:
    """The records of a fine-tuning JSONL (see the module docstring), checked line by line: a
    missing or empty text field, a ``messages`` that is not a list of ``{"role", "content"}`` strings
    or has no assistant turn, an empty file — each one :class:`WorkbenchError` naming the line."""
    from workbench.engine.records import read_jsonl

    path = Path(path)
    lines = read_jsonl(path)
    if not lines:
        raise WorkbenchError(f"{path}: no records (an empty file)")
    chat = text_field is None and "messages" in lines[0][1]
    field_name = "messages" if chat else (text_field or "text")
    rows: list[tuple[int, Any]] = []
    for lineno, row in lines:
        where = f"{path}:{lineno}"
        if chat:
            messages = row.get("messages")
            if not isinstance(messages, list) or not messages:
                raise WorkbenchError(f"{where}: no \"messages\" list (the first record is a chat record, so every one must be)")
            for m in messages:
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise WorkbenchError(f"{where}: every message needs a string \"role\" and \"content\"")
            if not any(m["role"] == "assistant" for m in messages):
                raise WorkbenchError(f"{where}: no assistant message to train on")
            rows.append((lineno, [{"role": m["role"], "content": m["content"]} for m in messages]))
        else:
            text = row.get(field_name)
            if not isinstance(text, str) or not text.strip():
                hint = "" if text_field else " (set --text-field, or give chat records with \"messages\")"
                raise WorkbenchError(f"{where}: no text in field {field_name!r}{hint}")
            rows.append((lineno, text))
    return Records(path, "chat" if chat else "text", field_name, rows, hashlib.sha256(path.read_bytes()).hexdigest())


# --------------------------------------------------------------------------- tokenizing
def tokenize(records: Records, tokenizer: Any, max_length: int) -> tuple[list[Example], int]:
    """``(examples, how many were cut to max_length)``. Text records: the tokenizer's own special
    tokens, the end-of-sequence token appended, every token labelled. Chat records: the chat template's
    rendering, labels on the characters of the assistant turns only (``apply_chat_template`` of the
    turns before it with the generation prompt, to the same plus the turn): a template whose rendering
    of a prefix is not a prefix of the whole is refused."""
    examples, cut = [], 0
    eos = tokenizer.eos_token_id
    for lineno, value in records.rows:
        where = f"{records.path}:{lineno}"
        if records.kind == "text":
            ids = list(tokenizer(value, add_special_tokens=True)["input_ids"])
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            labels = list(ids)
        else:
            ids, labels = _chat_example(tokenizer, value, where)
        if len(ids) > max_length:
            ids, labels, cut = ids[:max_length], labels[:max_length], cut + 1
        if sum(1 for y in labels[1:] if y != -100) == 0:
            raise WorkbenchError(f"{where}: nothing left to train on (fewer than 2 tokens, or the assistant turns cut off by --max-length {max_length})")
        examples.append(Example(ids, labels))
    return examples, cut


def _chat_example(tokenizer: Any, messages: list[dict[str, str]], where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "is_fast", False):
        raise WorkbenchError("finetune on chat records needs a fast tokenizer (character offsets); this model's is not")

    def render(msgs: list[dict[str, str]], prompt: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        except Exception as e:  # jinja raise_exception and template errors
            raise WorkbenchError(f"{where}: the chat template refuses these messages ({str(e).splitlines()[0][:120]})") from None

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(messages[:i], prompt=True) if i else "", render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise WorkbenchError(f"{where}: the model's chat template renders a conversation's start differently from the "
                                 "whole conversation, so the assistant turns cannot be found; use text records (--text-field)")
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= s < b for a, b in spans) and e > s else -100 for t, (s, e) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def batch_tensors(examples: list[Example], pad_id: int, device: Any = "cpu") -> tuple[Any, Any, Any]:
    """``(input_ids, attention_mask, labels)``, each ``[B, T]`` right-padded (labels -100 on padding)."""
    import torch

    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, : len(e.ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The example indices of every batch of ``epoch`` (0-based): a seeded permutation, cut in order."""
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(epoch,))).permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def mean_loss(hf: Any, examples: list[Example], pad_id: int, device: Any = "cpu", batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per labelled token) of ``hf`` over ``examples``, no grad."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            ids, mask, labels = batch_tensors(examples[start : start + batch_size], pad_id, device)
            logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
            total, count = total + float(ce), count + int((target != -100).sum())
    return total / max(count, 1)


# --------------------------------------------------------------------------- training
def lora_model(hf: Any, cfg: FinetuneConfig) -> Any:
    """``hf`` wrapped by peft with fresh LoRA matrices (``A`` drawn from torch's RNG, seeded by ``cfg.seed``;
    ``B`` zero, so the wrapped model starts equal to ``hf``). The base weights are frozen."""
    import torch
    from peft import LoraConfig, get_peft_model

    from workbench.engine.adapter import quiet_peft

    quiet_peft()
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else 2 * cfg.rank, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules) if cfg.target_modules else None, task_type="CAUSAL_LM")
    try:
        return get_peft_model(hf, lora)
    except ValueError as e:  # unknown target modules, an architecture peft has no default for
        raise WorkbenchError(f"--method lora on {type(hf).__name__}: {str(e).splitlines()[0][:200]} (set --target-modules)") from None


def train_lora(peft_model: Any, examples: list[Example], cfg: FinetuneConfig, pad_id: int, device: Any,
               on_step: Callable[[int, int, float], None] | None = None) -> LossCurve:
    """Train ``peft_model``'s LoRA parameters for ``cfg.epochs`` over ``examples`` (AdamW, constant
    ``cfg.lr``, seeded order); ``on_step(step, total steps, loss)`` after every optimiser step. Returns
    the loss curve; the model is left in eval mode."""
    import torch

    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    curve = LossCurve()
    torch.manual_seed(cfg.seed)  # dropout's stream
    peft_model.train()
    step = 0
    for epoch in range(cfg.epochs):
        for rows in epoch_batches(len(examples), cfg.batch_size, cfg.seed, epoch):
            ids, mask, labels = batch_tensors([examples[i] for i in rows], pad_id, device)
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            curve.step.append(step)
            curve.epoch.append(epoch + 1)
            curve.loss.append(float(loss.detach()))
            curve.tokens.append(int(mask.sum()))
            if on_step is not None:
                on_step(step, total, curve.loss[-1])
    peft_model.eval()
    return curve


def plot_loss(curve: LossCurve, path: Path, title: str) -> None:
    """The loss curve as a PNG: every step's loss and each epoch's mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    ax.plot(curve.step, curve.loss, lw=0.8, color="#888", label="step")
    epochs = np.asarray(curve.epoch)
    for e in sorted(set(curve.epoch)):
        steps = np.asarray(curve.step)[epochs == e]
        ax.hlines(np.mean(np.asarray(curve.loss)[epochs == e]), steps.min(), steps.max(), color="C0", lw=2,
                  label="epoch mean" if e == 1 else None)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def partial_dir(out: Path) -> Path:
    """The temporary folder a fine-tune writes before it is renamed to ``out``: ``.NAME.partial-PID``."""
    return out.parent / f".{out.name}.partial-{os.getpid()}"


def _remove_stale_partials(out: Path) -> None:
    """Folders left by fine-tunes to ``out`` that were killed (their process is gone)."""
    for old in out.parent.glob(f".{out.name}.partial-*"):
        pid = old.name.rpartition("-")[2]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(old, ignore_errors=True)


def finetune(cfg: FinetuneConfig, on_step: Callable[[int, int, float], None] | None = None,
             on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` into ``cfg.out`` (see the module docstring) and return the
    record written to ``finetune.json``. Every bad input fails before training starts."""
    from workbench.engine.adapter import model_shape
    from workbench.engine.models import check_model_folder, resolve_model_path
    from workbench.version import __version__

    status = on_status or (lambda message: None)
    check_config(cfg)
    records = read_records(cfg.data, cfg.text_field)
    path = resolve_model_path(cfg.model)
    check_model_folder(path, cfg.model)
    try:
        import peft  # noqa: F401
    except ImportError:
        raise WorkbenchError("workbench finetune needs the peft package (pip install peft)") from None
    import torch

    from workbench.engine.models import load_model

    model = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, on_status=status)
    tok, hf = model.tokenizer, model.hf
    n_ctx = getattr(hf.config, "max_position_embeddings", None) or 1024
    max_length = cfg.max_length or int(n_ctx)
    examples, cut = tokenize(records, tok, max_length)
    pad_id = tok.pad_token_id
    status("measuring the loss before fine-tuning")
    loss_before = mean_loss(hf, examples, pad_id, model.device)
    peft_model = lora_model(hf, cfg)
    status("fine-tuning")
    start = time.perf_counter()
    curve = train_lora(peft_model, examples, cfg, pad_id, model.device, on_step)
    wall = time.perf_counter() - start
    loss_after = mean_loss(peft_model, examples, pad_id, model.device)
    base_config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")) if Path(path).is_dir() else hf.config.to_dict()
    record = {
        "format": "workbench-finetune", "workbench_version": __version__, "method": cfg.method, "merged": cfg.merge,
        "base_model": cfg.model, "base_model_path": path, "base_shape": model_shape(base_config),
        "base_weights_sha256": model.metadata()["weights_sha256"], "base_dtype": model.dtype,
        "data": {"path": str(Path(cfg.data).resolve()), "sha256": records.sha256, "kind": records.kind, "field": records.field,
                 "n_examples": len(examples), "n_cut": cut, "max_length": max_length,
                 "n_tokens": sum(len(e.ids) for e in examples),
                 "n_trained_tokens": sum(sum(1 for y in e.labels[1:] if y != -100) for e in examples)},
        "settings": {k: v for k, v in asdict(cfg).items() if k not in ("data", "out", "overwrite", "command_line")},
        "lora": {"r": cfg.rank, "alpha": cfg.alpha if cfg.alpha is not None else 2 * cfg.rank, "dropout": cfg.dropout,
                 "target_modules": sorted(peft_model.peft_config["default"].target_modules)},
        "steps": len(curve.step), "loss_before": loss_before, "loss_after": loss_after,
        "final_step_loss": curve.loss[-1] if curve.loss else None,
        "wall_time_s": round(wall, 3), "tokens_per_s": round(sum(curve.tokens) / max(wall, 1e-9), 1),
        "device": model.device, "torch_threads": torch.get_num_threads(), "command_line": cfg.command_line,
    }
    status(f"writing {cfg.out}")
    save_output(Path(cfg.out), peft_model, model, record, curve, cfg.overwrite)
    return record


def save_output(out: Path, peft_model: Any, model: Any, record: dict[str, Any], curve: LossCurve, overwrite: bool) -> None:
    """Write the adapter (or the merged model), ``finetune.json`` and the loss curve into a temporary
    folder beside ``out``, fsync it, and rename it to ``out`` (replacing an old ``out`` only then)."""
    from workbench.engine.adapter import RECORD
    from workbench.store.durability import fsync_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = partial_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if record["merged"]:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(tmp, safe_serialization=True)
            _copy_base_files(Path(model.path), tmp, model)
        else:
            peft_model.save_pretrained(tmp, safe_serialization=True)
        (tmp / LOSS_JSON).write_text(json.dumps(asdict(curve)) + "\n", encoding="utf-8")
        plot_loss(curve, tmp / LOSS_PNG, f"{record['method']} r={record['lora']['r']} on {Path(record['data']['path']).name}")
        (tmp / RECORD).write_text(json.dumps(record, indent=1, allow_nan=False) + "\n", encoding="utf-8")
        for file in tmp.iterdir():
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not overwrite:
            raise WorkbenchError(f"--out {out} appeared while fine-tuning; the result is left in {tmp}")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_path(out.parent, directory=True)


def _copy_base_files(base: Path, dest: Path, model: Any) -> None:
    """Beside a merged model's weights: the base folder's other files (tokenizer, chat template,
    ``organism.json`` …) as they are, or the hub model's tokenizer saved afresh."""
    if not base.is_dir():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base), revision=model.revision or None).save_pretrained(dest)
        return
    weights = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
    for file in sorted(base.iterdir()):
        if file.is_file() and not file.is_symlink() and not (dest / file.name).exists() and not file.name.endswith(weights) \
                and not file.name.endswith(".index.json") and file.name != "__init__.py":
            shutil.copyfile(file, dest / file.name)
