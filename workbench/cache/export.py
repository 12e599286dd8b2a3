"""``workbench export``: every token's activations for chosen hooks, recomputed from a run's final transcripts.

The model is causal, so one forward pass over a sample's final transcript holds every round's
tokens exactly as each round saw them (DESIGN §3); the export makes that one pass per batch.
Hooks are picked by glob patterns over the TransformerBridge's hook names. Hooks at a Hugging
Face module boundary (``hook_resid_post``, ``hook_attn_out``, …; see :mod:`workbench.engine.capture`) are
read from the plain HF model's own pass; as soon as one chosen hook lives inside a module
(``attn.hook_pattern``, ``attn.hook_z``, …) the batch goes through the bridge instead, once, for all
of them. Inside the hooks only the chosen tokens are kept, cast and moved to the CPU at once, so
memory is one batch of chosen tokens.

Writing (docs/CACHE.md, :mod:`workbench.cache.writer`): the token count is known before the first
forward (the run holds every final transcript), so the cache file is created up front in
``OUT.parts/`` with its token labels and metadata written and every activation dataset allocated;
each batch's rows are then written once, straight into place. Progress is recorded after each batch
by an empty ``done-A-B.{boot}`` name, safe against the process dying (its writes are in the page
cache) but not trusted after the machine restarts; with ``fsync=True`` (``--fsync``) by an fsync,
then a durable ``done-A-B`` name, at most once a second. ``--resume`` computes only the unfinished
batches (batches are fixed by sample order: the result is bit-identical to an uninterrupted
export). At the end the file is renamed onto ``OUT`` (fsynced first with ``fsync=True``).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fnmatch
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import typer

from workbench.cache.file import ROLES, HookLayout, TokenTable, create_cache_file, is_attention_map
from workbench.store.durability import atomic_replace, fsync_path
from workbench.store.reader import decoded_attrs
from workbench.store.trust import refuse_symlinks, refuse_symlinks_in
from workbench.cache.writer import PartialCache, done_batches, is_durable
from workbench.errors import WorkbenchError, parse_int_list

FORMATS = ("hdf5", "saelens")
EXPORT_DTYPES = ("auto", "float32", "float16")


@dataclass(frozen=True)
class ExportPlan:
    """What an export computes, fixed before the first batch (a resumed export must match it)."""

    run_file: str
    run_digest: str
    rows: list[int]  # run-file rows exported, in order
    sample_index: list[int]  # their stable global indices
    rounds: list[int] | None  # 0-based; None: all
    roles: list[str]
    hooks: list[str]
    dtype: str
    batch_size: int
    key_length: int  # the key axis of attention maps: the longest chosen transcript
    batch_tokens: list[int]  # chosen tokens per batch

    @property
    def n_batches(self) -> int:
        return len(self.batch_tokens)

    def batch_rows(self, k: int) -> list[int]:
        return self.rows[k * self.batch_size : (k + 1) * self.batch_size]


# --------------------------------------------------------------------------- the run's tokens


def token_labels(length: int, prompt_span: np.ndarray, response_span: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round and role of every position of one transcript.

    prompt_span, response_span ``[R, 2]`` → (round ``[length]`` int16, role ``[length]`` uint8 index
    into ``ROLES``): a round's prompt span is ``prompt``, its response span ``response``; what
    follows the last response (the chat template's closing text) is ``template`` of the last round."""
    rounds = np.full(length, -1, dtype=np.int16)
    roles = np.full(length, ROLES.index("template"), dtype=np.uint8)
    for t, ((ps, pe), (rs, re_)) in enumerate(zip(prompt_span, response_span)):
        rounds[ps:pe], roles[ps:pe] = t, ROLES.index("prompt")
        rounds[rs:re_], roles[rs:re_] = t, ROLES.index("response")
    end = int(max(prompt_span[:, 1].max(), response_span[:, 1].max())) if len(prompt_span) else 0
    rounds[end:] = len(prompt_span) - 1
    return rounds, roles


def _chosen(rounds: np.ndarray, roles: np.ndarray, want_rounds: list[int] | None, want_roles: list[str]) -> np.ndarray:
    keep = np.isin(roles, [ROLES.index(r) for r in want_roles])
    if want_rounds is not None:
        keep &= np.isin(rounds, want_rounds)
    return np.flatnonzero(keep)


@dataclass(frozen=True)
class RunTokens:
    """The done samples of a run file: transcripts and spans, read once."""

    meta: dict[str, Any]
    rows: np.ndarray  # [n_done] run-file rows
    index: np.ndarray  # [n_done] stable global sample index
    transcripts: list[np.ndarray]  # [n_done][len] int32
    prompt_span: np.ndarray  # [n_done, R, 2]
    response_span: np.ndarray  # [n_done, R, 2]
    digest: str


def read_run(path: Path) -> RunTokens:
    """Transcripts, spans and metadata of the run's finished samples (through ``RunFile``)."""
    from workbench.store.reader import RunFile

    with RunFile(path) as run:
        meta = run.meta
        rows = np.flatnonzero(run.done)
        transcripts = [np.asarray(t, dtype=np.int32) for t in run.array("transcripts/token_ids")]
        prompt_span = run.array("rounds/prompt_span")
        response_span = run.array("rounds/response_span")
        index = run.array("samples/index")
    h = hashlib.sha256()
    for part in (rows.astype(np.int64), prompt_span.astype(np.int64), response_span.astype(np.int64)):
        h.update(part.tobytes())
    for t in transcripts:
        h.update(np.int64(len(t)).tobytes() + t.tobytes())
    return RunTokens(meta, rows, np.asarray(index, dtype=np.int64), transcripts, prompt_span, response_span, h.hexdigest())


# --------------------------------------------------------------------------- hooks


def available_hooks(model: Any) -> dict[str, tuple[int, ...]]:
    """Every bridge hook that fires in a forward pass with one float value per position →
    its per-token shape (``(d_model,)``, ``(n_heads, d_head)``; attention maps ``(n_heads, 0)``,
    the key axis filled in later). From one bridge pass on a short text, twice in a batch (a value
    shared by the batch, such as the rotary tables ``[1, pos, d]``, is not per token)."""
    import torch

    seq = 5
    tokens = torch.tensor([model.tokenizer("hooks are listed from one short pass")["input_ids"][:seq]] * 2, device=model.device)
    seq = tokens.shape[1]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: True, return_type=None)
    found = {}
    for name, value in cache.items():
        if not value.is_floating_point() or value.ndim < 2 or value.shape[0] != 2:
            continue
        if is_attention_map(name):
            if value.ndim == 4 and value.shape[2] == value.shape[3] == seq:
                found[name] = (int(value.shape[1]), 0)
        elif value.shape[1] == seq:
            found[name] = tuple(int(x) for x in value.shape[2:])
    return found


def resolve_hooks(patterns: list[str], available: dict[str, tuple[int, ...]]) -> list[str]:
    """The hook names matched by glob ``patterns``, in the bridge's order. A pattern matching
    nothing raises one line naming the nearest valid names first."""
    if not patterns:
        raise WorkbenchError("--hooks is required, e.g. --hooks 'blocks.*.hook_resid_post' (workbench export RUN --list-hooks lists them)")
    names = list(available)
    chosen: set[str] = set()
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            nearest = difflib.get_close_matches(pattern, names, n=len(names), cutoff=0.0)
            shown = ", ".join(nearest[:12]) + (f", … ({len(names)} in all; --list-hooks lists them)" if len(nearest) > 12 else "")
            raise WorkbenchError(f"unknown hook {pattern!r}: it matches none of the model's hooks (nearest: {shown})")
        chosen.update(hits)
    return [n for n in names if n in chosen]


def hook_aliases(model: Any) -> dict[str, str]:
    """alias → canonical name of every bridge hook name that is another name of a hook point:
    TransformerLens 4 keeps the legacy names (``blocks.0.hook_resid_post``, ``blocks.0.attn.hook_z``)
    as aliases of its own (``blocks.0.hook_out``, ``blocks.0.attn.o.hook_in``); both fire with one tensor."""
    out = {}
    for name, point in model.bridge.hook_dict.items():
        canonical = getattr(point, "name", None)
        if isinstance(canonical, str) and canonical and canonical != name:
            out[name] = canonical
    return out


def drop_aliases(names: list[str], aliases: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """``names`` without each alias whose canonical hook is chosen too (the same values twice) →
    (kept names, {dropped alias: its canonical name})."""
    chosen = set(names)
    dropped = {n: aliases[n] for n in names if aliases.get(n) in chosen}
    return [n for n in names if n not in dropped], dropped


_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hf_sites(model: Any, hooks: list[str]) -> dict[str, Any] | None:
    """hook name → :class:`workbench.engine.capture.HookSite` on the plain HF model, when every hook is
    at a module boundary whose value equals the bridge's; None when one is not (the bridge pass)."""
    from workbench.engine.capture import hook_sites

    by_hook: dict[str, list[int]] = {}
    for name in hooks:
        m = _BLOCK_HOOK.match(name)
        if m is None or is_attention_map(name):
            return None
        by_hook.setdefault(m.group(2), []).append(int(m.group(1)))
    sites = {}
    for hook, layers in by_hook.items():
        try:
            for site in hook_sites(model, [hook], sorted(layers)):
                sites[f"blocks.{site.layer}.{hook}"] = site
        except WorkbenchError:
            return None
    return sites


# --------------------------------------------------------------------------- one batch


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def batch_activations(
    model: Any,
    transcripts: list[np.ndarray],
    chosen: list[np.ndarray],
    hooks: list[str],
    sites: dict[str, Any] | None,
    dtype: str,
    key_length: int,
) -> dict[str, np.ndarray]:
    """One forward pass over right-padded transcripts; each hook's value at the chosen positions.

    transcripts ``[B][len_i]``, chosen ``[B][n_i]`` positions → ``{hook: [Σ n_i, *per_token]}`` in
    ``dtype``, samples in order; attention maps ``[Σ n_i, n_heads, key_length]``, zero past each
    sample's own length. ``sites`` (from :func:`hf_sites`): read from the HF model's own pass."""
    import torch

    from workbench.engine.generation import pad

    device = model.device
    ids, _ = pad([t.tolist() for t in transcripts], model.tokenizer.pad_token_id, device, "right")
    b_idx = torch.from_numpy(np.repeat(np.arange(len(chosen)), [len(c) for c in chosen])).to(device)
    p_idx = torch.from_numpy(np.concatenate(chosen).astype(np.int64)).to(device)
    out_dtype = _torch_dtype(dtype)
    got: dict[str, np.ndarray] = {}

    def keep(name: str, act: torch.Tensor) -> None:
        if is_attention_map(name):  # [batch, head, q, k] → [tokens, head, key_length]
            rows = act.transpose(1, 2)[b_idx, p_idx]
            rows = torch.nn.functional.pad(rows, (0, key_length - rows.shape[-1]))
        else:
            rows = act[b_idx, p_idx]
        got[name] = rows.to(out_dtype).cpu().numpy()

    with torch.no_grad():
        if sites is not None:
            handles = []
            try:
                for name, site in sites.items():
                    module = model.hf.get_submodule(site.module)
                    if site.side == "input":
                        hook = functools.partial(lambda n, mod, args, kwargs: keep(n, args[0] if args else kwargs["hidden_states"]), name)
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                    else:
                        hook = functools.partial(lambda n, mod, args, output: keep(n, output[0] if isinstance(output, tuple) else output), name)
                        handles.append(module.register_forward_hook(hook))
                model.hf(input_ids=ids, logits_to_keep=1, use_cache=False)  # no KV cache to fill: one pass
            finally:
                for h in handles:
                    h.remove()
        else:
            layers = [_BLOCK_HOOK.match(n) for n in hooks]
            stop = max(int(m.group(1)) for m in layers) + 1 if all(layers) else None
            fwd = [(name, functools.partial(lambda n, act, hook: keep(n, act), name)) for name in hooks]
            with model.bridge.hooks(fwd_hooks=fwd):
                model.bridge(ids, return_type=None, stop_at_layer=stop)
    return got


# --------------------------------------------------------------------------- the parts folder


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # the disk is full, the quota is, or one file may not grow


def _refused_write(e: BaseException) -> int | None:
    """The errno of a write the file system refused for lack of room (``_REFUSED``); None for any other error."""
    from workbench.store.durability import os_errno

    code = os_errno(e)
    if code is None and "No space left" in str(e):
        code = errno.ENOSPC
    return code if code in _REFUSED else None


@contextlib.contextmanager
def _disk_full_is_one_line(where: Path, plan: ExportPlan | None, parts: Path) -> Iterator[None]:
    """A write the file system refuses (full disk, full quota, a file-size limit) becomes one line
    that says what is kept and what to do (h5py's tracebacks as it frees the failed file's objects
    dropped); other errors pass."""
    from workbench.store.failed_writes import quiet_failed_writes

    try:
        with quiet_failed_writes():
            yield
    except (OSError, RuntimeError) as e:  # h5py reports a failed write as either
        code = _refused_write(e)
        if code is None:
            raise
        from workbench.store.durability import free_space
        from workbench.store.failed_writes import skip_hdf5_teardown

        skip_hdf5_teardown()  # HDF5 may hold a dataset it could not close
        kept = len(done_batches(parts)) if parts.exists() else 0
        total = plan.n_batches if plan else "?"
        kept_text = f"{kept} of {total} batches are kept in {parts}"
        if code == errno.EFBIG:
            raise WorkbenchError(
                f"writing {where} failed: {os.strerror(code)} (the file system, or a `ulimit -f`, refuses one file "
                f"this large; the cache file is allocated at its full size); {kept_text}; lift the limit and run the "
                "same command with --resume, or export fewer hooks, rounds or samples (see --help)") from None
        what = "disk full" if code == errno.ENOSPC else "disk quota exceeded"
        raise WorkbenchError(f"{what} writing {where} ({free_space(where)} free there): {kept_text}; "
                             "free some space and run the same command with --resume") from None


# --------------------------------------------------------------------------- the export


def parse_rows(text: str | None, n_samples: int) -> list[int] | None:
    """``--samples``: ``A:B`` (a slice of run-file rows), ``A,B,C``, or None (all)."""
    if text is None:
        return None
    try:
        if ":" in text:
            lo, _, hi = text.partition(":")
            return list(range(*slice(int(lo) if lo else None, int(hi) if hi else None).indices(n_samples)))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WorkbenchError(f"--samples takes A:B or comma-separated run-file rows, not {text!r}") from None


def check_same_model(model: Any, meta: dict[str, Any], run_path: Path) -> None:
    """Refuse a run file made with another model than the loaded one."""
    ours = model.metadata()
    same_place = (ours["model_name"] == meta.get("model_name") == "organism") or (
        Path(str(meta.get("model_path", ""))).expanduser().resolve() == Path(ours["model_path"]).expanduser().resolve()
        if Path(str(meta.get("model_path", ""))).exists() else meta.get("model_path") == ours["model_path"])
    keys = ("model_class", "n_layers", "d_model")
    if not same_place or meta.get("model_revision", "") != ours["model_revision"] or any(meta.get(k) != ours[k] for k in keys):
        raise WorkbenchError(f"{run_path} was made with model {meta.get('model_name')!r} ({meta.get('model_path')}), "
                             f"not the loaded {ours['model_name']!r} ({ours['model_path']}); pass --model {meta.get('model_name')}")


def export_dtype(requested: str, model_dtype: str) -> str:
    """``auto``: the model's dtype when HDF5 has it, float32 for bfloat16 (exact)."""
    if requested not in EXPORT_DTYPES:
        raise WorkbenchError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {requested!r}")
    if requested == "auto":
        return model_dtype if model_dtype in ("float32", "float16") else "float32"
    return requested


def plan_export(run: RunTokens, run_path: Path, hooks: list[str], rows: list[int] | None, rounds: list[int] | None,
                roles: list[str], dtype: str, batch_size: int) -> tuple[ExportPlan, list[np.ndarray]]:
    """The fixed plan and, per exported sample, its chosen positions."""
    n_rounds = run.prompt_span.shape[1] if len(run.prompt_span) else int(run.meta.get("n_rounds", 0))
    bad = [r for r in roles if r not in ROLES[:3]]
    if bad:
        raise WorkbenchError(f"--roles: unknown role {bad[0]!r} (roles: {', '.join(ROLES[:3])})")
    if rounds is not None and any(not 0 <= r < n_rounds for r in rounds):
        raise WorkbenchError(f"--rounds: the run has rounds 1..{n_rounds}")
    if batch_size < 1:
        raise WorkbenchError("--batch-size must be at least 1")
    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    if rows is None:
        rows = [int(r) for r in run.rows]
    n_samples = int(run.meta.get("n_samples", len(run.rows)))
    outside = [r for r in rows if not 0 <= r < n_samples]
    if outside:
        raise WorkbenchError(f"--samples: row {outside[0]} is out of range (the run has rows 0..{n_samples - 1})")
    not_done = [r for r in rows if r not in position_of_row]
    if not_done:
        raise WorkbenchError(f"--samples: row {not_done[0]} is not finished in {run_path} ({len(not_done)} rows are not)")
    chosen = []
    for r in rows:
        i = position_of_row[r]
        rnd, role = token_labels(len(run.transcripts[i]), run.prompt_span[i], run.response_span[i])
        chosen.append(_chosen(rnd, role, rounds, roles))
    if not sum(len(c) for c in chosen):
        raise WorkbenchError("the selection (--samples, --rounds, --roles) holds no tokens")
    lengths = [len(run.transcripts[position_of_row[r]]) for r in rows]
    batch_tokens = [int(sum(len(c) for c in chosen[k : k + batch_size])) for k in range(0, len(rows), batch_size)]
    plan = ExportPlan(
        run_file=str(run_path), run_digest=run.digest, rows=rows,
        sample_index=[int(run.index[position_of_row[r]]) for r in rows], rounds=rounds, roles=list(roles),
        hooks=hooks, dtype=dtype, batch_size=batch_size, key_length=max(lengths), batch_tokens=batch_tokens,
    )
    return plan, chosen


def _token_table(run: RunTokens, plan: ExportPlan, chosen: list[np.ndarray], tokenizer: Any) -> TokenTable:
    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    sample, rnd, role, position, ids = [], [], [], [], []
    for r, c in zip(plan.rows, chosen):
        i = position_of_row[r]
        rr, ro = token_labels(len(run.transcripts[i]), run.prompt_span[i], run.response_span[i])
        sample.append(np.full(len(c), r, dtype=np.int32))
        rnd.append(rr[c])
        role.append(ro[c])
        position.append(c.astype(np.int32))
        ids.append(run.transcripts[i][c])
    token_id = np.concatenate(ids)
    strings = {int(u): tokenizer.decode([int(u)]) for u in np.unique(token_id)}
    return TokenTable(
        offsets=np.concatenate([[0], np.cumsum([len(c) for c in chosen])]).astype(np.int64),
        sample=np.concatenate(sample), round=np.concatenate(rnd), role=np.concatenate(role),
        position=np.concatenate(position), token_id=token_id, token_str=[strings[int(u)] for u in token_id],
    )


def export_run(
    run_path: str | Path,
    out: str | Path,
    hooks: list[str],
    model: Any = None,
    rows: list[int] | None = None,
    rounds: list[int] | None = None,
    roles: tuple[str, ...] = ROLES[:3],
    dtype: str = "auto",
    batch_size: int = 16,
    format: str = "hdf5",
    context_size: int = 128,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
    fsync: bool = False,
) -> Path:
    """Export every chosen token's activations of a run into ``out``; returns ``out``.

    ``hooks`` are glob patterns over the bridge's hook names; ``rows`` run-file rows (default: every
    finished sample); ``rounds`` 0-based (default all); ``roles`` among prompt/response/template.
    ``model``: a loaded model or a name to load (default: the run's own; it must be the run's model). ``format``: ``hdf5`` (docs/CACHE.md) or
    ``saelens`` (a Hugging Face ``datasets`` folder, :mod:`workbench.cache.saelens`).
    ``on_batch(done_tokens, total_tokens)`` is called once before the first batch and after each.
    ``fsync``: durable against a power cut (fsynced commits at most once a second, ``out`` fsynced
    before its rename); by default safe against the process dying only, with no fsync (docs/CACHE.md)."""
    from workbench.engine.models import load_model

    run_path, out = Path(run_path), Path(out)
    if not hooks:
        resolve_hooks([], {})  # the one-line "--hooks is required", before a model is loaded
    if format not in FORMATS:
        raise WorkbenchError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if format == "saelens":
        from workbench.cache.saelens import check_saelens_ready

        check_saelens_ready(context_size)
    parts = _parts_dir(out)
    refuse_symlinks(out)
    refuse_symlinks_in(parts)
    if resume and overwrite:
        raise WorkbenchError("--resume and --overwrite exclude each other (--resume continues OUT.parts, --overwrite starts over)")
    if out.resolve() == run_path.resolve() or (out.exists() and run_path.exists() and os.path.samefile(out, run_path)):
        raise WorkbenchError(f"--out {out} is the run being exported: give the cache another path")
    if out.exists() and not overwrite:
        raise WorkbenchError(f"{out} already exists (use --overwrite to replace it)")
    if parts.exists() and not (resume or overwrite):
        raise WorkbenchError(f"{parts} holds an interrupted export: continue it with --resume, or start over with --overwrite")
    run = read_run(run_path)
    if not len(run.rows):
        raise WorkbenchError(f"{run_path} has no finished samples to export")
    meta = run.meta
    if model is None or isinstance(model, str):
        model = load_model(model or str(meta.get("model_name", "organism")), device=device,
                           dtype=str(meta.get("model_dtype", "auto")), revision=meta.get("model_revision") or None)
    check_same_model(model, meta, run_path)
    shapes = available_hooks(model)
    names, merged = drop_aliases(resolve_hooks(list(hooks), shapes), hook_aliases(model))
    if format == "saelens":
        from workbench.cache.saelens import check_saelens_hooks

        check_saelens_hooks(names)
    plan, chosen = plan_export(run, run_path, names, rows, rounds, list(roles), export_dtype(dtype, model.dtype), batch_size)
    manifest = {"plan": asdict(plan), "model": model.metadata()}
    manifest["plan"].pop("run_file")
    durable = is_durable(fsync)
    if overwrite:
        shutil.rmtree(parts, ignore_errors=True)
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink(missing_ok=True)
    with _disk_full_is_one_line(parts, plan, parts):
        _start_or_check_parts(parts, manifest, durable)
    tokens = _token_table(run, plan, chosen, model.tokenizer)
    layouts = [HookLayout(name, (shapes[name][0], plan.key_length) if is_attention_map(name) else shapes[name], plan.dtype)
               for name in names]
    attrs = _cache_attrs(meta, model, plan)
    if merged:
        attrs["hook_aliases"] = merged

    def create(path: Path) -> list:
        return create_cache_file(path, attrs, tokens, layouts, samples=np.asarray(plan.rows),
                                 sample_index=np.asarray(plan.sample_index), status="running")

    sites = hf_sites(model, names)
    position_of_row = {int(r): i for i, r in enumerate(run.rows)}
    total = tokens.n_tokens
    with _disk_full_is_one_line(parts, plan, parts), PartialCache.open(parts, plan.batch_tokens, create, durable=durable) as cache:
        if on_batch:
            on_batch(cache.done_tokens, total)
        for k in cache.missing:
            batch_rows = plan.batch_rows(k)
            first = k * plan.batch_size
            arrays = batch_activations(model, [run.transcripts[position_of_row[r]] for r in batch_rows],
                                       chosen[first : first + len(batch_rows)], names, sites, plan.dtype, plan.key_length)
            cache.write(k, arrays)
            if on_batch:
                on_batch(cache.written_tokens, total)
        if format == "saelens":
            from workbench.cache.saelens import write_saelens

            cache.commit()
            write_saelens(out, attrs, tokens, layouts, cache.blocks(), context_size, fsync=durable)
        else:
            cache.finish(out)
    shutil.rmtree(parts, ignore_errors=True)
    return out


def finished_export(out: Path) -> bool:
    """Whether ``out`` is a complete cache file that the interrupted export in ``OUT.parts`` (if any)
    was writing: the same run digest and hooks (an export killed after its final rename leaves
    both). Reads attributes only."""
    from workbench.cache.file import is_cache_file, open_cache_file

    if not is_cache_file(out):
        return False
    try:
        with open_cache_file(out) as f:
            attrs = decoded_attrs(f.attrs)
    except WorkbenchError:
        return False
    try:
        plan = json.loads((_parts_dir(out) / "manifest.json").read_text())["plan"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return plan.get("run_digest") == attrs.get("run_digest") and list(plan.get("hooks", [])) == list(attrs.get("hooks", []))


def _start_or_check_parts(parts: Path, manifest: dict[str, Any], fsync: bool) -> None:
    """Create ``parts`` with its manifest, or check that an interrupted export's is this one's.
    A manifest that is missing or unreadable while no batch counts (a kill before it was in place,
    or a restart after it was written without fsync) is written anew."""
    path = parts / "manifest.json"
    if parts.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError):
            have = None
        if have is not None or done_batches(parts):
            if have != json.loads(json.dumps(manifest)):
                raise WorkbenchError(f"--resume: {parts} was started with other settings (run, hooks, selection, dtype, batch size or model)")
            if fsync:
                fsync_path(path)  # it may have been written without: the durable commits rely on it
            return
    parts.mkdir(parents=True, exist_ok=True)
    tmp = parts / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    if fsync:
        atomic_replace(tmp, path)
    else:
        tmp.replace(path)


def _cache_attrs(meta: dict[str, Any], model: Any, plan: ExportPlan) -> dict[str, Any]:
    from workbench.version import __version__

    attrs: dict[str, Any] = {"source": "workbench export", "workbench_version": __version__, **model.metadata()}
    attrs.update({
        "activation_dtype": plan.dtype,
        "run_file": plan.run_file,
        "run_digest": plan.run_digest,
        "run_model_dtype": str(meta.get("model_dtype", "")),
        "n_rounds": int(meta.get("n_rounds", 0)),
        "selection": {"rounds": plan.rounds, "roles": plan.roles},  # the rows are samples/sample
        "batch_size": plan.batch_size,
        "key_length": plan.key_length,
    })
    if model.dtype != plan.dtype:
        exact = model.dtype in ("bfloat16", "float16") and plan.dtype == "float32"
        attrs["dtype_note"] = (f"the model computes in {model.dtype}; activations are stored as {plan.dtype} "
                               f"({'exactly' if exact else 'rounded'}; HDF5 has no bfloat16)")
    return attrs


# --------------------------------------------------------------------------- the command




def export_command(
    run_path: Path = typer.Argument(..., help="A run file written by `workbench run`."),
    hooks: list[str] = typer.Option([], "--hooks", metavar="PATTERN", help="Hook names or glob patterns over the TransformerBridge's hooks, e.g. 'blocks.*.hook_resid_post', 'blocks.3.attn.hook_z', 'blocks.*.attn.hook_pattern' (repeatable; commas also separate)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Cache file to write (HDF5), or a folder for --format saelens. Default: beside the run, RUN-cache.h5."),
    rounds: Optional[str] = typer.Option(None, help="Comma-separated rounds to keep, 1-based (default: all)."),
    samples: Optional[str] = typer.Option(None, help="Run-file rows to keep: A:B or A,B,C (default: every finished sample)."),
    roles: str = typer.Option("prompt,response,template", help="Token roles to keep: prompt (user turn, assistant header and prefix), response (generated), template (the closing text)."),
    dtype: str = typer.Option("auto", help="Stored dtype: auto (the model's; float32 for bfloat16), float32 or float16."),
    format: str = typer.Option("hdf5", "--format", help="hdf5 (docs/CACHE.md) or saelens (a datasets folder SAELens' ActivationsStore reads)."),
    context_size: int = typer.Option(128, help="--format saelens: tokens per window."),
    batch_size: int = typer.Option(16, help="Samples per forward pass."),
    model: Optional[str] = typer.Option(None, help="Model to load (default: the run's own); must be the run's model."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or mps."),
    resume: bool = typer.Option(False, help="Continue an interrupted export (its OUT.parts folder)."),
    overwrite: bool = typer.Option(False, help="Replace an existing OUT (and any interrupted export of it)."),
    fsync: bool = typer.Option(False, "--fsync/--no-fsync", help="--fsync: make the export durable against a power cut: fsync its progress at most once a second and OUT before it is renamed into place (the disk's speed then bounds the export). Without it the export, like numpy.save, is safe against the process dying (kill, Ctrl-C, a full disk: --resume continues it) but not against a power cut: an OUT finished less than about 30 s before one may be incomplete, and an interrupted export is recomputed from the start."),
    list_hooks: bool = typer.Option(False, "--list-hooks", help="Print the hook names the model has, with their per-token shapes (and which are legacy aliases of another), and exit."),
) -> None:
    """Export every token's activations for chosen hooks, recomputed from the run's final transcripts (one pass per batch)."""
    from workbench.store.reader import RunFile

    with RunFile(run_path) as run:
        meta = run.meta
        running, n_done = run.running, int(run.done.sum())
    if list_hooks:
        from workbench.engine.models import load_model

        loaded = load_model(model or str(meta.get("model_name", "organism")), device=device,
                            dtype=str(meta.get("model_dtype", "auto")), revision=meta.get("model_revision") or None)
        aliases = hook_aliases(loaded)
        for name, shape in available_hooks(loaded).items():
            alias = f"  (alias of {aliases[name]})" if name in aliases else ""
            print(f"{name}  {list(shape) if not is_attention_map(name) else [shape[0], 'key_pos']}{alias}")
        return
    patterns = [p.strip() for h in hooks for p in h.split(",") if p.strip()]
    out = out or run_path.with_name(run_path.stem + ("-saelens" if format == "saelens" else "-cache.h5"))
    if resume and not overwrite and out.exists() and finished_export(out):
        refuse_symlinks(_parts_dir(out))
        shutil.rmtree(_parts_dir(out), ignore_errors=True)
        print(f"{out} is complete already (the export finished before it was stopped): nothing left to do", file=sys.stderr)
        return
    if running:
        print(f"note: {run_path} is not finished (still running, or stopped before its end): exporting the {n_done} of "
              f"{meta.get('n_samples')} samples finished so far (export again once it has finished for the rest)", file=sys.stderr)
    wanted_rounds = parse_int_list(rounds, "--rounds")
    with _Progress() as reporter:
        export_run(run_path, out, patterns, model=model, rows=parse_rows(samples, int(meta.get("n_samples", 0))),
                   rounds=None if wanted_rounds is None else [r - 1 for r in wanted_rounds],
                   roles=tuple(r.strip() for r in roles.split(",") if r.strip()), dtype=dtype, batch_size=batch_size,
                   format=format, context_size=context_size, device=device, resume=resume, overwrite=overwrite,
                   on_batch=reporter.update, fsync=fsync)
    print(f"wrote {out}", file=sys.stderr)


class _Progress:
    """A rich progress bar over tokens on a terminal; a plain line per batch otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.task: Any = None
        self.t0 = time.perf_counter()
        self.first: int | None = None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, done: int, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.first is None:  # the model is loaded and the finished parts counted: start the clock
            self.t0, self.first = time.perf_counter(), done
        speed = f"{(done - self.first) / max(1e-9, time.perf_counter() - self.t0):.0f} tok/s"
        console = Console(stderr=True)
        if not console.is_terminal:
            print(f"exported {done}/{total} tokens ({speed})", file=sys.stderr, flush=True)
            return
        if self.bar is None:
            self.bar = Progress(TextColumn("[bold]tokens"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[speed]}"),
                                TimeRemainingColumn(), console=console)
            self.bar.start()
            self.task = self.bar.add_task("export", total=total, completed=done, speed="")
        else:
            self.bar.update(self.task, completed=done, speed=speed)
